"""Trivial predictions (and a trained model) scored on a preset's validation set, measure by measure.

    python benchmarks/baselines.py [--preset cpu] [--checkpoint runs/NAME]

Prints one row per prediction of the future 10 frames: all-zeros (blank), the mean frame of
the validation futures, the last past frame copied, the same blurred (Gaussian, sigma 1.5),
the target blurred, the target itself, and with --checkpoint a trained model (a run folder
means its best checkpoint). Columns: MSE/frame, SSIM, ink SSIM (`lstm_ae.metrics`, what every
validation reports) and the gradient difference of Mathieu et al. (2016), summed per frame,
the candidate sharpness measure that lost: it ranks the blank above the last frame copied.

A sharpness measure is worth searching on only if the blank scores worst or near it and the
target best: SSIM fails (the blank beats trained models: most of a frame is background), ink
SSIM passes (`tests/test_metrics.py` checks that order on these predictions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstm_ae.config import PRESETS, preset  # noqa: E402
from lstm_ae.data import load_test_set  # noqa: E402
from lstm_ae.metrics import (  # noqa: E402
    clip_prediction,
    copy_last_frame,
    squared_error_per_frame,
    ssim_and_ink_ssim_per_frame,
)

BLUR_SIGMA = 1.5


def gaussian_blur(frames: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """(B, T, C, H, W) blurred per frame by a separable 7-tap Gaussian, zero beyond the border."""
    offsets = torch.arange(7, dtype=torch.float32) - 3
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    shape = frames.shape
    images = frames.float().reshape(-1, 1, *shape[-2:])
    images = F.conv2d(F.pad(images, (3, 3, 0, 0)), kernel.view(1, 1, 1, 7))
    images = F.conv2d(F.pad(images, (0, 0, 3, 3)), kernel.view(1, 1, 7, 1))
    return images.view(shape)


def gradient_difference_per_frame(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mathieu et al.'s gradient difference (alpha 1), summed over a frame: (B, T)."""
    prediction, target = clip_prediction(prediction), target.float()

    def gradients(frames):
        return (frames[..., 1:, :] - frames[..., :-1, :]).abs(), (frames[..., 1:] - frames[..., :-1]).abs()

    return sum(
        (ours - theirs).abs().flatten(2).sum(-1)
        for ours, theirs in zip(gradients(prediction), gradients(target))
    )


def trivial_predictions(past: torch.Tensor, future: torch.Tensor) -> dict[str, torch.Tensor]:
    copy_last = copy_last_frame(past, future.shape[1])
    return {
        "all-zeros (blank)": torch.zeros_like(future),
        "mean frame": future.float().mean(dim=(0, 1), keepdim=True).expand_as(future),
        "last frame copied": copy_last,
        "last frame copied, blurred": gaussian_blur(copy_last),
        "target blurred": gaussian_blur(future),
        "target": future,
    }


def scores(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    ssim, ink_ssim = ssim_and_ink_ssim_per_frame(prediction, target)
    return {
        "mse_frame": float(squared_error_per_frame(prediction, target).mean()),
        "ssim": float(ssim.mean()),
        "ink_ssim": float(ink_ssim.mean()),
        "gradient_difference": float(gradient_difference_per_frame(prediction, target).mean()),
    }


def model_prediction(checkpoint: Path, sequences: torch.Tensor) -> torch.Tensor:
    from lstm_ae.checkpoint import load_model
    from lstm_ae.viz import model_outputs
    from train.commandline import resolve_checkpoint

    model, config, _ = load_model(resolve_checkpoint(checkpoint))
    predictions = [model_outputs(model, batch, config)[2] for batch in sequences.split(100)]
    return torch.cat(predictions)


def main(argv=None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    parser.add_argument("--checkpoint", type=Path, help="a trained model's run folder or checkpoint")
    arguments = parser.parse_args(argv)
    config = preset(arguments.preset)
    test_set = load_test_set(config.model, config.data)
    sequences = torch.cat(list(test_set.batches(100))).float()
    past_length = config.model.past_length
    past, future = sequences[:, :past_length], sequences[:, past_length:]
    predictions = trivial_predictions(past, future)
    if arguments.checkpoint is not None:
        predictions[f"model {arguments.checkpoint}"] = model_prediction(arguments.checkpoint, sequences)
    table = {name: scores(prediction, future) for name, prediction in predictions.items()}
    print(f"{len(test_set)} validation sequences of preset {arguments.preset} ({test_set.path})")
    print("| prediction | MSE/frame | SSIM | ink SSIM | gradient difference |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row in table.items():
        print(
            f"| {name} | {row['mse_frame']:.1f} | {row['ssim']:.3f} | {row['ink_ssim']:.3f} "
            f"| {row['gradient_difference']:.1f} |"
        )
    return table


if __name__ == "__main__":
    main()
