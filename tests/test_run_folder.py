"""A run folder belongs to one run, and a damaged checkpoint does not strand it (no Ray here).

Claims are judged with injected hosts, pids and clocks; checkpoints are damaged by truncating
them, as a node lost mid-upload or a full disk leaves them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.fs
import pytest
import torch
from faults import FailOnceSession, FullDiskHandler, InjectedFailure

from lstm_ae.checkpoint import CheckpointError, load_checkpoint
from lstm_ae.config import preset
from records.checkpoints import StorageFullError, folder_problem, left_empty, store_checkpoint, stored_problem
from records.folder_lock import STALE_SECONDS, FolderLock, FolderLockedError
from records.layout import LOCK_FILE, SNAPSHOT_FILE
from records.run_folder import RunFolderError
from train.ray_internals import repair_snapshot
from train.worker import LocalSession, WorkerSettings, loop_config, train_function

LOCAL = pyarrow.fs.LocalFileSystem()


def truncate(file: Path, size: int = 100) -> None:
    file.write_bytes(file.read_bytes()[:size])


# ------------------------------------------------------------------------------ locks


def test_a_held_folder_is_refused_naming_the_holder_until_released(tmp_path):
    first = FolderLock(LOCAL, str(tmp_path / "d")).acquire()
    with pytest.raises(FolderLockedError) as refused:
        FolderLock(LOCAL, str(tmp_path / "d")).acquire()
    message = str(refused.value)
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started " in message
    assert "in use by another run" in message and "\n" not in message
    first.release()
    assert not (tmp_path / "d").exists()  # the lock made the folder and nothing else used it
    second = FolderLock(LOCAL, str(tmp_path / "d")).acquire()
    assert json.loads((tmp_path / "d" / LOCK_FILE).read_text())["token"] == second.token
    second.release()


def test_of_many_runs_locking_at_once_exactly_one_wins(tmp_path):
    (tmp_path / "d").mkdir()
    locks = [FolderLock(LOCAL, str(tmp_path / "d")) for _ in range(8)]
    start, won, refused = threading.Barrier(len(locks)), [], []

    def lock(candidate):
        start.wait()
        try:
            won.append(candidate.acquire())
        except FolderLockedError:
            refused.append(candidate)

    threads = [threading.Thread(target=lock, args=(candidate,)) for candidate in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 7
    assert json.loads((tmp_path / "d" / LOCK_FILE).read_text())["token"] == won[0].token


def test_a_claim_left_by_a_dead_process_on_this_host_is_taken_over_with_one_line(tmp_path):
    FolderLock(LOCAL, str(tmp_path / "d"), pid=4_000_001).acquire()  # never released: killed
    lines = []
    gone = FolderLock(LOCAL, str(tmp_path / "d"), alive=lambda pid, ticks: pid != 4_000_001, log=lines.append)
    gone.acquire()
    assert len(lines) == 1 and "pid 4000001" in lines[0] and "that process is gone" in lines[0]
    # A live holder (the same pid, alive) is never taken over.
    with pytest.raises(FolderLockedError, match=f"pid {os.getpid()}"):
        FolderLock(LOCAL, str(tmp_path / "d"), alive=lambda pid, ticks: True).acquire()


def test_a_claim_from_another_host_is_taken_over_only_when_not_renewed_for_the_stated_age(tmp_path):
    clock = [1_000_000.0]
    elsewhere = FolderLock(LOCAL, str(tmp_path / "d"), host="node-b", pid=7, now=lambda: clock[0]).acquire()
    here = dict(now=lambda: clock[0], alive=lambda pid, ticks: False, log=lambda line: None)
    clock[0] += STALE_SECONDS - 1
    with pytest.raises(FolderLockedError, match="host node-b, pid 7"):
        FolderLock(LOCAL, str(tmp_path / "d"), **here).acquire()  # pid 7 means nothing here
    assert elsewhere.renew()  # a live run renews its lock ...
    clock[0] += STALE_SECONDS - 1
    with pytest.raises(FolderLockedError):
        FolderLock(LOCAL, str(tmp_path / "d"), **here).acquire()
    clock[0] += 2  # ... and one that stopped renewing is taken over
    taker = FolderLock(LOCAL, str(tmp_path / "d"), **here).acquire()
    assert not elsewhere.renew()  # the old holder learns it lost the folder
    elsewhere.release()  # and its release leaves the new holder's lock alone
    assert json.loads((tmp_path / "d" / LOCK_FILE).read_text())["token"] == taker.token


def test_on_storage_without_exclusive_create_the_claim_is_checked_and_read_back(tmp_path):
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path), LOCAL)  # stands in for s3://
    first = FolderLock(remote, "runs/d")
    assert not first.local
    first.acquire()
    with pytest.raises(FolderLockedError, match="in use by another run"):
        FolderLock(remote, "runs/d").acquire()
    first.release()
    assert not (tmp_path / "runs" / "d" / LOCK_FILE).exists()


def run_cli(module: str, *arguments: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *arguments], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.parametrize("resume", [False, True])
def test_a_second_run_or_resume_of_a_claimed_folder_exits_2_naming_the_first(tmp_path, resume):
    holder = FolderLock(LOCAL, str(tmp_path / "d")).acquire()  # this test process: alive
    (tmp_path / "d" / "events.first").write_text("the first run's file")
    before = sorted(path.name for path in (tmp_path / "d").iterdir())
    flags = ["--resume"] if resume else ["--preset", "smoke"]
    completed = run_cli("train", "--output-dir", str(tmp_path), "--name", "d", *flags)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.count("\n") == 1 and f"pid {os.getpid()}" in completed.stderr
    assert "Ray" not in completed.stdout + completed.stderr
    assert sorted(path.name for path in (tmp_path / "d").iterdir()) == before
    search = run_cli("tune", "--output-dir", str(tmp_path), "--name", "d", *flags)
    assert (
        search.returncode == 2
        and "experiment folder" in search.stderr
        and f"pid {os.getpid()}" in search.stderr
    )
    holder.release()


@pytest.mark.slow
def test_the_command_line_takes_over_a_dead_runs_claim_and_gives_it_back(tmp_path):
    (tmp_path / "d").mkdir()
    dead = FolderLock(LOCAL, str(tmp_path / "d"), pid=os.getpid())
    record = {**dead.record(), "pid": 4_000_002, "pid_start_ticks": None}  # a killed run's lock
    (tmp_path / "d" / LOCK_FILE).write_text(json.dumps(record))
    # The lock is taken over, then the run stops on a missing file, before Ray.
    missing = str(tmp_path / "missing.npy")
    completed = run_cli(
        "train", "--preset", "smoke", "--output-dir", str(tmp_path), "--name", "d", "--test-file", missing
    )
    assert completed.returncode == 2 and "sequence file not found" in completed.stderr
    taken = [line for line in completed.stdout.splitlines() if "taking over" in line]
    assert len(taken) == 1 and "pid 4000002" in taken[0] and "that process is gone" in taken[0]
    assert not (tmp_path / "d" / LOCK_FILE).exists()


# ------------------------------------------------------------------------------ damaged checkpoints


@pytest.fixture
def smoke(tmp_path):
    return preset("smoke", hidden_size=16, cache_dir=str(tmp_path / "data"), checkpoint_every=2, eval_every=2)


def train(config, session):
    return train_function(loop_config(config, WorkerSettings(quiet=True)), session)


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_skipped_and_the_run_ends_as_an_uninterrupted_one(
    smoke, tmp_path, capsys
):
    expected_state = train(smoke, uninterrupted := LocalSession())
    session = LocalSession(checkpoint_root=str(tmp_path / "run"))
    with pytest.raises(InjectedFailure):  # stopped at step 6: checkpoints at steps 2 and 4
        train(smoke, FailOnceSession(session, 6, tmp_path / "failed"))
    damaged = tmp_path / "run" / "checkpoint_00000004" / "checkpoint.pt"
    truncate(damaged)
    capsys.readouterr()
    state = train(smoke, session)
    lines = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    assert len(lines) == 1 and "checkpoint_00000004" in lines[0] and "resuming from step 2" in lines[0]
    assert (
        (state.step, state.sequences_seen) == (expected_state.step, expected_state.sequences_seen) == (6, 24)
    )
    assert state.resumed_from == [2]
    kept = tmp_path / "run" / "damaged_checkpoint_00000004" / "checkpoint.pt"
    assert kept.stat().st_size == 100  # set aside, never deleted
    assert left_empty(LOCAL, str(damaged.parent))  # left for Ray's controller, which deletes it
    assert Path(session.checkpoints[-2]).name == "checkpoint_00000004_1"  # a fresh name
    weights, expected = (
        load_checkpoint(session.checkpoints[-1])["model"],
        load_checkpoint(uninterrupted.checkpoints[-1])["model"],
    )
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


@pytest.mark.slow
def test_when_no_checkpoint_loads_the_worker_says_so_in_one_line(smoke, tmp_path):
    session = LocalSession(checkpoint_root=str(tmp_path / "run"))
    with pytest.raises(InjectedFailure):
        train(smoke, FailOnceSession(session, 6, tmp_path / "failed"))
    for folder in session.checkpoints:
        truncate(Path(folder) / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="no checkpoint of this run loads") as error:
        train(smoke, session)
    assert "\n" not in str(error.value)


def snapshot_entry(name: str, step: int, value: float) -> dict:
    return {"version": 0, "checkpoint_dir_name": name, "metrics": {"step": step, "val_mse_frame": value}}


@pytest.fixture
def run_folder(smoke, tmp_path):
    """A stopped run's folder as Ray Train leaves it: checkpoints at steps 2 and 4 and Ray's
    list of them (checkpoint_manager_snapshot.json), step 2 the best."""
    session = LocalSession(checkpoint_root=str(tmp_path / "runs" / "r"))
    with pytest.raises(InjectedFailure):
        train(smoke, FailOnceSession(session, 6, tmp_path / "failed"))
    entries = [
        snapshot_entry("checkpoint_00000004", 4, 150.0),
        snapshot_entry("checkpoint_00000002", 2, 140.0),
    ]
    snapshot = {
        "ray_version": "2.60.0",
        "checkpoint_results": entries,  # worst first, as Ray sorts them
        "checkpoint_report_indices": [3, 1],
        "latest_checkpoint_result": entries[0],
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": 4,
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }
    (tmp_path / "runs" / "r" / SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    return tmp_path / "runs" / "r"


@pytest.mark.slow
def test_before_a_resume_the_driver_drops_damaged_checkpoints_from_rays_list(run_folder):
    truncate(run_folder / "checkpoint_00000004" / "checkpoint.pt")
    lines = []
    repair = repair_snapshot(LOCAL, str(run_folder), log=lines.append)
    assert repair.dropped == ("checkpoint_00000004",) and repair.step == 2
    assert len(lines) == 1 and "checkpoint_00000004" in lines[0] and "resuming from step 2" in lines[0]
    snapshot = json.loads((run_folder / SNAPSHOT_FILE).read_text())
    assert [entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]] == [
        "checkpoint_00000002"
    ]
    assert snapshot["checkpoint_report_indices"] == [1]
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_00000002"
    assert not (run_folder / "checkpoint_00000004").exists()  # Ray would otherwise report into it
    assert (run_folder / "damaged_checkpoint_00000004" / "checkpoint.pt").stat().st_size == 100
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    parse = getattr(_CheckpointManagerState, "model_validate", None) or _CheckpointManagerState.parse_obj
    parse(snapshot)  # Ray reads the list back
    assert repair_snapshot(LOCAL, str(run_folder)).dropped == ()  # nothing more to do


@pytest.mark.slow
def test_a_damaged_best_checkpoint_is_dropped_too_and_the_latest_stays(run_folder):
    truncate(run_folder / "checkpoint_00000002" / "history.json", 10)
    repair = repair_snapshot(LOCAL, str(run_folder), log=lambda line: None)
    assert repair.dropped == ("checkpoint_00000002",) and repair.step == 4
    snapshot = json.loads((run_folder / SNAPSHOT_FILE).read_text())
    assert [entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]] == [
        "checkpoint_00000004"
    ]
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_00000004"


@pytest.mark.slow
def test_when_no_checkpoint_loads_the_resume_stops_in_one_line_and_changes_nothing(run_folder):
    for name in ("checkpoint_00000002", "checkpoint_00000004"):
        truncate(run_folder / name / "checkpoint.pt")
    before = sorted(str(path.relative_to(run_folder)) for path in run_folder.rglob("*"))
    with pytest.raises(CheckpointError, match="nothing to resume from") as error:
        repair_snapshot(LOCAL, str(run_folder))
    assert "\n" not in str(error.value)
    assert sorted(str(path.relative_to(run_folder)) for path in run_folder.rglob("*")) == before


@pytest.mark.slow
def test_on_object_stores_a_truncated_checkpoint_is_found_without_downloading_it(run_folder, tmp_path):
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path), LOCAL)  # stands in for s3://
    problem, state = stored_problem(remote, "runs/r/checkpoint_00000004")
    assert problem is None and state.step == 4
    truncate(run_folder / "checkpoint_00000004" / "checkpoint.pt")
    problem, state = stored_problem(remote, "runs/r/checkpoint_00000004")
    assert "not a readable checkpoint" in problem and state is None


@pytest.mark.slow
def test_the_command_line_resume_exits_2_in_one_line_when_no_checkpoint_loads(run_folder, smoke):
    (run_folder / "config.json").write_text(json.dumps({"config": smoke.to_dict()}))
    for name in ("checkpoint_00000002", "checkpoint_00000004"):
        truncate(run_folder / name / "checkpoint.pt")
    completed = run_cli("train", "--output-dir", str(run_folder.parent), "--name", "r", "--resume")
    assert completed.returncode == 2 and completed.stderr.count("\n") == 1
    assert (
        "run r has no complete checkpoint: all 2 of its checkpoints (checkpoint_00000004, "
        in completed.stderr
    )
    assert completed.stderr.rstrip().endswith("are damaged: start it again without --resume")
    assert "Ray" not in completed.stderr


@pytest.mark.parametrize("damaged", [False, True])
def test_a_resume_without_a_complete_checkpoint_says_so_and_a_new_start_sets_the_damaged_aside(
    checkpoint, smoke, tmp_path, damaged
):
    import shutil

    from train.driver import RunSettings, check_run_folder

    run_folder = tmp_path / "runs" / "r"  # Ray lists a checkpoint only once stored: no list here
    run_folder.mkdir(parents=True)
    (run_folder / "config.json").write_text(json.dumps({"config": smoke.to_dict()}))
    if damaged:  # a copy cut short in place, as Ray's own upload left it
        shutil.copytree(checkpoint, run_folder / "checkpoint_00000002")
        truncate(run_folder / "checkpoint_00000002" / "checkpoint.pt")
    settings = RunSettings(name="r", storage=str(run_folder.parent), resume=True)
    with pytest.raises(RunFolderError) as error:
        check_run_folder(settings)
    expected = (
        "run r has no complete checkpoint: its only checkpoint, checkpoint_00000002, is damaged ("
        if damaged
        else "run r has no checkpoint to resume from (it stopped before its first checkpoint was stored)"
    )
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)
    assert str(error.value).endswith(": start it again without --resume")
    check_run_folder(RunSettings(name="r", storage=str(run_folder.parent)))  # as the line says
    assert not (run_folder / "checkpoint_00000002").exists()
    assert (run_folder / "damaged_checkpoint_00000002").is_dir() == damaged


# ------------------------------------------------------------------------------ a full disk


@pytest.fixture
def checkpoint(smoke, tmp_path):
    """A local checkpoint folder as rank 0 writes it before it is stored (4 MB of weights)."""
    from dataclasses import asdict

    from lstm_ae.checkpoint import save_checkpoint
    from lstm_ae.model import CompositeLSTMAutoencoder
    from records.checkpoints import TrainingState

    folder = tmp_path / "written" / "checkpoint_00000002"
    save_checkpoint(folder, CompositeLSTMAutoencoder(smoke.model), 2, smoke)
    (folder / "history.json").write_text(json.dumps(asdict(TrainingState(step=2))))
    return folder


@pytest.mark.parametrize("staged", [True, False], ids=["renamed-into-place", "checkpoint-file-last"])
def test_a_checkpoint_that_does_not_fit_is_never_left_looking_complete(checkpoint, tmp_path, staged):
    size = sum(file.stat().st_size for file in checkpoint.iterdir())
    disk = FullDiskHandler(room=size // 2)
    filesystem = pyarrow.fs.PyFileSystem(disk)
    target = tmp_path / "run" / "checkpoint_00000002"
    with pytest.raises(StorageFullError) as error:
        store_checkpoint(checkpoint, filesystem, str(target), staged=staged)
    line = str(error.value)
    assert "\n" not in line and line.startswith("no room for checkpoint_00000002 in py::full-disk storage")
    assert f"needs {size / 1e6:.1f} MB" in line
    assert disk.written == size // 2  # half of it was written, then removed
    assert list((tmp_path / "run").iterdir()) == []
    disk.room = 10 * size  # room made: stored whole, once
    store_checkpoint(checkpoint, filesystem, str(target), staged=staged)
    assert folder_problem(target) == folder_problem(checkpoint)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["checkpoint_00000002"]


def test_a_copy_cut_short_in_place_is_replaced_when_the_checkpoint_is_stored_again(checkpoint, tmp_path):
    target = tmp_path / "run" / "checkpoint_00000002"
    target.mkdir(parents=True)
    (target / "checkpoint.pt").write_bytes(b"half")  # a lost node's upload, never listed by Ray
    store_checkpoint(checkpoint, LOCAL, str(target))
    assert folder_problem(target)[0] is None


def test_on_a_full_tmpfs_the_error_names_the_disk_the_space_needed_and_free(checkpoint, small_disk):
    size = sum(file.stat().st_size for file in checkpoint.iterdir())
    disk = small_disk(f"{size // 2 // 4096 * 4096}")
    with pytest.raises(StorageFullError) as error:
        store_checkpoint(checkpoint, LOCAL, str(disk / "run" / "checkpoint_00000002"))
    line = str(error.value)
    assert line.startswith(f"no room for checkpoint_00000002 on the disk mounted at {disk} (tmpfs)")
    assert f"it needs {size / 1e6:.1f} MB" in line and line.endswith(" free")
    assert [path.name for path in (disk / "run").iterdir()] == []  # nothing that looks complete


def test_a_checkpoint_folder_left_empty_is_never_the_best(tmp_path):
    from records.checkpoints import best_checkpoint

    (tmp_path / "checkpoint_00000002").mkdir()
    (tmp_path / "checkpoint_00000002" / "checkpoint.pt").write_bytes(b"weights")
    (tmp_path / "checkpoint_00000004").mkdir()  # set aside: the controller still lists it
    (tmp_path / "damaged_checkpoint_00000004").mkdir()
    kept = [
        (150.0, LOCAL, str(tmp_path / "checkpoint_00000002"), 2),
        (140.0, LOCAL, str(tmp_path / "checkpoint_00000004"), 4),
    ]
    assert best_checkpoint(kept, "min") == 2
    assert best_checkpoint(kept[1:], "min") is None
    (tmp_path / "checkpoint_00000004" / "checkpoint.pt").write_bytes(b"weights")  # not empty: counts
    assert best_checkpoint(kept, "min") == 4


# ------------------------------------------------------------------------------ Ctrl-C


@pytest.fixture
def restore_sigint():
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def assert_exits_130_with_one_line(main, argv, capsys, expected: str, folder) -> None:
    """Ctrl-C: exit status 130, one line on stderr holding `expected`, the folder's lock given back."""
    with pytest.raises(SystemExit) as exit_status:
        main(argv)
    assert exit_status.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]
    assert not (folder / LOCK_FILE).exists()  # the lock is given back


def test_ctrl_c_of_a_train_run_exits_130_with_the_line_to_continue_it(
    tmp_path, monkeypatch, capsys, restore_sigint
):
    import train.cli

    def interrupted_run(config, scaling, settings):
        # What Ray Train does: its own SIGINT handler aborts the run, then fit raises an
        # error about the controller actor that does not mention the interrupt.
        (tmp_path / "x" / SNAPSHOT_FILE).write_text("{}")  # it had checkpointed
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        os.kill(os.getpid(), signal.SIGINT)
        raise RuntimeError("The actor died unexpectedly before finishing this task.")

    monkeypatch.setattr(train.cli, "run_training", interrupted_run)
    assert_exits_130_with_one_line(
        train.cli.main, ["--preset", "smoke", "--output-dir", str(tmp_path), "--name", "x"], capsys,
        f"python -m train --name x --output-dir {tmp_path} --resume", tmp_path / "x",
    )  # fmt: skip


def test_ctrl_c_of_a_search_exits_130_with_the_line_to_continue_it(
    tmp_path, monkeypatch, capsys, restore_sigint
):
    import tune.cli
    import tune.search

    def interrupted_search(base, space, settings, callbacks, points):
        # What Ray Tune does: its handler ends the experiment and fit returns as if done.
        (tmp_path / "s" / "search.json").write_text("{}")
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        os.kill(os.getpid(), signal.SIGINT)
        return [], str(tmp_path / "s"), None

    monkeypatch.setattr(tune.search, "run_search", interrupted_search)
    assert_exits_130_with_one_line(
        tune.cli.main, ["--preset", "smoke", "--output-dir", str(tmp_path), "--name", "s"], capsys,
        f"python -m tune --name s --output-dir {tmp_path} --resume", tmp_path / "s",
    )  # fmt: skip


def test_ctrl_c_before_the_first_checkpoint_says_to_start_again(
    tmp_path, monkeypatch, capsys, restore_sigint
):
    import train.cli

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own: KeyboardInterrupt
    monkeypatch.setattr(train.cli, "run_training", lambda *args: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(SystemExit) as exit_status:
        train.cli.main(["--preset", "smoke", "--output-dir", str(tmp_path), "--name", "y"])
    assert exit_status.value.code == 130
    assert "start it again with python -m train --name y" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()  # nothing was written: the lock's folder is gone again
