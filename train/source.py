"""Where a new run's config comes from with `python -m train --from PATH`, read before Ray starts.

PATH (a local path, or a URI such as s3://bucket/runs/x, as run folders are) is one of:

    a run folder         written by `python -m train`: config.json (and result.json once it ended)
    a trial folder       one trial of a search or ablation grid, inside its experiment folder
    an experiment folder a search or ablation grid (search.json): its best trial, or --trial ID
    a config file        the config.json a run writes, or a config as JSON or YAML
                         ({"model": {...}, "training": {...}}, sections as `ExperimentConfig`)

A trial's config is the `config.json` its trial wrote into its folder (`tune.experiment.trial`);
a trial of an older search, which has none, is the search's base config with its sampled
values (`params.json`) where those are config fields.

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
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from pathlib import Path
from typing import Any

import torch

from lstm_ae.checkpoint import CHECKPOINT_FILE, CheckpointError
from lstm_ae.config import ExperimentConfig
from lstm_ae.model import CompositeLSTMAutoencoder
from train.recovery import stored_checkpoint
from train.source_records import (
    CONFIG_FILE,
    RESULT_FILE,
    SEARCH_FILE,
    Source,
    SourceError,
    config_from_record,
    file_kind,
    first_line,
    open_location,
    read_json,
    read_yaml,
)
from train.storage import path_exists, storage_filesystem, write_text
from train.trials import chosen_trial, experiment_source, is_trial_folder, open_experiment, read_trial


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
