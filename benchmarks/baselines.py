"""The trivial predictions' metrics on a preset's validation set: all-zeros and copy-last-frame.

    python benchmarks/baselines.py [--preset cpu]

Prints MSE/frame and SSIM of each, as every validation reports them (`lstm_ae.metrics.add_baselines`).
An empty prediction scores a high SSIM on Moving MNIST (most of a frame is background), so a
model's SSIM reads against this line, not against zero.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstm_ae.config import PRESETS, preset  # noqa: E402
from lstm_ae.data import load_test_set  # noqa: E402
from lstm_ae.metrics import MetricAccumulator, add_baselines  # noqa: E402


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    arguments = parser.parse_args(argv)
    config = preset(arguments.preset)
    test_set = load_test_set(config.model, config.data)
    accumulator = MetricAccumulator()
    past_length = config.model.past_length
    for frames in test_set.batches(100):
        add_baselines(accumulator, frames[:, :past_length], frames[:, past_length:])
    means = accumulator.means()
    print(f"{len(test_set)} validation sequences of preset {arguments.preset} ({test_set.path})")
    for name in sorted(means):
        print(f"{name} {means[name]:.4f}")
    return means


if __name__ == "__main__":
    main()
