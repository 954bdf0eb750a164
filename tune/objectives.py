"""What a search optimises: one metric, or two at once (a Pareto front).

`python -m tune --metric val_mse_frame --metric val_ink_ssim` searches both: each metric's mode
follows its unit (errors are minimised; SSIM, ink SSIM, PSNR and probe accuracy maximised:
`lstm_ae.metrics.METRIC_MODES`), `--mode` overrides them in the same order. The first metric
stays the config's `metric`: trials keep their checkpoints by it, and a trial's values on the
front are those of its report with the best first metric (the model its best checkpoint holds).

Two objectives run Optuna's TPE sampler in its multi-objective form (Ray Tune's OptunaSearch
with a list of metrics and modes): TPE rather than NSGA-II because NSGA-II breeds generations
of 50 trials by default, so a search of tens of trials would never leave its random first
generation, while TPE models the good configs from the first trials on. ASHA ranks trials on
one number, so a two-objective search stops no trial early: every trial trains its whole
budget (`python -m tune` says so when it starts).
"""

from __future__ import annotations

from lstm_ae.config import ConfigError
from lstm_ae.metrics import METRIC_MODES

Objectives = tuple[tuple[str, str], ...]  # ((metric, mode), ...)
MAX_OBJECTIVES = 2


def objectives_from_flags(metrics: list[str] | None, modes: list[str] | None) -> Objectives:
    """((metric, mode), ...) from repeated --metric and --mode flags; () when --metric is absent
    (the preset's metric, one objective). ConfigError names what is wrong."""
    metrics, modes = metrics or [], modes or []
    if not metrics:
        if modes:
            raise ConfigError("--mode needs --metric: give one --mode per --metric, in the same order")
        return ()
    if len(metrics) > MAX_OBJECTIVES:
        raise ConfigError(
            f"at most {MAX_OBJECTIVES} --metric flags (a Pareto front of two), got {len(metrics)}"
        )
    if len(set(metrics)) != len(metrics):
        raise ConfigError(f"--metric {metrics[0]} is given twice: two objectives must be two metrics")
    for metric in metrics:
        if metric not in METRIC_MODES:
            raise ConfigError(f"metric must be one of {', '.join(METRIC_MODES)}, got {metric!r}")
    if modes and len(modes) != len(metrics):
        raise ConfigError(
            f"{len(modes)} --mode for {len(metrics)} --metric: give one --mode per --metric, or none"
        )
    return tuple(zip(metrics, modes or [METRIC_MODES[metric] for metric in metrics]))


def is_multi(objectives: Objectives) -> bool:
    return len(objectives) > 1


def describe(objectives: Objectives) -> str:
    """The objectives in words, for the search's first lines."""
    words = " and ".join(
        f"{metric} ({'minimised' if mode == 'min' else 'maximised'})" for metric, mode in objectives
    )
    return (
        f"objectives {words}: Optuna's multi-objective TPE, the results table marks the Pareto front; "
        "no trial is stopped early (ASHA ranks one metric), every trial trains its whole budget"
    )


def to_record(objectives: Objectives) -> list[dict[str, str]]:
    """As search.json keeps them."""
    return [{"metric": metric, "mode": mode} for metric, mode in objectives]


def from_record(record: dict) -> Objectives:
    """From search.json; () for a single-objective experiment."""
    return tuple((entry["metric"], entry["mode"]) for entry in record.get("objectives", ()))
