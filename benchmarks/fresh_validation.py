"""A run's model on sequences it has never been validated on: a freshly seeded set.

    python benchmarks/fresh_validation.py runs/my-run [--test-seed 777] [--sequences 1000]

Loads the run's best checkpoint (result.json) and scores it on a validation set generated
with another seed (held-out digits, as the run's own set), with the run's own metrics and in
the run's own precision. A model whose validation metric was selected on the fixed set should
score about the same here; a large gap means it was fitted to that set. The last line is
`mse_frame=<value> ssim=<value>`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstm_ae.checkpoint import load_model  # noqa: E402
from lstm_ae.data import load_test_set  # noqa: E402
from lstm_ae.engine import evaluate  # noqa: E402
from lstm_ae.metrics import VAL_MSE_FRAME, VAL_SSIM  # noqa: E402
from train.commandline import resolve_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="run folder (its best checkpoint) or checkpoint folder")
    parser.add_argument(
        "--test-seed", type=int, default=777, help="seed of the fresh set (the runs' own: 4242)"
    )
    parser.add_argument("--sequences", type=int, default=1000, help="sequences in the fresh set")
    parser.add_argument("--batch-size", type=int, default=100, help="sequences per evaluation batch")
    arguments = parser.parse_args(argv)

    checkpoint = resolve_checkpoint(arguments.run)
    model, config, state = load_model(checkpoint)
    with tempfile.TemporaryDirectory() as cache:
        data = replace(
            config.data,
            test_seed=arguments.test_seed,
            test_sequences=arguments.sequences,
            cache_dir=cache,
            test_file="",
        )
        fresh = load_test_set(config.model, data)
        metrics = evaluate(
            model, fresh.batches(arguments.batch_size), config.model, config.training.precision
        ).means()
    print(f"checkpoint: {checkpoint} (step {state['step']}, precision {config.training.precision})")
    print(
        f"fresh set: {arguments.sequences} sequences, seed {arguments.test_seed}, {torch.get_num_threads()} threads"
    )
    for name in sorted(metrics):
        print(f"  {name}: {metrics[name]:.4g}")
    print(f"mse_frame={metrics[VAL_MSE_FRAME]:.2f} ssim={metrics[VAL_SSIM]:.3f}")
    return metrics[VAL_MSE_FRAME], metrics[VAL_SSIM]


if __name__ == "__main__":
    main()
