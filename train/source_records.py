"""What `python -m train --from` reads, at its lowest: the files' names, the Source it yields,
and readers that turn any failure into a one-line SourceError (`train/source.py` reads the
kinds of source; `train/trials.py` a search's or ablation grid's trials).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from lstm_ae.config import ConfigError, ExperimentConfig
from lstm_ae.metrics import is_finite_number
from lstm_ae.yaml12 import yaml_loader
from train.storage import read_text, storage_filesystem

CONFIG_FILE = "config.json"  # a run's (and, since --from, a trial's) config
RESULT_FILE = "result.json"  # a run's summary; in a trial folder, Tune's reports (JSON lines)
SEARCH_FILE = "search.json"  # an experiment's record (tune.experiment.SEARCH_FILE)
PARAMS_FILE = "params.json"  # a trial's sampled values (Tune's)
TRIAL_PREFIX = "trial_"  # Tune's trial folders: trial_<trial id>_<index>_<values>_<time>


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
