"""The time budget (`--max-minutes`): the step at which a run's minutes run out, planned from
its measured speed and made the end of its learning-rate schedule, and the hard stop that keeps
a run inside its minutes on any machine."""

from __future__ import annotations

import math
from typing import Any

import torch.distributed as dist

from records.checkpoints import TrainingState
from train.collective import all_reduce


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
