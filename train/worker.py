"""The training function: one per worker, the only training loop in the project.

`train_loop_per_worker` is what Ray Train's `TorchTrainer` runs on every worker; a Tune trial
of one worker calls `train_function` with its own session. Each worker:

1. builds the model (same seed everywhere; DDP broadcasts rank 0's weights), restores the
   latest checkpoint if resuming or recovering, and settles the run's precision (chosen on
   each worker's hardware by `lstm_ae.precision`, agreed by all: any fp32 wins);
2. draws its own batches: step s on rank r from the seed (seed, r, s), so workers never share
   sequences and a resumed run sees exactly the batches it would have seen;
3. trains on `batch_size / world_size` sequences per step (in `grad_accumulation_steps`
   micro-batches, `lstm_ae.engine.train_step`); DDP all-reduces the gradients;
4. reports every `log_every` steps, validates every `eval_every` (each worker a shard, sums
   all-reduced), checkpoints every `checkpoint_every` and at the end (rank 0 writes);
5. stops early after `patience` validations without improvement, or when its minutes
   (`--max-minutes`, `TimeBudget`) run out.

The few Ray calls sit behind one small interface, the session (`Session`): where the function
runs is what differs, not what it does.

- `RayTrainSession`: inside a Ray Train `TorchTrainer` worker (`ray.train.*`, DDP via
  `prepare_model`). This is `python -m train`, and each multi-worker Tune trial.
- `TuneSession`: a Tune trial that runs the function directly in its own process (one worker
  per trial), reporting through `ray.tune.*`.
- `LocalSession`: no Ray at all (tests, notebooks).

Every session hands the function the newest checkpoint that loads (`records.checkpoints`): a
damaged one is skipped with one line and set aside, and checkpoints written afterwards take a
fresh name where the skipped one's would repeat. Rank 0 prints a progress line per report and
at least every 30 s (`train.progress`). The run's history (one row per report) travels inside
every checkpoint. Steps, validations and the time between progress lines are timed with
`now`, which tests replace with a fake clock.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from lstm_ae.checkpoint import load_checkpoint, restore, save_checkpoint
from lstm_ae.config import ExperimentConfig, check_batch_split
from lstm_ae.data import BouncingDigits, GeneratedSequences, PrefetchedBatches, load_test_set
from lstm_ae.engine import (
    NonFiniteLossError,
    evaluate,
    make_optimizer,
    make_scheduler,
    reschedule,
    step_seed,
    train_step,
    unwrap,
)
from lstm_ae.hardware import gpu_problem
from lstm_ae.linear_probe import probe_with_baseline
from lstm_ae.metrics import BASELINE_METRICS, MetricAccumulator
from lstm_ae.model import CompositeLSTMAutoencoder
from lstm_ae.precision import PrecisionChoice, agreed, choose_precision
from lstm_ae.viz import render_run
from records.checkpoints import (
    HISTORY_FILE,
    TrainingState,
    fresh_checkpoint_name,
    newest_loadable,
    store_checkpoint,
    stored_checkpoint,
    update_early_stopping,
)
from train.progress import ProgressClock, describe_run, progress_line
from train.ray_internals import checkpoint_destination, quiet_report_logging
from train.tracking import open_tracker

now = time.perf_counter  # the workers' clock (tests replace it)


VISUALISED_SEQUENCES = 4


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker runs, apart from the experiment config (which says what it trains)."""

    threads: int = 0  # torch threads (0: torch's default)
    validation_reports_only: bool = False  # Tune wants its metric in every report
    quiet: bool = False  # no progress lines (Tune shows its own trial table)
    # A checkpoint folder (path or URI) whose model weights a new run starts from (--from
    # with --init-from-checkpoint); its optimizer, schedule and step are not taken.
    initial_weights: str | None = None


@dataclass
class Trainables:
    """What one training step changes."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


def loop_config(config: ExperimentConfig, settings: WorkerSettings) -> dict[str, Any]:
    """The dictionary every worker receives (Ray passes plain data)."""
    return {"config": config.to_dict(), "settings": asdict(settings)}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: `loop_config` is `loop_config(config, settings)`."""
    quiet_report_logging()
    train_function(loop_config, RayTrainSession())


def train_function(loop_config: dict[str, Any], session: Session) -> TrainingState:
    """Train one worker's share of a run. Returns the final state (on every rank)."""
    config = ExperimentConfig.from_dict(loop_config["config"])
    settings = WorkerSettings(**loop_config.get("settings", {}))
    training = config.training
    rank, world_size = session.world_rank, session.world_size
    if settings.threads:
        torch.set_num_threads(settings.threads)
    check_batch_split(training.batch_size, world_size, training.grad_accumulation_steps)

    # 1. Setup: model, optimizer and schedule, restored from the latest checkpoint if any;
    # the precision the hardware pays for, decided once for the whole run.
    trainables, state = _build_or_restore(config, session, settings.initial_weights)
    choice = agree_precision(config, state, world_size, session.device)
    config = config.replace(precision=choice.precision)
    stream = _training_batches(config, rank, world_size, state.step, session.device)
    test_set = _validation_set(config, session.device)
    tracker = open_tracker(loop_config, config, rank, state.step)  # rank 0's TensorBoard events
    if state.step == 0 and not settings.quiet:
        _log(rank, describe_run(config, trainables.model, world_size, session.device))
    _log(rank, None if settings.quiet else choice.line())
    _log(rank, choice.warning)

    budget = TimeBudget(training, config.optim.warmup_steps, state) if training.max_minutes else None
    interval = SinceLastReport(state.step, state.sequences_seen)
    progress = ProgressClock(now=now)
    baselines: dict[str, float] = {}  # the trivial predictions' metrics, from the first validation
    while not state.finished:
        # 2. One optimizer step on this worker's share of the global batch.
        interval.add(_train_one_step(trainables, next(stream), config, state, rank))
        if budget is not None and budget.replan(state, world_size, session.device):
            reschedule(trainables.scheduler, config.optim, state.schedule)

        last = state.step >= state.schedule[-1][1]
        validate_now = (
            last or state.step % training.eval_every == 0 or state.step % training.checkpoint_every == 0
        )
        if not (validate_now or state.step % training.log_every == 0):
            if rank == 0 and not settings.quiet and progress.due():  # rank 0's own losses
                row = with_eta(interval.row(state, interval.losses()), state, budget)
                print(progress_line(row, config, state.schedule[-1][1]), flush=True)
                progress.mark()
            continue
        losses = all_reduce_mean(interval.losses(), world_size, session.device)
        row = with_eta(interval.row(state, losses), state, budget)

        # 3. Validation (every worker a shard) and early stopping.
        if validate_now:
            evaluation_start = now()
            model = trainables.model
            row.update(_validate(model, test_set, config, rank, world_size, session.device, baselines))
            update_early_stopping(state, row, training.metric, training.patience)
            state.elapsed_seconds += now() - evaluation_start
            if state.stopped_early:
                row["stopped_early"] = True
        final = state.finished
        if final:
            row.update(_final_checks(trainables.model, config, rank, world_size))
        state.history.append(row)
        tracker.log(row, trainables.model, test_set)
        if rank == 0 and not settings.quiet:
            print(progress_line(row, config, state.schedule[-1][1]), flush=True)
            progress.mark()
            if final and budget is not None and budget.stop_line:
                print(budget.stop_line, flush=True)

        # 4. Report, with a checkpoint every checkpoint_every steps and at the end.
        checkpoint_now = validate_now and (final or state.step % training.checkpoint_every == 0)
        if checkpoint_now:
            report_with_checkpoint(session, row, state, config, trainables, test_set if final else None)
        elif validate_now or not settings.validation_reports_only:
            session.report(_reported(row, final), None, state.step)
        interval = SinceLastReport(state.step, state.sequences_seen)  # throughput excludes validation

    tracker.close()
    stream.close()
    if state.resumed_from and state.resumed_from[-1] == state.step and state.history:
        # Restored a finished run (a restart after its last checkpoint): its checkpoint is
        # already reported; report the last row again without one (Ray needs unique names).
        session.report(_reported(dict(state.history[-1]), True), None, state.step)
    return state


def _build_or_restore(
    config: ExperimentConfig, session: Session, initial_weights: str | None = None
) -> tuple[Trainables, TrainingState]:
    """The model (same seed on every rank), AdamW and the schedule; restored from the latest
    checkpoint when the run is resuming or recovering, else the model's weights alone from
    `initial_weights` where given. DDP wraps the model last."""
    device, training = session.device, config.training
    torch.manual_seed(training.seed)
    model = CompositeLSTMAutoencoder(config.model).to(device)
    optimizer = make_optimizer(model, config.optim, device)
    state = TrainingState(schedule=[[0, training.max_steps]])
    checkpoint = None
    with session.latest_checkpoint() as folder:
        if folder is not None:
            checkpoint = load_checkpoint(folder, map_location=device)
            state = TrainingState(**json.loads((Path(folder) / HISTORY_FILE).read_text()))
            _log(session.world_rank, f"resuming from step {state.step} ({folder})")
    if checkpoint is not None:
        state.resumed_from.append(state.step)
        state.schedule = state.schedule or [[0, training.max_steps]]  # checkpoints before schedules
        end = state.schedule[-1][1]
        # A run whose end a time budget planned trains on when given more minutes (reopened up
        # to max_steps; TimeBudget plans the new end at the next report), others more steps.
        if state.planned_minutes:
            longer = training.max_minutes > state.planned_minutes
        else:
            longer = training.max_steps > end
        if longer and not state.stopped_early:
            state.schedule.append([state.step, training.max_steps])
        elif training.max_steps < end:
            raise ValueError(f"max_steps {training.max_steps} is below the resumed run's {end}")
    scheduler = make_scheduler(optimizer, config.optim, state.schedule[0][1], state.schedule[1:])
    if checkpoint is not None:
        restore(checkpoint, model, optimizer, scheduler)
    elif initial_weights:
        _load_initial_weights(model, initial_weights, session)
    model = session.prepare_model(model)
    if training.bf16_allreduce and session.world_size > 1:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(dist.group.WORLD, default_hooks.bf16_compress_hook)
    return Trainables(model, optimizer, scheduler), state


def _load_initial_weights(model: torch.nn.Module, location: str, session: Session) -> None:
    """A new run's starting weights: the model's state of the checkpoint at `location` (a
    folder, local or a URI), on every rank. Weights are fp32 whatever precision either run
    computes in (bf16 runs keep fp32 parameters), so they load as they are."""
    with stored_checkpoint(location, session.device) as checkpoint:
        restore(checkpoint, model)  # the model alone: the optimizer and schedule start anew
    _log(
        session.world_rank,
        f"initial weights from {location} (its step {checkpoint['step']}); a new run from step 0",
    )


def _training_batches(config: ExperimentConfig, rank: int, world_size: int, start_step: int, device):
    """This worker's batches: step s on rank r is drawn from the seed (seed, r, s), placed on
    a background thread ahead of the step and rendered on the training device (uint8)."""
    generator = BouncingDigits.from_config(config.model, config.data, "train").to(device)
    per_worker = config.training.batch_size // world_size
    sequences = GeneratedSequences(generator, per_worker, config.training.seed, rank)
    return PrefetchedBatches(sequences, start_step=start_step, pin_memory=device.type == "cuda")


def _validation_set(config: ExperimentConfig, device: torch.device):
    """The fixed validation set, read once per run; on an accelerator it is copied there once
    (uint8) and stays for the run. On the CPU it stays memory-mapped, its pages shared by the
    node's workers."""
    test_set = load_test_set(config.model, config.data)
    return test_set if device.type == "cpu" else test_set.to(device)


def _train_one_step(
    trainables: Trainables, frames, config: ExperimentConfig, state: TrainingState, rank: int
):
    """One optimizer step on this worker's frames (B, T, C, H, W); advances `state`."""
    training = config.training
    step_start = now()
    torch.manual_seed(step_seed(training.seed, rank, state.step))  # dropout masks
    result = train_step(
        trainables.model,
        trainables.optimizer,
        trainables.scheduler,
        list(frames.chunk(training.grad_accumulation_steps)),
        config.model,
        training.precision,
        config.optim.grad_clip_norm,
        state.step,
    )
    state.step += 1
    state.sequences_seen += training.batch_size
    seconds = now() - step_start
    state.elapsed_seconds += seconds
    state.training_seconds += seconds
    return result


def _validate(
    model,
    test_set,
    config: ExperimentConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    baselines: dict[str, float],
) -> dict[str, float]:
    """All validation metrics; with several workers each evaluates a shard, then sums are combined.
    The trivial predictions' metrics are measured at the first validation and kept in `baselines`
    (the set does not change, and their two SSIMs would be recomputed over it every time)."""
    batches = test_set.batches(max(1, config.training.batch_size // world_size), rank, world_size)
    accumulator = evaluate(model, batches, config.model, config.training.precision, baselines=not baselines)
    if world_size > 1 and dist.is_initialized():
        totals = accumulator.totals().to(device)
        dist.all_reduce(totals)
        accumulator = MetricAccumulator.from_totals(totals)
    means = accumulator.means()
    if not baselines:
        baselines.update({name: means[name] for name in BASELINE_METRICS if name in means})
    return {**means, **baselines}


def _final_checks(model, config: ExperimentConfig, rank: int, world_size: int) -> dict[str, Any]:
    """At the end: every replica's weight checksum (equal iff DDP kept them in sync) and the
    linear digit probe of the encoder (rank 0)."""
    extra: dict[str, Any] = {}
    if world_size > 1:
        extra["replica_checksums"] = replica_checksums(model, world_size)
    if rank == 0 and config.training.probe_sequences > 0:
        extra.update(probe_with_baseline(unwrap(model), config, config.training.probe_sequences))
    return extra


def report_with_checkpoint(
    session: Session,
    row: dict[str, Any],
    state: TrainingState,
    config: ExperimentConfig,
    trainables: Trainables,
    pictures_from=None,
) -> None:
    """Report a row on every rank with a checkpoint from rank 0 (weights, optimizer, schedule,
    config and the run's state); `pictures_from` (the validation set) adds the run's pictures."""
    if not all(torch.isfinite(parameter).all() for parameter in trainables.model.parameters()):
        raise NonFiniteLossError(f"parameters became non-finite at step {state.step}; not checkpointing them")
    metrics = _reported(row, final=state.finished)
    if session.world_rank != 0:
        session.report(metrics, None, state.step)
        return
    folder = tempfile.mkdtemp(prefix="lstm_ae_checkpoint_")  # the session's once reported
    try:
        save_checkpoint(
            folder,
            trainables.model,
            state.step,
            config,
            optimizer=trainables.optimizer,
            scheduler=trainables.scheduler,
            metrics={key: value for key, value in row.items() if isinstance(value, (int, float))},
        )
        (Path(folder) / HISTORY_FILE).write_text(json.dumps(asdict(state)))
        if pictures_from is not None:
            sample = next(pictures_from.batches(VISUALISED_SEQUENCES))
            render_run(folder, unwrap(trainables.model), sample, config, state.history)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    session.report(metrics, folder, state.step)


def _reported(row: dict[str, Any], final: bool) -> dict[str, Any]:
    """The metrics a report carries: the row without empty values, and `final` at the end
    (not Tune's reserved `done`, which would stop a trial before its trainer finished)."""
    metrics = {key: value for key, value in row.items() if value is not None}
    metrics["final"] = bool(final)
    return metrics


def _log(rank: int, message: str | None) -> None:
    if rank == 0 and message:
        print(message, flush=True)


class Session(Protocol):
    world_rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """A local folder holding the newest checkpoint that loads, to resume from, or None."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        """Report metrics (every rank, same number of calls); rank 0 may attach a checkpoint
        folder, which the session then owns: it deletes the folder once the checkpoint is stored."""


@contextlib.contextmanager
def checkpoint_folder(checkpoint) -> Iterator[str | None]:
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield folder


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _ray_folder(filesystem, path: str):
    import ray.train

    return ray.train.Checkpoint(path=path, filesystem=filesystem).as_directory()


class RayTrainSession:
    """A Ray Train worker: rank and device from the Train context, DDP from prepare_model."""

    upload_mode = "ASYNC"  # a ray.train.CheckpointUploadMode name (benchmarks compare SYNC)
    UPLOAD_POLL_SECONDS = 0.05

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        if ray.get_gpu_ids():  # this worker holds a GPU: never train on the CPU by surprise
            problem = gpu_problem()
            if problem:
                raise RuntimeError(problem)
        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.skipped: set[str] = set()  # damaged checkpoints skipped on restoring
        self._uploading: str | None = None  # the local folder of the checkpoint being uploaded

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return checkpoint_folder(None)
        return newest_loadable(
            checkpoint.filesystem, checkpoint.path, self.world_rank, self.skipped, open_folder=_ray_folder
        )

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        """Reports without holding training: Ray Train uploads the checkpoint on its upload
        thread while the ranks train on (`upload_mode` ASYNC). Ray registers a checkpoint (for
        results, restarts and resumes) only once its upload is complete, reports in order, and
        ends a run only after its last upload; it deletes the local folder after the upload.
        A checkpoint waits for the one before it to be stored, so at most one is uploading and
        one more written on this node's disk when storage is slower than checkpoint_every
        steps. Every report takes the same mode: a report waits for those before it."""
        import ray.train

        checkpoint = None
        if checkpoint_dir:
            self._wait_for_upload()
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
            self._uploading = checkpoint_dir
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=fresh_checkpoint_name(checkpoint_name(step), self.skipped),
            checkpoint_upload_mode=getattr(ray.train.CheckpointUploadMode, self.upload_mode),
            delete_local_checkpoint_after_upload=True,
            checkpoint_upload_fn=self.upload_checkpoint,
        )

    def upload_checkpoint(self, checkpoint, name: str):
        """Ray's upload thread stores each checkpoint through this, in place of its own copy
        (which leaves a folder cut short by a full disk looking complete):
        `records.checkpoints.store_checkpoint`, which raises StorageFullError on a full disk."""
        import ray.train

        filesystem, target = checkpoint_destination(name)
        store_checkpoint(checkpoint.path, filesystem, target)
        return ray.train.Checkpoint(path=target, filesystem=filesystem)

    def _wait_for_upload(self) -> None:
        """Until the checkpoint reported last is stored (Ray deletes its local folder then; a
        failed upload ends the worker group, this thread with it)."""
        while self._uploading is not None and os.path.exists(self._uploading):
            time.sleep(self.UPLOAD_POLL_SECONDS)
        self._uploading = None


class LocalSession:
    """No Ray at all: one process, checkpoints kept in a folder (for notebooks and tests)."""

    def __init__(self, device: str | torch.device = "cpu", checkpoint_root: str | None = None):
        self.world_rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.checkpoint_root = checkpoint_root or tempfile.mkdtemp(prefix="lstm_ae_local_")
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[str] = []
        self.skipped: set[str] = set()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self):
        import pyarrow.fs

        latest = self.checkpoints[-1] if self.checkpoints else None
        return newest_loadable(pyarrow.fs.LocalFileSystem(), latest, self.world_rank, self.skipped)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            target = Path(self.checkpoint_root) / fresh_checkpoint_name(checkpoint_name(step), self.skipped)
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
            shutil.rmtree(checkpoint_dir)
            self.checkpoints.append(str(target))


class TuneSession:
    """Reports through `ray.tune.report`; resumes from `ray.tune.get_checkpoint()`."""

    world_rank = 0
    world_size = 1

    def __init__(self, use_gpu: bool = False):
        self.skipped: set[str] = set()  # damaged checkpoints skipped on restoring
        if use_gpu:  # never train on the CPU by surprise
            problem = gpu_problem()
            if problem:
                raise RuntimeError(problem)
        self.device = torch.device("cuda" if use_gpu else "cpu")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self):
        """The newest of the trial's checkpoints that loads (Tune names them by report, so a
        checkpoint written after skipping a damaged one never takes its name)."""
        import ray.tune

        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is None:
            return checkpoint_folder(None)
        return newest_loadable(
            checkpoint.filesystem,
            checkpoint.path,
            self.world_rank,
            self.skipped,
            open_folder=lambda filesystem, path: ray.tune.Checkpoint(
                path=path, filesystem=filesystem
            ).as_directory(),
        )

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        try:
            ray.tune.report(metrics, checkpoint=checkpoint)  # Tune's report stores it before returning
        finally:
            if checkpoint_dir:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)


class TimeBudget:
    """Fits a run into `max_minutes` of training steps (`TrainingState.training_seconds`;
    validations are not counted, so how often a run validates does not change what it learns).

    From the speed measured since this process started (skipping its first `SKIPPED_STEPS`
    or `SKIPPED_SHARE` of the budget, whichever ends first: they can run slow while memory is
    first touched), it plans the step at which the budget runs out as soon as `MIN_MEASURED_STEPS`
    steps or `MIN_MEASURED_SECONDS` of them are measured, whichever comes first, then again at
    every report and every `REPLAN_SECONDS`. The plan becomes the learning-rate schedule's end
    (`TrainingState.schedule`, which keeps the rate continuous), so the run ends annealed
    instead of cut off mid-decay; `max_steps` stays an upper bound. Whatever the plan says, the
    run ends once its training time reaches the budget, or when one more step would pass it
    by more than `OVERSHOOT`: slow first steps on a slow machine cannot overrun it.
    Every worker takes the earliest end any of them wants (one all-reduce per step).
    """

    SKIPPED_STEPS = 5
    SKIPPED_SHARE = 0.02
    MIN_MEASURED_STEPS = 10
    MIN_MEASURED_SECONDS = 15.0
    REPLAN_SECONDS = 30.0
    OVERSHOOT = 0.05
    TOLERANCE = 0.01  # of the steps left: smaller corrections are not worth a schedule entry

    def __init__(self, training, warmup_steps: int, state: TrainingState):
        self.training = training
        self.warmup_steps = warmup_steps
        self.budget_seconds = 60.0 * training.max_minutes
        self.start = (state.step, state.training_seconds)
        self.reference: tuple[int, float] | None = None  # (step, training seconds) speed is measured from
        self.last_plan_seconds: float | None = None
        self.stop_line: str | None = None  # why the budget ended the run, once it did

    def seconds_per_step(self, state: TrainingState) -> float | None:
        """The measured seconds per step, once enough steps are measured (None before)."""
        if self.reference is None:
            skipped_steps, skipped_seconds = (
                state.step - self.start[0],
                state.training_seconds - self.start[1],
            )
            if (
                skipped_steps >= self.SKIPPED_STEPS
                or skipped_seconds >= self.SKIPPED_SHARE * self.budget_seconds
            ):
                self.reference = (state.step, state.training_seconds)
            return None
        steps, seconds = state.step - self.reference[0], state.training_seconds - self.reference[1]
        if steps >= self.MIN_MEASURED_STEPS or (steps >= 1 and seconds >= self.MIN_MEASURED_SECONDS):
            return seconds / steps
        return None

    def seconds_left(self, state: TrainingState) -> float:
        return max(0.0, self.budget_seconds - state.training_seconds)

    def replan(self, state: TrainingState, world_size: int, device) -> bool:
        """After every step: plan (or end) the schedule where the budget says; True if it moved."""
        training, used = self.training, state.training_seconds
        per_step = self.seconds_per_step(state)
        # For the overshoot check any estimate will do, even one over the first, slow steps.
        estimate = per_step or (used - self.start[1]) / max(1, state.step - self.start[0])
        wanted = math.inf  # this worker's wish for the schedule's end (inf: no change)
        if used + estimate > (1 + self.OVERSHOOT) * self.budget_seconds or used >= self.budget_seconds:
            wanted = state.step
        elif per_step is not None and self._due(state):
            wanted = min(training.max_steps, state.step + int(self.seconds_left(state) / per_step))
        wanted = all_reduce([float(wanted)], world_size, device, dist.ReduceOp.MIN)[0]
        if math.isinf(wanted):
            return False
        end, current = int(wanted), state.schedule[-1][1]
        if current <= state.step:  # already ending at this step
            return False
        state.planned_minutes = training.max_minutes
        if end <= state.step:
            self.stop_line = self._stop_line(state)
        else:
            self.last_plan_seconds = used
            if abs(end - current) <= self.TOLERANCE * (current - state.step):
                return False
        state.schedule.append([state.step, end])
        return True

    def _due(self, state: TrainingState) -> bool:
        training = self.training
        return (
            self.last_plan_seconds is None
            or state.step == self.warmup_steps
            or any(state.step % every == 0 for every in (training.log_every, training.eval_every))
            or state.training_seconds - self.last_plan_seconds >= self.REPLAN_SECONDS
        )

    def _stop_line(self, state: TrainingState) -> str:
        minutes, steps = state.training_seconds / 60.0, state.step - self.start[0]
        budget = f"--max-minutes {self.training.max_minutes:g}"
        if self.last_plan_seconds is None:  # never planned: the first steps alone used the budget
            return (
                f"time budget: the first {steps} step(s) alone took {minutes:.1f} minutes of {budget}; "
                f"ending with a checkpoint at step {state.step} (a smaller model, --precision fp32 "
                "or more minutes would train further)"
            )
        return f"time budget: {minutes:.1f} minutes of training used ({budget}); ending at step {state.step}"


def with_eta(row: dict[str, Any], state: TrainingState, budget: TimeBudget | None) -> dict[str, Any]:
    """The row's ETA, no later than the time budget's end (before its first plan too)."""
    if budget is not None:
        row["eta_seconds"] = min(row["eta_seconds"], budget.seconds_left(state))
    return row


@dataclass
class SinceLastReport:
    """Losses and throughput since the last report."""

    start_step: int
    start_sequences: int
    start_time: float = field(default_factory=lambda: now())
    totals: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    steps: int = 0
    learning_rate: float = 0.0

    def add(self, result) -> None:
        for index, value in enumerate(
            (result.loss, result.reconstruction_loss, result.prediction_loss, result.grad_norm)
        ):
            self.totals[index] += value
        self.steps += 1
        self.learning_rate = result.learning_rate

    def losses(self) -> list[float]:
        return [total / max(1, self.steps) for total in self.totals]

    def row(self, state: TrainingState, losses: list[float]) -> dict[str, Any]:
        max_steps = state.schedule[-1][1]
        seconds = now() - self.start_time
        sequences_per_second = (state.sequences_seen - self.start_sequences) / max(seconds, 1e-9)
        seconds_per_step = seconds / max(1, state.step - self.start_step)
        return {
            "step": state.step,
            "sequences_seen": state.sequences_seen,
            "loss": losses[0],
            "reconstruction_loss": losses[1],
            "prediction_loss": losses[2],
            "grad_norm": losses[3],
            "learning_rate": self.learning_rate,
            "sequences_per_second": sequences_per_second,
            "elapsed_seconds": state.elapsed_seconds,
            "training_seconds": state.training_seconds,
            "eta_seconds": seconds_per_step * (max_steps - state.step),
        }


def agree_precision(
    config: ExperimentConfig, state: TrainingState, world_size: int, device
) -> PrecisionChoice:
    """The run's precision: kept from its start when it resumes or restarts; else chosen on
    this worker's hardware (lstm_ae.precision) and agreed by all workers (any fp32 wins).
    Recorded in `state`, so checkpoints, result.json and every resume carry it."""
    training = config.training
    if state.precision:
        return PrecisionChoice(
            state.precision,
            "kept from the run's start",
            **{
                key: value
                for key, value in state.precision_choice.items()
                if key not in ("precision", "reason", "warning")
            },
        )
    rows = training.batch_size // world_size // training.grad_accumulation_steps
    model = config.model
    choice = choose_precision(training.precision, device, model.hidden_size, model.frame_size, rows)
    everyone = all_reduce([float(choice.precision == "bf16")], world_size, device, dist.ReduceOp.MIN)
    choice = agreed(choice, everyone[0] == 1.0)
    state.precision, state.precision_choice = choice.precision, choice.to_dict()
    return choice


def all_reduce_mean(values: list[float], world_size: int, device: torch.device) -> list[float]:
    return [total / world_size for total in all_reduce(values, world_size, device)]


def all_reduce(values: list[float], world_size: int, device: torch.device, op=None) -> list[float]:
    """`values` combined over the workers (summed by default; `op` a dist.ReduceOp)."""
    if world_size == 1 or not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor.tolist()


def replica_checksums(model: torch.nn.Module, world_size: int) -> list[list[float]]:
    """Every rank's (sum, sum of squares) of all parameters: equal iff the replicas agree."""
    parameters = [parameter.detach().double() for parameter in model.parameters()]
    local = torch.tensor(
        [sum(float(p.sum()) for p in parameters), sum(float((p * p).sum()) for p in parameters)],
        dtype=torch.float64,
        device=parameters[0].device,
    )
    gathered = [torch.zeros_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    return [values.tolist() for values in gathered]
