"""What rank 0 prints: what the run will do, at its start, and one progress line per report
and at least every `ProgressClock.EVERY_SECONDS` between reports
(with the validation metrics beside the trivial baselines, the probe at the end, and why it
stops early)."""

from __future__ import annotations

import time
from typing import Any

import torch

from lstm_ae import metrics as metric_names
from lstm_ae.config import ExperimentConfig
from lstm_ae.engine import unwrap
from lstm_ae.model import parameter_count


def describe_run(config: ExperimentConfig, model, world_size: int, device: torch.device) -> str:
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


def progress_line(row: dict[str, Any], config: ExperimentConfig, max_steps: int) -> str:
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
            f"| ssim {row[metric_names.VAL_SSIM]:.3f} (ink {row[metric_names.VAL_INK_SSIM]:.3f}) | psnr {row[metric_names.VAL_PSNR_DB]:.2f} dB "
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
