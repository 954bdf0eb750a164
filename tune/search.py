"""The search: Optuna's TPE sampler proposes configs, ASHA stops poor trials early.

A search of two metrics (`tune/objectives.py`) runs TPE's multi-objective form and no ASHA.

ASHA's clock is the training step each report carries (`step`), not Tune's
`training_iteration`, which restarts when a multi-worker trial is retried while its
TorchTrainer resumes at step k. With a time budget (`--max-minutes`) trials are compared at
equal training time instead: the clock is `training_seconds` (the steps' wall-clock time,
carried across restarts, validation not counted), with rungs at budget / reduction_factor**2, budget /
reduction_factor and the budget. ASHA's decisions are written to the experiment folder
(`stopped_by_scheduler/<trial id>`, through the same filesystem as the experiment, so they
survive s3:// storage): Tune itself marks a stopped trial like a finished one.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from lstm_ae.config import ExperimentConfig
from records.storage import path_exists, storage_filesystem
from tune.experiment import SearchSettings, experiment_path, run_experiment
from tune.objectives import is_multi, to_record
from tune.space import SearchSpace

STOPPED_BY_SCHEDULER_FOLDER = "stopped_by_scheduler"
MAX_T_MARGIN = 1.1


def comparison_field(base: ExperimentConfig) -> str:
    """The reported field trials of `base` are compared on: seconds of training with a time
    budget, else the step."""
    return "training_seconds" if base.training.max_minutes else "step"


def asha_clock(base: ExperimentConfig, grace_period: int, reduction_factor: int) -> dict[str, Any]:
    """ASHA's time_attr, max_t and grace_period for trials of `base` (module docstring)."""
    training = base.training
    if comparison_field(base) == "training_seconds":
        budget = 60.0 * training.max_minutes
        # max_t above the budget: a trial ends at its own planned step, never stopped there by ASHA.
        return {
            "time_attr": "training_seconds",
            "max_t": budget * MAX_T_MARGIN,
            "grace_period": budget / reduction_factor**2,
        }
    return {
        "time_attr": "step",
        "max_t": training.max_steps,
        "grace_period": min(grace_period * training.eval_every, training.max_steps),
    }


class RecordingASHA(ASHAScheduler):
    """ASHA that records each trial it stops in the experiment folder."""

    def __init__(self, storage: str, name: str, **kwargs):
        super().__init__(**kwargs)
        self.storage, self.name = storage, name

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            filesystem, root = storage_filesystem(self.storage)
            folder = f"{root}/{self.name}/{STOPPED_BY_SCHEDULER_FOLDER}"
            filesystem.create_dir(folder, recursive=True)
            with filesystem.open_output_stream(f"{folder}/{trial.trial_id}") as stream:
                stream.write(f"stopped at {self._time_attr} {result.get(self._time_attr)}\n".encode())
        return decision


def stopped_by_scheduler(settings: SearchSettings) -> set[str]:
    """The ids of the trials ASHA stopped, from the experiment folder."""
    import pyarrow.fs

    filesystem, path = experiment_path(settings)
    folder = f"{path}/{STOPPED_BY_SCHEDULER_FOLDER}"
    if not path_exists(filesystem, folder):
        return set()
    return {info.base_name for info in filesystem.get_file_info(pyarrow.fs.FileSelector(folder))}


def run_search(
    base: ExperimentConfig,
    space: SearchSpace,
    settings: SearchSettings,
    callbacks=(),
    points_to_evaluate: list[dict[str, Any]] | None = None,
):
    """Run (or resume) the Optuna + ASHA search; returns (ResultGrid, experiment path, plan).

    ASHA's rungs are in steps (the first at `grace_period` validations, the last at
    max_steps) or, with max_minutes, in seconds (`asha_clock`).
    """
    from ray.tune.search.optuna import OptunaSearch

    space.check(base)

    def search_setup(ray_tune):
        if is_multi(settings.objectives):  # the front: Optuna's multi-objective TPE, no early stopping
            metrics, modes = (list(values) for values in zip(*settings.objectives))
            searcher = OptunaSearch(
                metric=metrics, mode=modes, seed=settings.seed, points_to_evaluate=points_to_evaluate
            )
            return space.to_ray(), {
                "search_alg": searcher,
                "metric": None,
                "mode": None,
                "num_samples": settings.num_samples,
            }
        scheduler = RecordingASHA(
            settings.storage,
            settings.name,
            reduction_factor=settings.reduction_factor,
            **asha_clock(base, settings.grace_period, settings.reduction_factor),
        )
        searcher = OptunaSearch(seed=settings.seed, points_to_evaluate=points_to_evaluate)
        return space.to_ray(), {
            "search_alg": searcher,
            "scheduler": scheduler,
            "num_samples": settings.num_samples,
        }

    record = {"space": [asdict(dimension) for dimension in space.dimensions]}
    if settings.objectives:
        if settings.objectives[0][0] != base.training.metric:
            raise ValueError("the first objective must be the base config's metric")
        record["objectives"] = to_record(settings.objectives)
    return run_experiment(base, settings, search_setup, record, callbacks)
