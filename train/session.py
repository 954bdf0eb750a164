"""Where the training function runs: the few Ray calls it makes, behind one small interface.

The training function (`train.worker.train_function`) is the same everywhere; what differs is
how it reports and finds its checkpoint:

- `RayTrainSession`: inside a Ray Train `TorchTrainer` worker (`ray.train.*`, DDP via
  `prepare_model`). This is `python -m train`, and each multi-worker Tune trial.
- `tune.session.TuneSession`: a Tune trial that runs the function directly in its own
  process (one worker per trial), reporting through `ray.tune.*`.

Every session hands the function the newest checkpoint that loads (`records.checkpoints`): a
damaged one is skipped with one line and set aside, and checkpoints written afterwards take
a fresh name where the skipped one's would repeat.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from lstm_ae.hardware import gpu_problem
from records.checkpoints import fresh_checkpoint_name, newest_loadable


class Session(Protocol):
    world_rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """A local folder holding the newest checkpoint that loads, to resume from, or None."""

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


def _ray_folder(filesystem, path: str):
    import ray.train

    return ray.train.Checkpoint(path=path, filesystem=filesystem).as_directory()


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
        self.skipped: set[str] = set()  # damaged checkpoints skipped on restoring

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return checkpoint_folder(None)
        return newest_loadable(
            checkpoint.filesystem, checkpoint.path, self.world_rank, self.skipped, open_folder=_ray_folder
        )

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = fresh_checkpoint_name(checkpoint_name(step), self.skipped)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


class LocalSession:
    """No Ray at all: one process, checkpoints kept in a folder (for notebooks and tests)."""

    def __init__(self, device: str | torch.device = "cpu", checkpoint_root: str | None = None):
        self.world_rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.checkpoint_root = checkpoint_root or tempfile.mkdtemp(prefix="lstm_ae_local_")
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[str] = []
        self.skipped: set[str] = set()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self):
        import pyarrow.fs

        latest = self.checkpoints[-1] if self.checkpoints else None
        return newest_loadable(pyarrow.fs.LocalFileSystem(), latest, self.world_rank, self.skipped)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        import shutil
        from pathlib import Path

        self.reports.append(dict(metrics))
        if checkpoint_dir:
            target = Path(self.checkpoint_root) / fresh_checkpoint_name(checkpoint_name(step), self.skipped)
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
            self.checkpoints.append(str(target))
