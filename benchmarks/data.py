"""Moving MNIST sequences per second rendered, against what a training step consumes.

    python benchmarks/data.py [--device cuda|cpu] [--batch-size 32] [--hidden-size 1024] [--dtype bf16]

On the device it finds (a GPU where there is one; `--device` to choose), it times:
- placement: the CPU's share of every batch (digit choices and float64 trajectories), what a
  worker's prefetching thread does when the batches are rendered on a GPU;
- rendered: the training stream as a worker draws it (`lstm_ae.data.PrefetchedBatches` over
  a generator moved to the device: placed on the thread, rendered on the device), through to
  float frames on the device;
- consumed: `lstm_ae.engine.train_step` of the model on such batches (the `cpu` preset's
  shape by default), at the same batch size.
It prints each rate and the ratio rendered / consumed; the last line is `ratio=<ratio>`
(above 1: the data keep up with the step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstm_ae.config import DataConfig, ModelConfig, OptimConfig, TrainingConfig  # noqa: E402
from lstm_ae.data import BouncingDigits, GeneratedSequences, PrefetchedBatches, as_unit_float  # noqa: E402
from lstm_ae.engine import make_optimizer, make_scheduler, train_step  # noqa: E402
from lstm_ae.model import CompositeLSTMAutoencoder  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def placement_rate(stream: GeneratedSequences, batches: int) -> float:
    """Sequences per second of the CPU's placements alone, median over batches."""
    times = []
    for step in range(batches):
        start = time.perf_counter()
        stream.placement(step)
        times.append(time.perf_counter() - start)
    return stream.batch_size / statistics.median(times)


def rendering_rate(stream: GeneratedSequences, batches: int, device: torch.device) -> float:
    """Sequences per second of the prefetched stream on `device`, float frames included
    (nothing else runs, so this is the most the stream can give a step)."""
    with PrefetchedBatches(stream, pin_memory=device.type == "cuda") as prefetched:
        as_unit_float(next(prefetched))
        synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            as_unit_float(next(prefetched))
        synchronize(device)
        return stream.batch_size * batches / (time.perf_counter() - start)


def training_rate(
    config: ModelConfig, stream: GeneratedSequences, precision: str, steps: int, device: torch.device
) -> float:
    """Sequences per second of the project's training step on the stream's batches (median
    over steps, the first left out)."""
    torch.manual_seed(0)
    model = CompositeLSTMAutoencoder(config).to(device)
    optimizer = make_optimizer(model, OptimConfig(), device)
    scheduler = make_scheduler(optimizer, OptimConfig(), 1000)
    batch = stream.pixel_batch(0)[0]
    times = []
    for step in range(steps + 1):
        synchronize(device)
        start = time.perf_counter()
        train_step(model, optimizer, scheduler, [batch], config, precision, 1000.0, step)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return stream.batch_size / statistics.median(times[1:])


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch-size", type=int, default=TrainingConfig().batch_size, help="sequences per batch"
    )
    parser.add_argument("--hidden-size", type=int, default=1024, help="hidden size of the consuming model")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="training step precision")
    parser.add_argument("--batches", type=int, default=30, help="batches to time")
    parser.add_argument("--steps", type=int, default=4, help="training steps to time")
    arguments = parser.parse_args(argv)
    device = torch.device(arguments.device)

    model_config = ModelConfig(hidden_size=arguments.hidden_size)
    generator = BouncingDigits.from_config(model_config, DataConfig(), "train").to(device)
    stream = GeneratedSequences(generator, arguments.batch_size, seed=0)
    shape = f"batch {arguments.batch_size}, 20 frames of 64x64"
    placed = placement_rate(stream, arguments.batches)
    print(f"placement (CPU): {placed:.0f} sequences/s ({shape})")
    rendered = rendering_rate(stream, arguments.batches, device)
    print(f"rendered on {device.type}: {rendered:.0f} sequences/s ({shape})")
    consumed = training_rate(model_config, stream, arguments.dtype, arguments.steps, device)
    print(
        f"consumed by the training step on {device.type} (hidden {arguments.hidden_size}, "
        f"{arguments.dtype}): {consumed:.1f} sequences/s"
    )
    ratio = rendered / consumed
    print(f"ratio={ratio:.1f}")
    return ratio


if __name__ == "__main__":
    main()
