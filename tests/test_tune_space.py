"""Search spaces, results tables and `python -m tune` input checks (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from command_line import run_main

from lstm_ae.config import preset
from lstm_ae.tables import to_csv, to_html, to_markdown
from tune.results import BEST_MARK, sort_rows
from tune.space import SpaceError, default_space, load_space, parse_space


def test_default_space_covers_the_four_searched_fields_and_is_valid_for_every_preset():
    for name in ("smoke", "cpu", "paper"):
        space = default_space(name)
        assert space.names == ["hidden_size", "num_layers", "learning_rate", "reconstruction_weight"]
        space.check(preset(name))
    assert default_space("paper").dimensions[0].values == (128, 256, 512, 1024, 2048, 4096)
    assert "log-uniform in [0.0001, 0.01]" in default_space("cpu").describe()


def test_yaml_space_parses_every_distribution(tmp_path):
    (tmp_path / "space.yaml").write_text(
        "hidden_size: {choice: [64, 128]}\n"
        "num_layers: {int: [1, 2]}\n"
        "learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "reconstruction_weight: {uniform: [0.0, 1.0]}\n"
        "decoder_mode: {choice: [free, conditioned]}\n"
    )
    space = load_space(tmp_path / "space.yaml")
    assert [dimension.kind for dimension in space.dimensions] == [
        "choice",
        "int",
        "loguniform",
        "uniform",
        "choice",
    ]
    ray_space = space.to_ray()
    assert set(ray_space) == set(space.names)
    assert space.dimensions[1].to_optuna().high == 2


def test_numbers_in_exponent_form_are_numbers_as_in_yaml_1_2(tmp_path):
    # PyYAML alone (YAML 1.1) reads 1e-4 as the string '1e-4'.
    (tmp_path / "space.yaml").write_text(
        "learning_rate: {loguniform: [1e-4, 1e-2]}\n"
        "weight_decay: {loguniform: [1E-6, 1.0e-3]}\n"
        "hidden_size: {choice: [64, 128]}\n"
        "decoder_mode: {choice: [free, conditioned]}\n"
    )
    space = load_space(tmp_path / "space.yaml")
    learning_rate, weight_decay, hidden_size, decoder_mode = space.dimensions
    assert learning_rate.values == (1e-4, 1e-2) and weight_decay.values == (1e-6, 1e-3)
    assert hidden_size.values == (64, 128) and all(isinstance(value, int) for value in hidden_size.values)
    assert decoder_mode.values == ("free", "conditioned")
    assert "log-uniform in [0.0001, 0.01]" in space.describe()


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"hidden": {"choice": [1]}}, "unknown config field 'hidden'"),
        ({"learning_rate": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
        ({"learning_rate": {"loguniform": [0.0, 1.0]}}, "positive low bound"),
        ({"learning_rate": {"uniform": [0.1, 0.01]}}, "low must be below high"),
        ({"num_layers": {"int": [1.5, 3]}}, "integer bounds"),
        ({"hidden_size": {"uniform": [128, 1024]}}, "hidden_size: takes whole numbers"),
        ({"batch_size": {"loguniform": [8, 64]}}, r"use \{int: \[low, high\]\}"),
        ({"max_steps": {"choice": [10, 20]}}, "max_steps: fixed for the whole experiment"),
        ({"metric": {"choice": ["val_mse_frame"]}}, "set it with --metric instead"),
        ({"learning_rate": 0.1}, "expected one of"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_malformed_spaces_name_the_problem(entries, message):
    with pytest.raises(SpaceError, match=message):
        parse_space(entries)


@pytest.mark.parametrize(
    "entries, message",
    [
        (
            {"reconstruction_weight": {"uniform": [0.0, 1.5]}},
            "reconstruction_weight must be in [0, 1], got 1.5",
        ),
        ({"hidden_size": {"choice": [64, 0]}}, "hidden_size must be a positive integer, got 0"),
        ({"decoder_mode": {"choice": ["free", "teacher"]}}, "decoder_mode must be one of"),
    ],
)
def test_out_of_range_bounds_are_caught_by_the_config_validation(entries, message):
    with pytest.raises(SpaceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_space(entries).check(preset("smoke"))


def test_every_searched_batch_size_must_split_over_the_workers_of_a_trial():
    space = parse_space({"batch_size": {"choice": [8, 6]}})
    space.check(preset("smoke"), workers_per_trial=2)
    with pytest.raises(SpaceError, match="batch_size 6 that does not split over 4 workers"):
        space.check(preset("smoke"), workers_per_trial=4)


@pytest.fixture
def run_tune(capsys):
    """`python -m tune ARGUMENTS` run in this process (tests/command_line.py says why)."""
    from tune.cli import main

    return lambda *arguments: run_main(main, arguments, capsys)


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "reconstruction_weight: {uniform: [0.0, 2.0]}\n",
            "reconstruction_weight must be in [0, 1], got 2.0",
        ),
        ("learning_rate: [1, 2\n", "is not valid YAML"),
        ("num_layers: {int: [1, 2]}\nlearning_rate: {uniform: [1, 2}\n", "not valid YAML at line 2"),
        ("dropouts: {uniform: [0, 0.5]}\n", "unknown config field 'dropouts'"),
    ],
)
def test_bad_space_files_exit_2_with_one_line(run_tune, tmp_path, content, message):
    (tmp_path / "space.yaml").write_text(content)
    completed = run_tune("--preset", "smoke", "--space", str(tmp_path / "space.yaml"))
    assert completed.returncode == 2 and message in completed.stderr
    assert completed.stderr.count("\n") == 1 and "Traceback" not in completed.stderr


def test_base_point_is_the_base_configs_values_of_the_searched_fields():
    space = parse_space(
        {
            "hidden_size": {"choice": [16, 32]},
            "learning_rate": {"loguniform": [1e-3, 1e-1]},
            "head": {"choice": ["linear", "logistic"]},
        }
    )
    base = preset("smoke", hidden_size=32)
    assert space.base_point(base) == {"hidden_size": 32, "learning_rate": 1e-2, "head": "logistic"}
    with pytest.raises(SpaceError, match="base's hidden_size 64 is outside the search space"):
        space.base_point(base.replace(hidden_size=64))


def test_bad_flags_exit_2_with_one_line(run_tune, tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00binary")
    for arguments, message in (
        (["--num-samples", "0"], "--num-samples must be at least 1"),
        (["--space", str(tmp_path / "missing.yaml")], "search space file not found"),
        (["--resume"], "--resume needs the --name"),
        (["--learning-rate", "-1"], "learning_rate must be a positive number"),
        (["--cpus-per-worker", "0"], "--cpus-per-worker must be positive"),
        (["--space", str(tmp_path / "binary.yaml")], "binary.yaml is not a text (UTF-8) file"),
        (["--base-first", "--learning-rate", "0.5"], "--base-first: the base's learning_rate 0.5 is outside"),
    ):
        completed = run_tune("--preset", "smoke", *arguments)
        assert completed.returncode == 2 and message in completed.stderr, completed.stderr


def test_rows_sort_best_first_and_render_in_every_format():
    rows = [
        {"trial": "a", "best_val_mse_frame": 120.0},
        {"trial": "b", "best_val_mse_frame": None},
        {"trial": "c", "best_val_mse_frame": 101.5},
    ]
    ordered = sort_rows(rows, "best_val_mse_frame", "min")
    assert [row["trial"] for row in ordered] == ["c", "a", "b"]
    assert [row["best"] for row in ordered] == [BEST_MARK, "", ""]
    assert to_markdown(ordered).splitlines()[2] == "| * | c | 101.5 |"
    assert to_csv(ordered).splitlines()[0] == "best,trial,best_val_mse_frame"
    assert "<td>101.5</td>" in to_html(ordered)
    assert [row["trial"] for row in sort_rows(rows, "best_val_mse_frame", "max")][0] == "a"


@pytest.mark.slow
def test_python_m_tune_lists_its_flags_and_refuses_a_bad_one_in_one_line():
    """The real entry point, in its own interpreter (the other command-line tests call main)."""

    def python_m_tune(*arguments):
        command = [sys.executable, "-m", "tune", *arguments]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    completed = python_m_tune("--help")
    assert completed.returncode == 0
    for flag in ("--num-samples", "--search-seed", "--space", "--hidden-size", "--seed"):
        assert flag in completed.stdout
    completed = python_m_tune("--preset", "smoke", "--num-samples", "0")
    assert (
        completed.returncode == 2 and completed.stderr == "error: --num-samples must be at least 1, got 0\n"
    )


def write_experiment_record(folder, base, space):
    from dataclasses import asdict

    folder.mkdir(parents=True)
    record = {"base": base.to_dict(), "space": [asdict(dimension) for dimension in space.dimensions]}
    (folder / "search.json").write_text(json.dumps(record))


def test_a_resumed_search_keeps_its_saved_config_and_space_and_refuses_new_ones(run_tune, tmp_path):
    from tune.cli import build_parser, resumed_experiment
    from tune.experiment import SearchSettings, saved_experiment

    base = preset("smoke", hidden_size=16, max_steps=9)
    space = parse_space({"learning_rate": {"loguniform": [1e-3, 1e-2]}})
    write_experiment_record(tmp_path / "exp", base, space)
    record = saved_experiment(SearchSettings(name="exp", storage=str(tmp_path)))
    arguments = build_parser().parse_args(["--name", "exp", "--resume"])  # default preset: cpu
    resumed_base, resumed_space, _ = resumed_experiment(arguments, record)
    assert resumed_base == base and resumed_space == space
    common = ("--output-dir", str(tmp_path), "--name", "exp", "--resume")
    (tmp_path / "other.yaml").write_text("hidden_size: {choice: [16, 32]}\n")
    for arguments, message in (
        (
            ["--hidden-size", "64", "--max-steps", "9", "--seed", "3"],
            "these flags differ from it: --hidden-size 64 (saved: 16), --seed 3 (saved: 0); drop them",
        ),
        (["--experiment", "ablations"], "experiment 'exp' is search: resume it with --experiment search"),
        (["--space", str(tmp_path / "other.yaml")], "keeps the experiment's saved search space"),
    ):
        completed = run_tune(*common, *arguments)
        assert completed.returncode == 2 and message in completed.stderr, completed.stderr
        assert completed.stderr.count("\n") == 1
    # The command as it was started, with --resume added: equal flags and space are accepted.
    (tmp_path / "same.yaml").write_text("learning_rate: {loguniform: [1.0e-3, 1.0e-2]}\n")
    same = build_parser().parse_args(
        ["--preset", "smoke", "--hidden-size", "16", "--max-steps", "9", "--space", str(tmp_path / "same.yaml"),
         "--name", "exp", "--resume"]
    )  # fmt: skip
    assert resumed_experiment(same, record)[:2] == (base, space)
    (tmp_path / "exp" / "search.json").write_text("{}")
    completed = run_tune(*common)
    assert completed.returncode == 2 and "not a readable experiment record" in completed.stderr


def test_asha_counts_steps_or_with_a_time_budget_seconds_of_training():
    from tune.search import asha_clock

    steps = asha_clock(
        preset("cpu", max_minutes=0.0, max_steps=900, eval_every=300), grace_period=2, reduction_factor=3
    )
    assert steps == {"time_attr": "step", "max_t": 900, "grace_period": 600}
    timed = asha_clock(preset("cpu", max_minutes=9.0, max_steps=10**6), grace_period=2, reduction_factor=3)
    assert timed == {"time_attr": "training_seconds", "max_t": pytest.approx(594.0), "grace_period": 60.0}
