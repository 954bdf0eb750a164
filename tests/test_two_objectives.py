"""Two objectives: the flags, the table's front and order, the plot (no Ray here)."""

from __future__ import annotations

import pytest

from lstm_ae.config import ConfigError
from lstm_ae.pareto import dominates
from tune.cli import main
from tune.objectives import from_record, objectives_from_flags, to_record
from tune.results import mark_front, plot_front
from tune.space import parse_space

OBJECTIVES = (("val_mse_frame", "min"), ("val_ssim", "max"))


def test_each_metric_takes_its_units_mode_and_mode_flags_override_in_order():
    assert objectives_from_flags(["val_mse_frame", "val_ssim"], None) == OBJECTIVES
    assert objectives_from_flags(["val_psnr_db", "val_bce_nats_frame"], None) == (
        ("val_psnr_db", "max"),
        ("val_bce_nats_frame", "min"),
    )
    assert objectives_from_flags(["val_mse_frame", "val_ssim"], ["min", "min"])[1] == ("val_ssim", "min")
    assert objectives_from_flags(None, None) == ()
    assert from_record({"objectives": to_record(OBJECTIVES)}) == OBJECTIVES
    assert from_record({}) == ()


@pytest.mark.parametrize(
    "metrics, modes, message",
    [
        (["val_mse_frame", "val_ssim", "val_psnr_db"], None, "at most 2 --metric flags"),
        (["val_ssim", "val_ssim"], None, "--metric val_ssim is given twice"),
        (["val_mse_frame", "val_ssimm"], None, "got 'val_ssimm'"),
        (["val_mse_frame", "val_ssim"], ["min"], "1 --mode for 2 --metric"),
        (None, ["max"], "--mode needs --metric"),
    ],
)
def test_bad_objective_flags_name_the_problem(metrics, modes, message):
    with pytest.raises(ConfigError, match=message):
        objectives_from_flags(metrics, modes)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--metric", "val_mse_frame", "--metric", "val_ssim", "--experiment", "ablations"],
            "ablation grid ranks one",
        ),
        (["--metric", "val_mse_frame", "--mode", "max", "--mode", "min"], "2 --mode for 1 --metric"),
        (["--mode", "sideways"], "invalid choice: 'sideways'"),
    ],
)
def test_the_command_refuses_bad_objectives_in_one_line_before_ray(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--output-dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing locked or written


def rows_of(points):
    return [
        {"trial": f"t{index}", "status": "completed", "best_val_mse_frame": mse, "val_ssim": ssim}
        for index, (mse, ssim) in enumerate(points)
    ]


def test_the_table_marks_the_front_puts_it_first_and_marks_the_rules_pick():
    points = [(130.0, 0.40), (114.7, 0.41), (124.8, 0.48), (119.0, 0.43), (116.5, 0.44), (None, None)]
    rows = mark_front(rows_of(points), OBJECTIVES)
    assert [row["trial"] for row in rows] == ["t1", "t4", "t2", "t3", "t0", "t5"]
    assert [row["front"] for row in rows] == ["*", "*", "*", "", "", ""]
    assert [row["best"] for row in rows] == ["", "*", "", "", "", ""]  # 116.5 <= 114.7 * 1.02, sharper
    assert list(rows[0])[:3] == ["best", "front", "trial"]
    complete = [(row["best_val_mse_frame"], row["val_ssim"]) for row in rows[:5]]
    for row, point in zip(rows, complete):  # no marked row dominated; every unmarked one is
        dominated = any(dominates(other, point, ("min", "max")) for other in complete)
        assert (row["front"] == "*") == (not dominated)


def test_pareto_png_draws_every_trial(tmp_path):
    rows = mark_front(rows_of([(130.0, 0.40), (114.7, 0.41), (124.8, 0.48)]), OBJECTIVES)
    plot_front(tmp_path / "pareto.png", rows, OBJECTIVES)
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cpu_budget_space_searches_the_loss_with_the_head():
    import pathlib

    import yaml

    space = parse_space(yaml.safe_load(pathlib.Path("tune/spaces/cpu_budget.yaml").read_text()))
    dimensions = {dimension.name: dimension.values for dimension in space.dimensions}
    assert dimensions["loss"] == ("auto", "l1_l2") and dimensions["head"] == ("logistic", "linear")


def test_the_command_that_trains_the_best_trial_says_when_it_did_not_finish():
    from tune.results import COMPLETED, ERRORED, STOPPED_BY_SCHEDULER, train_best_line

    done = train_best_line({"trial": "a1", "status": COMPLETED, "steps": 40}, "runs/f")
    assert done == "train the best trial: python -m train --from runs/f --trial a1"
    for status in (ERRORED, STOPPED_BY_SCHEDULER):
        line = train_best_line({"trial": "b2", "status": status, "steps": 20}, "runs/f")
        assert (
            line
            == f"train the best trial: python -m train --from runs/f --trial b2  (it did not finish: {status} at step 20)"
        )
