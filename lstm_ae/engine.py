"""One training step and one evaluation, in plain PyTorch with explicit arguments.

Ray's training function (train/worker.py) calls these; so can a notebook. The model may be
wrapped in DistributedDataParallel: gradient accumulation then skips the all-reduce on all
but the last micro-batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lstm_ae.config import ModelConfig, OptimConfig
from lstm_ae.data import as_unit_float, split_sequence, stream_seed
from lstm_ae.metrics import (
    MetricAccumulator,
    add_baselines,
    add_prediction_metrics,
    add_reconstruction_metrics,
)
from lstm_ae.model import CompositeLSTMAutoencoder
from lstm_ae.precision import cuda_native_bf16


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass(frozen=True)
class StepResult:
    """Losses of one optimizer step (per frame, averaged over micro-batches)."""

    loss: float
    reconstruction_loss: float
    prediction_loss: float
    grad_norm: float
    learning_rate: float


def unmeasured_precision(precision: str, device: torch.device) -> str:
    """'auto' without measuring: bf16 on a CUDA GPU with native bf16, fp32 elsewhere. Training
    runs resolve 'auto' once, by measurement, before they start (lstm_ae.precision)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and cuda_native_bf16() else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for 'bf16' (the model keeps states, loss and gradients in fp32)."""
    if unmeasured_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> CompositeLSTMAutoencoder:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def make_optimizer(model: nn.Module, config: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel for all parameters) on CPU and CUDA."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )


def learning_rate_factor(
    step: int, config: OptimConfig, max_steps: int, extensions: Sequence[tuple[int, int]] = ()
) -> float:
    """Multiplier of the peak learning rate at `step`: linear warm-up, then constant or cosine.

    `extensions` are `(from_step, new_max_steps)` pairs of a run whose `max_steps` was raised
    when it resumed: from `from_step` on, the cosine continues from the factor it had reached
    down to `min_lr_fraction` at the new end, so the learning rate never jumps.
    """
    if extensions:
        start, end = extensions[-1]
        if start <= config.warmup_steps:  # the decay has not begun: a new end is no jump
            return learning_rate_factor(step, config, end)
        if step < start:
            return learning_rate_factor(step, config, max_steps, extensions[:-1])
        reached = learning_rate_factor(start, config, max_steps, extensions[:-1])
        if config.lr_schedule == "constant":
            return reached
        floor = min(config.min_lr_fraction, reached)
        progress = (step - start) / max(1, end - start)
        return floor + (reached - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_fraction + (1 - config.min_lr_fraction) * cosine


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    config: OptimConfig,
    max_steps: int,
    extensions: Sequence[tuple[int, int]] = (),
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of `learning_rate_factor` (see there for `extensions`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _factor_of_step(config, max_steps, extensions))


def _factor_of_step(config: OptimConfig, max_steps: int, extensions: Sequence[tuple[int, int]]):
    extensions = tuple(tuple(extension) for extension in extensions)
    return lambda step: learning_rate_factor(step, config, max_steps, extensions)


def reschedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR, config: OptimConfig, schedule: Sequence[Sequence[int]]
) -> None:
    """Point a `make_scheduler` schedule at new ends: `schedule` is [[0, max_steps], *extensions].

    The rate the optimizer uses next is the new schedule's at the scheduler's current step.
    """
    scheduler.lr_lambdas = [
        _factor_of_step(config, schedule[0][1], schedule[1:]) for _ in scheduler.lr_lambdas
    ]
    for group, base, factor in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas
    ):
        group["lr"] = base * factor(scheduler.last_epoch)


DROPOUT_SEEDS = 1  # stream_seed's purpose tag for torch's per-step seed


def step_seed(seed: int, rank: int, step: int) -> int:
    """torch's seed for one training step: different on every worker, and the same when a
    resumed run replays the step (its dropout masks then match an uninterrupted run's)."""
    return stream_seed(seed, rank, step, DROPOUT_SEEDS)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: list[Tensor],
    config: ModelConfig,
    precision: str,
    grad_clip_norm: float,
    step: int,
) -> StepResult:
    """One optimizer step over one or more micro-batches of sequences (B, T, C, H, W), float
    in [0, 1] or uint8 pixels (converted on the model's device).

    Raises NonFiniteLossError naming the step if the loss or gradient norm is NaN or
    infinite; the parameters are then left as they were before the step.
    """
    device = next(model.parameters()).device
    totals = torch.zeros(3, device=device)
    count = len(micro_batches)
    for index, frames in enumerate(micro_batches):
        # uint8 batches (the training stream's) become floats on the device, after the copy.
        frames = as_unit_float(frames.to(device, non_blocking=True))
        past, future = split_sequence(frames, config.past_length, config.future_length)
        last = index == count - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(precision, device):
                output = model(past, future)
            (output.loss / count).backward()
        totals += torch.stack(
            [output.loss.detach(), output.reconstruction_loss.detach(), output.prediction_loss.detach()]
        )
    totals /= count
    max_norm = grad_clip_norm if grad_clip_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    losses, grad_norm, rank_losses = _agreed_check_values(model, totals, grad_norm)
    if not (all(math.isfinite(loss) for loss in rank_losses) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(_non_finite_message(step, rank_losses, grad_norm))
    learning_rate = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(losses[0], losses[1], losses[2], grad_norm, learning_rate)


def _agreed_check_values(
    model: nn.Module, totals: Tensor, grad_norm: Tensor
) -> tuple[list[float], float, list[float]]:
    """This rank's mean losses, the gradient norm, and every rank's loss, in one transfer.

    Under DistributedDataParallel the gradients (hence their norm) are the same on every
    rank but each rank's loss is its own: a rank deciding alone would raise while the others
    step on into their next all-reduce and wait there until the collective times out. So the
    losses of all ranks are gathered (an all-reduce of a vector holding this rank's loss in
    its own slot) and every rank takes the same decision from the same numbers.
    """
    group = getattr(model, "process_group", None)  # DDP's group; None for a bare model
    world_size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    if world_size == 1:
        values = torch.cat([totals, grad_norm.reshape(1).to(totals)]).tolist()
        return values[:3], values[3], values[:1]
    rank = dist.get_rank(group)
    everyone = torch.zeros(world_size, device=totals.device, dtype=totals.dtype)
    everyone[rank] = totals[0]
    dist.all_reduce(everyone, group=group)  # other slots are 0: a sum is a gather (inf, nan stay)
    values = torch.cat([totals, grad_norm.reshape(1).to(totals), everyone]).tolist()
    return values[:3], values[3], values[4:]


def _non_finite_message(step: int, rank_losses: list[float], grad_norm: float) -> str:
    """One line, the same on every rank (it names the ranks whose loss went bad)."""
    if len(rank_losses) == 1:
        return f"non-finite loss at step {step}: loss={rank_losses[0]}, gradient norm={grad_norm}"
    bad = [rank for rank, loss in enumerate(rank_losses) if not math.isfinite(loss)]
    where = f"on rank {', '.join(map(str, bad))} of {len(rank_losses)}" if bad else "on no rank"
    losses = ", ".join(str(loss) for loss in rank_losses)
    return (
        f"non-finite loss at step {step}: loss {where} (per rank: {losses}), gradient norm={grad_norm}; "
        "every rank stops here"
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Tensor],
    config: ModelConfig,
    precision: str,
    accumulator: MetricAccumulator | None = None,
    baselines: bool = True,
) -> MetricAccumulator:
    """Validation metrics over batches of sequences (B, T, C, H, W), both decoders free-running.

    Returns the accumulator (its `means()` are the metrics) so that shards evaluated on
    several workers can be combined before averaging. `baselines` False leaves out the trivial
    predictions' metrics (`BASELINE_METRICS`), which depend on the sequences alone: a caller that
    validates on the same set again keeps them from the first time.
    """
    bare = unwrap(model)
    device = next(bare.parameters()).device
    accumulator = accumulator if accumulator is not None else MetricAccumulator()
    was_training = bare.training
    bare.eval()
    try:
        for frames in batches:
            past, future = split_sequence(frames.to(device), config.past_length, config.future_length)
            with autocast(precision, device):
                reconstruction, prediction = bare.reconstruct_and_predict(past)
            add_prediction_metrics(accumulator, prediction, future)
            add_reconstruction_metrics(accumulator, reconstruction, past)
            if baselines:
                add_baselines(accumulator, past, future)
    finally:
        bare.train(was_training)
    return accumulator
