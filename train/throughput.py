"""The interval between two reports: its mean losses and gradient norm, the learning rate,
sequences per second, and the time left at that speed (the report row's training half)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from records.checkpoints import TrainingState
from train import clock


@dataclass
class SinceLastReport:
    """Losses and throughput since the last report."""

    start_step: int
    start_sequences: int
    start_time: float = field(default_factory=lambda: clock.now())
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
        seconds = clock.now() - self.start_time
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
