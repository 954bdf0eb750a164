"""A Tune experiment of training trials: the plan (resources, concurrency), the trial
function, and starting or restoring the experiment. `tune.search` (Optuna + ASHA) and
`tune.ablations` (a grid) build on it.

Each trial trains one config with the same training function as `train`:

- one worker per trial: the trial process runs `train.worker.train_function` itself;
- several workers per trial: the trial launches a Ray Train `TorchTrainer` (the Train V2
  pattern; `TuneReportCallback` forwards its reports to Tune), whose run lives under the
  experiment folder in `train_runs/<trial id>` and resumes there if the trial is retried.
  Ray places that trainer's controller on the trial's node, so the trial asks for the head
  node's `lstm_ae_head` resource where the cluster has it: a reclaimed spot node then
  takes workers with it, never a controller. The trainer waits up to
  `worker_group_start_timeout_s` (10 minutes unless $RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
  is set for the search) for its workers' placement group while an autoscaler adds nodes.

Tune ends a trial by stopping and then killing its actor, also while a TorchTrainer is still
running in it (ASHA stops a trial at its last report, at max_t, and at a rung). The trainer's
controller dies with the trial without removing its workers' placement group, which Ray
keeps reserved as long as the search's driver lives; Ray Train's own cleaner for this asks
the dashboard's State API, which a cluster without a dashboard lacks. So while trials run,
`DeadTrainerReaper` releases the placement groups of this search's dead Train controllers
within seconds: a search never sits on reserved, unused CPUs.

Trials report after every validation. A failed trial (a lost node) is retried from its
latest checkpoint up to `max_failures` times. The experiment folder is Tune's own,
`<storage>/<name>/`, with `search.json` (what the experiment was started with); the
experiment locks it before Ray starts (`lock.json`, see `records/folder_lock.py`).
Each trial's folder also holds the TensorBoard events its rank 0 writes (`train/tracking.py`)
and the trial's config (`config.json`, which `python -m train --from` reads).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

from lstm_ae.config import ExperimentConfig
from lstm_ae.data import load_test_set
from lstm_ae.metrics import METRIC_MODES
from records.folder_lock import locked
from records.layout import SEARCH_FILE, TRAIN_RUNS_FOLDER
from records.run_folder import RunFolderError, check_folder
from records.sources import write_config_file
from records.storage import path_exists, read_text, storage_filesystem, storage_path
from train.cluster import HEAD_RESOURCE, ClusterCapacity, check_can_hold, cluster_capacity, waiting_line
from train.commandline import flag
from train.driver import build_trainer, connect, with_absolute_paths, worker_cpus, worker_resources
from train.ray_internals import DeadTrainerReaper, quiet_report_logging, repair_experiment_state
from train.tracking import TRACKING_KEY
from train.worker import TuneSession, WorkerSettings, loop_config, train_function, train_loop_per_worker
from tune.objectives import Objectives
from tune.space import Dimension, SearchSpace
from tune.variants import expand_variant

DRIVER_SHARE = 0.01  # what a trial that only launches a TorchTrainer asks for
# Ray Train gives up on a worker group's placement group after this many seconds and asks
# again (Ray's default, 60 s, is shorter than a cloud node takes to start).
WORKER_GROUP_START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WORKER_GROUP_START_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class SearchSettings:
    """How a Tune experiment (a search or the ablation grid) runs, apart from its configs."""

    name: str
    storage: str = "runs"
    num_samples: int = flag(8, "trials to run")
    workers_per_trial: int = flag(1, "data-parallel workers per trial", name="--num-workers-per-trial")
    use_gpu: bool = flag(False, "one GPU per worker")
    cpus_per_worker: float | None = flag(
        None,
        "CPUs per worker (default: one node's CPUs split over a trial's workers; 2 with --use-gpu)",
        type=float,
    )
    max_concurrent: int | None = flag(
        None,
        "trials at once (default: as many as the cluster holds at its largest, autoscaled nodes included)",
        type=int,
    )
    time_budget_seconds: float | None = flag(
        None,
        "stop the experiment after SECONDS, running trials too (their checkpoints stay; --resume starts a new budget)",
        name="--time-budget",
        type=float,
    )
    seed: int = flag(0, "seed of the TPE sampler", name="--search-seed")
    resume: bool = False
    address: str | None = None
    grace_period: int = flag(1, "validations before ASHA may stop a trial")
    reduction_factor: int = flag(2, "ASHA keeps 1/N of the trials at each rung")
    max_failures: int = flag(
        2, "retries of a failed trial (a lost node) from its latest checkpoint (-1: no limit)"
    )
    objectives: Objectives = ()  # two (metric, mode) pairs for a Pareto search; () one metric (tune/objectives.py)


@dataclass(frozen=True)
class TrialPlan:
    """Resources per trial and how many trials run at once (Ray needs plain data: to_dict)."""

    workers_per_trial: int
    use_gpu: bool
    cpus_per_worker: float
    max_concurrent: int
    capacity: int  # trials the cluster holds at its largest (-1: no limit)
    driver_resources: dict[str, float]  # multi-worker trials only
    train_storage: str
    experiment_folder: str  # <storage>/<name>: each trial's TensorBoard events go to its folder there
    worker_group_start_timeout_s: float = WORKER_GROUP_START_TIMEOUT_S  # multi-worker trials only

    @property
    def threads(self) -> int:
        return max(1, int(round(self.cpus_per_worker)))

    @property
    def worker_resources(self) -> dict[str, float]:
        return worker_resources(self.cpus_per_worker, self.use_gpu)

    @property
    def trial_resources(self) -> dict[str, float]:
        """What Tune reserves for the trial itself (the worker, or the trainer's driver)."""
        return self.worker_resources if self.workers_per_trial == 1 else self.driver_resources

    def describe(self) -> str:
        worker = f"{self.cpus_per_worker:g} CPU" + (" + 1 GPU" if self.use_gpu else "")
        shape = (
            f"1 worker ({worker})"
            if self.workers_per_trial == 1
            else f"{self.workers_per_trial} workers ({worker} each) + a driver on "
            + ("the head node" if HEAD_RESOURCE in self.driver_resources else "any node")
        )
        held = "no limit" if self.capacity < 0 else str(self.capacity)
        return (
            f"plan: each trial {shape}; up to {self.max_concurrent} trial(s) at once "
            f"(the cluster holds {held} at its largest)"
        )


def plan_trials(settings: SearchSettings, cluster: ClusterCapacity, num_trials: int) -> TrialPlan:
    """Resources per worker and trials at once, from the cluster's live nodes and the node
    types its autoscaler can launch.

    Single-worker trials: as many at once as the cluster can hold when fully scaled; Tune
    keeps that many trials pending, which is what makes an autoscaler add nodes.
    Multi-worker trials: as many whole worker groups as the cluster can hold. Either is
    capped by --max-concurrent and by the number of trials.
    """
    workers = settings.workers_per_trial
    # One node's CPUs per trial, split over its workers (train.driver.worker_cpus).
    cpus = worker_cpus(
        workers, settings.use_gpu, settings.cpus_per_worker, cluster, cluster.largest("CPU") or 1
    )
    worker = worker_resources(cpus, settings.use_gpu)
    if HEAD_RESOURCE in {name for group in cluster.live for name in group.resources}:
        driver = {"CPU": 0.0, HEAD_RESOURCE: DRIVER_SHARE}
    else:
        driver = {"CPU": DRIVER_SHARE}
    if workers == 1:
        capacity = cluster.fits(worker)
    else:
        worker_slots = cluster.fits(worker)
        capacity = -1 if worker_slots < 0 else worker_slots // workers
    limit = num_trials if capacity < 0 else min(max(1, capacity), num_trials)
    concurrent = min(settings.max_concurrent, num_trials) if settings.max_concurrent else limit
    return TrialPlan(
        workers_per_trial=workers,
        use_gpu=settings.use_gpu,
        cpus_per_worker=cpus,
        max_concurrent=max(1, concurrent),
        capacity=capacity,
        driver_resources=driver,
        train_storage=f"{storage_path(settings.storage)}/{settings.name}/{TRAIN_RUNS_FOLDER}",
        experiment_folder=f"{storage_path(settings.storage)}/{settings.name}",
        worker_group_start_timeout_s=float(
            os.environ.get(WORKER_GROUP_START_TIMEOUT_VARIABLE) or WORKER_GROUP_START_TIMEOUT_S
        ),
    )


def trial(sampled: dict[str, Any], base: dict[str, Any], plan: dict[str, Any]) -> None:
    """One Tune trial: train the base config with the sampled values."""
    import ray.tune

    quiet_report_logging()
    plan = TrialPlan(**plan)
    config = ExperimentConfig.from_dict(base).replace(**expand_variant(sampled))
    worker_config = loop_config(
        config, WorkerSettings(threads=plan.threads, validation_reports_only=True, quiet=True)
    )
    # Rank 0 writes TensorBoard events into the trial's folder (beside Tune's own events);
    # get_trial_dir is a local staging folder that ends in the trial folder's name.
    trial_folder = PurePosixPath(ray.tune.get_context().get_trial_dir()).name
    worker_config[TRACKING_KEY] = {"tensorboard": f"{plan.experiment_folder}/{trial_folder}"}
    # The trial's whole config beside its reports, for `python -m train --from`.
    write_config_file(f"{plan.experiment_folder}/{trial_folder}", config)
    if plan.workers_per_trial == 1:
        train_function(worker_config, TuneSession(plan.use_gpu))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    # Read in this process when the trainer starts and passed on to its controller.
    os.environ[WORKER_GROUP_START_TIMEOUT_VARIABLE] = f"{plan.worker_group_start_timeout_s:g}"
    build_trainer(
        train_loop_per_worker,
        worker_config,
        name=ray.tune.get_context().get_trial_id(),
        storage=plan.train_storage,
        num_workers=plan.workers_per_trial,
        use_gpu=plan.use_gpu,
        resources=plan.worker_resources,
        config=config,
        max_failures=1,  # then the trial fails, and Tune retries it (SearchSettings.max_failures)
        callbacks=[TuneReportCallback()],
    ).fit()


def experiment_path(settings: SearchSettings) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of the experiment folder."""
    filesystem, root = storage_filesystem(settings.storage)
    return filesystem, f"{root}/{settings.name}"


def saved_experiment(settings: SearchSettings) -> dict[str, Any] | None:
    """The record (search.json) an experiment was started with, or None where there is none."""
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
        raise RunFolderError(f"{path}/{SEARCH_FILE} is not a readable experiment record: {error}") from None
    return record


def run_experiment(
    base: ExperimentConfig,
    settings: SearchSettings,
    setup,
    record: dict[str, Any],
    callbacks=(),
    num_trials: int | None = None,
):
    """Check, start or restore, and run a Tune experiment of `trial`s over `base`.

    `setup(ray_tune, plan)` returns (param_space, extra TuneConfig arguments) for a new experiment
    (`plan` is the TrialPlan: how many trials run at once);
    `callbacks` are Tune callbacks (tests use them to watch or interrupt the driver).
    Returns (ResultGrid, experiment path, plan).
    """
    filesystem, path = experiment_path(settings)
    with locked(filesystem, path, "experiment folder"):  # before Ray starts, until the end
        return _run_locked(base, settings, setup, record, callbacks, num_trials)


def _run_locked(base: ExperimentConfig, settings: SearchSettings, setup, record, callbacks, num_trials):
    from ray import tune as ray_tune  # (this project's package is `tune` too)

    filesystem, path = experiment_path(settings)
    base = with_absolute_paths(base)
    load_test_set(base.model, base.data)  # fail on bad data before any trial, and build the cache once
    exists = path_exists(filesystem, f"{path}/{SEARCH_FILE}")
    check_folder(exists, settings.resume, path, "experiment", settings.name, settings.storage)

    joined = connect(settings.address)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    capacity = cluster_capacity(joined)
    plan = plan_trials(settings, capacity, num_trials or settings.num_samples)
    check_can_hold(capacity, plan.worker_resources, plan.workers_per_trial, "each trial's worker(s)")
    waiting = waiting_line(capacity, plan.worker_resources, plan.workers_per_trial)
    if waiting:
        print(waiting, flush=True)
    print(plan.describe(), flush=True)
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(trial, base=base.to_dict(), plan=asdict(plan)), plan.trial_resources
    )
    metric = base.training.metric
    tune_path = f"{storage_path(settings.storage)}/{settings.name}"
    if settings.resume:
        if not ray_tune.Tuner.can_restore(tune_path):
            raise RunFolderError(f"experiment {path} cannot be restored (no Tune state)")
        # Tune's saved state may name checkpoints the trials' own pruning removed since.
        repair_experiment_state(filesystem, path)
        tuner = ray_tune.Tuner.restore(tune_path, trainable=trainable, resume_errored=True)
    else:
        param_space, tune_arguments = setup(ray_tune, plan)
        filesystem.create_dir(path, recursive=True)
        with filesystem.open_output_stream(f"{path}/{SEARCH_FILE}") as stream:
            full_record = {"base": base.to_dict(), "settings": asdict(settings), **record}
            stream.write(json.dumps(full_record, indent=2).encode())
        tuner = ray_tune.Tuner(
            trainable,
            param_space=param_space,
            # A searcher of several metrics holds them itself (TuneConfig's would replace them).
            tune_config=ray_tune.TuneConfig(
                **{"metric": metric, "mode": METRIC_MODES[metric], **tune_arguments},
                max_concurrent_trials=plan.max_concurrent,
                time_budget_s=settings.time_budget_seconds,
            ),
            run_config=ray_tune.RunConfig(
                name=settings.name,
                storage_path=storage_path(settings.storage),
                checkpoint_config=ray_tune.CheckpointConfig(
                    num_to_keep=base.training.keep_checkpoints,
                    checkpoint_score_attribute=metric,
                    checkpoint_score_order=METRIC_MODES[metric],
                ),
                failure_config=ray_tune.FailureConfig(max_failures=settings.max_failures),
                callbacks=list(callbacks),
                verbose=1,
            ),
        )
    if plan.workers_per_trial == 1:
        results = tuner.fit()
    else:
        with DeadTrainerReaper():
            results = tuner.fit()
    return results, path, plan
