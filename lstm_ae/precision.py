"""Which precision a run trains in: decided by the hardware the code finds, by measurement.

bf16 pays only where the hardware computes it natively. On CUDA that is what
`torch.cuda.is_bf16_supported(including_emulation=False)` answers (T4 and V100 emulate it). On
a CPU, torch reports native bf16 as `avx512_bf16` or `amx_bf16` in
`torch.cpu.get_capabilities()`; without them (AVX2-only CPUs: AMD EPYC before Zen 4, Intel
before Cooper Lake) a bf16 matmul falls back to a generic kernel about 100x slower than fp32.
Native support is necessary but not enough, so on a CPU a sub-second timing of the model's own
per-step matmul shapes decides: bf16 only where it is clearly faster than fp32.

`choose_precision` gathers the facts and calls `decide_precision`, which is pure (its inputs
are the device's answers) so that every branch is tested without the hardware.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

# bf16 must beat fp32 by this factor on the model's shapes to be chosen: the rest of the step
# (casts, gate math, optimizer) does not speed up, so a small matmul gain does not pay.
CLEARLY_FASTER = 1.3
# An explicit --precision bf16 this many times slower than fp32 still runs, with a warning.
WARN_SLOWDOWN = 5.0
# A first timing at a small shape: bf16 below this share of fp32 is decided without timing
# the model's shapes (on a slow path they could take seconds each).
PILOT_SIZE = (128, 512, 16)  # hidden, frame, rows
PILOT_CUTOFF = 0.5
SECONDS_PER_TIMING = 0.02


@dataclass(frozen=True)
class PrecisionChoice:
    """The resolved precision ('fp32' or 'bf16'), the one-line reason, and the facts behind it."""

    precision: str
    reason: str
    requested: str = "auto"
    native_bf16: bool | None = None
    bf16_gflops: float | None = None
    fp32_gflops: float | None = None
    warning: str | None = None

    @property
    def bf16_speedup(self) -> float | None:
        """bf16's matmul rate over fp32's (None where not measured)."""
        if not self.bf16_gflops or not self.fp32_gflops:
            return None
        return self.bf16_gflops / self.fp32_gflops

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """What the run prints at its start."""
        return f"precision: {self.precision} ({self.reason})"


def cpu_capabilities() -> dict[str, Any]:
    """torch's reading of the CPU (cpuinfo; instruction-set caps in the environment do not
    change it), empty where this torch cannot say."""
    return torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}


def cpu_native_bf16(capabilities: dict[str, Any] | None = None) -> bool:
    """True where the CPU computes bf16 natively (AVX512_BF16 or AMX), as torch reports it."""
    if capabilities is None:
        capabilities = cpu_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def cuda_native_bf16() -> bool:
    """True where the current CUDA device computes bf16 natively (Ampere and newer)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 has no including_emulation: its answer is the native one
        return bool(torch.cuda.is_bf16_supported())


def model_products(
    hidden_size: int, frame_size: int, batch_rows: int, steps: int = 10
) -> list[tuple[int, int, int, str]]:
    """The model's per-step matmuls as (out, inner, rows, kind), in the orientations
    lstm_ae/recurrence.py runs them (the fast and slow bf16 kernels differ by orientation):
    'forward' W (out x inner) @ x^T, 'backward' dY (rows x out) @ W, 'weight' dY^T @ x over
    `steps` x rows rows. For the recurrent gates (out 4H) and the frame head (out = frame)."""
    gates, rows = 4 * hidden_size, batch_rows
    return [
        (gates, hidden_size, rows, "forward"),
        (gates, hidden_size, rows, "backward"),
        (gates, hidden_size, steps * rows, "weight"),
        (frame_size, hidden_size, rows, "forward"),
        (frame_size, hidden_size, rows, "backward"),
    ]


def _operands(out: int, inner: int, rows: int, kind: str, dtype: torch.dtype, device: torch.device):
    def random(*shape):
        return torch.randn(1, *shape, device=device).to(dtype)

    if kind == "forward":  # (W @ x^T): x is a transposed view, as in recurrence._Matmul.forward
        return random(out, inner), random(rows, inner).transpose(1, 2)
    if kind == "backward":
        return random(rows, out), random(out, inner)
    return random(rows, out).transpose(1, 2), random(rows, inner)  # weight gradient


def matmul_gflops(
    products: list[tuple[int, int, int, str]], dtype: torch.dtype, device: torch.device
) -> float:
    """Achieved GFLOP/s over `products` (see model_products): each product is timed call by
    call for about SECONDS_PER_TIMING (at least 3 calls) after one untimed run, and its fastest
    call counts, on one thread. Other work on the machine only ever slows a call down, so the
    fastest call is what the hardware does, and a busy machine cannot flip the choice."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a core busy with other work cannot stall the timing
    try:
        return _fastest_gflops(products, dtype, device)
    finally:
        torch.set_num_threads(threads)


def _fastest_gflops(products, dtype: torch.dtype, device: torch.device) -> float:
    flops = seconds = 0.0
    for out, inner, rows, kind in products:
        left, right = _operands(out, inner, rows, kind, dtype, device)
        torch.bmm(left, right)  # warm-up: first-call dispatch, kernel selection
        _synchronize(device)
        fastest, calls, start = math.inf, 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - start < SECONDS_PER_TIMING:
            call_start = time.perf_counter()
            torch.bmm(left, right)
            _synchronize(device)
            fastest = min(fastest, time.perf_counter() - call_start)
            calls += 1
        flops += 2.0 * out * inner * rows
        seconds += fastest
    return flops / seconds / 1e9


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bf16_against_fp32(
    products: list[tuple[int, int, int, str]], device: torch.device
) -> tuple[float, float]:
    """(bf16 GFLOP/s, fp32 GFLOP/s) on the model's products, unless the same products at a
    small pilot size already find bf16 far slower (then those rates: a slow path never costs
    seconds here)."""
    bf16, fp32 = bf16_and_fp32_gflops(model_products(*PILOT_SIZE), device)
    if bf16 < PILOT_CUTOFF * fp32:
        return bf16, fp32
    return bf16_and_fp32_gflops(products, device)


def bf16_and_fp32_gflops(
    products: list[tuple[int, int, int, str]], device: torch.device
) -> tuple[float, float]:
    return matmul_gflops(products, torch.bfloat16, device), matmul_gflops(products, torch.float32, device)


def decide_precision(
    requested: str,
    device_type: str,
    native_bf16: bool | None,
    bf16_gflops: float | None = None,
    fp32_gflops: float | None = None,
) -> PrecisionChoice:
    """The precision to train in, from the device's answers (pure: no hardware is touched).

    'fp32' and 'bf16' are kept as asked ('bf16' with a warning where it measured
    WARN_SLOWDOWN x slower or worse); 'auto' is bf16 only on native hardware and, on a CPU,
    only where bf16 measured at least CLEARLY_FASTER x the fp32 rate.
    """
    facts = dict(
        requested=requested, native_bf16=native_bf16, bf16_gflops=bf16_gflops, fp32_gflops=fp32_gflops
    )
    measured = (
        f"bf16 {bf16_gflops:.1f} against fp32 {fp32_gflops:.1f} GFLOP/s on the model's kinds of matmul"
        if bf16_gflops and fp32_gflops
        else None
    )
    if requested == "fp32":
        return PrecisionChoice("fp32", "as asked", **facts)
    if requested == "bf16":
        warning = None
        if bf16_gflops and fp32_gflops and fp32_gflops >= WARN_SLOWDOWN * bf16_gflops:
            warning = (
                f"warning: --precision bf16 runs {fp32_gflops / bf16_gflops:.0f}x slower than fp32 on this "
                f"{device_type.upper()} ({measured}); --precision auto would choose fp32"
            )
        return PrecisionChoice(
            "bf16", "as asked" + (f"; {measured}" if measured else ""), warning=warning, **facts
        )
    if requested != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {requested!r}")
    if device_type == "cuda":
        if native_bf16:
            return PrecisionChoice("bf16", "auto: this GPU computes bf16 natively", **facts)
        return PrecisionChoice("fp32", "auto: this GPU has no native bf16 (torch would emulate it)", **facts)
    if device_type != "cpu":
        return PrecisionChoice("fp32", f"auto: bf16 is not chosen on {device_type}", **facts)
    if not native_bf16:
        reason = "auto: this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16)"
        return PrecisionChoice("fp32", reason + (f"; {measured}" if measured else ""), **facts)
    if measured is None:
        return PrecisionChoice("fp32", "auto: bf16 not measured on this CPU", **facts)
    if bf16_gflops >= CLEARLY_FASTER * fp32_gflops:
        return PrecisionChoice("bf16", f"auto: native bf16 on this CPU, {measured}", **facts)
    return PrecisionChoice(
        "fp32", f"auto: native bf16 on this CPU, but not clearly faster ({measured})", **facts
    )


def choose_precision(
    requested: str, device: torch.device, hidden_size: int, frame_size: int, batch_rows: int
) -> PrecisionChoice:
    """Resolve `requested` ('auto', 'fp32' or 'bf16') on `device`, timing the model's shapes on
    a CPU where it matters (under a second)."""
    device = torch.device(device)
    if requested == "fp32":
        return decide_precision(requested, device.type, None)
    if device.type == "cuda":
        return decide_precision(requested, "cuda", cuda_native_bf16())
    if device.type != "cpu":
        return decide_precision(requested, device.type, None)
    native = cpu_native_bf16()
    products = model_products(hidden_size, frame_size, max(1, batch_rows))
    bf16, fp32 = measure_bf16_against_fp32(products, device)
    return decide_precision(requested, "cpu", native, bf16, fp32)


def agreed(choice: PrecisionChoice, everyone_can_bf16: bool) -> PrecisionChoice:
    """`choice` after the ranks compared: where any rank chose fp32, every rank trains in fp32
    (the slowest rank sets the pace of a data-parallel step)."""
    if choice.precision == "fp32" or everyone_can_bf16:
        return choice
    reason = "another worker of this run chose fp32 (the slowest rank decides)"
    return PrecisionChoice(**{**choice.to_dict(), "precision": "fp32", "reason": reason, "warning": None})


def describe_cpu() -> str:
    """One line on what this CPU offers torch: its name, ATen's vector level and native bf16."""
    capabilities = cpu_capabilities()
    if capabilities.get("amx_bf16"):
        bf16 = "native bf16 (AMX)"
    elif capabilities.get("avx512_bf16"):
        bf16 = "native bf16 (AVX512_BF16)"
    else:
        bf16 = "no native bf16"
    name = capabilities.get("cpu_name") or "unknown"
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"CPU: {name}, ATen {torch.backends.cpu.get_cpu_capability()}, {bf16}" + (
        f" (oneDNN capped at {capped} by ONEDNN_MAX_CPU_ISA)" if capped else ""
    )


def bf16_support(device: torch.device | str = "cpu") -> str:
    """What `python -m train.doctor` shows: 'native', 'emulated' or 'none', with bf16's
    measured matmul rate as a multiple of fp32's (on a CPU, at the pilot size)."""
    device = torch.device(device)
    if device.type == "cuda":
        if cuda_native_bf16():
            return "native"
        return "emulated" if torch.cuda.is_bf16_supported() else "none"
    bf16, fp32 = bf16_and_fp32_gflops(model_products(*PILOT_SIZE), device)
    ratio = f"{bf16 / fp32:.2g}x fp32"
    if cpu_native_bf16() and bf16 < PILOT_CUTOFF * fp32:  # e.g. oneDNN capped by ONEDNN_MAX_CPU_ISA
        return f"native in the CPU, unused by torch here ({ratio})"
    if cpu_native_bf16():
        return f"native ({ratio})"
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # oneDNN emulates bf16 on AVX-512 without AVX512_BF16
        return f"emulated ({ratio})"
    return f"none ({ratio})"
