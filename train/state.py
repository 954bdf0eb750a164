"""What a run has done so far, saved beside the weights in every checkpoint (`HISTORY_FILE`),
so that a restarted or resumed run carries on where it was: the step, the clocks, the best
validation and early stopping, the learning-rate schedule's ends, and the history of reports."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lstm_ae.metrics import METRIC_MODES

HISTORY_FILE = "history.json"


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
    # The precision the run trains in, resolved once at its start (train.run_precision)
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


def update_early_stopping(state: TrainingState, row: dict[str, Any], metric: str, patience: int) -> None:
    """Track the best value of `metric` in a validation row; stop after `patience` (0: never)
    validations without improvement."""
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
