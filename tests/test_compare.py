"""`python -m tune.compare` on run folders in the layouts train and tune write, without Ray:
written by hand, or by tune's own table writers from ray.tune.Result objects built here.

(tests/test_tune_ray.py runs it on folders that Ray really produced.)
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from dataclasses import asdict

import pandas as pd
import pytest

from lstm_ae.config import preset
from tune.compare import comparison_table, main
from tune.experiment import SearchSettings
from tune.results import COMPLETED, ERRORED, STOPPED, STOPPED_BY_PATIENCE, trial_rows, write_results
from tune.space import parse_space

CONFIG = preset("smoke").to_dict()
MAX_STEPS = CONFIG["training"]["max_steps"]


def write_train_run(folder, **result):
    folder.mkdir(parents=True)
    defaults = {
        "config": CONFIG,
        "status": "completed",
        "metric": "val_mse_frame",
        "best_metric": 150.0,
        "final_metrics": {"val_mse_frame": 151.0, "val_bce_nats_frame": 700.0, "probe_accuracy": 0.3},
        "steps": 6,
        "sequences_seen": 24,
        "wall_seconds": 30.0,
        "best_checkpoint": str(folder / "checkpoint_00000006"),
    }
    (folder / "result.json").write_text(json.dumps({**defaults, **result}))


def write_search_record(folder, settings, **record):
    """search.json as tune.experiment.run_experiment writes it before the first trial."""
    folder.mkdir(parents=True)
    full_record = {"base": CONFIG, "settings": asdict(settings), **record}
    (folder / "search.json").write_text(json.dumps(full_record, indent=2))


def tune_result(folder, config, reports, error=None, best_checkpoints=()):
    """A ray.tune.Result as a ResultGrid holds it: the last report in `metrics` (with Tune's
    trial_id, time_total_s and config), every report in `metrics_dataframe`."""
    from ray.tune import Result

    folder.mkdir(parents=True)
    last = (
        {**reports[-1], "trial_id": folder.name, "time_total_s": 12.34, "config": config} if reports else {}
    )
    return Result(
        metrics=last,
        checkpoint=None,
        error=error,
        path=str(folder),
        metrics_dataframe=pd.DataFrame(reports),
        best_checkpoints=list(best_checkpoints),
    )


def run_compare(*arguments):
    completed = subprocess.run(
        [sys.executable, "-m", "tune.compare", *map(str, arguments), "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    return list(csv.DictReader(io.StringIO(completed.stdout)))


def write_csv(path, rows):
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_search_on_another_metric_still_fills_mse_bce_and_probe(tmp_path):
    folder = tmp_path / "search-bce"
    folder.mkdir()
    (folder / "search.json").write_text(json.dumps({"base": CONFIG, "settings": {"workers_per_trial": 1}}))
    write_csv(
        folder / "results.csv",
        [
            {
                "trial": "a1",
                "status": "completed",
                "hidden_size": 64,
                "best_val_bce_nats_frame": 690.0,
                "final_val_bce_nats_frame": 695.0,
                "val_mse_frame": 149.5,
                "probe_accuracy": 0.31,
                "steps": 6,
                "best_checkpoint": "/somewhere/checkpoint_000001",
            }
        ],
    )
    for metric, expected in (("val_bce_nats_frame", 690.0), ("val_mse_frame", 149.5)):
        (row,) = [row for row in comparison_table([folder], metric) if row["kind"] == "tune trial"]
        assert row[metric] == expected
        assert row["val_mse_frame"] == 149.5 and row["probe_accuracy"] == 0.31
        assert row["val_bce_nats_frame"] == (690.0 if metric == "val_bce_nats_frame" else 695.0)
        assert row["hidden_size"] == 64 and row["learning_rate"] == CONFIG["optim"]["learning_rate"]


def test_ablation_grids_join_the_table_without_untrained_prediction_figures(tmp_path):
    folder = tmp_path / "ablations"
    folder.mkdir()
    (folder / "search.json").write_text(json.dumps({"base": CONFIG, "settings": {"workers_per_trial": 1}}))
    common = {"error": "", "val_reconstruction_mse_frame": 150.0, "step": 6, "probe_accuracy_untrained": 0.2}
    write_csv(
        folder / "ablations.csv",
        [
            {"variant": "composite", "seed": 0, "val_mse_frame": 150.0, "val_bce_nats_frame": 700.0,
             "probe_accuracy": 0.3, **common},
            {"variant": "reconstruction_only", "seed": 0, "val_mse_frame": 163.0, "val_bce_nats_frame": 800.0,
             "probe_accuracy": 0.28, **common},
        ],
    )  # fmt: skip
    write_train_run(tmp_path / "run")
    rows = comparison_table([tmp_path], "val_mse_frame")
    ablation = {row["trial"]: row for row in rows if row["kind"] == "ablation trial"}
    # A table from before ablations.csv had `finished`: step 6 of max_steps 6 is completed.
    assert [row["status"] for row in ablation.values()] == [COMPLETED, COMPLETED]
    assert ablation["composite seed 0"]["val_mse_frame"] == 150.0
    assert ablation["composite seed 0"]["sequences_seen"] == 6 * CONFIG["training"]["batch_size"]
    only = ablation["reconstruction_only seed 0"]
    assert only["val_mse_frame"] is None and only["val_bce_nats_frame"] is None  # not trained
    assert only["probe_accuracy"] == 0.28 and only["reconstruction_weight"] == 1.0
    assert [row["kind"] for row in rows].count("train run") == 1


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[]", "not a readable train run: expected a JSON object, got list"),
        (b'{"status": "completed"}', "not a readable train run: no 'config' section"),
        (b"{broken", "not a readable train run: Expecting property name"),
        (b"\xff\xfe binary", "not a readable train run: 'utf-8' codec can't decode"),
    ],
)
def test_unreadable_run_folders_exit_2_naming_the_folder(tmp_path, content, message, capsys):
    (tmp_path / "bad-run").mkdir()
    (tmp_path / "bad-run" / "result.json").write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "bad-run")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert "bad-run" in error and message in error


def test_missing_figures_leave_blank_cells_not_errors(tmp_path):
    write_train_run(tmp_path / "run", wall_seconds=None, final_metrics=None)
    (run,) = [row for row in run_compare(tmp_path / "run") if row["kind"] == "train run"]
    assert run["val_mse_frame"] == "150.0" and run["probe_accuracy"] == "" and run["wall_seconds"] == ""


def test_an_ablation_trial_cut_short_shows_as_stopped_not_completed(tmp_path):
    from tune.ablations import final_metrics, write_ablations

    settings = SearchSettings(name="ablations", storage=str(tmp_path), time_budget_seconds=60)
    folder = tmp_path / "ablations"
    write_search_record(folder, settings, experiment="ablations", seeds=1)
    metrics = {"val_mse_frame": 150.0, "val_bce_nats_frame": 700.0, "probe_accuracy": 0.3}
    results = [
        tune_result(
            folder / "composite", {"variant": "composite", "seed": 0}, [{"step": MAX_STEPS, **metrics}]
        ),
        # The time budget ran out at step 2 of 6: not stopped early, no error.
        tune_result(
            folder / "cut_short", {"variant": "prediction_only", "seed": 0}, [{"step": 2, **metrics}]
        ),
        tune_result(
            folder / "patience",
            {"variant": "composite_conditioned", "seed": 0},
            [{"step": 4, "stopped_early": True, **metrics}],
        ),
        tune_result(
            folder / "errored",
            {"variant": "reconstruction_only", "seed": 0},
            [{"step": 2, **metrics}],
            error=RuntimeError("worker died"),
        ),
    ]
    write_ablations(folder, final_metrics(results, MAX_STEPS), seeds=1)
    rows = {row["trial"]: row for row in run_compare(folder) if row["kind"] == "ablation trial"}
    assert rows["prediction_only seed 0"]["status"] == STOPPED
    assert rows["prediction_only seed 0"]["steps"] == "2"
    assert rows["composite seed 0"]["status"] == COMPLETED
    assert rows["composite_conditioned seed 0"]["status"] == STOPPED_BY_PATIENCE
    assert rows["reconstruction_only seed 0"]["status"] == ERRORED


def test_a_search_table_names_each_trials_best_kept_checkpoint(tmp_path):
    """One-worker trials: Tune's best kept checkpoint. Multi-worker trials: the best of the
    checkpoint_path rows their Train run reported (not a report that carried no checkpoint)."""
    from ray.tune import Checkpoint

    settings = SearchSettings(name="search", storage=str(tmp_path), num_samples=2)
    folder = tmp_path / "search"
    write_search_record(folder, settings, experiment="search")
    space = parse_space({"learning_rate": {"loguniform": [1e-4, 1e-2]}})
    kept = {step: tmp_path / f"checkpoint_{step}" for step in (4, 6)}
    for path in kept.values():
        path.mkdir()
    one_worker = tune_result(
        folder / "one_worker",
        {"learning_rate": 1e-3},
        [{"step": 2, "val_mse_frame": 140.0}, {"step": 4, "val_mse_frame": 120.0},
         {"step": 6, "val_mse_frame": 125.0, "sequences_seen": 24}],
        best_checkpoints=[(Checkpoint.from_directory(str(kept[step])), {"step": step, "val_mse_frame": value})
                          for step, value in ((6, 125.0), (4, 120.0))],
    )  # fmt: skip
    two_workers = tune_result(
        folder / "two_workers",
        {"learning_rate": 1e-2},
        [{"step": 2, "val_mse_frame": 130.0, "checkpoint_path": "/train_runs/two_workers/checkpoint_2"},
         {"step": 3, "val_mse_frame": 100.0},
         {"step": 4, "val_mse_frame": 110.0, "checkpoint_path": "/train_runs/two_workers/checkpoint_4"}],
    )  # fmt: skip
    rows, histories = trial_rows([one_worker, two_workers], space, "val_mse_frame", MAX_STEPS, set())
    write_results(folder, rows, histories, space, "val_mse_frame")
    table = {
        row["trial"]: row
        for row in comparison_table([folder], "val_mse_frame")
        if row["kind"] == "tune trial"
    }
    assert table["one_worker"]["checkpoint"] == str(kept[4])
    assert table["one_worker"]["status"] == COMPLETED and table["one_worker"]["steps"] == MAX_STEPS
    assert table["two_workers"]["checkpoint"] == "/train_runs/two_workers/checkpoint_4"
    assert table["two_workers"]["status"] == STOPPED and table["two_workers"]["val_mse_frame"] == 100.0
    assert table["two_workers"]["best"] == "*" and table["one_worker"]["learning_rate"] == 1e-3
