"""`python -m tune.compare` on run folders written by hand in the layouts train and tune write.

(tests/test_tune_ray.py runs it on folders that Ray really produced.)
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from lstm_ae.config import preset
from tune.compare import comparison_table, main

CONFIG = preset("smoke").to_dict()


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
    assert set(ablation) == {"composite seed 0", "reconstruction_only seed 0"}
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
    completed = subprocess.run(
        [sys.executable, "-m", "tune.compare", str(tmp_path / "run"), "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    (run,) = [row for row in csv.DictReader(io.StringIO(completed.stdout)) if row["kind"] == "train run"]
    assert run["val_mse_frame"] == "150.0" and run["probe_accuracy"] == "" and run["wall_seconds"] == ""
