"""The search space: defined once, overridable from a YAML file, checked before Ray starts.

A space maps config fields to distributions. The YAML file has one entry per field:

    hidden_size: {choice: [128, 256, 512, 1024]}
    num_layers: {int: [1, 3]}                   # integers, both ends included
    learning_rate: {loguniform: [1e-4, 1e-2]}   # numbers as YAML 1.2 reads them
    reconstruction_weight: {uniform: [0.0, 1.0]}
    dropout: {uniform: [0.0, 0.5]}
    decoder_mode: {choice: [free, conditioned]}

Any config field may be searched (`python -m train --help` lists them). Every bound and
choice is checked with the config's own validation, so an out-of-range bound is reported
by field name before any trial starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lstm_ae.config import FIELD_SECTIONS, ConfigError, ExperimentConfig, field_type, yaml_loader

KINDS = ("choice", "int", "uniform", "loguniform")
# Fields the experiment itself is built on (ASHA's budget, the metric, the reporting grid):
# they stay the same for every trial.
FIXED_FIELDS = (
    "max_steps",
    "max_minutes",
    "eval_every",
    "checkpoint_every",
    "log_every",
    "keep_checkpoints",
    "metric",
)


class SpaceError(ValueError):
    """An invalid search space; the message names the field."""


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: str
    values: tuple[Any, ...]  # the choices, or (low, high)

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name:<24} one of {', '.join(map(str, self.values))}"
        low, high = self.values
        scale = {"int": "integer", "uniform": "uniform", "loguniform": "log-uniform"}[self.kind]
        return f"{self.name:<24} {scale} in [{low:g}, {high:g}]"

    def extremes(self) -> tuple[Any, ...]:
        """The values that must all be valid: every choice, or both bounds."""
        return self.values

    def to_ray(self):
        from ray import tune as ray_tune  # (this project's package is `tune` too)

        if self.kind == "choice":
            return ray_tune.choice(list(self.values))
        low, high = self.values
        if self.kind == "int":
            return ray_tune.randint(int(low), int(high) + 1)  # Ray's upper bound is exclusive
        if self.kind == "uniform":
            return ray_tune.uniform(low, high)
        return ray_tune.loguniform(low, high)

    def to_optuna(self):
        import optuna

        if self.kind == "choice":
            return optuna.distributions.CategoricalDistribution(list(self.values))
        low, high = self.values
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(low), int(high))
        return optuna.distributions.FloatDistribution(low, high, log=self.kind == "loguniform")


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    @property
    def names(self) -> list[str]:
        return [dimension.name for dimension in self.dimensions]

    def describe(self) -> str:
        return "\n".join("  " + dimension.describe() for dimension in self.dimensions)

    def to_ray(self) -> dict[str, Any]:
        return {dimension.name: dimension.to_ray() for dimension in self.dimensions}

    def base_point(self, base: ExperimentConfig) -> dict[str, Any]:
        """The base config's own values of the searched fields, as a point of the space (the
        search's first trial with `--base-first`); SpaceError if one lies outside it."""
        values = base.values_by_field()
        point = {}
        for dimension in self.dimensions:
            value = values[dimension.name]
            inside = (
                value in dimension.values
                if dimension.kind == "choice"
                else dimension.values[0] <= value <= dimension.values[1]
            )
            if not inside:
                raise SpaceError(
                    f"--base-first: the base's {dimension.name} {value!r} is outside the search "
                    f"space ({dimension.describe().split(maxsplit=1)[1]})"
                )
            point[dimension.name] = value
        return point

    def check(self, base: ExperimentConfig, workers_per_trial: int = 1) -> None:
        """Every choice and bound must make a valid config on top of `base`, and every batch
        size must split over the workers of a trial."""
        for dimension in self.dimensions:
            for value in dimension.extremes():
                try:
                    config = base.replace(**{dimension.name: value})
                except ConfigError as error:
                    raise SpaceError(f"search space {dimension.name}: {error}") from None
                training = config.training
                if training.batch_size % (workers_per_trial * training.grad_accumulation_steps):
                    raise SpaceError(
                        f"search space {dimension.name}: {value!r} makes batch_size "
                        f"{training.batch_size} that does not split over {workers_per_trial} "
                        f"workers x {training.grad_accumulation_steps} micro-batches"
                    )


def default_space(preset_name: str) -> SearchSpace:
    """Hidden size (powers of two), layers, learning rate and the reconstruction weight w."""
    largest = {"smoke": 64, "cpu": 1024, "paper": 4096}[preset_name]
    smallest = 16 if preset_name == "smoke" else 128
    sizes = tuple(2**power for power in range(int(math.log2(smallest)), int(math.log2(largest)) + 1))
    return SearchSpace(
        (
            Dimension("hidden_size", "choice", sizes),
            Dimension("num_layers", "int", (1, 3 if preset_name != "smoke" else 2)),
            Dimension("learning_rate", "loguniform", (1e-4, 1e-2)),
            Dimension("reconstruction_weight", "uniform", (0.0, 1.0)),
        )
    )


def parse_space(entries: Any, source: str = "search space") -> SearchSpace:
    """A SearchSpace from the YAML mapping described in the module docstring."""
    if not isinstance(entries, dict) or not entries:
        raise SpaceError(f"{source} must be a mapping of config fields to distributions")
    dimensions = []
    for name, spec in entries.items():
        if name not in FIELD_SECTIONS:
            raise SpaceError(f"{source}: unknown config field {name!r}")
        if name in FIXED_FIELDS:
            raise SpaceError(
                f"{source} {name}: fixed for the whole experiment (the scheduler's budget and "
                f"reporting depend on it); set it with --{name.replace('_', '-')} instead"
            )
        if not isinstance(spec, dict) or len(spec) != 1:
            raise SpaceError(f"{source} {name}: expected one of {{{', '.join(KINDS)}: ...}}, got {spec!r}")
        ((kind, values),) = spec.items()
        if kind not in KINDS:
            raise SpaceError(f"{source} {name}: unknown distribution {kind!r} (use {', '.join(KINDS)})")
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{source} {name}: {kind} needs a non-empty list, got {values!r}")
        if kind != "choice":
            if len(values) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            ):
                raise SpaceError(f"{source} {name}: {kind} needs [low, high] numbers, got {values!r}")
            low, high = values
            if not low < high:
                raise SpaceError(f"{source} {name}: low must be below high, got [{low}, {high}]")
            if kind == "loguniform" and low <= 0:
                raise SpaceError(f"{source} {name}: loguniform needs a positive low bound, got {low}")
            if kind == "int" and not all(float(v).is_integer() for v in values):
                raise SpaceError(f"{source} {name}: int needs integer bounds, got {values!r}")
            if kind != "int" and field_type(name) is int:
                raise SpaceError(
                    f"{source} {name}: takes whole numbers, so {kind} would sample fractions: "
                    f"use {{int: [low, high]}} or {{choice: [...]}}"
                )
        dimensions.append(Dimension(name, kind, tuple(values)))
    return SearchSpace(tuple(dimensions))


def load_space(path: str | Path) -> SearchSpace:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file not found: {path}")
    try:
        entries = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml_loader())
    except UnicodeDecodeError:
        raise SpaceError(f"{path} is not a text (UTF-8) file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpaceError(f"{path} is not valid YAML{where}: {problem}") from None
    return parse_space(entries, source=str(path))
