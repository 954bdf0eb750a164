"""How much of the training stream's drawing time the prefetching thread hides behind the step.

    python benchmarks/prefetch.py [--hidden-size 512] [--batch-size 32] [--dtype fp32] [--pairs 12]
    python benchmarks/prefetch.py --device cuda --hidden-size 2048 --num-layers 2 \
        --decoder-mode conditioned --head logistic --batch-size 128 --dtype bf16   # paper shape

Paired A/B on the same model, alternating step by step: A draws the batch in series and then
trains on it (the loop before prefetching: `GeneratedSequences.batch`, then `train_step`);
B takes the batch from `lstm_ae.data.PrefetchedBatches` (drawn on a background thread while
the previous step trained) and trains on it. Also timed alone: the drawing of a batch (g).
The figures are medians over pairs:

    hidden = (A - B) / g       share of the drawing time that no longer adds to the step
    B / A                      step time with prefetching against drawing in series

On a CPU machine the thread competes with the step's own threads for the cores, so less
than all of g is hidden. On a GPU the step runs on the device and the host's cores are free:
the batch of the paper preset (128 sequences, 10.5 MB of uint8, a quarter of the float32
bytes) takes about 39 ms to draw at 3,300 sequences/s on 2 cores, longer than the
5-20 ms estimated for the step on an H200, so in series the GPU would idle for most of each
step; ahead, the drawing overlaps the step and the copy is a non-blocking one from
page-locked memory (about 0.2 ms at 50 GB/s), and what remains is max(0, g - step) per step.
The last line is `hidden=<share>`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstm_ae.config import DataConfig, ModelConfig, OptimConfig  # noqa: E402
from lstm_ae.data import BouncingDigits, GeneratedSequences, PrefetchedBatches  # noqa: E402
from lstm_ae.engine import make_optimizer, make_scheduler, train_step  # noqa: E402
from lstm_ae.model import CompositeLSTMAutoencoder  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden-size", type=int, default=512, help="LSTM units (the cpu preset's 512)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step (the cpu preset's 32)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="training step precision")
    parser.add_argument("--num-layers", type=int, default=1, help="stacked LSTM layers")
    parser.add_argument(
        "--decoder-mode", choices=("free", "conditioned"), default="free", help="decoder input"
    )
    parser.add_argument("--head", choices=("linear", "logistic"), default="linear", help="output head")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the step runs")
    parser.add_argument("--pairs", type=int, default=12, help="timed (serial, prefetched) pairs")
    parser.add_argument("--warmup", type=int, default=2, help="untimed pairs first")
    arguments = parser.parse_args(argv)

    config = ModelConfig(
        hidden_size=arguments.hidden_size,
        num_layers=arguments.num_layers,
        decoder_mode=arguments.decoder_mode,
        head=arguments.head,
    )
    device = torch.device(arguments.device)
    stream = GeneratedSequences(
        BouncingDigits.from_config(config, DataConfig(), "train"), arguments.batch_size, 0
    )
    torch.manual_seed(0)
    model = CompositeLSTMAutoencoder(config).to(device)
    optimizer = make_optimizer(model, OptimConfig(), device)
    scheduler = make_scheduler(optimizer, OptimConfig(), 10**6)

    def train(frames: torch.Tensor, step: int) -> None:
        """The worker's step: uint8 (prefetched) or float (in series) frames, copied and trained on."""
        train_step(model, optimizer, scheduler, [frames], config, arguments.dtype, 1e4, step)
        if device.type == "cuda":
            torch.cuda.synchronize()

    draw_times, serial_times, prefetched_times = [], [], []
    step = 0
    # B's batches come from their own steps of the stream (a million on), drawn one ahead.
    pin = device.type == "cuda"  # as the worker does: page-locked batches, non-blocking copies
    with PrefetchedBatches(stream, start_step=10**6, depth=1, pin_memory=pin) as prefetched:
        for pair in range(arguments.warmup + arguments.pairs):
            start = time.perf_counter()
            frames = stream.batch(step)[0]  # A: drawn in series, then trained on
            drawn = time.perf_counter()
            train(frames, step)
            finished = time.perf_counter()
            train(next(prefetched), step + 1)  # B: drawn while the previous step trained
            prefetched_time = time.perf_counter() - finished
            step += 2
            if pair >= arguments.warmup:
                draw_times.append(drawn - start)
                serial_times.append(finished - start)
                prefetched_times.append(prefetched_time)

    draw = statistics.median(draw_times)
    serial, ahead = statistics.median(serial_times), statistics.median(prefetched_times)
    ratio = statistics.median(b / a for a, b in zip(serial_times, prefetched_times))
    hidden = statistics.median((a - b) / draw for a, b in zip(serial_times, prefetched_times))
    print(
        f"hidden {arguments.hidden_size}, {arguments.num_layers} layer(s), {arguments.decoder_mode} decoders, "
        f"batch {arguments.batch_size}, {arguments.dtype} on {device.type}, "
        f"{torch.get_num_threads()} threads, {arguments.pairs} pairs"
    )
    print(
        f"drawing a batch (in series): median {1000 * draw:.1f} ms ({arguments.batch_size / draw:.0f} sequences/s)"
    )
    print(f"step with drawing in series: median {1000 * serial:.1f} ms")
    print(f"step with prefetching:       median {1000 * ahead:.1f} ms (prefetched/serial = {ratio:.3f})")
    print(f"hidden={hidden:.2f}")
    return hidden


if __name__ == "__main__":
    main()
