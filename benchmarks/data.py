"""Generated Moving MNIST sequences per second, against what a training step consumes.

    python benchmarks/data.py [--batch-size 32] [--hidden-size 1024] [--dtype bf16]

Times the training stream (`lstm_ae.data.GeneratedSequences`: trajectories, rendering,
conversion to floats) in this process, then a few training steps of the model at the same
batch size (the `cpu` preset's shape by default), and prints both rates and their ratio.
The last line is `ratio=<generated per second / consumed per second>`.
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
from lstm_ae.data import BouncingDigits, GeneratedSequences  # noqa: E402
from lstm_ae.engine import make_optimizer, make_scheduler, train_step  # noqa: E402
from lstm_ae.model import CompositeLSTMAutoencoder  # noqa: E402


def generation_rate(stream: GeneratedSequences, batches: int) -> float:
    """Sequences per second of the stream, median over batches."""
    stream.batch(0)
    times = []
    for step in range(batches):
        start = time.perf_counter()
        stream.batch(step)
        times.append(time.perf_counter() - start)
    return stream.batch_size / statistics.median(times)


def training_rate(config: ModelConfig, batch_size: int, precision: str, steps: int, stream) -> float:
    """Sequences per second of the project's training step, median over steps."""
    torch.manual_seed(0)
    model = CompositeLSTMAutoencoder(config)
    optimizer = make_optimizer(model, OptimConfig(), torch.device("cpu"))
    scheduler = make_scheduler(optimizer, OptimConfig(), 1000)
    batch = stream.batch(0)[0]
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        train_step(model, optimizer, scheduler, [batch], config, precision, 1000.0, step)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times[1:])


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--batch-size", type=int, default=TrainingConfig().batch_size, help="sequences per batch"
    )
    parser.add_argument("--hidden-size", type=int, default=1024, help="hidden size of the consuming model")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="training step precision")
    parser.add_argument("--batches", type=int, default=30, help="generated batches to time")
    parser.add_argument("--steps", type=int, default=4, help="training steps to time")
    arguments = parser.parse_args(argv)

    model_config = ModelConfig(hidden_size=arguments.hidden_size)
    generator = BouncingDigits.from_config(model_config, DataConfig(), "train")
    stream = GeneratedSequences(generator, arguments.batch_size, seed=0)
    generated = generation_rate(stream, arguments.batches)
    print(f"generator: {generated:.0f} sequences/s (batch {arguments.batch_size}, 20 frames of 64x64)")
    consumed = training_rate(model_config, arguments.batch_size, arguments.dtype, arguments.steps, stream)
    print(f"training step (hidden {arguments.hidden_size}, {arguments.dtype}): {consumed:.1f} sequences/s")
    ratio = generated / consumed
    print(f"ratio={ratio:.1f}")
    return ratio


if __name__ == "__main__":
    main()
