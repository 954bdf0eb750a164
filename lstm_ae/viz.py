"""Pictures of a run: prediction and reconstruction GIFs, a frame grid, and loss curves.

Frames come in as (T, H, W) or (T, 1, H, W) floats in [0, 1]. Everything here writes files
and returns nothing; matplotlib runs headless (Agg).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lstm_ae.data import split_sequence
from lstm_ae.engine import autocast, unwrap
from lstm_ae.metrics import BASELINE_COPY_LAST_MSE_FRAME, BASELINE_ZEROS_MSE_FRAME, is_finite_number

GIF_SCALE = 3  # pixels per frame pixel
GIF_FRAME_MS = 200
GAP = 2  # pixels between panels


def _to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """(T, [1,] H, W) floats in [0, 1] -> (T, H, W) uint8."""
    array = frames.detach().float().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim == 4:
        array = array[:, 0]
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)


def _joined(images: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """`images` joined along `axis`, GAP gray pixels between each two."""
    padding = [(0, 0)] * images[0].ndim
    padding[axis] = (0, GAP)
    joined = np.concatenate([np.pad(image, padding, constant_values=128) for image in images], axis)
    return np.delete(joined, np.s_[-GAP:], axis=axis)


def _side_by_side(panels: Sequence[np.ndarray], marker: np.ndarray | None = None) -> list[Image.Image]:
    """Panels (T, H, W) uint8 side by side per frame; `marker` (T,) bool lights a bar on top."""
    steps, height, _ = panels[0].shape
    images = []
    for t in range(steps):
        frame = _joined([panel[t] for panel in panels], axis=1)
        bar = np.full((3, frame.shape[1]), 255 if marker is not None and marker[t] else 0, np.uint8)
        frame = np.concatenate([bar, frame], axis=0)
        image = Image.fromarray(frame).resize(
            (frame.shape[1] * GIF_SCALE, frame.shape[0] * GIF_SCALE), Image.NEAREST
        )
        images.append(image)
    return images


def _save_gif(path: str | os.PathLike, images: list[Image.Image]) -> None:
    images[0].save(path, save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0)


def _stack_sequences(sequences: Sequence[np.ndarray]) -> np.ndarray:
    """Several (T, H, W) sequences stacked vertically into one (T, n*H + gaps, W)."""
    return _joined(sequences, axis=1)


def prediction_gif(path: str | os.PathLike, past, future, prediction) -> None:
    """Left: the true sequence; right: the same past, then the model's prediction.

    Arguments are (N, T, 1, H, W) batches; each of the N sequences is a row. The bar on top
    lights up while the frames shown are predicted.
    """
    truth = [_to_uint8(torch.cat([p, f])) for p, f in zip(past, future)]
    generated = [_to_uint8(torch.cat([p, q])) for p, q in zip(past, prediction)]
    marker = np.arange(truth[0].shape[0]) >= past.shape[1]
    _save_gif(path, _side_by_side([_stack_sequences(truth), _stack_sequences(generated)], marker))


def reconstruction_gif(path: str | os.PathLike, past, reconstruction) -> None:
    """Left: the past frames; right: their reconstruction (chronological order)."""
    original = _stack_sequences([_to_uint8(p) for p in past])
    rebuilt = _stack_sequences([_to_uint8(r) for r in reconstruction])
    _save_gif(path, _side_by_side([original, rebuilt]))


def _figure(rows: int, columns: int, width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(rows, columns, figsize=(width, height), squeeze=False)


FRAME_LABELS = ("input", "true future", "predicted", "reconstructed")


def frame_grid_rows(past, future, prediction, reconstruction) -> tuple[list[str], np.ndarray]:
    """Row labels and the grid as one (rows*H + gaps, steps*W + gaps) uint8 image: per sequence,
    its input, true future, predicted future and reconstruction, a frame per column, gray gaps."""
    steps = max(past.shape[1], future.shape[1])
    labels, rows = [], []
    for index in range(past.shape[0]):
        for label, frames in zip(FRAME_LABELS, (past, future, prediction, reconstruction)):
            frames = _to_uint8(frames[index])
            height, width = frames.shape[1:]
            columns = [frames[t] if t < len(frames) else np.full((height, width), 128, np.uint8)
                       for t in range(steps)]  # fmt: skip
            labels.append(f"#{index} {label}")
            rows.append(_joined(columns, axis=1))
    return labels, _joined(rows, axis=0)


def frames_png(path: str | os.PathLike, past, future, prediction, reconstruction) -> None:
    """A grid per sequence: input, true future, predicted future, reconstruction (rows), drawn
    as one image in one axes (an axes per frame took 10 s on 2 cores, at every validation)."""
    labels, grid = frame_grid_rows(past, future, prediction, reconstruction)
    frame_height = (grid.shape[0] + GAP) // len(labels)
    plt, figure, axes = _figure(1, 1, grid.shape[1] / 64 * 0.9 + 1.2, len(labels) * 0.95)
    axis = axes[0, 0]
    axis.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([row * frame_height + (frame_height - GAP) / 2 for row in range(len(labels))], labels)
    axis.tick_params(axis="y", length=0, labelsize=7)
    for spine in axis.spines.values():
        spine.set_visible(False)
    figure.savefig(path, dpi=80, bbox_inches="tight", pad_inches=0.05)
    plt.close(figure)


def curves_png(path: str | os.PathLike, rows: Sequence[Mapping[str, float]], metric: str) -> None:
    """Training losses over steps, and the validation metric with the trivial baselines over
    steps and over wall-clock time (`elapsed_seconds`: training and validation)."""
    plt, figure, axes = _figure(1, 3, 15, 4)
    train_axis, step_axis, time_axis = axes[0]
    train_rows = [row for row in rows if "loss" in row and is_finite_number(row["loss"])]
    for key, label in (
        ("loss", "composite loss"),
        ("reconstruction_loss", "reconstruction"),
        ("prediction_loss", "prediction"),
    ):
        points = [(row["step"], row[key]) for row in train_rows if is_finite_number(row.get(key))]
        if points and any(value > 0 for _, value in points):
            train_axis.plot(*zip(*points), label=label)
    train_axis.set_xlabel("step")
    train_axis.set_ylabel("training loss per frame")
    train_axis.set_yscale("log")
    train_axis.legend()
    validation_rows = [row for row in rows if is_finite_number(row.get(metric))]
    _plot_validation(step_axis, validation_rows, metric, lambda row: row["step"], "step")
    timed_rows = [row for row in validation_rows if is_finite_number(row.get("elapsed_seconds"))]
    _plot_validation(
        time_axis,
        timed_rows,
        metric,
        lambda row: row["elapsed_seconds"] / 60,
        "minutes of training and validation",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _plot_validation(axis, rows: Sequence[Mapping[str, float]], metric: str, x, label: str) -> None:
    if rows:
        axis.plot([x(row) for row in rows], [row[metric] for row in rows], marker="o", label="model")
        last = rows[-1]
        if metric.startswith("val_mse"):
            for key, baseline, style in (
                (BASELINE_ZEROS_MSE_FRAME, "all-zeros baseline", "--"),
                (BASELINE_COPY_LAST_MSE_FRAME, "copy-last-frame baseline", ":"),
            ):
                if is_finite_number(last.get(key)):
                    axis.axhline(last[key], linestyle=style, color="gray", label=baseline)
        axis.legend()
    axis.set_xlabel(label)
    axis.set_ylabel(metric)


RUN_PICTURES = ("prediction.gif", "reconstruction.gif", "frames.png", "curves.png")


@torch.no_grad()
def model_outputs(model, sequences: torch.Tensor, config) -> tuple[torch.Tensor, ...]:
    """(past, future, prediction, reconstruction) of `model` in evaluation mode on `sequences`
    (B, T, 1, H, W), on the CPU: what the pictures show."""
    model = unwrap(model)
    model_config = config.model
    past, future = split_sequence(sequences, model_config.past_length, model_config.future_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with autocast(config.training.precision, device):
        reconstruction, prediction = model.reconstruct_and_predict(past.to(device))
    model.train(was_training)
    return past.cpu(), future.cpu(), prediction.float().cpu(), reconstruction.float().cpu()


def render_run(
    folder, model, sequences: torch.Tensor, config, history: Sequence[Mapping[str, float]]
) -> None:
    """The run's pictures in `folder`: GIFs and a frame grid of `model` on `sequences`
    (B, T, 1, H, W), and the curves of `history` (one row per report)."""
    folder = Path(folder)
    past, future, prediction, reconstruction = model_outputs(model, sequences, config)
    prediction_gif(folder / "prediction.gif", past, future, prediction)
    reconstruction_gif(folder / "reconstruction.gif", past, reconstruction)
    frames_png(folder / "frames.png", past, future, prediction, reconstruction)
    curves_png(folder / "curves.png", history, config.training.metric)
