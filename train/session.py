"""Where the training function runs: the few Ray calls it makes, behind one small interface.

The training function (`train.worker.train_function`) is the same everywhere; what differs is
how it reports and finds its checkpoint:

- `RayTrainSession`: inside a Ray Train `TorchTrainer` worker (`ray.train.*`, DDP via
  `prepare_model`). This is `python -m train`, and each multi-worker Tune trial.
- `tune.session.TuneSession`: a Tune trial that runs the function directly in its own
  process (one worker per trial), reporting through `ray.tune.*`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from lstm_ae.hardware import gpu_problem


class Session(Protocol):
    world_rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """A local folder holding the checkpoint to resume from, or None."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        """Report metrics (every rank, same number of calls); rank 0 may attach a checkpoint folder."""


@contextlib.contextmanager
def checkpoint_folder(checkpoint) -> Iterator[str | None]:
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield folder


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


class RayTrainSession:
    """A Ray Train worker: rank and device from the Train context, DDP from prepare_model."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        if ray.get_gpu_ids():  # this worker holds a GPU: never train on the CPU by surprise
            problem = gpu_problem()
            if problem:
                raise RuntimeError(problem)
        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def latest_checkpoint(self):
        import ray.train

        return checkpoint_folder(ray.train.get_checkpoint())

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(step))


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


class LocalSession:
    """No Ray at all: one process, checkpoints kept in a folder (for notebooks and tests)."""

    def __init__(self, device: str | torch.device = "cpu", checkpoint_root: str | None = None):
        self.world_rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.checkpoint_root = checkpoint_root or tempfile.mkdtemp(prefix="lstm_ae_local_")
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[str] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self):
        return contextlib.nullcontext(self.checkpoints[-1] if self.checkpoints else None)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        import shutil
        from pathlib import Path

        self.reports.append(dict(metrics))
        if checkpoint_dir:
            target = Path(self.checkpoint_root) / checkpoint_name(step)
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
            self.checkpoints.append(str(target))
