"""The driver: join (or start) Ray, build the TorchTrainer, run it, and write the run folder.

`build_trainer` is the one place a `TorchTrainer` is made, for `python -m train` and for every
multi-worker Tune trial (`tune.experiment.trial`); `worker_cpus` is the one rule for the CPUs
beside each worker. `run_training` is `python -m train`: it locks the run folder
(`records.folder_lock`), repairs Ray's checkpoint list on a resume
(`train.ray_internals.repair_snapshot`), trains, and writes the run folder
(`records.run_folder`). Rank 0 writes TensorBoard event files into the folder as the run goes,
and with `RunSettings.mlflow` the run is also an MLflow run (`train.tracking`).

`storage` is a local folder or any pyarrow filesystem URI (`s3://bucket/prefix`), which a
multi-node cluster needs so that every node reaches the checkpoints.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lstm_ae.checkpoint import CheckpointError
from lstm_ae.config import ExperimentConfig
from lstm_ae.data import STANDARD_FILE, load_test_set
from lstm_ae.metrics import METRIC_MODES
from records.folder_lock import locked
from records.layout import SNAPSHOT_FILE
from records.run_folder import (
    RunFolderError,
    check_folder,
    check_run_start,
    continue_line,
    folder_flags,
    saved_source,
    write_run_config,
    write_run_folder,
)
from records.storage import path_exists, storage_filesystem, storage_path
from train.cluster import ClusterCapacity, check_can_hold, cluster_capacity, waiting_line
from train.commandline import flag
from train.ray_internals import repair_snapshot
from train.tracking import TRACKING_KEY, MLflowSettings, MLflowTrainRun
from train.worker import WorkerSettings, loop_config, train_loop_per_worker

GPU_WORKER_CPUS = 2.0  # CPUs beside each GPU worker (data, the host side of the step)

# Quieter Ray: no duplicated worker prints. Ray Train's preemption watcher stays on (its
# default): when Ray drains a node (a spot notice where the autoscaler turns it into a
# drain), the run checkpoints on its schedule and restarts elsewhere without spending
# --max-failures. It costs one 0-CPU actor and one harmless ERROR line from Ray's core per
# run ("PreemptionWatcher ... has constructor arguments in the object store").
RAY_ENVIRONMENT = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# oneDNN's and ATen's instruction-set caps: a run started under them trains under them.
FORWARDED_ENVIRONMENT = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def connect(address: str | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local one. True when it
    joined a cluster that was already running (which may have an autoscaler)."""
    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    import ray

    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    # CPU capability caps set for this command reach its workers too (docs/scaling.md, "Precision follows the hardware").
    forwarded = {key: os.environ[key] for key in FORWARDED_ENVIRONMENT if key in os.environ}
    if not ray.is_initialized():
        ray.init(
            address=address,
            runtime_env={"env_vars": {**RAY_ENVIRONMENT, **forwarded}},
            log_to_driver=True,
        )
    return joined


# ------------------------------------------------------------------------------- scaling


@dataclass(frozen=True)
class Scaling:
    """How a run is spread over Ray workers."""

    num_workers: int = flag(1, "data-parallel workers (one per GPU)")
    use_gpu: bool = flag(False, "one GPU per worker")
    cpus_per_worker: float | None = flag(
        None,
        "CPUs reserved per worker (default: all CPUs split over the workers; 2 with --use-gpu)",
        type=float,
    )

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {self.num_workers}")


@dataclass(frozen=True)
class RunSettings:
    """Where a run lives and how it survives failures."""

    name: str
    storage: str = "runs"
    resume: bool = False
    max_failures: int = flag(1, "worker-group restarts from the latest checkpoint (-1: no limit)")
    address: str | None = None
    mlflow: MLflowSettings | None = None  # also log to MLflow
    # Where the config came from (--from; `records.sources.Source.record`): kept in config.json
    # and result.json as `source`. A resumed run keeps the one its config.json holds.
    source: dict[str, Any] | None = None
    initial_weights: str | None = None  # a checkpoint folder whose weights a new run starts from


@dataclass(frozen=True)
class RunSummary:
    path: str
    result: dict[str, Any]


def default_run_name(preset_name: str) -> str:
    return f"lstm-ae-{preset_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def worker_cpus(
    num_workers: int, use_gpu: bool, given: float | None, capacity: ClusterCapacity, cpu_pool: float
) -> float:
    """The one rule for the CPUs beside each worker: as given; GPU_WORKER_CPUS beside each GPU
    (never more than one node has); else the `cpu_pool` split over the workers, never more
    than one node has. A run's pool is the cluster's CPUs; a search trial's is one node's,
    so that trials fill the nodes side by side."""
    if given is not None:
        return given
    largest = capacity.largest("CPU")
    if use_gpu:
        return min(GPU_WORKER_CPUS, largest or GPU_WORKER_CPUS)
    return float(max(1, min(int(largest or 1), int(cpu_pool) // num_workers)))


def worker_resources(cpus: float, use_gpu: bool) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": 1.0} if use_gpu else {})}


def build_trainer(
    train_loop: Callable[[dict[str, Any]], None],
    worker_config: dict[str, Any],
    *,
    name: str,
    storage: str,
    num_workers: int,
    use_gpu: bool,
    resources: dict[str, float],
    config: ExperimentConfig,
    max_failures: int,
    callbacks: Sequence[Any] = (),
):
    """The TorchTrainer of a run or a multi-worker trial: `num_workers` workers with
    `resources` each, checkpoints kept by the config's metric, `max_failures` restarts."""
    import ray.train
    from ray.train.torch import TorchTrainer

    metric = config.training.metric
    return TorchTrainer(
        train_loop,
        train_loop_config=worker_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.training.keep_checkpoints,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=METRIC_MODES[metric],
            ),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
        ),
    )


def with_absolute_paths(config: ExperimentConfig) -> ExperimentConfig:
    """Ray workers run in their own folders: make data paths absolute on the driver."""
    data = config.data
    test_file = data.test_file
    if test_file and test_file != STANDARD_FILE:
        test_file = str(Path(test_file).expanduser().resolve())
    return replace(
        config,
        data=replace(
            data,
            cache_dir=str(Path(data.cache_dir).expanduser().resolve()),
            mnist_root=str(Path(data.mnist_root).expanduser().resolve()),
            test_file=test_file,
        ),
    )


# ------------------------------------------------------------------------------- a run


def lock_run_folder(settings: RunSettings):
    """The lock on the run folder, held for the `with` block (FolderLockedError if a live
    run holds it; a nested lock by the same process is a no-op)."""
    filesystem, root = storage_filesystem(settings.storage)
    return locked(filesystem, f"{root}/{settings.name}")


def _started(settings: RunSettings) -> bool:
    filesystem, root = storage_filesystem(settings.storage)
    return path_exists(filesystem, f"{root}/{settings.name}/{SNAPSHOT_FILE}")


def run_continue_line(settings: RunSettings) -> str:
    """How to go on with a stopped run: resume it once it has a checkpoint, else start it again."""
    flags = folder_flags(settings.name, settings.storage)
    return continue_line("train", flags, _started(settings), "it had no checkpoint yet")


def check_run_folder(settings: RunSettings) -> None:
    """A new run must not overwrite an old one; a resume needs a checkpoint that loads (a
    folder without one is started again: `records.run_folder.check_run_start`)."""
    filesystem, root = storage_filesystem(settings.storage)
    run_path = f"{root}/{settings.name}"
    started = check_run_start(filesystem, run_path, settings.name, _started(settings), settings.resume)
    check_folder(started, settings.resume, run_path, "run", settings.name, root)


def run_training(
    config: ExperimentConfig,
    scaling: Scaling,
    settings: RunSettings,
    train_loop: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Train with Ray Train and write the run folder.

    `train_loop` replaces `train.worker.train_loop_per_worker` (tests wrap it to inject faults).
    """
    with lock_run_folder(settings):
        check_run_folder(settings)
        filesystem, root = storage_filesystem(settings.storage)
        if settings.resume:
            try:  # Ray's resume then starts from the newest checkpoint that loads
                repair_snapshot(filesystem, f"{root}/{settings.name}")
            except CheckpointError as error:
                raise RunFolderError(str(error)) from None
        return _train(config, scaling, settings, train_loop)


def _train(config, scaling: Scaling, settings: RunSettings, train_loop) -> RunSummary:
    import ray

    config = with_absolute_paths(config)
    load_test_set(config.model, config.data)  # check (and build, and cache) the validation set here
    capacity = cluster_capacity(joined=connect(settings.address))
    cpus = worker_cpus(
        scaling.num_workers,
        scaling.use_gpu,
        scaling.cpus_per_worker,
        capacity,
        cpu_pool=ray.cluster_resources().get("CPU", 1),
    )
    resources = worker_resources(cpus, scaling.use_gpu)
    check_can_hold(capacity, resources, scaling.num_workers, f"{scaling.num_workers} worker(s)")
    waiting = waiting_line(capacity, resources, scaling.num_workers)
    if waiting:
        print(waiting, flush=True)
    worker_config = loop_config(
        config, WorkerSettings(threads=max(1, int(cpus)), initial_weights=settings.initial_weights)
    )
    worker_config[TRACKING_KEY] = {"tensorboard": f"{storage_path(settings.storage)}/{settings.name}"}
    mlflow_run = None
    if settings.mlflow is not None:
        params = {**config.values_by_field(), **asdict(scaling)}
        mlflow_run = MLflowTrainRun(settings.mlflow, settings.name, params, settings.resume)
    trainer = build_trainer(
        train_loop or train_loop_per_worker,
        worker_config,
        name=settings.name,
        storage=storage_path(settings.storage),
        num_workers=scaling.num_workers,
        use_gpu=scaling.use_gpu,
        resources=resources,
        config=config,
        max_failures=settings.max_failures,
        callbacks=[mlflow_run.callback()] if mlflow_run else [],
    )
    started = time.time()
    filesystem, root = storage_filesystem(settings.storage)
    run_path = f"{root}/{settings.name}"
    settings = replace(settings, source=settings.source or saved_source(filesystem, run_path))
    write_run_config(filesystem, run_path, config, asdict(scaling), settings.source)
    try:
        result = trainer.fit()
    except BaseException:
        if mlflow_run is not None:
            mlflow_run.finish(failed=True)
        raise
    try:  # drop the empty folders workers left for checkpoints they skipped as damaged
        repair_snapshot(filesystem, run_path, load=False)
    except (CheckpointError, OSError) as error:
        print(f"warning: could not tidy the run's checkpoint list: {error}", flush=True)
    path, summary = write_run_folder(
        result,
        config,
        asdict(scaling),
        time.time() - started,
        settings.storage,
        settings.name,
        settings.source,
    )
    if mlflow_run is not None:
        mlflow_run.finish(filesystem, run_path)
    return RunSummary(path, summary)
