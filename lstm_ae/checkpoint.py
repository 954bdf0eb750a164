"""Checkpoints: model, optimizer, scheduler, step and config in one file, written atomically.

A checkpoint is a folder holding `checkpoint.pt` (the layout Ray Train persists). The file
is written to a temporary name and renamed into place, so a crash mid-write never leaves a
file that looks complete. It is loaded with `torch.load(weights_only=True)`: only tensors
and plain containers, no pickled code. The config travels inside, so a checkpoint alone
rebuilds its model.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lstm_ae.config import ConfigError, ExperimentConfig
from lstm_ae.engine import unwrap
from lstm_ae.model import CompositeLSTMAutoencoder

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "lstm_ae.checkpoint.v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or not one of ours."""


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    step: int,
    config: ExperimentConfig,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write `directory/checkpoint.pt` atomically and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "step": int(step),
        "config": config.to_dict(),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "metrics": {name: float(value) for name, value in (metrics or {}).items()},
    }
    path = directory / CHECKPOINT_FILE
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{CHECKPOINT_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file given the file itself or the folder holding it."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Read and validate a checkpoint; CheckpointError names the problem in one line.

    `mmap` maps the tensors instead of reading them: a cheap check that the file loads."""
    file = checkpoint_file(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint not found: {file}")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{file} is not a readable checkpoint: not a torch.save file of tensors and plain values "
            "(checkpoints are loaded with weights_only=True, which refuses arbitrary objects)"
        ) from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{file} is not a readable checkpoint: {first_line}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not an lstm_ae checkpoint (no '{FORMAT}' format marker)")
    try:
        state["experiment_config"] = ExperimentConfig.from_dict(state["config"])
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{file} holds an invalid config: {error}") from None
    return state


def restore(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> int:
    """Load a checkpoint's states into the given objects; returns the step it was taken at."""
    try:
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint does not fit this model: {str(error).splitlines()[0]}") from None
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[CompositeLSTMAutoencoder, ExperimentConfig, dict[str, Any]]:
    """Rebuild the model a checkpoint holds, in eval mode, with its config and raw state."""
    state = load_checkpoint(path, map_location=device)
    config = state["experiment_config"]
    model = CompositeLSTMAutoencoder(config.model).to(device)
    restore(state, model)
    model.eval()
    return model, config, state
