"""Paired A/B of two versions of lstm_ae/recurrence.py: this tree's against a git revision's.

    python benchmarks/recurrence_ab.py --base aa1b410 --dtype bf16 --repeats 9

Both versions train the same model and optimizer, alternating step by step (base, ours,
base, ours, ...) so that drifts in the machine's speed hit both alike; the figure is the
median of the per-pair ratios ours/base (below 1: ours is faster). Default shape: the
hidden 1024, batch 32 step of benchmarks/train_step.py.

Each version runs as the model's kernel set (`model.kernels`): its `FusedKernels`, or for a
revision whose module offers only the functions `project`, `lstm_layer` and
`free_running_decoder`, those functions.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lstm_ae.recurrence as ours  # noqa: E402
from lstm_ae.config import ModelConfig, OptimConfig  # noqa: E402
from lstm_ae.engine import make_optimizer  # noqa: E402
from lstm_ae.model import CompositeLSTMAutoencoder  # noqa: E402


class ModuleFunctions:
    """A kernel set made of a recurrence module's three functions (revisions without `FusedKernels`)."""

    def __init__(self, module):
        self.project = module.project
        self.lstm_layer = module.lstm_layer
        self.free_running_decoder = module.free_running_decoder


def kernels_of(module):
    """The kernel set a version of lstm_ae/recurrence.py gives the model."""
    return module.FusedKernels() if hasattr(module, "FusedKernels") else ModuleFunctions(module)


def load_revision(revision: str):
    """lstm_ae/recurrence.py as it was at `revision`, imported under another name."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:lstm_ae/recurrence.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="recurrence_ab_")) / "recurrence_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("recurrence_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9, help="timed pairs")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each version first")
    arguments = parser.parse_args(argv)
    versions = {"base": kernels_of(load_revision(arguments.base)), "ours": kernels_of(ours)}
    config = ModelConfig(hidden_size=arguments.hidden_size)
    torch.manual_seed(0)
    model = CompositeLSTMAutoencoder(config)
    optimizer = make_optimizer(model, OptimConfig(), torch.device("cpu"))
    frames = torch.rand(arguments.batch_size, config.sequence_length, 1, config.height, config.width)
    past, future = frames[:, : config.past_length], frames[:, config.past_length :]

    def step(kernels) -> float:
        model.kernels = kernels
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=arguments.dtype == "bf16"):
            loss = model(past, future).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for version in versions.values():
        for _ in range(arguments.warmup):
            step(version)
    times = {name: [] for name in versions}
    for repeat in range(arguments.repeats):
        # Alternate which version runs first, so that neither always follows the other's caches.
        order = list(versions.items()) if repeat % 2 == 0 else list(versions.items())[::-1]
        for name, version in order:
            times[name].append(step(version))
        print(
            f"pair {repeat + 1}: base {times['base'][-1]:.3f} s, ours {times['ours'][-1]:.3f} s", flush=True
        )
    ratio = statistics.median(o / b for o, b in zip(times["ours"], times["base"]))
    print(
        f"hidden {arguments.hidden_size}, batch {arguments.batch_size}, {arguments.dtype}, "
        f"{torch.get_num_threads()} threads, base {arguments.base}: ours/base step time={ratio:.3f}"
    )
    return ratio


if __name__ == "__main__":
    main()
