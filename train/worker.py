"""The training function: one per worker, the only training loop in the project.

`train_loop_per_worker` is what Ray Train's `TorchTrainer` runs on every worker; Tune trials
call `train_function` with their own session. Each worker:

1. builds the model (same seed everywhere; DDP broadcasts rank 0's weights), restores the
   latest checkpoint if resuming or recovering, and settles the run's precision;
2. draws its own batches: step s on rank r from the seed (seed, r, s), so workers never share
   sequences and a resumed run sees exactly the batches it would have seen;
3. trains on `batch_size / world_size` sequences per step (in `grad_accumulation_steps`
   micro-batches); DDP all-reduces the gradients;
4. reports every `log_every` steps, validates every `eval_every` (each worker a shard, sums
   all-reduced), checkpoints every `checkpoint_every` and at the end (rank 0 writes);
5. stops early after `patience` validations without improvement.

Rank 0 prints a progress line per report and at least every 30 s. The run's history (one
row per report) travels inside every checkpoint. Helpers: `records.checkpoints`, `train.budget`
(--max-minutes), `train.run_precision`, `train.throughput`, `train.progress`, `train.collective`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

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
from lstm_ae.metrics import BASELINE_METRICS, MetricAccumulator
from lstm_ae.model import CompositeLSTMAutoencoder
from lstm_ae.probe import probe_with_baseline
from lstm_ae.viz import render_run
from records.checkpoints import HISTORY_FILE, TrainingState, stored_checkpoint, update_early_stopping
from train import clock
from train.budget import TimeBudget, with_eta
from train.collective import all_reduce_mean, replica_checksums
from train.progress import ProgressClock, describe_run, progress_line
from train.ray_internals import quiet_report_logging
from train.run_precision import resolve_precision
from train.session import RayTrainSession, Session
from train.throughput import SinceLastReport
from train.tracking import open_tracker

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
    choice = resolve_precision(config, state, world_size, session.device)
    config = config.replace(precision=choice.precision)
    stream = _training_batches(config, rank, world_size, state.step, session.device)
    test_set = load_test_set(config.model, config.data)
    tracker = open_tracker(loop_config, config, rank, state.step)  # rank 0's TensorBoard events
    if state.step == 0 and not settings.quiet:
        _log(rank, describe_run(config, trainables.model, world_size, session.device))
    _log(rank, None if settings.quiet else choice.line())
    _log(rank, choice.warning)

    budget = TimeBudget(training, config.optim.warmup_steps, state) if training.max_minutes else None
    interval = SinceLastReport(state.step, state.sequences_seen)
    progress = ProgressClock(now=clock.now)
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
            evaluation_start = clock.now()
            model = trainables.model
            row.update(_validate(model, test_set, config, rank, world_size, session.device, baselines))
            update_early_stopping(state, row, training.metric, training.patience)
            state.elapsed_seconds += clock.now() - evaluation_start
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
    """This worker's batches: step s on rank r is drawn from the seed (seed, r, s), on a
    background thread ahead of the step (uint8; page-locked for a GPU's copy)."""
    generator = BouncingDigits.from_config(config.model, config.data, "train")
    per_worker = config.training.batch_size // world_size
    sequences = GeneratedSequences(generator, per_worker, config.training.seed, rank)
    return PrefetchedBatches(sequences, start_step=start_step, pin_memory=device.type == "cuda")


def _train_one_step(
    trainables: Trainables, frames, config: ExperimentConfig, state: TrainingState, rank: int
):
    """One optimizer step on this worker's frames (B, T, C, H, W); advances `state`."""
    training = config.training
    step_start = clock.now()
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
    seconds = clock.now() - step_start
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
    with tempfile.TemporaryDirectory(prefix="lstm_ae_checkpoint_") as folder:
        if session.world_rank == 0:
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
        metrics = _reported(row, final=state.finished)
        session.report(metrics, folder if session.world_rank == 0 else None, state.step)


def _reported(row: dict[str, Any], final: bool) -> dict[str, Any]:
    """The metrics a report carries: the row without empty values, and `final` at the end
    (not Tune's reserved `done`, which would stop a trial before its trainer finished)."""
    metrics = {key: value for key, value in row.items() if value is not None}
    metrics["final"] = bool(final)
    return metrics


def _log(rank: int, message: str | None) -> None:
    if rank == 0 and message:
        print(message, flush=True)
