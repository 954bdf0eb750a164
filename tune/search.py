"""The search: Ray Tune with Optuna (TPE) and ASHA over the same training function as `train`.

Each trial trains one config sampled from the search space:

- one worker per trial: the trial process runs `train.worker.train_function` itself;
- several workers per trial: the trial launches a Ray Train `TorchTrainer` (the Train V2
  pattern; `TuneReportCallback` forwards its reports to Tune), whose run lives under the
  experiment folder in `train_runs/<trial id>` and resumes there if the trial is retried.

Trials report after every validation (ASHA's time unit is one validation), so the scheduler
stops poor trials early and the searcher learns from every result. The experiment folder is
Tune's own, `<storage>/<name>/`; the results table and plots are written into it at the end.
"""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lstm_ae.config import ExperimentConfig
from lstm_ae.metrics import METRIC_MODES
from train.launch import connect, loop_config, storage_filesystem, storage_path, with_absolute_paths
from tune.space import Dimension, SearchSpace

STOPPED_BY_SCHEDULER_FILE = "stopped_by_scheduler.txt"
SEARCH_FILE = "search.json"
TRIAL_DRIVER_CPUS = 0.01  # a trial that only launches a TorchTrainer needs almost nothing


class ExperimentFolderError(ValueError):
    """The experiment folder exists without --resume, or --resume finds nothing."""


@dataclass(frozen=True)
class SearchSettings:
    name: str
    storage: str = "runs"
    num_samples: int = 8
    workers_per_trial: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    max_concurrent: int | None = None
    time_budget_seconds: float | None = None
    seed: int = 0
    resume: bool = False
    address: str | None = None
    grace_period: int = 1
    reduction_factor: int = 2


def evaluation_count(config: ExperimentConfig) -> int:
    """How many validations a full trial reports (ASHA's max_t)."""
    training = config.training
    return sum(
        1
        for step in range(1, training.max_steps + 1)
        if step % training.eval_every == 0
        or step % training.checkpoint_every == 0
        or step == training.max_steps
    )


def expand_variant(sampled: dict[str, Any]) -> dict[str, Any]:
    """Config overrides of a sample: an ablation grid samples a variant name, a search fields."""
    sampled = dict(sampled)
    if "variant" in sampled:
        from tune.ablations import VARIANTS

        sampled.update(VARIANTS[sampled.pop("variant")].overrides)
    return sampled


def trial(sampled: dict[str, Any], base: dict[str, Any], plan: dict[str, Any]) -> None:
    """One Tune trial: train the base config with the sampled values."""
    import ray.tune

    from train.worker import quiet_report_logging, train_function

    quiet_report_logging()
    config = ExperimentConfig.from_dict(base).replace(**expand_variant(sampled))
    context = ray.tune.get_context()
    hooks = plan.get("hooks", {})
    if hooks.get("trial_log"):
        with open(hooks["trial_log"], "a") as log:
            log.write(f"{context.get_trial_id()}\n")
    # Tune wants its metric in every report and shows its own trial table.
    worker_config = loop_config(
        config, plan["threads"], {"validation_reports_only": True, "quiet": True, **hooks}
    )
    if plan["workers_per_trial"] == 1:
        from tune.session import TuneSession

        train_function(worker_config, TuneSession(plan["use_gpu"]))
        return
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from train.worker import train_loop_per_worker

    metric = config.training.metric
    resources = {"CPU": plan["cpus_per_worker"], **({"GPU": 1} if plan["use_gpu"] else {})}
    TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan["workers_per_trial"], use_gpu=plan["use_gpu"], resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=context.get_trial_id(),
            storage_path=plan["train_storage"],
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.training.keep_checkpoints,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=METRIC_MODES[metric],
            ),
            failure_config=ray.train.FailureConfig(max_failures=1),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    ).fit()


def _recording_asha(record_path: str, **kwargs):
    """ASHA that also writes which trials it stopped (Tune marks them like finished ones)."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP:
                with open(record_path, "a") as record:
                    record.write(f"{trial.trial_id}\n")
            return decision

    return RecordingASHA(**kwargs)


class _InterruptAfter:
    """Test hook: interrupt the driver (as Ctrl-C would) once `count` trials have completed.

    Tune saves callbacks with the experiment, so a marker file keeps a resumed run from
    being interrupted again.
    """

    def __new__(cls, count: int, marker: str):
        from ray.tune import Callback

        class InterruptAfter(Callback):
            def __init__(self):
                self.completed = 0

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.completed += 1
                if self.completed >= count and not os.path.exists(marker):
                    Path(marker).write_text(f"interrupted after {self.completed} trial(s)\n")
                    os.kill(os.getpid(), signal.SIGINT)

        return InterruptAfter()


def scheduler_record_path(settings: SearchSettings) -> Path:
    """Where the driver records the trials ASHA stopped: the experiment folder when it is
    local, else a local cache folder (the scheduler runs on the driver)."""
    if "://" in settings.storage:
        folder = Path.home() / ".cache" / "lstm_ae" / settings.name
    else:
        folder = Path(storage_path(settings.storage)) / settings.name
    folder.mkdir(parents=True, exist_ok=True)
    return folder / STOPPED_BY_SCHEDULER_FILE


def experiment_path(settings: SearchSettings) -> tuple[Any, str]:
    filesystem, root = storage_filesystem(settings.storage)
    return filesystem, f"{root}/{settings.name}"


def _plan(config: ExperimentConfig, settings: SearchSettings, hooks: dict[str, Any] | None) -> dict[str, Any]:
    """Resources per trial and per worker, from the cluster's size when not given."""
    import ray

    resources = ray.cluster_resources()
    total_cpus = float(resources.get("CPU", 1))
    workers = settings.workers_per_trial
    if settings.use_gpu:
        concurrent = settings.max_concurrent or max(1, int(resources.get("GPU", 0)) // workers)
        cpus_per_worker = settings.cpus_per_worker or 2.0
    else:
        concurrent = settings.max_concurrent or 1
        driver = TRIAL_DRIVER_CPUS if workers > 1 else 0.0
        fair_share = (total_cpus / concurrent - driver) / workers
        cpus_per_worker = settings.cpus_per_worker or max(0.01, math.floor(fair_share * 100) / 100)
    _, path = experiment_path(settings)
    return {
        "workers_per_trial": workers,
        "use_gpu": settings.use_gpu,
        "cpus_per_worker": cpus_per_worker,
        "threads": max(1, int(round(cpus_per_worker))),
        "max_concurrent": concurrent,
        "train_storage": f"{storage_path(settings.storage)}/{settings.name}/train_runs",
        "hooks": dict(hooks or {}),
    }


def _trainable(base: ExperimentConfig, plan: dict[str, Any]):
    from ray import tune

    if plan["workers_per_trial"] == 1:
        resources = {"CPU": plan["cpus_per_worker"], **({"GPU": 1} if plan["use_gpu"] else {})}
    else:
        resources = {"CPU": TRIAL_DRIVER_CPUS}
    return tune.with_resources(tune.with_parameters(trial, base=base.to_dict(), plan=plan), resources)


def saved_experiment(settings: SearchSettings) -> dict[str, Any] | None:
    """The record (search.json) an experiment was started with, or None where there is none."""
    from train.launch import path_exists, read_text

    filesystem, path = experiment_path(settings)
    if not path_exists(filesystem, f"{path}/{SEARCH_FILE}"):
        return None
    try:
        record = json.loads(read_text(filesystem, f"{path}/{SEARCH_FILE}"))
        record["base"] = ExperimentConfig.from_dict(record["base"])
        if "space" in record:
            record["space"] = SearchSpace(
                tuple(Dimension(d["name"], d["kind"], tuple(d["values"])) for d in record["space"])
            )
    except (ValueError, KeyError, TypeError) as error:
        raise ExperimentFolderError(
            f"{path}/{SEARCH_FILE} is not a readable experiment record: {error}"
        ) from None
    return record


def run_search(
    base: ExperimentConfig,
    space: SearchSpace,
    settings: SearchSettings,
    hooks: dict[str, Any] | None = None,
    points_to_evaluate: list[dict[str, Any]] | None = None,
):
    """Run (or resume) the Optuna + ASHA search; returns (ResultGrid, experiment path, plan)."""
    from ray.tune.search.optuna import OptunaSearch

    space.check(base)

    def search_setup(tune):
        scheduler = _recording_asha(
            str(scheduler_record_path(settings)),
            time_attr="training_iteration",
            max_t=evaluation_count(base),
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
        searcher = OptunaSearch(seed=settings.seed, points_to_evaluate=points_to_evaluate)
        return space.to_ray(), {
            "search_alg": searcher,
            "scheduler": scheduler,
            "num_samples": settings.num_samples,
        }

    record = {"space": [asdict(dimension) for dimension in space.dimensions]}
    return run_experiment(base, settings, search_setup, record, hooks)


def run_experiment(
    base: ExperimentConfig, settings: SearchSettings, setup, record: dict[str, Any], hooks=None
):
    """Check, start or restore, and run a Tune experiment of `trial`s over `base`.

    `setup(tune)` returns (param_space, extra TuneConfig arguments) for a new experiment.
    """
    from ray import tune

    from lstm_ae.data import load_test_set
    from train.launch import path_exists

    filesystem, path = experiment_path(settings)
    base = with_absolute_paths(base)
    load_test_set(base.model, base.data)  # fail on bad data before any trial, and build the cache once
    exists = path_exists(filesystem, f"{path}/{SEARCH_FILE}")
    if exists and not settings.resume:
        raise ExperimentFolderError(
            f"experiment folder {path} already exists: pass --resume to continue it, or choose another --name"
        )
    if settings.resume and not exists:
        raise ExperimentFolderError(
            f"nothing to resume: no experiment named {settings.name!r} under {settings.storage}"
        )

    connect(settings.address)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    plan = _plan(base, settings, hooks)
    trainable = _trainable(base, plan)
    callbacks = []
    if hooks and hooks.get("interrupt_after_trials"):
        callbacks.append(_InterruptAfter(hooks["interrupt_after_trials"], hooks["interrupt_marker"]))
    metric = base.training.metric
    tune_path = f"{storage_path(settings.storage)}/{settings.name}"
    if settings.resume:
        if not tune.Tuner.can_restore(tune_path):
            raise ExperimentFolderError(f"experiment {path} cannot be restored (no Tune state)")
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_errored=True)
    else:
        param_space, tune_arguments = setup(tune)
        filesystem.create_dir(path, recursive=True)
        with filesystem.open_output_stream(f"{path}/{SEARCH_FILE}") as stream:
            full_record = {
                "base": base.to_dict(),
                "settings": asdict(settings),
                "evaluations_per_trial": evaluation_count(base),
                **record,
            }
            stream.write(json.dumps(full_record, indent=2).encode())
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=METRIC_MODES[metric],
                max_concurrent_trials=plan["max_concurrent"],
                time_budget_s=settings.time_budget_seconds,
                **tune_arguments,
            ),
            run_config=tune.RunConfig(
                name=settings.name,
                storage_path=storage_path(settings.storage),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=base.training.keep_checkpoints,
                    checkpoint_score_attribute=metric,
                    checkpoint_score_order=METRIC_MODES[metric],
                ),
                callbacks=callbacks,
                verbose=1,
            ),
        )
    results = tuner.fit()
    return results, path, plan
