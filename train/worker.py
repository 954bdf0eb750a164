"""The training function: one per worker, the only training loop in the project.

`train_loop_per_worker` is what Ray Train's `TorchTrainer` runs on every worker; Tune trials
call `train_function` with their own session. Each worker:

1. builds the model from the config (same seed everywhere; DDP also broadcasts rank 0's
   weights), restores the latest checkpoint if the run is resuming or recovering;
2. draws its own training sequences: the batch of step s on rank r comes from the seed
   (seed, r, s), so workers never share sequences and a resumed run sees exactly the
   batches it would have seen;
3. trains on `batch_size / world_size` sequences per step (split into
   `grad_accumulation_steps` micro-batches); DDP all-reduces the gradients;
4. every `log_every` steps reports losses and throughput, every `eval_every` steps the
   validation metrics (each worker evaluates a shard, the sums are all-reduced), every
   `checkpoint_every` steps and at the end a checkpoint (written by rank 0);
5. stops early after `patience` validations without improvement.

Rank 0 prints one progress line per report. The run's history (one row per report)
travels inside every checkpoint, so it survives restarts and resumes.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lstm_ae import metrics as metric_names
from lstm_ae.checkpoint import load_checkpoint, restore, save_checkpoint
from lstm_ae.config import ExperimentConfig
from lstm_ae.data import BouncingDigits, GeneratedSequences, load_test_set, stream_seed
from lstm_ae.engine import (
    NonFiniteLossError,
    evaluate,
    make_optimizer,
    make_scheduler,
    reschedule,
    train_step,
    unwrap,
)
from lstm_ae.metrics import METRIC_MODES, MetricAccumulator
from lstm_ae.model import CompositeLSTMAutoencoder, parameter_count
from lstm_ae.precision import PrecisionChoice, agreed, choose_precision
from lstm_ae.probe import probe_with_baseline
from lstm_ae.viz import render_run
from train.session import RayTrainSession, Session
from train.tracking import open_tracker

HISTORY_FILE = "history.json"
# The worker's clock: steps, validations and progress lines are timed with it (tests replace
# it with a fake one to check the time budget and the progress cadence without sleeping).
clock = time.perf_counter
VISUALISED_SEQUENCES = 4


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker runs, apart from the experiment config (which says what it trains)."""

    threads: int = 0  # torch threads (0: torch's default)
    validation_reports_only: bool = False  # Tune wants its metric in every report
    quiet: bool = False  # no progress lines (Tune shows its own trial table)


@dataclass
class TrainingState:
    """Progress that must survive a restart; saved beside the weights in every checkpoint."""

    step: int = 0
    sequences_seen: int = 0
    elapsed_seconds: float = 0.0  # training steps and validations
    training_seconds: float = 0.0  # training steps only (what --max-minutes budgets)
    best_metric: float | None = None
    best_step: int | None = None
    evaluations_since_best: int = 0
    stopped_early: bool = False
    resumed_from: list[int] = field(default_factory=list)  # steps the run restarted at
    # max_minutes the schedule's end was last planned for (0: none; see TimeBudget).
    planned_minutes: float = 0.0
    # The precision the run trains in, resolved once at its start (see resolve_precision)
    # and kept by every restart and resume, with the facts that decided it.
    precision: str = ""
    precision_choice: dict[str, Any] = field(default_factory=dict)
    # The learning-rate schedule's ends: [[0, max_steps]], then [step, new max_steps] for each
    # resume that raised max_steps (engine.learning_rate_factor keeps the rate continuous).
    schedule: list[list[int]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.stopped_early or (bool(self.schedule) and self.step >= self.schedule[-1][1])


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


def quiet_report_logging() -> None:
    """Ray 2.60 logs every report's full metrics and every checkpoint's path at INFO (from
    the worker or trial process); our own progress line and results table say the same."""
    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


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
    trainables, state = _build_or_restore(config, session)
    choice = resolve_precision(config, state, session)
    config = config.replace(precision=choice.precision)
    stream = _training_stream(config, rank, world_size, state.step)
    test_set = load_test_set(config.model, config.data)
    tracker = open_tracker(loop_config, config, rank, state.step)  # rank 0's TensorBoard events
    if not settings.quiet:
        if state.step == 0:
            _log(rank, _describe_run(config, trainables.model, world_size, session.device))
        _log(rank, choice.line())
    if choice.warning:
        _log(rank, choice.warning)

    budget = TimeBudget(training, config.optim.warmup_steps, state) if training.max_minutes else None
    interval = _SinceLastReport(state.step, state.sequences_seen)
    progress = ProgressClock(now=clock)
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
                row = _with_eta(interval.row(state, interval.losses()), state, budget)
                print(_progress_line(row, config, state.schedule[-1][1]), flush=True)
                progress.mark()
            continue
        row = _with_eta(interval.row(state, _all_reduce_mean(interval.losses(), world_size, session.device)), state, budget)

        # 3. Validation (every worker a shard) and early stopping.
        if validate_now:
            evaluation_start = clock()
            row.update(_validate(trainables.model, test_set, config, rank, world_size, session.device))
            _update_early_stopping(state, row, training.metric, training.patience)
            state.elapsed_seconds += clock() - evaluation_start
            if state.stopped_early:
                row["stopped_early"] = True
        final = state.finished
        if final:
            row.update(_final_checks(trainables.model, config, rank, world_size))
        state.history.append(row)
        tracker.log(row, trainables.model, test_set)
        if rank == 0 and not settings.quiet:
            print(_progress_line(row, config, state.schedule[-1][1]), flush=True)
            progress.mark()
            if final and budget is not None and budget.stop_line:
                print(budget.stop_line, flush=True)

        # 4. Report, with a checkpoint every checkpoint_every steps and at the end.
        checkpoint_now = validate_now and (final or state.step % training.checkpoint_every == 0)
        if checkpoint_now:
            report_with_checkpoint(session, row, state, config, trainables, test_set if final else None)
        elif validate_now or not settings.validation_reports_only:
            session.report(_reported(row, final), None, state.step)
        interval = _SinceLastReport(state.step, state.sequences_seen)  # throughput excludes validation

    tracker.close()
    if state.resumed_from and state.resumed_from[-1] == state.step and state.history:
        # Restored a finished run (a restart after its last checkpoint): its checkpoint is
        # already reported; report the last row again without one (Ray needs unique names).
        session.report(_reported(dict(state.history[-1]), True), None, state.step)
    return state


def _train_one_step(
    trainables: Trainables, frames, config: ExperimentConfig, state: TrainingState, rank: int
):
    """One optimizer step on this worker's frames (B, T, C, H, W); advances `state`."""
    training = config.training
    step_start = clock()
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
    seconds = clock() - step_start
    state.elapsed_seconds += seconds
    state.training_seconds += seconds
    return result


def check_batch_split(batch_size: int, num_workers: int, micro_batches: int) -> None:
    """The global batch must split evenly over workers and micro-batches (ValueError if not)."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    if batch_size % (num_workers * micro_batches):
        raise ValueError(
            f"batch_size {batch_size} must split evenly over {num_workers} workers x "
            f"{micro_batches} micro-batches"
        )


def resolve_precision(config: ExperimentConfig, state: TrainingState, session: Session) -> PrecisionChoice:
    """The run's precision: kept from its start when it resumes or restarts; else chosen on
    this worker's hardware (lstm_ae.precision) and agreed by all workers (any fp32 wins).
    Recorded in `state`, so checkpoints, result.json and every resume carry it."""
    training = config.training
    if state.precision:
        return PrecisionChoice(
            state.precision, "kept from the run's start", **{
                key: value for key, value in state.precision_choice.items()
                if key not in ("precision", "reason", "warning")
            }
        )
    rows = training.batch_size // session.world_size // training.grad_accumulation_steps
    model = config.model
    choice = choose_precision(training.precision, session.device, model.hidden_size, model.frame_size, rows)
    everyone = _all_reduce([float(choice.precision == "bf16")], session.world_size, session.device, dist.ReduceOp.MIN)
    choice = agreed(choice, everyone[0] == 1.0)
    state.precision, state.precision_choice = choice.precision, choice.to_dict()
    return choice


def _build_or_restore(config: ExperimentConfig, session: Session) -> tuple[Trainables, TrainingState]:
    """The model (same seed on every rank), AdamW and the schedule; restored from the latest
    checkpoint when the run is resuming or recovering. DDP wraps the model last."""
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
    model = session.prepare_model(model)
    if training.bf16_allreduce and session.world_size > 1:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(dist.group.WORLD, default_hooks.bf16_compress_hook)
    return Trainables(model, optimizer, scheduler), state


def _training_stream(config: ExperimentConfig, rank: int, world_size: int, start_step: int):
    """This worker's endless stream of batches: the batch of step s on rank r is drawn from
    the seed (seed, r, s), so workers never share sequences and a resumed run replays them."""
    per_worker = config.training.batch_size // world_size
    generator = BouncingDigits.from_config(config.model, config.data, "train")
    return iter(
        GeneratedSequences(generator, per_worker, seed=config.training.seed, rank=rank, start_step=start_step)
    )


def _describe_run(config: ExperimentConfig, model, world_size: int, device: torch.device) -> str:
    training = config.training
    per_worker = training.batch_size // world_size
    micro = training.grad_accumulation_steps
    return (
        f"model: {parameter_count(unwrap(model)) / 1e6:.1f}M parameters; global batch "
        f"{training.batch_size} = {world_size} worker(s) x {per_worker} sequences"
        + (f" in {micro} micro-batches" if micro > 1 else "")
        + f"; {training.max_steps} steps"
        + (f" or {training.max_minutes:g} minutes, whichever comes first," if training.max_minutes else "")
        + f" on {device.type} ({training.precision} precision)"
    )


def _final_checks(model, config: ExperimentConfig, rank: int, world_size: int) -> dict[str, Any]:
    """At the end: every replica's weight checksum (equal iff DDP kept them in sync) and the
    linear digit probe of the encoder (rank 0)."""
    extra: dict[str, Any] = {}
    if world_size > 1:
        extra["replica_checksums"] = _replica_checksums(model, world_size)
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


# ----------------------------------------------------------------------------- reporting


@dataclass
class _SinceLastReport:
    """Losses and throughput since the last report."""

    start_step: int
    start_sequences: int
    start_time: float = field(default_factory=lambda: clock())
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
        seconds = clock() - self.start_time
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
            skipped_steps, skipped_seconds = state.step - self.start[0], state.training_seconds - self.start[1]
            if skipped_steps >= self.SKIPPED_STEPS or skipped_seconds >= self.SKIPPED_SHARE * self.budget_seconds:
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
        wanted = _all_reduce([float(wanted)], world_size, device, dist.ReduceOp.MIN)[0]
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


class ProgressClock:
    """When rank 0 prints a progress line between reports: `EVERY_SECONDS` after the last line
    (or the start), so a slow run shows progress at least that often."""

    EVERY_SECONDS = 30.0

    def __init__(self, now=time.monotonic, every_seconds: float = EVERY_SECONDS):
        self.now, self.every_seconds = now, every_seconds
        self.last = now()

    def due(self) -> bool:
        return self.now() - self.last >= self.every_seconds

    def mark(self) -> None:
        self.last = self.now()


def _with_eta(row: dict[str, Any], state: TrainingState, budget: TimeBudget | None) -> dict[str, Any]:
    """The row's ETA, no later than the time budget's end (before its first plan too)."""
    if budget is not None:
        row["eta_seconds"] = min(row["eta_seconds"], budget.seconds_left(state))
    return row


DROPOUT_SEEDS = 1  # stream_seed's purpose tag for torch's per-step seed


def step_seed(seed: int, rank: int, step: int) -> int:
    """torch's seed for one training step: different on every worker, and the same when a
    resumed run replays the step (its dropout masks then match an uninterrupted run's)."""
    return stream_seed(seed, rank, step, DROPOUT_SEEDS)


# Collectives run on the workers' device: NCCL (GPU workers) has no CPU tensors.


def _all_reduce_mean(values: list[float], world_size: int, device: torch.device) -> list[float]:
    return [total / world_size for total in _all_reduce(values, world_size, device)]


def _all_reduce(values: list[float], world_size: int, device: torch.device, op=None) -> list[float]:
    """`values` combined over the workers (summed by default; `op` a dist.ReduceOp)."""
    if world_size == 1 or not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor.tolist()


def _validate(
    model, test_set, config: ExperimentConfig, rank: int, world_size: int, device: torch.device
) -> dict[str, float]:
    """All validation metrics; with several workers each evaluates a shard, then sums are combined."""
    batches = test_set.batches(max(1, config.training.batch_size // world_size), rank, world_size)
    accumulator = evaluate(model, batches, config.model, config.training.precision)
    if world_size > 1 and dist.is_initialized():
        totals = accumulator.totals().to(device)
        dist.all_reduce(totals)
        accumulator = MetricAccumulator.from_totals(totals)
    return accumulator.means()


def _update_early_stopping(state: TrainingState, row: dict[str, Any], metric: str, patience: int) -> None:
    value = row.get(metric)
    if value is None or not math.isfinite(value):
        return
    better = state.best_metric is None or (
        value < state.best_metric if METRIC_MODES[metric] == "min" else value > state.best_metric
    )
    if better:
        state.best_metric, state.best_step, state.evaluations_since_best = value, state.step, 0
    else:
        state.evaluations_since_best += 1
        state.stopped_early = patience > 0 and state.evaluations_since_best >= patience


def _replica_checksums(model: torch.nn.Module, world_size: int) -> list[list[float]]:
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


def _progress_line(row: dict[str, Any], config: ExperimentConfig, max_steps: int) -> str:
    """`max_steps`: where the run ends, the config's or the end a time budget planned."""
    eta = row.get("eta_seconds", 0.0)
    line = (
        f"step {row['step']}/{max_steps} | loss {row['loss']:.2f} "
        f"(reconstruction {row['reconstruction_loss']:.2f}, prediction {row['prediction_loss']:.2f}) "
        f"| {row['sequences_per_second']:.1f} seq/s | lr {row['learning_rate']:.2e} "
        f"| ETA {int(eta // 60)}m{int(eta % 60):02d}s"
    )
    if metric_names.VAL_MSE_FRAME in row:
        line += (
            f"\n  validation: mse/frame {row[metric_names.VAL_MSE_FRAME]:.1f} "
            f"(all-zeros {row[metric_names.BASELINE_ZEROS_MSE_FRAME]:.1f}, "
            f"copy-last {row[metric_names.BASELINE_COPY_LAST_MSE_FRAME]:.1f}) "
            f"| bce {row[metric_names.VAL_BCE_NATS_FRAME]:.1f} nats/frame "
            f"| ssim {row[metric_names.VAL_SSIM]:.3f} | psnr {row[metric_names.VAL_PSNR_DB]:.2f} dB "
            f"| reconstruction mse/frame {row[metric_names.VAL_RECONSTRUCTION_MSE_FRAME]:.1f}"
        )
        if metric_names.PROBE_ACCURACY in row:
            line += (
                f"\n  linear digit probe of the encoder: {row[metric_names.PROBE_ACCURACY]:.3f} "
                f"(untrained encoder {row['probe_accuracy_untrained']:.3f}, chance {row['probe_chance']:.3f})"
            )
        if row.get("stopped_early"):
            line += f"\n  stopping early: no improvement of {config.training.metric} in {config.training.patience} validations"
    return line


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)
