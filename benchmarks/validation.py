"""Time one validation pass over the fixed validation set, as the training loop runs it.

    python benchmarks/validation.py [--hidden-size 1024] [--sequences 1000] [--repeats 3]

Compares, interleaved on the same untrained model (timing does not depend on the weights):
  separate  `predict` and `reconstruct` each encoding the past, batches of 32 (the earlier way)
  stacked   `reconstruct_and_predict`: one encoding, both decoders as one stack, batches of 32
  current   `lstm_ae.engine.evaluate` (what the training loop calls), batches of 32
All three compute every metric. Prints the medians and the ratio current / separate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstm_ae.config import preset  # noqa: E402
from lstm_ae.data import load_test_set, split_sequence  # noqa: E402
from lstm_ae.engine import autocast, evaluate  # noqa: E402
from lstm_ae.metrics import (  # noqa: E402
    MetricAccumulator,
    add_baselines,
    add_prediction_metrics,
    add_reconstruction_metrics,
)
from lstm_ae.model import CompositeLSTMAutoencoder  # noqa: E402


@torch.no_grad()
def separate_pass(model, test_set, config, batch: int, stacked: bool) -> None:
    accumulator = MetricAccumulator()
    for frames in test_set.batches(batch):
        past, future = split_sequence(frames, config.model.past_length, config.model.future_length)
        with autocast("bf16", torch.device("cpu")):
            if stacked:
                reconstruction, prediction = model.reconstruct_and_predict(past)
            else:
                prediction, reconstruction = model.predict(past), model.reconstruct(past)
        add_prediction_metrics(accumulator, prediction, future)
        add_reconstruction_metrics(accumulator, reconstruction, past)
        add_baselines(accumulator, past, future)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args(argv)
    config = preset("cpu", hidden_size=arguments.hidden_size, test_sequences=arguments.sequences)
    model = CompositeLSTMAutoencoder(config.model).eval()
    test_set = load_test_set(config.model, config.data)
    passes = {
        "separate": lambda: separate_pass(model, test_set, config, 32, stacked=False),
        "stacked": lambda: separate_pass(model, test_set, config, 32, stacked=True),
        "current": lambda: evaluate(model, test_set.batches(32), config.model, "bf16"),
    }
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(arguments.repeats):
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(
        f"hidden {arguments.hidden_size}, {arguments.sequences} sequences, bf16, {torch.get_num_threads()} threads"
    )
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:>9}: median {median:.2f} s")
    print(f"ratio current/separate={medians['current'] / medians['separate']:.2f}")


if __name__ == "__main__":
    main()
