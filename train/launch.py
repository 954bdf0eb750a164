"""The driver: start (or join) Ray, run the TorchTrainer, and write the run folder.

The run folder is Ray Train's own folder, `<storage>/<name>/`, where Ray keeps the
checkpoints (`checkpoint_<step>/`, the best `keep_checkpoints` by the validation metric plus
the latest). The run locks it before Ray starts (`lock.json`, `records/folder_lock.py`) and gives
it back at the end; a resume first sets aside checkpoints that do not load
(`damaged_checkpoint_<step>/`, `records/checkpoints.py`). After training the driver adds, from
the final checkpoint:

    config.json      the experiment config and how it was scaled (and, for a run started
                     with --from, `source`: where its config came from; result.json too)
    metrics.csv      one row per report (losses, throughput, validation metrics)
    result.json      final metrics with units, best checkpoint, wall time, sequences seen
    prediction.gif, reconstruction.gif, frames.png, curves.png

Rank 0 writes TensorBoard event files into the folder as the run goes, and with
`RunSettings.mlflow` the run is also an MLflow run (`train/tracking.py`).

`storage` is a local folder or any pyarrow filesystem URI (`s3://bucket/prefix`), which a
multi-node cluster needs so that every node reaches the checkpoints.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lstm_ae.checkpoint import CheckpointError
from lstm_ae.config import ConfigError, ExperimentConfig
from lstm_ae.data import STANDARD_FILE, load_test_set
from lstm_ae.metrics import METRIC_MODES, UNITS
from lstm_ae.viz import RUN_PICTURES
from records.checkpoints import HISTORY_FILE, SNAPSHOT_FILE, best_checkpoint
from records.folder_lock import locked
from records.storage import path_exists, read_text, storage_filesystem, storage_path, write_text
from train.cluster import ClusterCapacity, check_can_hold, cluster_capacity, waiting_line
from train.connection import connect
from train.ray_internals import repair_snapshot
from train.tracking import TRACKING_KEY, MLflowSettings, MLflowTrainRun
from train.worker import WorkerSettings, loop_config, train_loop_per_worker


class RunFolderError(ValueError):
    """The run folder is in a state the command cannot act on (exists without --resume, ...)."""


@dataclass(frozen=True)
class Scaling:
    """How a run is spread over Ray workers."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # default: the cluster's CPUs split evenly (CPU runs)

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {self.num_workers}")


@dataclass(frozen=True)
class RunSettings:
    """Where a run lives and how it survives failures."""

    name: str
    storage: str = "runs"
    resume: bool = False
    max_failures: int = 1
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


# ------------------------------------------------------------------------------- resuming


def lock_run_folder(settings: RunSettings):
    """The lock on the run folder, held for the `with` block (FolderLockedError if a live
    run holds it; a nested lock by the same process is a no-op)."""
    filesystem, root = storage_filesystem(settings.storage)
    return locked(filesystem, f"{root}/{settings.name}")


def continue_line(settings: RunSettings) -> str:
    """How to go on with a stopped run: resume it once it has a checkpoint, else start it again."""
    filesystem, root = storage_filesystem(settings.storage)
    flags = f"--name {settings.name}" + (f" --output-dir {settings.storage}" if settings.storage != "runs" else "")
    if path_exists(filesystem, f"{root}/{settings.name}/{SNAPSHOT_FILE}"):
        return f"continue it with: python -m train {flags} --resume"
    return f"it had no checkpoint yet: start it again with python -m train {flags} and the same flags"


def check_run_folder(settings: RunSettings) -> None:
    """A new run must not overwrite an old one; a resume needs something to resume."""
    filesystem, root = storage_filesystem(settings.storage)
    run_path = f"{root}/{settings.name}"
    started = path_exists(filesystem, f"{run_path}/{SNAPSHOT_FILE}")
    if started and not settings.resume:
        raise RunFolderError(
            f"run folder {run_path} already exists: pass --resume to continue it, or choose another --name"
        )
    if settings.resume and not started:
        raise RunFolderError(f"nothing to resume: no run named {settings.name!r} under {root}")


# Config fields a resumed run may change: they decide when it logs, validates, checkpoints
# or stops, and where it finds its data, not what it computes (max_steps may only grow).
RESUMABLE_FIELDS = frozenset(
    {
        "max_steps",
        "max_minutes",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "probe_sequences",
        "patience",
        "cache_dir",
        "mnist_root",
        "download",
    }
)


@dataclass(frozen=True)
class SavedRun:
    """What a run folder says about the run: its config and scaling (config.json) and, once
    it has ended, its result (result.json)."""

    config: ExperimentConfig
    num_workers: int
    result: dict[str, Any] | None

    def is_complete(self, config: ExperimentConfig) -> bool:
        """Ended, and `config` asks for no more steps or minutes (a run that stopped early
        stays ended)."""
        if self.result is None:
            return False
        planned_minutes = float(self.result.get("planned_minutes") or 0)
        return (
            self.result.get("status") == "stopped_early"
            or int(self.result.get("steps", 0)) >= config.training.max_steps
            or 0 < config.training.max_minutes <= planned_minutes
        )


def saved_run(settings: RunSettings) -> SavedRun | None:
    """The run folder's record of the run, or None where it has no config.json yet."""
    filesystem, root = storage_filesystem(settings.storage)
    path = f"{root}/{settings.name}"
    if not path_exists(filesystem, f"{path}/config.json"):
        return None
    try:
        record = json.loads(read_text(filesystem, f"{path}/config.json"))
        config = ExperimentConfig.from_dict(record["config"])
        num_workers = int(record.get("scaling", {}).get("num_workers", 1))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path}/config.json is not a readable run config: {error}") from None
    result = None
    if path_exists(filesystem, f"{path}/result.json"):
        try:
            result = json.loads(read_text(filesystem, f"{path}/result.json"))
        except ValueError as error:
            raise ConfigError(f"{path}/result.json is not readable: {error}") from None
    return SavedRun(config, num_workers, result)


# ------------------------------------------------------------------------------- launching


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


def _cpus_per_worker(scaling: Scaling, capacity: ClusterCapacity) -> float:
    """CPUs per worker: as given; 2 beside each GPU; else the CPUs split over the workers
    (never more than one node has)."""
    import ray

    if scaling.cpus_per_worker is not None:
        return scaling.cpus_per_worker
    largest = capacity.largest("CPU")
    if scaling.use_gpu:
        return min(2.0, largest or 2.0)
    total = int(ray.cluster_resources().get("CPU", 1))
    return float(max(1, min(int(largest), total // scaling.num_workers)))


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
    import ray.train
    from ray.train.torch import TorchTrainer

    config = with_absolute_paths(config)
    load_test_set(config.model, config.data)  # check (and build, and cache) the validation set here
    capacity = cluster_capacity(joined=connect(settings.address))
    cpus = _cpus_per_worker(scaling, capacity)
    resources = {"CPU": cpus, **({"GPU": 1} if scaling.use_gpu else {})}
    check_can_hold(capacity, resources, scaling.num_workers, f"{scaling.num_workers} worker(s)")
    waiting = waiting_line(capacity, resources, scaling.num_workers)
    if waiting:
        print(waiting, flush=True)
    metric = config.training.metric
    worker_config = loop_config(
        config, WorkerSettings(threads=max(1, int(cpus)), initial_weights=settings.initial_weights)
    )
    worker_config[TRACKING_KEY] = {"tensorboard": f"{storage_path(settings.storage)}/{settings.name}"}
    mlflow_run = None
    if settings.mlflow is not None:
        params = {**config.values_by_field(), **asdict(scaling)}
        mlflow_run = MLflowTrainRun(settings.mlflow, settings.name, params, settings.resume)
    trainer = TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config=worker_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=settings.name,
            storage_path=storage_path(settings.storage),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.training.keep_checkpoints,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=METRIC_MODES[metric],
            ),
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=[mlflow_run.callback()] if mlflow_run else [],
        ),
    )
    started = time.time()
    filesystem, root = storage_filesystem(settings.storage)
    run_path = f"{root}/{settings.name}"
    filesystem.create_dir(run_path, recursive=True)
    settings = replace(settings, source=settings.source or _saved_source(filesystem, run_path))
    record = {"config": config.to_dict(), "scaling": asdict(scaling)}
    write_text(
        filesystem,
        f"{run_path}/config.json",
        json.dumps({**record, **({"source": settings.source} if settings.source else {})}, indent=2),
    )
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
    summary = write_run_folder(result, config, scaling, time.time() - started, settings)
    if mlflow_run is not None:
        mlflow_run.finish(filesystem, run_path)
    return summary


def _saved_source(filesystem, run_path: str) -> dict[str, Any] | None:
    """The `source` a run's config.json already holds (a resumed run started with --from)."""
    if not path_exists(filesystem, f"{run_path}/config.json"):
        return None
    try:
        return json.loads(read_text(filesystem, f"{run_path}/config.json")).get("source")
    except (ValueError, AttributeError):
        return None


# ------------------------------------------------------------------------------- run folder


def write_run_folder(
    result, config: ExperimentConfig, scaling: Scaling, wall_seconds: float, settings: RunSettings
) -> RunSummary:
    """metrics.csv, result.json and the pictures, from the run's final checkpoint."""
    filesystem, root = storage_filesystem(settings.storage)
    run_path = f"{root}/{settings.name}"
    checkpoint_path = result.checkpoint.path
    checkpoint_fs = result.checkpoint.filesystem
    state = json.loads(read_text(checkpoint_fs, f"{checkpoint_path}/{HISTORY_FILE}"))
    history = state["history"]
    write_text(filesystem, f"{run_path}/metrics.csv", history_csv(history))
    for picture in RUN_PICTURES:
        source = f"{checkpoint_path}/{picture}"
        if path_exists(checkpoint_fs, source):
            with checkpoint_fs.open_input_stream(source) as reader:
                data = reader.read()
            with filesystem.open_output_stream(f"{run_path}/{picture}") as writer:
                writer.write(data)
    metric = config.training.metric
    best, best_row = _best_kept_checkpoint(result.best_checkpoints, metric)
    summary = {
        "name": settings.name,
        "status": "stopped_early" if state["stopped_early"] else "completed",
        "steps": state["step"],
        "sequences_seen": state["sequences_seen"],
        "training_seconds": state.get("training_seconds", state["elapsed_seconds"]),  # the steps
        "elapsed_seconds": state["elapsed_seconds"],  # the steps and the validations
        "planned_minutes": state.get("planned_minutes", 0.0),  # the time budget that set its end
        "wall_seconds": wall_seconds,
        "num_workers": scaling.num_workers,
        "use_gpu": scaling.use_gpu,
        "metric": metric,
        "metric_mode": METRIC_MODES[metric],
        # The best validation seen (best_step may fall between checkpoints when eval_every is
        # finer than checkpoint_every), and the best checkpoint kept, with its own step and value.
        "best_metric": state["best_metric"],
        "best_step": state["best_step"],
        "best_checkpoint": best,
        "best_checkpoint_step": best_row.get("step"),
        "best_checkpoint_metric": best_row.get(metric),
        "resumed_from": state["resumed_from"],
        "final_checkpoint": f"{checkpoint_path}",
        "final_metrics": {
            key: value for key, value in history[-1].items() if key in UNITS or key.endswith("loss")
        }
        if history
        else {},
        "units": {key: UNITS[key] for key in (history[-1] if history else {}) if key in UNITS},
        "replica_checksums": history[-1].get("replica_checksums") if history else None,
        # The precision the run trained in ('auto' resolved on the workers' hardware, and why).
        "precision": state.get("precision") or config.training.precision,
        "precision_choice": state.get("precision_choice", {}),
        "config": config.to_dict(),
    }
    if settings.source:
        summary["source"] = settings.source
    write_text(filesystem, f"{run_path}/result.json", json.dumps(summary, indent=2))
    _record_precision(filesystem, run_path, summary["precision"], summary["precision_choice"])
    return RunSummary(run_path, summary)


def _record_precision(filesystem, run_path: str, precision: str, choice: dict[str, Any]) -> None:
    """config.json gains the resolved precision beside the config as asked (which keeps
    'auto', so that `--resume` with the same flags matches it)."""
    path = f"{run_path}/config.json"
    if not path_exists(filesystem, path):
        return
    record = json.loads(read_text(filesystem, path))
    record["precision"] = {"resolved": precision, **{k: v for k, v in choice.items() if k != "precision"}}
    write_text(filesystem, path, json.dumps(record, indent=2))


def _best_kept_checkpoint(best_checkpoints, metric: str) -> tuple[str | None, dict[str, Any]]:
    """(path, reported row) of the best checkpoint Ray kept (Ray keeps their metrics)."""
    best = best_checkpoint(
        ((row.get(metric), checkpoint.filesystem, checkpoint.path, (checkpoint.path, row))
         for checkpoint, row in best_checkpoints),
        METRIC_MODES[metric],
    )  # fmt: skip
    return best or (None, {})


def history_csv(history: list[dict[str, Any]]) -> str:
    """One CSV row per report; columns are the union of the rows' keys, in first-seen order."""
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns and not isinstance(row[key], (list, dict))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()
