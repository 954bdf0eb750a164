"""Where a new run's config comes from with `python -m train --from PATH`, read before Ray starts.

PATH (a local path, or a URI such as s3://bucket/runs/x, as run folders are) is one of:

    a run folder         written by `python -m train`: config.json (and result.json once it ended)
    a trial folder       one trial of a search or ablation grid, inside its experiment folder
    an experiment folder a search or ablation grid (search.json): its best trial, or --trial ID
    a config file        the config.json a run writes, or a config as JSON or YAML
                         ({"model": {...}, "training": {...}}, sections as `ExperimentConfig`)

A trial's config is the `config.json` its trial wrote into its folder when it started
(`tune.experiment.trial`).

Which trial is best is read from each trial folder's reports (Tune's `result.json`, one JSON
object a line), by the search's metric (`training.metric` of search.json's base config, mode
from `METRIC_MODES`), as the results table ranks them: a trial's value is its best report's.
A trial without a finite value (errored or stopped before validating) is never chosen, nor is
a trial that does not train what the metric measures (reconstruction_weight 1 for a
prediction metric, 0 for a reconstruction one). A search of two objectives (search.json's
`objectives`: [{"metric", "mode"}, ...]) takes the trial that `lstm_ae.pareto.front_choice`
picks (`rule_text` says which), each trial placed by its best report by the first metric: the
report whose checkpoint is the trial's best, so the values recorded are one model's values.

A bad source raises SourceError with a one-line message.


Everything is read from the folders' files (search.json, each trial folder's config.json,
params.json and Tune's result.json lines), never from `tune` code; any failure becomes a
one-line `SourceError`.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from lstm_ae.checkpoint import CHECKPOINT_FILE, CheckpointError
from lstm_ae.config import ConfigError, ExperimentConfig, yaml_loader
from lstm_ae.metrics import METRIC_MODES, best_of, is_finite_number
from lstm_ae.model import CompositeLSTMAutoencoder
from lstm_ae.pareto import front_choice, rule_text
from records.checkpoints import best_checkpoint, stored_checkpoint
from records.layout import CONFIG_FILE, PARAMS_FILE, RESULT_FILE, SEARCH_FILE, TRIAL_PREFIX
from records.storage import path_exists, read_text, storage_filesystem, write_text


class SourceError(ValueError):
    """A --from source that cannot give a config; the message is one line naming the problem."""


@dataclass(frozen=True)
class Source:
    """A config and where it came from.

    `record` is what the new run folder keeps (config.json and result.json, key `source`):
    path, kind, trial, experiment, metric, mode, value (the metric value that made it the
    choice), objectives (every objective's value, two-objective searches), rule, checkpoint.
    """

    config: ExperimentConfig
    record: dict[str, Any]

    @property
    def checkpoint(self) -> str | None:
        """The source's best checkpoint folder (a path or URI), None where it kept none."""
        return self.record.get("checkpoint")

    def describe(self) -> str:
        record = self.record
        what = {
            "run": f"run folder {record['path']}",
            "trial": f"trial {record.get('trial')} of {record.get('experiment')}",
            "config file": f"config file {record['path']}",
        }[record["kind"]]
        if record.get("objectives"):
            values = ", ".join(f"{name} {number_text(value)}" for name, value in record["objectives"].items())
            what += f" ({values}; {record['rule']})"
        elif is_finite_number(record.get("value")):
            what += f" ({record['metric']} {record['value']:.5g}; {record['rule']})"
        return what


def number_text(value: Any) -> str:
    return f"{value:.5g}" if is_finite_number(value) else "none"


def open_location(path: str) -> tuple[Any, str, str]:
    """(filesystem, path on it, the path as the record shows it: absolute, or the URI)."""
    try:
        filesystem, where = storage_filesystem(path)
    except (OSError, ValueError) as error:  # pyarrow: an unknown scheme, no credentials, ...
        raise SourceError(f"--from {path}: cannot open it: {first_line(error)}") from None
    return filesystem, where, path if "://" in path else where


def first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def file_kind(filesystem, path: str):
    try:
        return filesystem.get_file_info(path).type
    except (OSError, ValueError) as error:  # pyarrow's errors are OSError or ValueError kinds
        raise SourceError(f"--from {path}: cannot read it: {first_line(error)}") from None


def read_source_text(filesystem, path: str) -> str:
    try:
        return read_text(filesystem, path)
    except (OSError, UnicodeDecodeError) as error:
        raise SourceError(f"{path} is not readable: {first_line(error)}") from None


def read_json(filesystem, path: str) -> Any:
    try:
        return json.loads(read_source_text(filesystem, path))
    except ValueError as error:
        raise SourceError(f"{path} is not valid JSON: {first_line(error)}") from None


def read_yaml(filesystem, path: str) -> Any:
    try:
        return yaml.load(read_source_text(filesystem, path), Loader=yaml_loader())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or first_line(error)
        raise SourceError(f"{path} is not valid YAML{where}: {problem}") from None


def config_from_record(values: Any, where: str) -> ExperimentConfig:
    """The config in a config file's contents: a run's config.json ({"config": {...}, ...}) or
    the sections alone. SourceError where it is not a config of this model."""
    if isinstance(values, dict) and isinstance(values.get("config"), dict):
        values = values["config"]
    if not isinstance(values, dict):
        raise SourceError(f"{where} holds no config (expected a mapping of config sections)")
    try:
        return ExperimentConfig.from_dict(values)
    except (ConfigError, TypeError, ValueError, AttributeError) as error:
        raise SourceError(f"{where} is not a config of this model: {first_line(error)}") from None


@dataclass(frozen=True)
class _Experiment:
    filesystem: Any
    where: str
    shown: str
    base: ExperimentConfig
    objectives: tuple[tuple[str, str], ...]  # (metric, mode): one, or two for a two-objective search


@dataclass(frozen=True)
class _Trial:
    trial_id: str
    where: str  # the trial folder
    reports: tuple[dict[str, Any], ...]


def open_experiment(filesystem, where: str, shown: str) -> _Experiment:
    record = read_json(filesystem, f"{where}/{SEARCH_FILE}")
    if not isinstance(record, dict) or not isinstance(record.get("base"), dict):
        raise SourceError(f"{shown}/{SEARCH_FILE} is not an experiment record (no base config)")
    base = config_from_record(record["base"], f"{shown}/{SEARCH_FILE}")
    objectives = record.get("objectives")
    try:
        if objectives:
            pairs = tuple((str(entry["metric"]), str(entry["mode"])) for entry in objectives)
        else:
            metric = base.training.metric
            pairs = ((metric, METRIC_MODES[metric]),)
    except (KeyError, TypeError) as error:
        raise SourceError(f"{shown}/{SEARCH_FILE}: unreadable objectives: {first_line(error)}") from None
    if any(mode not in ("min", "max") for _, mode in pairs):
        raise SourceError(f"{shown}/{SEARCH_FILE}: an objective's mode is not min or max: {pairs}")
    return _Experiment(filesystem, where, shown, base, pairs)


def _folders(filesystem, where: str) -> list[str]:
    import pyarrow.fs

    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(where))
    except OSError as error:
        raise SourceError(f"{where}: cannot list it: {first_line(error)}") from None
    return sorted(entry.path for entry in entries if entry.type == pyarrow.fs.FileType.Directory)


def is_trial_folder(filesystem, where: str) -> bool:
    return posixpath.basename(where.rstrip("/")).startswith(TRIAL_PREFIX) or path_exists(
        filesystem, f"{where}/{PARAMS_FILE}"
    )


def read_trial(filesystem, where: str) -> _Trial:
    """A trial folder's reports (a line that does not parse, such as one cut short when the
    trial died, is left out) and its id (from the reports; a trial that never reported has
    only its folder's name, `trial_<id>_<index>_<values>_<time>`, whose id may hold `_`)."""
    reports = []
    if path_exists(filesystem, f"{where}/{RESULT_FILE}"):
        for line in read_source_text(filesystem, f"{where}/{RESULT_FILE}").splitlines():
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if isinstance(report, dict):
                reports.append(report)
    trial_id = next((str(r["trial_id"]) for r in reports if r.get("trial_id")), None)
    if trial_id is None:
        name = posixpath.basename(where.rstrip("/"))
        trial_id = name[len(TRIAL_PREFIX) :] if name.startswith(TRIAL_PREFIX) else name
    return _Trial(trial_id, where, tuple(reports))


def _trials(experiment: _Experiment) -> list[_Trial]:
    fs = experiment.filesystem
    return [
        read_trial(fs, folder) for folder in _folders(fs, experiment.where) if is_trial_folder(fs, folder)
    ]


def _trial_config(experiment: _Experiment, trial: _Trial) -> ExperimentConfig:
    fs, shown = experiment.filesystem, f"{experiment.shown}/{posixpath.basename(trial.where)}"
    if path_exists(fs, f"{trial.where}/{CONFIG_FILE}"):
        return config_from_record(read_json(fs, f"{trial.where}/{CONFIG_FILE}"), f"{shown}/{CONFIG_FILE}")
    raise SourceError(f"trial {trial.trial_id} has no {CONFIG_FILE} (it never started): {shown}")


def _measures(experiment: _Experiment, trial: _Trial, metric: str) -> bool:
    """Whether a trial trains what `metric` measures: prediction metrics mean nothing for a
    model that only reconstructs (weight 1), reconstruction metrics for one that only predicts.
    (A trial whose config cannot be read counts; choosing it says why it cannot be trained.)"""
    try:
        weight = _trial_config(experiment, trial).model.reconstruction_weight
    except SourceError:
        return True
    if "reconstruction" in metric:
        return weight > 0
    return weight < 1 or not metric.startswith("val_")


def _best_report(trial: _Trial, metric: str, mode: str) -> dict[str, Any] | None:
    """The trial's best report by `metric` (the earliest of equals), None where none has a finite value."""
    return best_of(trial.reports, lambda report: report.get(metric), mode)


def _best_checkpoint(experiment: _Experiment, trial: _Trial, metric: str, mode: str) -> str | None:
    """The kept checkpoint of the trial's best checkpointed report: one-worker trials name it
    in `checkpoint_dir_name` (inside the trial folder), multi-worker trials in `checkpoint_path`
    (their Train run's). Folders Tune deleted (beyond keep_checkpoints) or left empty as
    damaged never count."""
    scored = []
    for report in trial.reports:
        if isinstance(report.get("checkpoint_dir_name"), str):
            name = report["checkpoint_dir_name"]
            fs, where = experiment.filesystem, f"{trial.where}/{name}"
            shown = f"{experiment.shown}/{posixpath.basename(trial.where)}/{name}"
        elif isinstance(report.get("checkpoint_path"), str):
            shown = report["checkpoint_path"]
            if "://" in experiment.shown and "://" not in shown:  # pyarrow paths drop the scheme
                shown = f"{experiment.shown.split('://', 1)[0]}://{shown}"
            try:
                fs, where = storage_filesystem(shown)
            except (OSError, ValueError):
                continue
        else:
            continue
        scored.append((report[metric], fs, where, shown))
    return best_checkpoint(scored, mode, require_file=True)


def chosen_trial(experiment: _Experiment, trial: _Trial, rule: str) -> Source:
    config = _trial_config(experiment, trial)
    (metric, mode), *others = experiment.objectives
    report = _best_report(trial, metric, mode) or {}
    record: dict[str, Any] = {
        "kind": "trial",
        "path": f"{experiment.shown}/{posixpath.basename(trial.where)}",
        "trial": trial.trial_id,
        "experiment": experiment.shown,
        "metric": metric,
        "mode": mode,
        "value": report.get(metric),
        "rule": rule,
        "checkpoint": _best_checkpoint(experiment, trial, metric, mode),
    }
    if others:
        record["objectives"] = {name: report.get(name) for name, _ in experiment.objectives}
    return Source(config, record)


def experiment_source(filesystem, where: str, shown: str, trial_id: str | None) -> Source:
    experiment = open_experiment(filesystem, where, shown)
    trials = _trials(experiment)
    if trial_id is not None:
        matches = [trial for trial in trials if trial.trial_id == trial_id] or [
            replace(trial, trial_id=trial_id)  # one that never reported: by its folder's name
            for trial in trials
            if posixpath.basename(trial.where).startswith(f"{TRIAL_PREFIX}{trial_id}_")
        ]
        if not matches:
            ids = [trial.trial_id for trial in trials if trial.reports]
            known = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "") or "none"
            raise SourceError(f"--trial {trial_id}: no such trial in {shown} (trials that reported: {known})")
        return chosen_trial(experiment, matches[0], "chosen with --trial")
    (metric, mode), *others = experiment.objectives
    candidates = []  # (trial, best report by the first metric)
    for trial in trials:
        report = _best_report(trial, metric, mode)
        if report is None or not _measures(experiment, trial, metric):
            continue
        candidates.append((trial, report))
    if not candidates:
        raise SourceError(
            f"no finished trial in {shown}: none of its {len(trials)} trial(s) reported a finite {metric}"
        )
    if others:
        names = [name for name, _ in experiment.objectives]
        points = [
            [report.get(name) if is_finite_number(report.get(name)) else math.nan for name in names[:2]]
            for _, report in candidates
        ]
        index = front_choice(points, [mode for _, mode in experiment.objectives[:2]])
        if index is None:
            raise SourceError(
                f"no finished trial in {shown}: no trial reported finite {names[0]} and {names[1]} together"
            )
        return chosen_trial(
            experiment, candidates[index][0], f"{rule_text(names)}, of {len(candidates)} trial(s)"
        )
    best, _ = best_of(candidates, lambda pair: pair[1][metric], mode)
    return chosen_trial(experiment, best, f"the best {metric} ({mode}) of {len(candidates)} trial(s)")


def source_label(path: str, trial: str | None = None) -> str:
    """A short name of a source for a run's default name: the trial, or the folder's or file's name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", trial or Path(path.rstrip("/")).stem) or "source"


def train_command(experiment: str, trial_id: str) -> str:
    """The command that trains a search's trial again, as the search's summary prints it."""
    return f"python -m train --from {shlex.quote(str(experiment))} --trial {shlex.quote(str(trial_id))}"


# ------------------------------------------------------------------------------- reading


def read_source(path: str, trial: str | None = None) -> Source:
    """The config at `path` and where it came from; `trial` picks a trial of an experiment folder."""
    import pyarrow.fs

    filesystem, where, shown = open_location(path)
    kind = file_kind(filesystem, where)
    if kind == pyarrow.fs.FileType.NotFound:
        raise SourceError(f"--from {path}: no such file or folder")
    if kind == pyarrow.fs.FileType.File:
        _no_trial(trial, path, "a config file")
        return _config_file(filesystem, where, shown)
    if path_exists(filesystem, f"{where}/{SEARCH_FILE}"):
        return experiment_source(filesystem, where, shown, trial)
    parent = posixpath.dirname(where.rstrip("/"))
    if path_exists(filesystem, f"{parent}/{SEARCH_FILE}") and is_trial_folder(filesystem, where):
        _no_trial(trial, path, "a trial folder")
        experiment = open_experiment(filesystem, parent, _parent_shown(shown))
        return chosen_trial(experiment, read_trial(filesystem, where), "given as its trial folder")
    if path_exists(filesystem, f"{where}/{CONFIG_FILE}"):
        _no_trial(trial, path, "a run folder")
        return _run_folder(filesystem, where, shown)
    raise SourceError(
        f"--from {path}: not a run folder (config.json), a search or ablation folder (search.json), "
        "a trial folder or a config file"
    )


def _no_trial(trial: str | None, path: str, what: str) -> None:
    if trial is not None:
        raise SourceError(f"--trial {trial}: --from {path} is {what}, not a search or ablation folder")


def _parent_shown(shown: str) -> str:
    return shown.rstrip("/").rsplit("/", 1)[0]


def _config_file(filesystem, where: str, shown: str) -> Source:
    text_kind = "yaml" if where.lower().endswith((".yaml", ".yml")) else "json"
    values = read_yaml(filesystem, where) if text_kind == "yaml" else read_json(filesystem, where)
    config = config_from_record(values, shown)
    return Source(config, {"kind": "config file", "path": shown})


def _run_folder(filesystem, where: str, shown: str) -> Source:
    config = config_from_record(read_json(filesystem, f"{where}/{CONFIG_FILE}"), f"{shown}/{CONFIG_FILE}")
    record: dict[str, Any] = {"kind": "run", "path": shown}
    if path_exists(filesystem, f"{where}/{RESULT_FILE}"):
        result = read_json(filesystem, f"{where}/{RESULT_FILE}")
        if not isinstance(result, dict):
            raise SourceError(f"{shown}/{RESULT_FILE} is not a run's result (expected a JSON object)")
        metric = result.get("metric")
        record.update(
            metric=metric,
            mode=result.get("metric_mode"),
            value=result.get("best_metric"),
            rule="the run's best validation",
            checkpoint=_run_checkpoint(filesystem, where, shown, result.get("best_checkpoint")),
        )
    return Source(config, record)


def _run_checkpoint(filesystem, where: str, shown: str, recorded: Any) -> str | None:
    """The run's best checkpoint: by its folder name inside the run folder (which finds it in
    a copied folder too), else where result.json says it was written."""
    if not isinstance(recorded, str) or not recorded:
        return None
    name = posixpath.basename(recorded.rstrip("/"))
    if path_exists(filesystem, f"{where}/{name}/{CHECKPOINT_FILE}"):
        return f"{shown.rstrip('/')}/{name}"
    if "://" not in shown and Path(recorded, CHECKPOINT_FILE).is_file():
        return recorded
    return None


def write_config_file(folder: str, config: ExperimentConfig) -> None:
    """Write `config` as `folder/config.json` (a path or URI), shaped as a run folder's is:
    what a search's trial leaves beside its reports for --from."""
    filesystem, where = storage_filesystem(folder)
    filesystem.create_dir(where, recursive=True)
    write_text(filesystem, f"{where}/{CONFIG_FILE}", json.dumps({"config": config.to_dict()}, indent=2))


def check_initial_weights(checkpoint: str | None, config: ExperimentConfig) -> str:
    """`checkpoint` (a folder, path or URI), checked to load and to fit `config`'s model;
    SourceError names the problem (a flag that changed the model's shape, say)."""
    if checkpoint is None:
        raise SourceError("--init-from-checkpoint: the source kept no checkpoint to start from")
    try:
        with stored_checkpoint(checkpoint, mmap=True) as state:
            weights = {name: tuple(tensor.shape) for name, tensor in state["model"].items()}
    except (CheckpointError, OSError) as error:
        raise SourceError(f"--init-from-checkpoint: {first_line(error)}") from None
    with torch.device("meta"):  # shapes only, no memory
        expected = {
            name: tuple(tensor.shape)
            for name, tensor in CompositeLSTMAutoencoder(config.model).state_dict().items()
        }
    for name in sorted(set(expected) | set(weights)):
        if expected.get(name) != weights.get(name):
            raise SourceError(
                f"--init-from-checkpoint: {checkpoint} does not fit this config's model: {name} is "
                f"{weights.get(name, 'absent')} there, {expected.get(name, 'absent')} here (a flag changed the model)"
            )
    return checkpoint
