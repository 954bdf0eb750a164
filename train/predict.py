"""`python -m train.predict CHECKPOINT INPUT.npy`: predict the future of your own sequences.

    python -m train.predict runs/my-run/checkpoint_00003000 my_sequences.npy --output predictions/

INPUT.npy holds sequences in the standard Moving MNIST layout, (T, N, H, W) uint8 with
T >= past_length (extra frames are ignored; if present, the true future is shown beside
the prediction). CHECKPOINT is a checkpoint folder or file, or a run folder (its best
checkpoint is used). Writes to --output:

    predictions.npy   (steps, N, H, W) uint8, the same layout as the input
    prediction.gif    the first sequences: input then prediction (beside the truth if known)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lstm_ae.checkpoint import CheckpointError, load_model
from lstm_ae.data import (
    DataError,
    check_fits_model,
    read_sequence_file,
    sequences_to_tensor,
    write_sequence_file,
)
from lstm_ae.engine import autocast
from lstm_ae.viz import prediction_gif
from train.commandline import OneLineParser, add_device_argument, check_device, fail, resolve_checkpoint

GIF_SEQUENCES = 4


def predict_file(
    checkpoint: Path, input_path: Path, output: Path, steps: int | None, batch_size: int, device: str
) -> Path:
    model, config, _ = load_model(resolve_checkpoint(checkpoint), device)
    array = read_sequence_file(input_path)
    frames, count = array.shape[:2]
    if count == 0:
        raise DataError(f"{input_path} holds no sequences (shape {array.shape})")
    shape = config.model
    check_fits_model(input_path, array, shape, shape.past_length, "past_length")
    steps = steps or shape.future_length
    predictions = []
    with torch.no_grad(), autocast(config.training.precision, torch.device(device)):
        for start in range(0, count, batch_size):
            past = sequences_to_tensor(array[: shape.past_length], slice(start, start + batch_size)).to(
                device
            )
            predictions.append(model.predict(past, steps).float().clamp(0, 1).cpu())
    prediction = torch.cat(predictions)  # (N, steps, 1, H, W)
    output.mkdir(parents=True, exist_ok=True)
    write_sequence_file(output / "predictions.npy", (prediction[:, :, 0] * 255).round().to(torch.uint8))
    shown = slice(0, min(GIF_SEQUENCES, count))
    past = sequences_to_tensor(array[: shape.past_length], shown)
    if frames >= shape.past_length + steps:
        truth = sequences_to_tensor(array[shape.past_length : shape.past_length + steps], shown)
    else:
        truth = torch.zeros_like(prediction[shown])
    prediction_gif(output / "prediction.gif", past, truth, prediction[shown])
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m train.predict", description=__doc__.split("\n")[0].split(": ", 1)[1]
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder or file, or a run folder")
    parser.add_argument("input", type=Path, help="sequences, (T, N, H, W) uint8 .npy")
    parser.add_argument("--output", type=Path, default=Path("predictions"), help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="frames to predict (default future_length)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass")
    add_device_argument(parser)
    arguments = parser.parse_args(argv)
    if arguments.steps is not None and arguments.steps < 1:
        fail(f"--steps must be at least 1, got {arguments.steps}")
    if arguments.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {arguments.batch_size}")
    if arguments.output.exists() and not arguments.output.is_dir():
        fail(f"--output {arguments.output} is a file; give a folder")
    check_device(arguments.device)
    try:
        output = predict_file(
            arguments.checkpoint,
            arguments.input,
            arguments.output,
            arguments.steps,
            arguments.batch_size,
            arguments.device,
        )
    except (CheckpointError, DataError) as error:
        fail(str(error))
    count = np.load(output / "predictions.npy", mmap_mode="r").shape
    print(f"wrote {output / 'predictions.npy'} {count} and {output / 'prediction.gif'}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
