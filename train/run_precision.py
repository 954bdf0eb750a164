"""The precision a run trains in: chosen once, at its start, on every worker's own hardware
(`lstm_ae.precision`), agreed by all workers (any fp32 wins: the slowest rank sets the pace),
and kept by every restart and resume."""

from __future__ import annotations

import torch.distributed as dist

from lstm_ae.config import ExperimentConfig
from lstm_ae.precision import PrecisionChoice, agreed, choose_precision
from records.checkpoints import TrainingState
from train.collective import all_reduce


def resolve_precision(
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
