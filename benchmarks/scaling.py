"""When does data parallelism pay off? Bytes all-reduced per step against compute per step.

    python benchmarks/scaling.py [--preset paper] [--achieved-tflops 300] [--bandwidth-gbs 300 25]

Pure arithmetic from the model's config (no timing): the parameter count, the gradient
bytes a DDP step all-reduces (fp32, or bf16 with `--bf16-allreduce`), the matmul FLOPs per
sequence (the formula of benchmarks/train_step.py), and, for each link bandwidth given, the
per-GPU batch above which one step's compute takes longer than its all-reduce. Below that
batch, adding GPUs mostly adds waiting. Ring all-reduce sends and receives 2 * (N - 1) / N
times the gradient bytes per GPU; the figures use the large-N limit, 2x.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_step import step_flops  # noqa: E402
from lstm_ae.config import PRESETS, preset  # noqa: E402
from lstm_ae.model import CompositeLSTMAutoencoder, parameter_count  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="paper", help="model shape")
    parser.add_argument(
        "--achieved-tflops", type=float, default=300.0, help="sustained matmul TFLOP/s per GPU (assumption)"
    )
    parser.add_argument(
        "--bandwidth-gbs",
        type=float,
        nargs="+",
        default=[300.0, 50.0, 12.5],
        help="all-reduce bandwidth per GPU in GB/s (e.g. NVLink, 400 Gb/s, 100 Gb/s networks)",
    )
    arguments = parser.parse_args(argv)

    config = preset(arguments.preset)
    import torch

    with torch.device("meta"):
        parameters = parameter_count(CompositeLSTMAutoencoder(config.model))
    flops_per_sequence = step_flops(config.model, 1)
    figures = {"parameters": parameters, "flops_per_sequence": flops_per_sequence}
    print(
        f"preset {arguments.preset}: hidden {config.model.hidden_size}, {config.model.num_layers} layer(s), "
        f"{config.model.decoder_mode} decoders, {parameters / 1e6:.1f}M parameters"
    )
    print(
        f"compute: {flops_per_sequence / 1e9:.1f} GFLOP per sequence per training step (forward + backward)"
    )
    for precision, width in (("fp32", 4), ("bf16", 2)):
        gradient_bytes = parameters * width
        traffic = 2 * gradient_bytes
        figures[f"allreduce_bytes_{precision}"] = traffic
        print(
            f"all-reduce ({precision} gradients, --bf16-allreduce {'on' if width == 2 else 'off'}): "
            f"{gradient_bytes / 1e9:.2f} GB of gradients, {traffic / 1e9:.2f} GB sent+received per GPU per step"
        )
        for bandwidth in arguments.bandwidth_gbs:
            seconds = traffic / (bandwidth * 1e9)
            break_even = seconds * arguments.achieved_tflops * 1e12 / flops_per_sequence
            figures[f"break_even_{precision}_{bandwidth:g}"] = break_even
            print(
                f"  at {bandwidth:g} GB/s: {seconds * 1e3:.1f} ms per all-reduce; compute matches it at "
                f"{break_even:.0f} sequences per GPU per step ({arguments.achieved_tflops:g} TFLOP/s sustained)"
            )
    print(
        "gradient accumulation over k micro-batches all-reduces once per k: the break-even batch "
        "counts all k micro-batches of a step"
    )
    return figures


if __name__ == "__main__":
    main()
