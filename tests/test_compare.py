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


@pytest.mark.slow
def test_missing_figures_leave_blank_cells_not_errors(tmp_path):
    write_train_run(tmp_path / "run", wall_seconds=None, final_metrics=None)
    (run,) = [row for row in run_compare(tmp_path / "run") if row["kind"] == "train run"]
    assert run["val_mse_frame"] == "150.0" and run["probe_accuracy"] == "" and run["wall_seconds"] == ""


@pytest.mark.slow
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
    for path in kept.values():  # a kept checkpoint holds its file (an emptied one was set aside)
        path.mkdir()
        (path / "checkpoint.pt").write_bytes(b"weights")
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


# ------------------------------------------------------------------------------ HTML report

CLUSTER_ROOT = "/cluster/lstm-ae"  # where the search ran: its recorded checkpoint paths start here


def render_pictures(folder, history, seed):
    """curves.png, prediction.gif, frames.png (and reconstruction.gif) as a run writes them:
    lstm_ae.viz.render_run on an untrained tiny model (weights from `seed`) and two moving squares."""
    import torch

    from lstm_ae.model import CompositeLSTMAutoencoder
    from lstm_ae.viz import render_run

    config = preset("smoke", hidden_size=8)
    torch.manual_seed(seed)
    sequences = torch.zeros(2, 20, 1, 64, 64)  # (B, T, C, H, W)
    for t in range(20):
        sequences[0, t, 0, 20:30, 2 + 2 * t : 12 + 2 * t] = 1.0
        sequences[1, t, 0, 2 + 2 * t : 12 + 2 * t, 30:40] = 1.0
    folder.mkdir(parents=True, exist_ok=True)
    render_run(folder, CompositeLSTMAutoencoder(config.model), sequences, config, history)


def history(values):
    """A run's history as render_run takes it: training losses, then a validation, per step."""
    losses = {"loss": 1.0, "reconstruction_loss": 0.6, "prediction_loss": 0.4}
    baselines = {"baseline_zeros_mse_frame": 200.0, "baseline_copy_last_mse_frame": 180.0}
    rows = []
    for step, value in enumerate(values, start=1):
        rows.append({"step": step, **{name: loss / step for name, loss in losses.items()}})
        rows.append({"step": step, "val_mse_frame": value, "elapsed_seconds": 20.0 * step, **baselines})
    return rows


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory):
    """A train run (pictures in its folder) and a search whose best trial's checkpoint was
    recorded on the cluster and copied here (pictures in the checkpoint, as the trial wrote
    them): the search's best trial is the best row."""
    root = tmp_path_factory.mktemp("report")
    final = {"val_mse_frame": 151.0, "baseline_zeros_mse_frame": 200.0, "baseline_copy_last_mse_frame": 180.0}
    write_train_run(root / "run-a", best_metric=150.0, final_metrics=final)
    render_pictures(root / "run-a", history([170.0, 150.0]), seed=0)

    settings = SearchSettings(name="search", storage=CLUSTER_ROOT, num_samples=2)
    folder = root / "search"
    write_search_record(folder, settings, experiment="search")
    space = parse_space({"learning_rate": {"loguniform": [1e-4, 1e-2]}})
    best_checkpoint = f"{CLUSTER_ROOT}/search/train_runs/trial_b/checkpoint_000004"
    results = [
        tune_result(folder / "trial_a", {"learning_rate": 1e-3}, [{"step": 2, "val_mse_frame": 160.0}]),
        tune_result(
            folder / "trial_b",
            {"learning_rate": 1e-2},
            [{"step": 2, "val_mse_frame": 140.0, "checkpoint_path": f"{CLUSTER_ROOT}/search/train_runs/trial_b/checkpoint_000002"},
             {"step": 4, "val_mse_frame": 120.0, "checkpoint_path": best_checkpoint}],
        ),
    ]  # fmt: skip
    rows, histories = trial_rows(results, space, "val_mse_frame", MAX_STEPS, set())
    write_results(folder, rows, histories, space, "val_mse_frame")
    render_pictures(folder / "train_runs" / "trial_b" / "checkpoint_000004", history([140.0, 120.0]), seed=1)
    (folder / "train_runs" / "trial_b" / "checkpoint_000002").mkdir()  # no pictures: not chosen

    report = root / "report.html"
    assert main([str(root / "run-a"), str(folder), "--format", "html", "--output", str(report)]) == 0
    return root, report


@pytest.mark.slow
def test_the_html_report_is_one_page_with_the_table_and_each_runs_pictures(report_inputs):
    import base64
    import re

    root, report = report_inputs
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count('class="dataframe"') == page.count("<table") == 1
    (best_row,) = re.findall(r'<tr class="best">(.*?)</tr>', page, re.S)
    assert "<td>best</td>" in best_row and "trial_b" in best_row and "120" in best_row
    references = re.findall(r'<tr class="reference">(.*?)</tr>', page, re.S)
    assert any("341.2" in row for row in references) and any("all-zeros" in row for row in references)
    # Nothing fetched from anywhere: every src is a data URI, no link leaves the page.
    assert not re.search(r"https?://", page)
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", page)
    sources = re.findall(r'<img src="data:(image/(?:png|gif));base64,([A-Za-z0-9+/=]+)"', page)
    assert len(sources) == len(re.findall(r"<img ", page)) == 3 + 4  # the run's 3, the trial's 3 + trials.png
    # Sections best first; the search's pictures are its best trial's, found in the local copy.
    search_at = page.index("<h2>Search search: best trial trial_b</h2>")
    run_at = page.index("<h2>Train run run-a</h2>")
    assert page.index("</table>") < search_at < run_at
    checkpoint = root / "search" / "train_runs" / "trial_b" / "checkpoint_000004"
    for name in ("curves.png", "prediction.gif", "frames.png"):
        embedded = base64.b64encode((checkpoint / name).read_bytes()).decode("ascii")
        assert search_at < page.index(embedded) < run_at, name
        embedded = base64.b64encode((root / "run-a" / name).read_bytes()).decode("ascii")
        assert page.index(embedded) > run_at, name
    assert base64.b64encode((root / "search" / "trials.png").read_bytes()).decode("ascii") in page
    assert {mime for mime, _ in sources} == {"image/png", "image/gif"}


@pytest.mark.slow
def test_the_html_report_renders_in_headless_chromium(report_inputs):
    import shutil
    from pathlib import Path

    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    root, report = report_inputs
    screenshot = root / "report.png"
    script = Path(__file__).resolve().parents[1] / "scripts" / "report_screenshot.sh"
    completed = subprocess.run(
        [str(script), str(report), str(screenshot)], capture_output=True, text=True, timeout=180
    )
    assert completed.returncode == 0, completed.stderr
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 50_000


@pytest.mark.parametrize(
    "path, output, message",
    [
        ("missing", "report.html", "not a folder: "),
        ("empty", "report.html", "holds no train run (result.json), tune experiment"),
        ("run-a", "no-such-folder/report.html", "cannot write "),
        ("run-a", ".", "cannot write "),  # a folder
    ],
)
def test_report_mistakes_exit_2_with_one_line(report_inputs, tmp_path, capsys, path, output, message):
    root, _ = report_inputs
    (tmp_path / "empty").mkdir()
    folder = root / path if path == "run-a" else tmp_path / path
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), "--format", "html", "--output", str(tmp_path / output)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and message in error, error


def test_a_two_objective_search_keeps_its_front_in_the_table_and_the_html(tmp_path):
    import re

    objectives = (("val_mse_frame", "min"), ("val_ssim", "max"))
    settings = SearchSettings(name="front", storage=str(tmp_path), num_samples=3, objectives=objectives)
    folder = tmp_path / "front"
    write_search_record(folder, settings, experiment="search")
    space = parse_space({"learning_rate": {"loguniform": [1e-4, 1e-2]}})
    reports = {  # (MSE, SSIM) per report; the front: sharp (b), low error (a); c is dominated by a
        "a": [(130.0, 0.30), (115.0, 0.40)],
        "b": [(125.0, 0.50), (121.0, 0.47)],
        "c": [(118.0, 0.35), (117.0, 0.38)],
    }
    results = [
        tune_result(folder / name, {"learning_rate": 1e-3},
                    [{"step": 2 * (i + 1), "val_mse_frame": m, "val_ssim": s} for i, (m, s) in enumerate(rows)])
        for name, rows in reports.items()
    ]  # fmt: skip
    rows, histories = trial_rows(results, space, "val_mse_frame", MAX_STEPS, set(), objectives=objectives)
    assert [(row["trial"], row["front"], row["val_ssim"]) for row in rows] == [
        ("a", "*", 0.40),
        ("b", "*", 0.47),
        ("c", "", 0.38),
    ]
    assert "pareto.png" in write_results(
        folder, rows, histories, space, "val_mse_frame", objectives=objectives
    )
    table = [row for row in comparison_table([folder], "val_mse_frame") if row["kind"] == "tune trial"]
    assert {row["trial"]: row["front"] for row in table} == {"a": "*", "b": "*", "c": ""}
    assert {row["trial"]: row["val_ssim"] for row in table}["b"] == 0.47
    report = tmp_path / "report.html"
    assert main([str(folder), "--format", "html", "--output", str(report)]) == 0
    page = report.read_text(encoding="utf-8")
    (front_row,) = re.findall(r'<tr class="front">(.*?)</tr>', page, re.S)  # a is best, b the other
    assert "<td>b</td>" in front_row and "Pareto front" in page
    import base64

    assert page.count("<img ") == 2  # the search's trials.png and pareto.png (no checkpoint pictures here)
    assert base64.b64encode((folder / "pareto.png").read_bytes()).decode("ascii") in page


def test_the_command_that_trains_the_best_row_is_printed_where_it_is_a_search_trial(tmp_path, capsys):
    search = tmp_path / "search"
    search.mkdir()
    (search / "search.json").write_text(json.dumps({"base": CONFIG, "settings": {"workers_per_trial": 1}}))
    rows = [{"trial": "a1", "status": "completed", "best_val_mse_frame": 140.0, "steps": 6}]
    write_csv(search / "results.csv", rows + [{**rows[0], "trial": "b2", "best_val_mse_frame": 145.0}])
    write_train_run(tmp_path / "run", best_metric=150.0)
    line = f"train the best trial: python -m train --from {search} --trial a1"
    assert main([str(search), str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.endswith(f"\n\n{line}\n")
    assert main([str(search), "--format", "csv"]) == 0  # the table alone on stdout, the line beside it
    captured = capsys.readouterr()
    assert line not in captured.out and captured.err.strip() == line
    assert main([str(search), "--output", str(tmp_path / "table.md")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'table.md'}\n{line}\n"
    write_train_run(tmp_path / "better-run", best_metric=120.0)  # a train run is best: no line
    assert main([str(search), str(tmp_path / "better-run")]) == 0
    assert "train the best trial" not in capsys.readouterr().out
