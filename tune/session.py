"""A Tune trial that runs the training function in its own process (one worker per trial)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lstm_ae.hardware import gpu_problem
from records.checkpoints import newest_loadable
from train.session import checkpoint_folder


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
            open_folder=lambda filesystem, path: ray.tune.Checkpoint(path=path, filesystem=filesystem).as_directory(),
        )

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)
