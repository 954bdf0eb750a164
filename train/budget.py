"""The time budget (`--max-minutes`): the step at which a run's minutes run out, planned from
its measured speed and made the end of its learning-rate schedule."""

from __future__ import annotations

import torch.distributed as dist

from train.collective import all_reduce
from train.state import TrainingState


class TimeBudget:
    """Fits a run into `max_minutes` of training steps (`TrainingState.training_seconds`;
    validations are not counted, so how often a run validates does not change what it learns).

    From the speed measured since this process started (skipping its first
    `SKIPPED_STEPS`, which can run slow while memory is first touched), it plans the step at
    which the budget runs out: at the end of the warm-up, then at every report. The plan becomes the
    learning-rate schedule's end (`TrainingState.schedule`, which keeps the rate
    continuous), so the run ends annealed instead of cut off mid-decay; `max_steps` stays an
    upper bound. Every worker takes the earliest end any of them planned.
    """

    SKIPPED_STEPS = 5
    MIN_MEASURED_STEPS = 10
    TOLERANCE = 0.01  # of the steps left: smaller corrections are not worth a schedule entry

    def __init__(self, training, warmup_steps: int, start_step: int):
        self.training = training
        self.warmup_steps = warmup_steps
        self.reference_step = start_step + self.SKIPPED_STEPS
        self.reference_seconds: float | None = None

    def replan(self, state: TrainingState, world_size: int, device) -> bool:
        """Plan the schedule's end after this step if it is a planning step; True if it moved."""
        training = self.training
        if state.step == self.reference_step:
            self.reference_seconds = state.training_seconds
        measured = state.step - self.reference_step
        due = state.step == self.warmup_steps or any(
            state.step % every == 0 for every in (training.log_every, training.eval_every)
        )
        if self.reference_seconds is None or measured < self.MIN_MEASURED_STEPS or not due:
            return False
        seconds_per_step = (state.training_seconds - self.reference_seconds) / measured
        remaining = max(0.0, 60.0 * training.max_minutes - state.training_seconds)
        end = min(training.max_steps, state.step + int(remaining / seconds_per_step))
        end = int(all_reduce([float(end)], world_size, device, dist.ReduceOp.MIN)[0])
        state.planned_minutes = training.max_minutes
        current = state.schedule[-1][1]
        tolerance = self.TOLERANCE * (current - state.step)
        if end > state.step and abs(end - current) <= tolerance:
            return False
        state.schedule.append([state.step, end])
        return True
