"""`python -m train --from PATH`: the config of a run, a trial, a search's or ablation grid's
best trial, or a config file, with the flags given applied; provenance; bad sources (no Ray).

The folders are real files in the layouts the tools write: a run folder as `python -m train`
leaves it, an experiment folder with search.json and Tune's trial folders (params.json,
result.json lines in Tune's format, checkpoint_<n>/ folders) and each trial's config.json.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from lstm_ae.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from lstm_ae.config import ExperimentConfig, preset
from lstm_ae.model import CompositeLSTMAutoencoder
from lstm_ae.pareto import rule_text
from records.sources import SourceError, source_label, train_command, write_config_file
from train import cli
from train.worker import LocalSession, WorkerSettings, _build_or_restore, loop_config, train_function

BASE = preset("smoke", hidden_size=16, cache_dir="/tmp/lstm_ae_from_source_cache")
OVERRIDES = ["--max-steps", "7", "--learning-rate", "0.002", "--eval-every", "7", "--checkpoint-every", "7"]
OVERRIDDEN = {"max_steps": 7, "learning_rate": 0.002, "eval_every": 7, "checkpoint_every": 7}


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))


def checkpoint(folder: Path, config: ExperimentConfig, step: int) -> Path:
    torch.manual_seed(step)
    model = CompositeLSTMAutoencoder(config.model)
    save_checkpoint(folder, model, step, config)
    return folder


def report(trial_id: str, step: int, values: dict, sampled: dict, checkpoint_name: str | None) -> dict:
    """One line of a Tune trial's result.json (the keys a real smoke search wrote)."""
    line = {"step": step, "sequences_seen": 4 * step, "loss": 800.0, **values, "final": False}
    line.update(
        {"timestamp": 1796093541, "checkpoint_dir_name": checkpoint_name, "should_checkpoint": True}
        if checkpoint_name
        else {"timestamp": 1796093541}
    )
    line.update(
        {"done": False, "training_iteration": step // 3, "trial_id": trial_id, "date": "2026-12-01_02-52-21"}
    )
    line.update({"time_this_iter_s": 2.9, "time_total_s": 2.9 * step, "pid": 15266, "hostname": "vm"})
    line.update(
        {"node_ip": "192.0.2.2", "config": sampled, "time_since_restore": 2.9, "iterations_since_restore": 1}
    )
    return line


def make_trial(
    experiment: Path,
    index: int,
    trial_id: str,
    sampled: dict,
    reports: list[tuple[int, dict]],
    config: ExperimentConfig | None,
    keep=(),
) -> Path:
    """A Tune trial folder: params.json, result.json (one report per (step, values), each with
    a checkpoint), the checkpoints whose steps are in `keep`, and config.json where `config`."""
    name = ",".join(f"{key}={value}" for key, value in sampled.items())
    folder = experiment / f"trial_{trial_id}_{index}_{name}_2026-12-01_02-52-{index:02d}"
    write_json(folder / "params.json", sampled)
    lines = []
    for number, (step, values) in enumerate(reports):
        checkpoint_name = f"checkpoint_{number:06d}"
        lines.append(json.dumps(report(trial_id, step, values, sampled, checkpoint_name)))
        if step in keep:
            checkpoint(folder / checkpoint_name, config or BASE, step)
    (folder / "result.json").write_text("".join(line + "\n" for line in lines))
    if config is not None:
        write_config_file(str(folder), config)
    return folder


def make_search(root: Path, objectives=None) -> dict:
    """A search of four trials: the best by MSE (b2), a worse one (a1), one that errored before
    validating (NaN), one that never reported. Returns {trial id: config}."""
    experiment = root / "search"
    record = {"base": BASE.to_dict(), "settings": {"name": "search", "storage": str(root)}, "space": []}
    if objectives:
        record["objectives"] = objectives
    write_json(experiment / "search.json", record)
    configs = {
        "a1": BASE.replace(hidden_size=32, learning_rate=0.003),
        "b2": BASE.replace(hidden_size=24, learning_rate=0.004, reconstruction_weight=0.25),
        "c3": BASE.replace(hidden_size=8),
        "d4": BASE.replace(hidden_size=16, learning_rate=0.001),
    }
    make_trial(
        experiment,
        1,
        "a1",
        {"hidden_size": 32, "learning_rate": 0.003},
        [(3, {"val_mse_frame": 140.0, "val_ssim": 0.30}), (6, {"val_mse_frame": 139.0, "val_ssim": 0.35})],
        configs["a1"],
        keep=(3, 6),
    )
    make_trial(
        experiment,
        2,
        "b2",
        {"hidden_size": 24, "learning_rate": 0.004, "reconstruction_weight": 0.25},
        [(3, {"val_mse_frame": 137.0, "val_ssim": 0.20}), (6, {"val_mse_frame": 138.0, "val_ssim": 0.40})],
        configs["b2"],
        keep=(3, 6),
    )
    make_trial(experiment, 3, "c3", {"hidden_size": 8}, [(3, {"val_mse_frame": math.nan})], configs["c3"])
    make_trial(experiment, 4, "d4", {"hidden_size": 16, "learning_rate": 0.001}, [], configs["d4"])
    (experiment / "tuner.pkl").write_bytes(b"")  # Tune's own files beside the trials
    return configs


def make_ablations(root: Path) -> dict:
    """An ablation grid where the reconstruction-only trial has the lowest prediction MSE (an
    untrained predictor's number), which must not make it the best."""
    experiment = root / "grid"
    write_json(experiment / "search.json", {"base": BASE.to_dict(), "experiment": "ablations", "seeds": 1})
    configs = {
        "58e28_00000": BASE.replace(reconstruction_weight=1.0, seed=0),
        "58e28_00001": BASE.replace(reconstruction_weight=0.0, seed=0),
        "58e28_00002": BASE.replace(reconstruction_weight=0.5, seed=0),
    }
    for index, (trial_id, value) in enumerate(zip(configs, (100.0, 142.0, 141.0))):
        variant = ("reconstruction_only", "prediction_only", "composite")[index]
        make_trial(
            experiment,
            index,
            trial_id,
            {"seed": 0, "variant": variant},
            [(3, {"val_mse_frame": value})],
            configs[trial_id],
            keep=(3,),
        )
    return configs


def make_run(root: Path, config: ExperimentConfig) -> Path:
    """A finished run folder as `python -m train` writes it (its best checkpoint at step 6)."""
    run = root / "run"
    write_json(
        run / "config.json", {"config": config.to_dict(), "scaling": {"num_workers": 2}, "precision": {}}
    )
    checkpoint(run / "checkpoint_00000006", config, 6)
    result = {
        "name": "run",
        "status": "completed",
        "steps": 6,
        "metric": "val_mse_frame",
        "metric_mode": "min",
        "best_metric": 145.2,
        "best_checkpoint": "/elsewhere/when/it/ran/run/checkpoint_00000006",  # a copied folder
        "config": config.to_dict(),
    }
    write_json(run / "result.json", result)
    return run


def resolved(argv: list[str]):
    """(config, source) as `python -m train ARGV` would train them, without Ray."""
    arguments = cli.build_parser().parse_args(argv)
    source = cli.read_from(arguments)
    return cli.resolve_config(arguments, None, source), source


# ------------------------------------------------------------------------------- each kind


def test_each_kind_of_source_gives_its_config_with_the_flags_applied(tmp_path):
    search = make_search(tmp_path)
    grid = make_ablations(tmp_path)
    run_config = BASE.replace(hidden_size=40, batch_size=8, weight_decay=0.05)
    run = make_run(tmp_path, run_config)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run_config.to_dict()))
    trial_folder = next((tmp_path / "search").glob("trial_a1_*"))
    cases = {
        "run folder": ([str(run)], run_config),
        "trial folder": ([str(trial_folder)], search["a1"]),
        "search (its best trial)": ([str(tmp_path / "search")], search["b2"]),
        "search --trial": ([str(tmp_path / "search"), "--trial", "a1"], search["a1"]),
        "ablation grid (its best trial)": ([str(tmp_path / "grid")], grid["58e28_00002"]),
        "config.json of a run": ([str(run / "config.json")], run_config),
        "YAML config": ([str(tmp_path / "config.yaml")], run_config),
        "file:// URI of a run": ([f"file://{run}"], run_config),
    }
    for kind, (source_argv, expected) in cases.items():
        config, source = resolved(["--from", *source_argv, *OVERRIDES])
        assert config == expected.replace(**OVERRIDDEN), kind
        # No flag: the source's config exactly (not the preset's values).
        assert resolved(["--from", *source_argv])[0] == expected, kind
        assert source.record["path"], kind


def test_a_search_chooses_by_its_metric_and_records_why(tmp_path):
    make_search(tmp_path)
    _, source = resolved(["--from", str(tmp_path / "search")])
    record = source.record
    assert record["kind"] == "trial" and record["trial"] == "b2"
    assert record["experiment"] == str(tmp_path / "search")
    assert (record["metric"], record["mode"], record["value"]) == ("val_mse_frame", "min", 137.0)
    assert record["rule"] == "the best val_mse_frame (min) of 2 trial(s)"  # c3 (NaN) and d4 skipped
    # The best checkpoint is the report's whose value made the trial best (step 3, not the last).
    assert record["checkpoint"].endswith("/checkpoint_000000")
    assert load_checkpoint(record["checkpoint"])["step"] == 3
    assert "objectives" not in record


def test_a_checkpoint_tune_deleted_is_not_the_best(tmp_path):
    make_search(tmp_path)
    trial = next((tmp_path / "search").glob("trial_b2_*"))
    for file in (trial / "checkpoint_000000").iterdir():
        file.unlink()
    (trial / "checkpoint_000000").rmdir()
    _, source = resolved(["--from", str(tmp_path / "search")])
    assert source.record["trial"] == "b2" and source.record["checkpoint"].endswith("/checkpoint_000001")


def test_two_objectives_take_the_fronts_rule_and_say_so(tmp_path, capsys):
    objectives = [{"metric": "val_mse_frame", "mode": "min"}, {"metric": "val_ssim", "mode": "max"}]
    search = make_search(tmp_path, objectives)
    config, source = resolved(["--from", str(tmp_path / "search")])
    # At each trial's best-MSE report: a1 (139.0, 0.35), b2 (137.0, 0.20). a1 is within 2% of
    # 137 (139.74) and sharper: the rule takes a1, which the MSE alone would not.
    assert config == search["a1"]
    record = source.record
    assert record["trial"] == "a1"
    assert record["objectives"] == {"val_mse_frame": 139.0, "val_ssim": 0.35}
    assert record["rule"].startswith(rule_text(["val_mse_frame", "val_ssim"]))
    assert rule_text(["val_mse_frame", "val_ssim"]) in source.describe()
    # --trial takes another trial of the front, with that trial's values.
    _, chosen = resolved(["--from", str(tmp_path / "search"), "--trial", "b2"])
    assert chosen.record["objectives"] == {"val_mse_frame": 137.0, "val_ssim": 0.20}
    assert chosen.record["rule"] == "chosen with --trial"
    _, unreported = resolved(["--from", str(tmp_path / "search"), "--trial", "d4"])  # never validated
    assert "val_mse_frame none, val_ssim none" in unreported.describe()


def test_an_ablation_grid_never_picks_a_variant_that_does_not_train_the_metric(tmp_path):
    make_ablations(tmp_path)
    _, source = resolved(["--from", str(tmp_path / "grid")])
    assert source.record["trial"] == "58e28_00002"  # not 58e28_00000 (reconstruction only, 100.0)
    _, chosen = resolved(["--from", str(tmp_path / "grid"), "--trial", "58e28_00000"])
    assert chosen.config.model.reconstruction_weight == 1.0  # --trial still takes it


def test_a_trial_without_its_config_file_is_refused_in_one_line(tmp_path):
    make_search(tmp_path)
    trial = next((tmp_path / "search").glob("trial_b2_*"))
    (trial / "config.json").unlink()
    with pytest.raises(SourceError, match=r"trial b2 has no config.json \(it never started\)"):
        resolved(["--from", str(tmp_path / "search"), "--trial", "b2"])


def test_the_printed_command_reproduces_the_trials_config_exactly(tmp_path):
    folder = tmp_path / "a search with spaces"
    folder.mkdir()
    search = make_search(folder)
    command = train_command(str(folder / "search"), "a1")
    assert command == f"python -m train --from {shlex.quote(str(folder / 'search'))} --trial a1"
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "train"]
    config, source = resolved(words[3:])
    assert config == search["a1"] and config.to_dict() == search["a1"].to_dict()
    assert source.record["trial"] == "a1"


def test_the_default_run_name_says_where_it_came_from():
    assert source_label("runs/my-search", "b2") == "b2"
    assert source_label("s3://bucket/runs/my search/") == "my-search"
    assert source_label("configs/best.yaml") == "best"


# ------------------------------------------------------------------------------- bad sources


@pytest.fixture
def no_ray(monkeypatch):
    """Every bad source must be refused before training (and Ray) starts."""

    def refuse(*arguments, **keywords):
        raise AssertionError("run_training was reached")

    monkeypatch.setattr(cli, "run_training", refuse)


def bad_sources(root: Path) -> dict[str, tuple[list[str], str]]:
    make_search(root)
    run = make_run(root, BASE)
    (root / "broken.json").write_text('{"config": {"model": ')
    (root / "broken.yaml").write_text("model: [unclosed\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    write_json(root / "unknown_field.json", {"config": {"model": {"hidden_size": 8, "attention_heads": 4}}})
    write_json(root / "other_version.json", {"model": {"hidden_size": 8}, "scheduler": {"kind": "step"}})
    write_json(root / "bad_value.json", {"model": {"hidden_size": -3}})
    empty = root / "empty_search"
    write_json(empty / "search.json", {"base": BASE.to_dict()})
    make_trial(empty, 1, "e1", {"hidden_size": 8}, [(3, {"val_mse_frame": math.inf})], BASE)
    (root / "not_a_source").mkdir()
    write_json(root / "bad_search" / "search.json", ["not", "a", "record"])
    no_checkpoint = root / "no_checkpoint"
    write_json(no_checkpoint / "config.json", {"config": BASE.to_dict()})
    return {
        "missing": (["--from", str(root / "nothing")], "no such file or folder"),
        "invalid JSON": (["--from", str(root / "broken.json")], "is not valid JSON"),
        "invalid YAML": (["--from", str(root / "broken.yaml")], "is not valid YAML at line"),
        "not a mapping": (["--from", str(root / "list.yaml")], "holds no config"),
        "unknown field": (
            ["--from", str(root / "unknown_field.json")],
            "unknown model field(s): attention_heads",
        ),
        "another model version": (
            ["--from", str(root / "other_version.json")],
            "unknown config section(s): scheduler",
        ),
        "bad value": (["--from", str(root / "bad_value.json")], "hidden_size must be a positive integer"),
        "no finished trial": (["--from", str(empty)], "no finished trial in"),
        "not a source": (["--from", str(root / "not_a_source")], "not a run folder (config.json), a search"),
        "unreadable search record": (["--from", str(root / "bad_search")], "is not an experiment record"),
        "--trial on a run": (["--from", str(run), "--trial", "a1"], "is a run folder, not a search"),
        "--trial on a config file": (
            ["--from", str(run / "config.json"), "--trial", "a1"],
            "is a config file",
        ),
        "unknown trial": (["--from", str(root / "search"), "--trial", "zz9"], "no such trial in"),
        "--trial without --from": (["--trial", "a1"], "--trial needs --from"),
        "--init-from-checkpoint without --from": (["--init-from-checkpoint"], "needs --from"),
        "--from with --preset": (
            ["--from", str(run), "--preset", "smoke"],
            "both choose the starting config",
        ),
        "--from with --resume": (["--from", str(run), "--resume", "--name", "x"], "--from starts a new run"),
        "a flag that breaks the source's config": (["--from", str(run), "--batch-size", "0"], "batch_size"),
        "weights that do not fit a changed model": (
            ["--from", str(run), "--init-from-checkpoint", "--hidden-size", "8"],
            "does not fit this config's model",
        ),
        "no checkpoint to start from": (
            ["--from", str(no_checkpoint), "--init-from-checkpoint"],
            "kept no checkpoint to start from",
        ),
    }


def test_each_bad_source_exits_2_with_one_line_before_ray_starts(tmp_path, capsys, no_ray):
    for case, (argv, message) in bad_sources(tmp_path).items():
        with pytest.raises(SystemExit) as exit_:
            cli.main([*argv, "--output-dir", str(tmp_path / "runs")])
        captured = capsys.readouterr()
        assert exit_.value.code == 2, case
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            case,
            captured.err,
        )
        assert "Traceback" not in captured.err + captured.out, case
    assert not (tmp_path / "runs").exists()  # no run folder was locked


# ------------------------------------------------------------------------------- the new run


def test_the_run_is_handed_its_source_and_the_weights_to_start_from(tmp_path, capsys, monkeypatch):
    make_search(tmp_path)
    handed = {}

    def capture(config, scaling, settings):
        handed.update(config=config, settings=settings)
        raise SystemExit(0)  # stop before Ray

    monkeypatch.setattr(cli, "run_training", capture)
    with pytest.raises(SystemExit):
        cli.main(
            [
                "--from",
                str(tmp_path / "search"),
                "--init-from-checkpoint",
                "--max-steps",
                "7",
                "--output-dir",
                str(tmp_path / "runs"),
            ]
        )
    settings = handed["settings"]
    assert settings.name.startswith("lstm-ae-from-search-")
    assert settings.source["trial"] == "b2" and settings.source["value"] == 137.0
    assert settings.source["overrides"] == {"max_steps": 7}
    assert settings.source["initial_weights"] == settings.initial_weights
    assert settings.initial_weights.endswith(
        "trial_b2_2_hidden_size=24,learning_rate=0.004,reconstruction_weight=0.25_2026-12-01_02-52-02/checkpoint_000000"
    )
    printed = capsys.readouterr().out
    assert "config of trial b2 of" in printed and "overridden by --max-steps 7" in printed
    assert f"weights from {settings.initial_weights}" in printed
    # Without --init-from-checkpoint the weights start fresh.
    with pytest.raises(SystemExit):
        cli.main(["--from", str(tmp_path / "search"), "--output-dir", str(tmp_path / "runs")])
    assert handed["settings"].initial_weights is None and "fresh weights" in capsys.readouterr().out


@pytest.mark.slow
def test_initial_weights_are_the_checkpoints_model_and_nothing_else(tmp_path):
    config = BASE.replace(max_steps=2, eval_every=2, checkpoint_every=2, probe_sequences=0, warmup_steps=0)
    source = checkpoint(tmp_path / "source" / "checkpoint_000003", config, 3)
    saved = load_checkpoint(source)["model"]
    for location in (str(source), f"file://{source}"):
        trainables, state = _build_or_restore(config, LocalSession(), location)
        for name, tensor in trainables.model.state_dict().items():
            assert torch.equal(tensor, saved[name]), name
        assert state.step == 0 and state.resumed_from == []  # a new run, not a resume
        assert trainables.optimizer.state_dict()["state"] == {}  # the optimizer starts anew
        assert trainables.scheduler.last_epoch == 0
    fresh, _ = _build_or_restore(config, LocalSession())
    assert not torch.equal(next(iter(fresh.model.state_dict().values())), next(iter(saved.values())))
    # And the run trains from them to its own end.
    session = LocalSession()
    final = train_function(loop_config(config, WorkerSettings(initial_weights=str(source))), session)
    assert final.step == 2 and (Path(session.checkpoints[-1]) / CHECKPOINT_FILE).is_file()


def test_a_yaml_config_reads_numbers_as_yaml_1_2_does(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  hidden_size: 48\noptim:\n  learning_rate: 3e-4\n")
    config, source = resolved(["--from", str(tmp_path / "config.yaml")])
    assert config == ExperimentConfig().replace(hidden_size=48, learning_rate=3e-4)
    assert source.record == {"kind": "config file", "path": str(tmp_path / "config.yaml")}


def test_a_multi_worker_trials_best_checkpoint_is_its_train_runs(tmp_path):
    """A trial with several workers reports its Train run's checkpoints as `checkpoint_path`."""
    search = make_search(tmp_path)
    trial = next((tmp_path / "search").glob("trial_a1_*"))
    train_run = tmp_path / "search" / "train_runs" / "a1"
    lines = []
    for number, line in enumerate((trial / "result.json").read_text().splitlines()):
        report = json.loads(line)
        del report["checkpoint_dir_name"]
        report["checkpoint_path"] = str(
            checkpoint(train_run / f"checkpoint_{number:06d}", search["a1"], report["step"])
        )
        lines.append(json.dumps(report) + "\n")
    (trial / "result.json").write_text("".join(lines))
    _, source = resolved(["--from", str(tmp_path / "search"), "--trial", "a1"])
    assert source.record["checkpoint"] == str(train_run / "checkpoint_000001")  # 139.0 at step 6
    _, best = resolved(["--from", str(tmp_path / "search")])  # train_runs/ is not a trial
    assert best.record["trial"] == "b2" and "of 2 trial(s)" in best.record["rule"]
