"""The trials of a search or ablation grid, for `python -m train --from`: each trial's config
and reports, which trial is best (by the search's metric, or by the rule of a two-objective
search, `lstm_ae/pareto.py`), and its best checkpoint. Read from the experiment folder's files
(search.json, each trial folder's config.json, params.json and Tune's result.json lines),
never from `tune` code.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass, replace
from typing import Any

from lstm_ae.checkpoint import CHECKPOINT_FILE
from lstm_ae.config import FIELD_SECTIONS, ConfigError, ExperimentConfig
from lstm_ae.metrics import METRIC_MODES, best_of, is_finite_number
from lstm_ae.pareto import front_choice, rule_text
from train.recovery import left_empty
from train.source_records import (
    CONFIG_FILE,
    PARAMS_FILE,
    RESULT_FILE,
    SEARCH_FILE,
    TRIAL_PREFIX,
    Source,
    SourceError,
    config_from_record,
    first_line,
    read_json,
    read_source_text,
)
from train.storage import path_exists, storage_filesystem

# ------------------------------------------------------------------------------- experiments


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
    sampled = (
        read_json(fs, f"{trial.where}/{PARAMS_FILE}")
        if path_exists(fs, f"{trial.where}/{PARAMS_FILE}")
        else None
    )
    if not isinstance(sampled, dict) or not set(sampled) <= set(FIELD_SECTIONS):
        raise SourceError(
            f"trial {trial.trial_id} has no {CONFIG_FILE} (written by searches since --from) and its "
            f"sampled values are not config fields alone: its config cannot be rebuilt from {shown}"
        )
    try:
        return experiment.base.replace(**sampled)
    except (ConfigError, TypeError, ValueError) as error:
        raise SourceError(
            f"trial {trial.trial_id}: its sampled values do not make a config: {error}"
        ) from None


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
        if not is_finite_number(report.get(metric)):
            continue
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
        if path_exists(fs, f"{where}/{CHECKPOINT_FILE}") and not left_empty(fs, where):
            scored.append((float(report[metric]), shown))
    best = best_of(scored, lambda pair: pair[0], mode)
    return best[1] if best else None


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
