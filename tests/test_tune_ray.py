"""Ray Tune end to end on CPU: search with ASHA, resume, multi-worker trials, and compare."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ray.tune import Callback

from lstm_ae.config import ExperimentConfig, preset
from tune.cli import search_and_tabulate
from tune.experiment import SearchSettings
from tune.results import COMPLETED, STOPPED_BY_SCHEDULER, train_best_line
from tune.space import parse_space

pytestmark = pytest.mark.ray

# 6 steps with a validation every 2: ASHA sees 3 results per trial and may stop after the first.
SPACE = parse_space({"learning_rate": {"loguniform": [1e-9, 1e-2]}, "hidden_size": {"choice": [16, 32]}})


class TrialStarts(Callback):
    """Writes each trial's id to a file when Tune starts (or restarts) it."""

    def __init__(self, log: Path):
        self.log = log

    def on_trial_start(self, iteration, trials, trial, **info):
        with open(self.log, "a") as log:
            log.write(f"{trial.trial_id}\n")


class InterruptAfter(Callback):
    """Interrupts the driver (as Ctrl-C would) once `count` trials completed. Tune saves
    callbacks with the experiment, so a marker file keeps a resumed run going."""

    def __init__(self, count: int, marker: Path):
        self.count, self.marker, self.completed = count, marker, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed += 1
        if self.completed >= self.count and not self.marker.exists():
            self.marker.write_text(f"interrupted after {self.completed} trial(s)\n")
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    return preset("smoke", eval_every=2, checkpoint_every=2, cache_dir=str(data))


def complete(checkpoint: Path) -> bool:
    """A trial checkpoint folder whose weights and history both read back."""
    from lstm_ae.checkpoint import CheckpointError, load_checkpoint

    try:
        load_checkpoint(checkpoint)
        json.loads((checkpoint / "history.json").read_text())
    except (CheckpointError, OSError, ValueError):
        return False
    return True


def read_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "results.csv") as file:
        return list(csv.DictReader(file))


def stored_study(folder: Path):
    """The Optuna study the search kept in its folder."""
    import optuna

    from tune.search import TUNE_TRIAL_ATTRIBUTE, journal_storage

    study = optuna.load_study(
        study_name=folder.name, storage=journal_storage(str(folder / "optuna_study.log"))
    )
    return {trial.user_attrs[TUNE_TRIAL_ATTRIBUTE]: trial for trial in study.trials}, study


def study_values(folder: Path) -> dict[str, float | list[float]]:
    trials, _ = stored_study(folder)
    return {
        trial_id: trial.value if len(trial.values) == 1 else trial.values
        for trial_id, trial in trials.items()
    }


@pytest.fixture(scope="module")
def search(ray_cluster, base, tmp_path_factory):
    storage = tmp_path_factory.mktemp("searches")
    settings = SearchSettings(
        name="four", storage=str(storage), num_samples=4, max_concurrent=1, cpus_per_worker=1
    )
    # A good first trial, then one that cannot learn: ASHA must stop the second at its first rung.
    points = [{"learning_rate": 1e-2, "hidden_size": 32}, {"learning_rate": 1e-9, "hidden_size": 32}]
    summary = search_and_tabulate(base, SPACE, settings, points_to_evaluate=points)
    return storage / "four", summary


def test_a_search_of_four_trials_writes_the_table_and_asha_stops_a_trial(search):
    folder, summary = search
    rows = read_rows(folder)
    assert len(rows) == 4
    expected = {"best", "trial", "status", "learning_rate", "hidden_size", "best_val_mse_frame",
                "final_val_mse_frame", "val_bce_nats_frame", "steps", "sequences_seen", "wall_seconds",
                "best_checkpoint"}  # fmt: skip
    assert expected <= set(rows[0])
    values = [float(row["best_val_mse_frame"]) for row in rows]
    assert values[0] == min(values) and rows[0]["best"] == "*"
    assert all(row["best"] == "" for row in rows[1:])
    assert STOPPED_BY_SCHEDULER in {row["status"] for row in rows}
    assert all(row["status"] in (COMPLETED, STOPPED_BY_SCHEDULER) for row in rows)
    assert all(Path(row["best_checkpoint"]).is_dir() for row in rows)
    for picture in (
        "trials.png",
        "parameters.png",
        "optuna_importances.png",
        "optuna_parallel_coordinate.png",
    ):
        assert (folder / picture).stat().st_size > 0
    assert "results.md" in summary
    # The stored study holds what the table ranks: each trial's best report, ASHA's stop included.
    assert study_values(folder) == {row["trial"]: float(row["best_val_mse_frame"]) for row in rows}


WINNER_OVERRIDES = {"max_steps": 2, "eval_every": 2, "checkpoint_every": 2, "probe_sequences": 0}


@pytest.fixture(scope="module")
def winner(search, tmp_path_factory):
    """The search's best trial trained again by the line the search printed, shortened to 2
    steps: (its run folder, the best row, the line, the exit status)."""
    from train.cli import main as train_main

    folder, _ = search
    best = read_rows(folder)[0]
    line = train_best_line(best, str(folder))  # says so where the best trial did not finish
    command = shlex.split(line.split(": ", 1)[1].split("  (")[0])[3:]
    flags = ["--max-steps", "2", "--eval-every", "2", "--checkpoint-every", "2", "--probe-sequences", "0"]
    storage = tmp_path_factory.mktemp("winner")
    where = ["--cpus-per-worker", "1", "--output-dir", str(storage), "--name", "winner"]
    status = train_main([*command, *flags, "--init-from-checkpoint", *where])
    return storage / "winner", best, line, status


def test_train_from_the_search_trains_its_printed_best_trial_and_records_its_source(search, winner):
    folder, summary = search
    run, best, line, status = winner
    assert status == 0 and summary.rstrip().endswith(line)
    assert all((trial / "config.json").is_file() for trial in folder.glob("trial_*"))
    trial_folder = next(folder.glob(f"trial_{best['trial']}_*"))
    trial_config = ExperimentConfig.from_dict(
        json.loads((trial_folder / "config.json").read_text())["config"]
    )
    record = json.loads((run / "config.json").read_text())
    assert record["config"] == trial_config.replace(**WINNER_OVERRIDES).to_dict()
    source = record["source"]
    assert (source["trial"], source["metric"]) == (best["trial"], "val_mse_frame")
    assert source["value"] == pytest.approx(float(best["best_val_mse_frame"]))
    assert source["overrides"] == WINNER_OVERRIDES
    assert Path(source["initial_weights"]) == Path(best["best_checkpoint"])
    result = json.loads((run / "result.json").read_text())
    assert result["source"] == source and result["steps"] == 2


def test_an_interrupted_search_resumes_without_rerunning_finished_trials(ray_cluster, base, tmp_path):
    log = tmp_path / "trial_starts.txt"
    settings = SearchSettings(
        name="interrupted", storage=str(tmp_path), num_samples=3, max_concurrent=1, cpus_per_worker=1
    )
    callbacks = [InterruptAfter(1, tmp_path / "interrupted.marker"), TrialStarts(log)]
    search_and_tabulate(base, SPACE, settings, callbacks=callbacks)
    assert (tmp_path / "interrupted.marker").exists()
    first_run = log.read_text().split()
    assert len(read_rows(tmp_path / "interrupted")) < 3 or any(
        row["status"] != COMPLETED for row in read_rows(tmp_path / "interrupted")
    )
    resumed = SearchSettings(
        name="interrupted",
        storage=str(tmp_path),
        num_samples=3,
        max_concurrent=1,
        cpus_per_worker=1,
        resume=True,
    )
    search_and_tabulate(base, SPACE, resumed)  # restores the saved callbacks too
    rows = read_rows(tmp_path / "interrupted")
    assert len(rows) == 3 and all(row["status"] != "errored" for row in rows)
    starts = log.read_text().split()
    assert starts.count(first_run[0]) == 1  # the trial that had finished was not run again
    assert len(set(starts)) == 3
    # One study across the interruption: the first run's trial kept, every trial told its best.
    assert study_values(tmp_path / "interrupted") == {
        row["trial"]: float(row["best_val_mse_frame"]) for row in rows
    }


def test_a_trial_with_two_workers_runs_a_torch_trainer_and_reports(ray_cluster, base, tmp_path):
    settings = SearchSettings(
        name="two-workers", storage=str(tmp_path), num_samples=1, workers_per_trial=2, cpus_per_worker=1
    )
    search_and_tabulate(
        base, SPACE, settings, points_to_evaluate=[{"learning_rate": 1e-2, "hidden_size": 16}]
    )
    (row,) = read_rows(tmp_path / "two-workers")
    assert row["status"] == COMPLETED and int(row["steps"]) == 6 and int(row["sequences_seen"]) == 24
    assert float(row["best_val_mse_frame"]) > 0
    assert "train_runs" in row["best_checkpoint"] and Path(row["best_checkpoint"]).is_dir()
    # ASHA stopped the trial at its last report, killing its TorchTrainer's controller before
    # that shut down its workers: their placement group must not stay reserved.
    held = [
        group
        for group in ray_cluster.util.placement_group_table().values()
        if group["state"] != "REMOVED" and len(group["bundles"]) == 2
    ]
    assert held == []


def test_compare_puts_experiments_and_a_train_run_in_one_table_with_references(search, winner):
    experiment, _ = search
    command = [sys.executable, "-m", "tune.compare", str(experiment), str(winner[0])]
    table = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    lines = [line for line in table.strip().splitlines() if line.startswith("|")]
    after = table.strip().splitlines()[len(lines) :]  # the line that trains the best, where it is a trial
    assert lines[0].startswith("| best | source | kind | trial | status |")
    assert sum("| tune trial |" in line for line in lines) == 4
    assert sum("| train run |" in line for line in lines) == 1
    assert any("341.2" in line and "| reference |" in line for line in lines)
    assert sum("all-zeros prediction" in line for line in lines) == 1  # both used the same validation set
    (best,) = [line for line in lines if line.startswith("| * |")]
    if "| tune trial |" in best:
        assert after[0] == "" and after[1].startswith(
            f"train the best trial: python -m train --from {experiment} --trial "
        )
    else:  # the winner, trained on from the best trial's checkpoint, may beat every trial
        assert "| train run |" in best and after == []
    csv_table = subprocess.run(
        [*command, "--format", "csv"], capture_output=True, text=True, check=True
    ).stdout
    assert len(list(csv.DictReader(csv_table.splitlines()))) == len(lines) - 2  # header and rule


def test_the_ablation_grid_on_smoke_with_two_seeds_fills_every_row(ray_cluster, base, tmp_path):
    from tune.ablations import VARIANTS
    from tune.cli import ablations_and_tabulate

    # Four trials at a time (the session's cluster has 4 logical CPUs): each trial's seed fixes
    # its result, so the order does not matter, and most of a 6-step trial is its start.
    settings = SearchSettings(name="ablations", storage=str(tmp_path), max_concurrent=4, cpus_per_worker=1)
    summary = ablations_and_tabulate(base, 2, settings)
    folder = tmp_path / "ablations"
    with open(folder / "ablations.csv") as file:
        records = list(csv.DictReader(file))
    assert len(records) == 2 * len(VARIANTS)
    assert all(record["error"] == "" and record["step"] == "6" for record in records)
    table = (folder / "ablations.md").read_text()
    for variant in VARIANTS.values():
        row = next(line for line in table.splitlines() if line.startswith(f"| {variant.label} |"))
        assert "(n=2)" in row and variant.claim in row
    assert "n/a (not trained)" in table and "| the composite predicts the future" in table
    assert (folder / "ablations.png").stat().st_size > 0 and "ablations.md" in summary


def test_a_two_objective_search_marks_a_front_no_trial_on_it_is_dominated(ray_cluster, base, tmp_path):
    """--metric val_mse_frame --metric val_ink_ssim, two trials at a time: no early stopping,
    the front marked and first, best = the rule's pick, each trial's ink SSIM taken at its best
    MSE report, the study told both values of every trial, pareto.png."""
    import json

    from lstm_ae.pareto import dominates, front_choice

    objectives = (("val_mse_frame", "min"), ("val_ink_ssim", "max"))
    settings = SearchSettings(
        name="front", storage=str(tmp_path), num_samples=4, max_concurrent=2, cpus_per_worker=1,
        objectives=objectives,
    )  # fmt: skip
    space = parse_space(
        {"learning_rate": {"loguniform": [1e-4, 3e-2]}, "head": {"choice": ["linear", "logistic"]}}
    )
    summary = search_and_tabulate(base, space, settings)
    folder = tmp_path / "front"
    rows = read_rows(folder)
    assert len(rows) == 4 and all(row["status"] == COMPLETED and row["steps"] == "6" for row in rows)
    points = [(float(row["best_val_mse_frame"]), float(row["val_ink_ssim"])) for row in rows]
    modes = ("min", "max")
    marked = [row["front"] == "*" for row in rows]
    for index, point in enumerate(points):  # the hand check
        dominated = any(dominates(other, point, modes) for other in points)
        assert marked[index] == (not dominated), (rows[index]["trial"], points)
    assert marked == sorted(marked, reverse=True)  # the front first
    assert [row["best"] for row in rows].count("*") == 1
    assert rows[front_choice(points, modes)]["best"] == "*"
    for row in rows:  # ink SSIM at the report with the best MSE, from Tune's own result.json
        trial_folder = next(folder.glob(f"trial_{row['trial']}_*"))
        reports = [json.loads(line) for line in (trial_folder / "result.json").read_text().splitlines()]
        best = min((r for r in reports if "val_mse_frame" in r), key=lambda r: r["val_mse_frame"])
        assert float(row["val_ink_ssim"]) == pytest.approx(best["val_ink_ssim"])
    assert json.loads((folder / "search.json").read_text())["objectives"] == [
        {"metric": "val_mse_frame", "mode": "min"},
        {"metric": "val_ink_ssim", "mode": "max"},
    ]
    assert not (folder / "stopped_by_scheduler").exists()
    _, study = stored_study(folder)  # Optuna was told both values of every trial, as the table takes them
    assert [direction.name for direction in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert study_values(folder) == {
        row["trial"]: [float(row["best_val_mse_frame"]), float(row["val_ink_ssim"])] for row in rows
    }
    for picture in ("pareto.png", "optuna_pareto_front.png", "optuna_hypervolume.png"):
        assert (folder / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "front: the Pareto front of best_val_mse_frame and val_ink_ssim" in summary


def test_a_search_whose_driver_is_killed_resumes_every_trial_from_a_checkpoint_it_still_has(
    ray_cluster, tmp_path
):
    """SIGKILL of `python -m tune` once its two trials have checkpoints, then what a trial's
    pruning leaves when it runs after Tune saved its state: the checkpoint the saved state
    names is gone (for one trial, older and newer ones remain; for the other, none is left).
    `--resume` restores the first from its newest complete checkpoint and starts the second
    again from step 0, saying so for each; every trial completes, none errors."""
    import time

    import pyarrow.fs

    from train.ray_internals import saved_trials

    address = ray_cluster.get_runtime_context().gcs_address
    flags = ["--output-dir", str(tmp_path), "--name", "killed", "--address", address]
    search = [sys.executable, "-m", "tune", "--preset", "smoke", "--num-samples", "2", "--max-concurrent", "2",
              "--cpus-per-worker", "1", "--max-steps", "12", "--eval-every", "2", "--checkpoint-every", "2",
              "--grace-period", "6", "--cache-dir", str(tmp_path / "data"), *flags]  # fmt: skip
    folder = tmp_path / "killed"
    driver = subprocess.Popen(search, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    local = pyarrow.fs.LocalFileSystem()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        trials = saved_trials(local, str(folder)) if folder.is_dir() else {}
        checkpoints = [sum(map(complete, trial.glob("checkpoint_*"))) for trial in folder.glob("trial_*")]
        if len(trials) == 2 and all(name and status != "TERMINATED" for status, name in trials.values()):
            if len(checkpoints) == 2 and min(checkpoints) >= 2:
                break
        time.sleep(0.2)
    driver.kill()  # SIGKILL: no handler, no last save
    driver.wait()
    trials = saved_trials(local, str(folder))
    assert len(trials) == 2 and all(name and status != "TERMINATED" for status, name in trials.values()), (
        trials
    )

    # The kill may land while a checkpoint is being written: only those that load count.
    def complete_besides(trial_id: str, saved_name: str) -> list[str]:
        trial_folder = next(folder.glob(f"trial_{trial_id}_*"))
        return sorted(path.name for path in trial_folder.glob("checkpoint_*")
                      if path.name != saved_name and complete(path))  # fmt: skip

    (kept_id, kept_name), (lost_id, _) = sorted(
        ((trial_id, name) for trial_id, (_, name) in trials.items()),
        key=lambda item: not complete_besides(*item),  # the kept trial has one left to resume from
    )
    newest = complete_besides(kept_id, kept_name)[-1]
    kept_folder, lost_folder = (next(folder.glob(f"trial_{trial}_*")) for trial in (kept_id, lost_id))
    for checkpoint in [kept_folder / kept_name, *lost_folder.glob("checkpoint_*")]:
        shutil.rmtree(checkpoint)
    resumed = subprocess.run(
        [sys.executable, "-m", "tune", "--resume", *flags], capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "does not exist on storage anymore" not in resumed.stdout + resumed.stderr
    assert f"trial {lost_id}: no complete checkpoint left" in resumed.stdout
    assert "it starts again from step 0" in resumed.stdout
    assert f"trial {kept_id}: resuming from {newest}, its newest complete checkpoint" in resumed.stdout, (
        resumed.stdout[-3000:]
    )
    rows = read_rows(folder)
    assert len(rows) == 2 and all(row["status"] == COMPLETED and row["steps"] == "12" for row in rows), rows
