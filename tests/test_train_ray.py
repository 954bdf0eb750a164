"""Ray Train end to end on CPU: data parallelism, the run folder, failure recovery, resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import faults
import pytest
import torch
from command_line import run_main
from faults import FaultyTrainLoop, KilledMidUploadLoop

from lstm_ae.checkpoint import load_checkpoint, load_model
from lstm_ae.config import preset
from lstm_ae.viz import RUN_PICTURES
from train.cli import main
from train.driver import RunSettings, Scaling, run_training

pytestmark = pytest.mark.ray

TWO_WORKERS = Scaling(num_workers=2, cpus_per_worker=1)


@pytest.fixture(scope="module", autouse=True)
def _faults_travel_to_ray_workers():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(faults)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    return preset("smoke", checkpoint_every=2, eval_every=2, cache_dir=str(data))


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, config, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    return run_training(config, TWO_WORKERS, RunSettings(name="uninterrupted", storage=str(storage)))


def final_weights(summary) -> dict[str, torch.Tensor]:
    return load_checkpoint(summary.result["final_checkpoint"])["model"]


def metrics_rows(run_path: str) -> list[dict[str, str]]:
    with open(Path(run_path) / "metrics.csv") as file:
        return list(csv.DictReader(file))


def test_two_workers_train_in_sync_and_write_the_run_folder(uninterrupted):
    run_path = Path(uninterrupted.path)
    result = json.loads((run_path / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 6 and result["sequences_seen"] == 24
    first, second = result["replica_checksums"]
    assert first == second  # DDP all-reduced the gradients: both replicas hold identical weights
    for name in ("config.json", "metrics.csv", "result.json", *RUN_PICTURES):
        assert (run_path / name).stat().st_size > 0, name
    rows = metrics_rows(uninterrupted.path)
    assert [int(row["step"]) for row in rows] == [2, 4, 6]
    validation = [float(row["val_bce_nats_frame"]) for row in rows]
    assert validation[-1] < validation[0]
    assert result["units"]["val_mse_frame"].startswith("squared error per frame")
    model, config, _ = load_model(result["best_checkpoint"])
    assert config.model.hidden_size == 32 and not model.training
    best_row = next(row for row in rows if int(row["step"]) == result["best_checkpoint_step"])
    assert float(best_row["val_mse_frame"]) == pytest.approx(result["best_checkpoint_metric"])
    assert result["best_checkpoint"].endswith(f"{result['best_checkpoint_step']:08d}")


def test_a_worker_crash_between_checkpoints_restarts_from_the_latest_one(config, uninterrupted, tmp_path):
    # Step 3 is trained and logged (log_every 1), then the last rank dies before step 4's
    # checkpoint, once Ray registered step 2's (it uploads beside training).
    crashing = FaultyTrainLoop(
        3, tmp_path / "failed-once", registered=(tmp_path / "recovered", "checkpoint_00000002")
    )
    summary = run_training(
        config.replace(log_every=1),
        TWO_WORKERS,
        RunSettings(name="recovered", storage=str(tmp_path), max_failures=1),
        train_loop=crashing,
    )
    assert (tmp_path / "failed-once").exists()
    assert summary.result["steps"] == 6 and summary.result["sequences_seen"] == 24
    assert summary.result["resumed_from"] == [2]
    assert [int(row["step"]) for row in metrics_rows(summary.path)] == [1, 2, 3, 4, 5, 6]
    recovered, expected = final_weights(summary), final_weights(uninterrupted)
    assert all(torch.equal(recovered[name], expected[name]) for name in expected)


def test_a_node_lost_mid_upload_restarts_from_the_newest_complete_checkpoint(config, uninterrupted, tmp_path):
    # Step 4's checkpoint uploads while the ranks train on; rank 0's process dies halfway
    # through that upload, after step 5 is reported. Ray had registered only step 2's.
    killed = KilledMidUploadLoop(at_step=4, marker=tmp_path / "killed-once")
    summary = run_training(
        config.replace(log_every=1),
        TWO_WORKERS,
        RunSettings(name="lost", storage=str(tmp_path), max_failures=1),
        train_loop=killed,
    )
    assert "killed uploading checkpoint_00000004" in (tmp_path / "killed-once").read_text()
    assert summary.result["steps"] == 6 and summary.result["resumed_from"] == [2]
    assert [int(row["step"]) for row in metrics_rows(summary.path)] == [1, 2, 3, 4, 5, 6]
    # The half-written folder was uploaded again, whole, when the restarted run got there.
    load_checkpoint(tmp_path / "lost" / "checkpoint_00000004")
    recovered, expected = final_weights(summary), final_weights(uninterrupted)
    assert all(torch.equal(recovered[name], expected[name]) for name in expected)


def test_a_stopped_run_resumes_past_a_truncated_newest_checkpoint_to_the_end_of_an_uninterrupted_run(
    config, uninterrupted, tmp_path, capsys
):
    """A run that failed with no retries left is resumed by name. Its newest checkpoint was
    cut short (a node lost mid-upload, a full disk): the resume sets it aside, says so in one
    line, restarts from the one before, and ends with the uninterrupted run's weights. (The
    full-disk scene below resumes from an intact newest checkpoint.)"""
    registered = (tmp_path / "damaged", "checkpoint_00000004")
    crashing = FaultyTrainLoop(6, tmp_path / "failed-once.marker", registered=registered)
    settings = RunSettings(name="damaged", storage=str(tmp_path), max_failures=0)
    with pytest.raises(Exception, match="injected failure at step 6"):  # checkpoints at steps 2 and 4
        run_training(config, TWO_WORKERS, settings, train_loop=crashing)
    damaged = tmp_path / "damaged" / "checkpoint_00000004" / "checkpoint.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a node lost mid-upload, a full disk
    capsys.readouterr()
    resumed = run_training(
        config, TWO_WORKERS, RunSettings(name="damaged", storage=str(tmp_path), resume=True)
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if "damaged checkpoint" in line]
    assert len(lines) == 1 and "checkpoint_00000004" in lines[0] and "resuming from step 2" in lines[0]
    assert resumed.result["steps"] == uninterrupted.result["steps"] == 6
    assert resumed.result["sequences_seen"] == uninterrupted.result["sequences_seen"] == 24
    assert resumed.result["resumed_from"] == [2]
    kept = tmp_path / "damaged" / "damaged_checkpoint_00000004" / "checkpoint.pt"
    assert kept.stat().st_size == 100  # set aside, never deleted
    assert "damaged_" not in resumed.result["best_checkpoint"]
    assert Path(resumed.result["best_checkpoint"], "checkpoint.pt").is_file()
    weights, expected = final_weights(resumed), final_weights(uninterrupted)
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def test_the_command_line_joins_a_running_cluster(ray_cluster, config, tmp_path, capsys):
    address = ray_cluster.get_runtime_context().gcs_address
    flags = [
        "--preset", "smoke", "--address", address, "--output-dir", str(tmp_path), "--name", "cli",
        "--cache-dir", config.data.cache_dir, "--max-steps", "2", "--cpus-per-worker", "1",
    ]  # fmt: skip
    command = PYTHON_M_TRAIN + flags
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "step 2/2" in completed.stdout and "run folder:" in completed.stdout
    assert json.loads((tmp_path / "cli" / "result.json").read_text())["steps"] == 2
    # The same name again without --resume refuses to overwrite the run.
    again = run_main(main, flags, capsys)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.fixture(scope="module")
def finished_run(ray_cluster, config, tmp_path_factory):
    """A finished one-worker run that keeps a single checkpoint (the setting that lost it)."""
    storage = tmp_path_factory.mktemp("finished")
    settings = RunSettings(name="x", storage=str(storage))
    run_training(config.replace(keep_checkpoints=1), Scaling(1, cpus_per_worker=1), settings)
    return storage


PYTHON_M_TRAIN = [sys.executable, "-m", "train"]


def train_flags(storage: Path, *flags: str) -> list[str]:
    return ["--preset", "smoke", "--output-dir", str(storage), "--name", "x", *flags]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_run, capsys):
    before = snapshot(finished_run)
    assert any(name.startswith("x/checkpoint_00000006/") for name in before)
    completed = run_main(main, train_flags(finished_run, "--resume"), capsys)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "already complete" in completed.stdout and "6 steps" in completed.stdout
    assert snapshot(finished_run) == before


@pytest.mark.parametrize(
    "flags, saved",
    [
        (["--seed", "1"], "(saved: 0)"),
        (["--batch-size", "8"], "(saved: 4)"),
        (["--step-fraction", "0.2"], "(saved: 0.1)"),
        (["--learning-rate", "0.5"], "(saved: 0.01)"),
        (["--hidden-size", "64"], "(saved: 32)"),
        (["--num-workers", "2"], "the resumed run's num_workers 1"),
        (["--max-steps", "4"], "the resumed run's max_steps 6"),
    ],
)
def test_resume_refuses_changes_that_break_reproducibility(finished_run, flags, saved, capsys):
    before = snapshot(finished_run)
    completed = run_main(main, train_flags(finished_run, "--resume", *flags), capsys)
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert f"{flags[0]} {flags[1]}" in lines[0] and saved in lines[0], lines[0]
    assert snapshot(finished_run) == before


def test_a_finished_run_extended_keeps_its_checkpoint_and_continues_its_schedule(ray_cluster, finished_run):
    address = ray_cluster.get_runtime_context().gcs_address
    command = PYTHON_M_TRAIN + train_flags(
        finished_run, "--resume", "--max-steps", "8", "--address", address, "--cpus-per-worker", "1"
    )
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads((finished_run / "x" / "result.json").read_text())
    assert result["steps"] == 8 and result["resumed_from"] == [6]
    assert Path(result["final_checkpoint"]).is_dir() and Path(result["best_checkpoint"]).is_dir()
    rates = [float(row["learning_rate"]) for row in metrics_rows(str(finished_run / "x"))]
    assert rates[-1] <= rates[-2] * (1 + 1e-9)  # no jump back up after the resume


def test_the_doctor_checks_every_node_of_a_running_cluster(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "train.doctor", "--address", address, "--output-dir", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = [line for line in completed.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len([node for node in ray_cluster.nodes() if node["Alive"]])
    assert rows[1].rstrip().endswith("| ok |")


def test_use_gpu_on_a_cluster_that_can_never_have_a_gpu_exits_2_with_one_line(ray_cluster, config, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    command = [
        sys.executable, "-m", "train", "--preset", "smoke", "--use-gpu", "--address", address,
        "--output-dir", str(tmp_path), "--cache-dir", config.data.cache_dir,
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "no node has a GPU" in error_lines[0]


def test_a_full_disk_ends_the_run_in_one_line_and_a_resume_after_room_is_made_ends_it_exact(
    ray_cluster, config, uninterrupted, small_disk, capfd
):
    """The run folder on a tmpfs with room for one checkpoint (22 MB each) and not two: the
    run stops at the second with one line naming the disk and what to do, no traceback, and
    nothing in the folder that looks like a second checkpoint; once the disk is larger,
    --resume ends the run as an uninterrupted one."""
    disk = small_disk("36m")
    flags = ["--preset", "smoke", "--checkpoint-every", "2", "--eval-every", "2", "--cache-dir",
             config.data.cache_dir, "--num-workers", "2", "--cpus-per-worker", "1",
             "--output-dir", str(disk), "--name", "full"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_status:
        main(flags)
    out, err = capfd.readouterr()
    assert exit_status.value.code == 1
    # The error is the last line and the only one of ours; Ray's processes may add their own
    # prefixed log lines (its core's known ERROR line about the preemption watcher), never a traceback.
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err[-3000:]
    line = lines[-1]
    assert line.startswith(f"error: no room for checkpoint_00000004 on the disk mounted at {disk} (tmpfs)")
    assert "MB free" in line and "it needs 22." in line
    assert line.endswith(f"continue it with: python -m train --name full --output-dir {disk} --resume")
    # No traceback of the full disk. (A surviving rank torn down inside a collective may still
    # have Ray print its own error; one waiting at a report is filtered.)
    assert "StorageFullError" not in out + err and "Errno 28" not in out + err, (out + err)[-3000:]
    checkpoints = sorted(path.name for path in (disk / "full").iterdir() if "checkpoint_0" in path.name)
    assert checkpoints == ["checkpoint_00000002"]
    load_checkpoint(disk / "full" / "checkpoint_00000002")
    small_disk("200m", remount=True)  # room made
    assert main([*flags, "--resume"]) == 0
    result = json.loads((disk / "full" / "result.json").read_text())
    assert result["steps"] == 6 and result["sequences_seen"] == 24 and result["resumed_from"] == [2]
    recovered = load_checkpoint(result["final_checkpoint"])["model"]
    expected = final_weights(uninterrupted)
    assert all(torch.equal(recovered[name], expected[name]) for name in expected)
