"""Time full training steps of the project's model against the naive reference.

    python benchmarks/train_step.py --hidden-size 1024 --batch-size 32 --dtype bf16

A training step is forward, backward and optimizer step on one batch of 64x64 Moving MNIST
sequences (10 past + 10 future frames). The two implementations are run on identical
weights and data, interleaved (reference, ours, reference, ours, ...) after a warm-up, and
compared by the median step time. The last line is `speedup=<ratio>`.

FLOPs are counted analytically: the matmuls of the model's maths, the same count for both
implementations so GFLOP/s compare directly (tests/test_benchmarks.py checks the formula
against torch's FlopCounterMode on our model). A matmul of M rows, K inputs, N outputs
costs 2*M*K*N forward, the same again for its weight gradient, and again for its input
gradient where one is needed. Per sequence, with D = C*H*W, G = 4*hidden, L layers and
T_d = max(T_past, T_future) decoder steps:

    recurrent(T)  = T * [2*hidden*G + (L-1) * (2*hidden*G + 2*hidden*G)]     (x3 fwd+bwd)
    encoder       = 2 * T_past * 2*D*G                 (input projection: no input gradient)
                  + 3 * recurrent(T_past)
    each decoder  = 3 * recurrent(T_d) + 3 * T_d * 2*hidden*D              (output head)
                  + free:        3 * (T_d - 1) * 2*D*G  (fed back; the first input is zeros)
                    conditioned: 2 * T_d * 2*D*G        (ground truth: no input gradient)
    step FLOPs    = B * (encoder + decoders run)

On CUDA the benchmark compares like with like and prints the flags that decide it: fp32 is
IEEE fp32 on both sides (PyTorch lets cuDNN, hence the reference's nn.LSTM, use TF32 by
default, but not matmuls), or TF32 on both with `--tf32`. Under bf16 autocast the reference's
cuDNN LSTM computes in fp16 (the line names what it computed in): its speed is an fp16 one.

The machine's matmul peak is measured in the same run (best of a few large square matmuls
in the benchmark's dtype), and the achieved rate is reported as a share of it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reference_model import NaiveCompositeLSTM  # noqa: E402
from lstm_ae.config import ModelConfig, OptimConfig  # noqa: E402
from lstm_ae.engine import make_optimizer  # noqa: E402
from lstm_ae.model import CompositeLSTMAutoencoder  # noqa: E402
from lstm_ae.precision import describe_cpu  # noqa: E402


def step_flops(config: ModelConfig, batch_size: int) -> float:
    """Matmul FLOPs of one training step (forward + backward), per the module docstring."""
    frame, hidden, layers = config.frame_size, config.hidden_size, config.num_layers
    gates = 4 * hidden

    def recurrent(steps: int) -> int:
        return steps * (2 * hidden * gates + (layers - 1) * 4 * hidden * gates)

    encoder = 2 * config.past_length * 2 * frame * gates + 3 * recurrent(config.past_length)
    decoder_steps = max(config.past_length, config.future_length)
    decoder = 3 * recurrent(decoder_steps) + 3 * decoder_steps * 2 * hidden * frame
    if config.decoder_mode == "free":
        decoder += 3 * (decoder_steps - 1) * 2 * frame * gates
    else:
        decoder += 2 * decoder_steps * 2 * frame * gates
    decoders = (config.reconstruction_weight > 0) + (config.reconstruction_weight < 1)
    return batch_size * (encoder + decoders * decoder)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Best achieved GFLOP/s over a few large square matmuls (a size the best rate so far
    predicts to take over 2 s is skipped: the slow bf16 path of a CPU without native bf16)."""
    best = 0.0
    for size in (512, 2048, 4096) if device.type == "cpu" else (4096, 8192):
        flops = 2 * size**3
        if best and flops / (best * 1e9) > 2.0:
            break
        left = torch.randn(size, size, device=device).to(dtype)
        right = torch.randn(size, size, device=device).to(dtype)
        torch.mm(left, right)
        synchronize(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(left, right)
            synchronize(device)
            times.append(time.perf_counter() - start)
            if sum(times) > 2.0:
                break
        best = max(best, flops / min(times) / 1e9)
    return best


def set_fp32_math(tf32: bool) -> None:
    """Like with like on CUDA: fp32 matmuls (ours) and cuDNN's RNNs and convolutions (the
    reference's nn.LSTM) both in IEEE fp32, or both allowed TF32. PyTorch's defaults differ:
    matmuls IEEE, cuDNN TF32."""
    mode = "tf32" if tf32 else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.rnn.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def cuda_numerics(reference: torch.nn.Module | None, past, dtype: str) -> str:
    """The flags that decide what fp32 means on CUDA, and the dtype the reference's cuDNN LSTM
    computes in under this benchmark's autocast (PyTorch's autocast runs it in fp16, not bf16)."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        flags = (
            f"matmul fp32_precision={torch.backends.cuda.matmul.fp32_precision}, "
            f"cudnn rnn fp32_precision={torch.backends.cudnn.rnn.fp32_precision}"
        )
    else:
        flags = (
            f"matmul allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
            f"cudnn allow_tf32={torch.backends.cudnn.allow_tf32}"
        )
    line = (
        f"CUDA numerics: {flags}, cudnn enabled={torch.backends.cudnn.enabled} "
        f"(version {torch.backends.cudnn.version()}), bf16 reduced-precision reduction="
        f"{torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction}"
    )
    if reference is not None:
        lstm = next(module for module in reference.modules() if isinstance(module, torch.nn.LSTM))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            computed = lstm(past[:1].flatten(2).to(lstm.weight_ih_l0.dtype))[0].dtype
        line += f"; reference nn.LSTM computes in {str(computed).replace('torch.', '')} here"
    return line


def make_step(model, optimizer, past, future, dtype: str, device: torch.device):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step() -> float:
        start = time.perf_counter()
        with autocast:
            output = model(past, future)
        loss = output.loss if hasattr(output, "loss") else output[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    return step


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden-size", type=int, default=1024, help="LSTM units per layer")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    parser.add_argument("--num-layers", type=int, default=1, help="stacked LSTM layers")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast matmuls")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    parser.add_argument(
        "--decoder-mode", choices=("free", "conditioned"), default="free", help="decoder input"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each implementation first")
    parser.add_argument("--skip-reference", action="store_true", help="time only the project's model")
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="CUDA fp32: let both implementations' matmuls and cuDNN use TF32 (default: both IEEE fp32)",
    )
    arguments = parser.parse_args(argv)

    device = torch.device(arguments.device)
    if device.type == "cuda":
        set_fp32_math(arguments.tf32)
    config = ModelConfig(
        hidden_size=arguments.hidden_size,
        num_layers=arguments.num_layers,
        decoder_mode=arguments.decoder_mode,
    )
    torch.manual_seed(0)
    ours = CompositeLSTMAutoencoder(config).to(device)
    frames = torch.rand(
        arguments.batch_size, config.sequence_length, 1, config.height, config.width, device=device
    )
    past, future = frames[:, : config.past_length], frames[:, config.past_length :]
    # The suite's optimizer (fused AdamW) for ours; the seed tutorial's plain Adam for the reference.
    steps = {
        "ours": make_step(
            ours, make_optimizer(ours, OptimConfig(), device), past, future, arguments.dtype, device
        )
    }
    if not arguments.skip_reference:
        reference = NaiveCompositeLSTM(config).to(device)
        reference.copy_weights_from(ours)
        reference_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)
        steps = {
            "reference": make_step(reference, reference_optimizer, past, future, arguments.dtype, device),
            **steps,
        }

    print(
        f"model: hidden {config.hidden_size}, layers {config.num_layers}, {config.decoder_mode} decoders, "
        f"batch {arguments.batch_size}, {arguments.dtype} on {device.type}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(describe_cpu() if device.type == "cpu" else f"GPU: {torch.cuda.get_device_name(device)}")
    if device.type == "cuda":
        print(cuda_numerics(reference if not arguments.skip_reference else None, past, arguments.dtype))
    print("ours = lstm_ae.model.CompositeLSTMAutoencoder (hand-written LSTM backward, fused AdamW)")
    print("reference = benchmarks/reference_model.py (nn.LSTM + Linear unrolled per step, Adam)")
    for name, step in list(steps.items()):
        try:
            for _ in range(max(1, arguments.warmup) if name == "reference" else arguments.warmup):
                step()
        except RuntimeError as error:  # oneDNN's bf16 LSTM refuses CPUs without native bf16
            if name != "reference":
                raise
            reason = str(error).strip().splitlines()[0]
            print(f"reference: torch cannot run it in {arguments.dtype} here ({reason}); timing ours alone")
            del steps[name]
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(arguments.repeats):
        for name, step in steps.items():
            times[name].append(step())
        print(
            f"repeat {repeat + 1}: " + ", ".join(f"{name} {times[name][-1]:.3f} s" for name in steps),
            flush=True,
        )

    flops = step_flops(config, arguments.batch_size)
    peak = matmul_peak(torch.bfloat16 if arguments.dtype == "bf16" else torch.float32, device)
    print(
        f"step FLOPs (analytic): {flops / 1e9:.1f} GFLOP; measured {arguments.dtype} matmul peak: {peak:.3g} GFLOP/s"
    )
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        rate = flops / median / 1e9
        print(
            f"{name:>9}: median {median:.3f} s/step, {arguments.batch_size / median:.1f} sequences/s, "
            f"{rate:.0f} GFLOP/s ({100 * rate / peak:.0f}% of peak)"
        )
    if "reference" not in medians:
        return float("nan")
    speedup = medians["reference"] / medians["ours"]
    print(f"speedup={speedup:.2f}")
    return speedup


if __name__ == "__main__":
    main()
