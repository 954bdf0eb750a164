"""Time the linear digit probe on one checkpoint and print its scores.

    python benchmarks/linear_probe_timing.py runs/my-run/checkpoint_00000900 --sequences 2000
    git show REV:lstm_ae/linear_probe.py > /tmp/old_probe.py
    python benchmarks/linear_probe_timing.py CHECKPOINT --implementation /tmp/old_probe.py   # another version

Runs what training runs at its end (`probe_with_baseline`: the trained encoder and an
untrained one of the same shape) and the shuffled-label control, and prints the trained
accuracy, the untrained baseline, chance, the shuffled-label accuracy and the seconds each
took (wall clock; `cpu_seconds` sum all the process's threads). `fit_seconds` time the
classifier alone: the trained encoder's features are computed once and handed to `probe`
again, so two implementations are compared on the part that differs. `--implementation` loads a probe module from a file (an older version, say); it
must offer `encoder_features`, `probe` and `probe_with_baseline` as lstm_ae/linear_probe.py does.
The last line is `seconds=<end-to-end seconds of probe_with_baseline>`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstm_ae.checkpoint import load_model  # noqa: E402


def load_implementation(path: Path | None) -> ModuleType:
    """lstm_ae.linear_probe, or the probe module in the file `path`."""
    if path is None:
        import lstm_ae.linear_probe

        return lstm_ae.linear_probe
    specification = importlib.util.spec_from_file_location("probe_under_test", path)
    module = importlib.util.module_from_spec(specification)
    sys.modules[specification.name] = module  # dataclasses look their module up there
    specification.loader.exec_module(module)
    return module


def time_fit_only(implementation: ModuleType, model, config, sequences: int) -> tuple[float, float, float]:
    """(accuracy, wall seconds, CPU seconds) of `probe` with the encoder features computed
    beforehand."""
    computed = {}
    original = implementation.encoder_features

    def cached_features(model, config, split, count, seed):
        key = (split, count, seed)
        if key not in computed:
            computed[key] = original(model, config, split, count, seed)
        return computed[key]

    implementation.encoder_features = cached_features
    try:
        implementation.probe(model, config, sequences)  # fills the cache
        start, cpu_start = time.perf_counter(), time.process_time()
        result = implementation.probe(model, config, sequences)
        return result.accuracy, time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        implementation.encoder_features = original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder or file")
    parser.add_argument(
        "--sequences", type=int, default=2000, help="training sequences (half as many held out)"
    )
    parser.add_argument(
        "--implementation",
        type=Path,
        default=None,
        help="probe module file (default: lstm_ae/linear_probe.py)",
    )
    parser.add_argument("--cache-dir", default=None, help="where the digit data are cached")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    implementation = load_implementation(arguments.implementation)
    model, config, _ = load_model(arguments.checkpoint)
    if arguments.cache_dir:
        config = config.replace(cache_dir=arguments.cache_dir)

    start, cpu_start = time.perf_counter(), time.process_time()
    scores = implementation.probe_with_baseline(model, config, arguments.sequences)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    start = time.perf_counter()
    shuffled = implementation.probe(model, config, arguments.sequences, shuffle_labels=True)
    shuffled_seconds = time.perf_counter() - start
    _, fit_seconds, fit_cpu_seconds = time_fit_only(implementation, model, config, arguments.sequences)
    report = {
        "implementation": str(arguments.implementation or "lstm_ae/linear_probe.py"),
        "sequences": arguments.sequences,
        "feature_size": config.model.hidden_size * config.model.num_layers * 2,
        **scores,
        "probe_accuracy_shuffled_labels": shuffled.accuracy,
        "probe_with_baseline_seconds": round(seconds, 2),
        "probe_with_baseline_cpu_seconds": round(cpu_seconds, 2),
        "shuffled_labels_seconds": round(shuffled_seconds, 2),
        "fit_seconds": round(fit_seconds, 2),
        "fit_cpu_seconds": round(fit_cpu_seconds, 2),
    }
    print(json.dumps(report, indent=2))
    print(f"seconds={seconds:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
