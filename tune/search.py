"""The search: Optuna's TPE sampler proposes configs, ASHA stops poor trials early.

ASHA's clock is the training step each report carries (`step`), not Tune's
`training_iteration`, which restarts when a multi-worker trial is retried while its
TorchTrainer resumes at step k. ASHA's decisions are written to the experiment folder
(`stopped_by_scheduler/<trial id>`, through the same filesystem as the experiment, so they
survive s3:// storage): Tune itself marks a stopped trial like a finished one.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from lstm_ae.config import ExperimentConfig
from train.launch import path_exists, storage_filesystem
from tune.experiment import SearchSettings, experiment_path, run_experiment
from tune.space import SearchSpace

STOPPED_BY_SCHEDULER_FOLDER = "stopped_by_scheduler"
TIME_ATTRIBUTE = "step"


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
                stream.write(f"stopped at step {result.get(TIME_ATTRIBUTE)}\n".encode())
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

    ASHA's rungs are in steps: the first at `grace_period` validations, the last at max_steps.
    """
    from ray.tune.search.optuna import OptunaSearch

    space.check(base)

    def search_setup(ray_tune):
        scheduler = RecordingASHA(
            settings.storage,
            settings.name,
            time_attr=TIME_ATTRIBUTE,
            max_t=base.training.max_steps,
            grace_period=min(settings.grace_period * base.training.eval_every, base.training.max_steps),
            reduction_factor=settings.reduction_factor,
        )
        searcher = OptunaSearch(seed=settings.seed, points_to_evaluate=points_to_evaluate)
        return space.to_ray(), {
            "search_alg": searcher,
            "scheduler": scheduler,
            "num_samples": settings.num_samples,
        }

    record = {"space": [asdict(dimension) for dimension in space.dimensions]}
    return run_experiment(base, settings, search_setup, record, callbacks)
