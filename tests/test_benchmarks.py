"""The benchmarks run and count FLOPs right (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import data as data_benchmark
from benchmarks import gpu_check, train_step
from benchmarks import prefetch as prefetch_benchmark
from lstm_ae.config import ModelConfig
from lstm_ae.model import CompositeLSTMAutoencoder


def _in_place_matmul_flops(self_shape, left_shape, right_shape, *args, out_shape=None, **kwargs) -> int:
    """2*M*K*N per batch entry, as torch counts `baddbmm` / `addmm` (the addend is free)."""
    *batch, rows, inner = left_shape
    return 2 * (batch[0] if batch else 1) * rows * inner * right_shape[-1]


# FlopCounterMode looks formulas up by overload packet, and an in-place op is a packet of its
# own (`aten.baddbmm_`, not `aten.baddbmm`) that torch registers no formula for: without these,
# the recurrence's in-place fused products (`Tensor.baddbmm_`) would count zero FLOPs.
# (`out=` variants are overloads of the registered packets and are counted already.)
IN_PLACE_MATMULS = {
    torch.ops.aten.baddbmm_: _in_place_matmul_flops,
    torch.ops.aten.addmm_: _in_place_matmul_flops,
}


@pytest.mark.slow
@pytest.mark.parametrize("decoder_mode", ["free", "conditioned"])
@pytest.mark.parametrize("layers, weight", [(1, 0.5), (2, 0.5), (2, 1.0), (1, 0.0)])
def test_analytic_flops_match_the_flop_counter(decoder_mode, layers, weight):
    config = ModelConfig(
        hidden_size=8,
        num_layers=layers,
        height=4,
        width=6,
        past_length=4,
        future_length=4,
        decoder_mode=decoder_mode,
        reconstruction_weight=weight,
    )
    model = CompositeLSTMAutoencoder(config)
    frames = torch.rand(5, 8, 1, 4, 6)
    with FlopCounterMode(display=False, custom_mapping=IN_PLACE_MATMULS) as counter:
        model(frames[:, :4], frames[:, 4:]).loss.backward()
    assert train_step.step_flops(config, 5) == counter.get_total_flops()


@pytest.mark.slow
def test_train_step_benchmark_runs_and_reports_a_speedup(capsys):
    speedup = train_step.main(["--hidden-size", "16", "--batch-size", "2", "--repeats", "1", "--warmup", "0"])
    output = capsys.readouterr().out
    assert output.strip().splitlines()[-1] == f"speedup={speedup:.2f}"
    assert "GFLOP/s" in output and "% of peak" in output


def test_data_benchmark_runs_and_reports_a_ratio(capsys):
    ratio = data_benchmark.main(
        ["--batch-size", "4", "--hidden-size", "16", "--batches", "2", "--steps", "1"]
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"ratio={ratio:.1f}"


def test_prefetch_benchmark_runs_and_reports_the_hidden_share(capsys):
    hidden = prefetch_benchmark.main(
        ["--batch-size", "2", "--hidden-size", "16", "--pairs", "2", "--warmup", "0"]
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"hidden={hidden:.2f}"


@pytest.mark.slow
def test_train_step_benchmark_names_the_cpu_and_times_ours_where_the_reference_cannot_run():
    # oneDNN and ATen capped at AVX2: the slow bf16 path of CPUs without native bf16, where
    # oneDNN's bf16 LSTM (the reference) refuses to run.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    command = [
        sys.executable,
        "benchmarks/train_step.py",
        "--hidden-size",
        "16",
        "--batch-size",
        "2",
        "--dtype",
        "bf16",
        "--repeats",
        "1",
        "--warmup",
        "0",
    ]
    completed = subprocess.run(
        command, cwd=root, env=environment, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = completed.stdout.splitlines()
    assert any(line.startswith("CPU: ") and "ATen AVX2" in line for line in lines)
    assert any(line.strip().startswith("ours: median") for line in lines)
    cannot = [line for line in lines if line.startswith("reference: torch cannot run it in bf16 here")]
    assert cannot or lines[-1].startswith("speedup=")
    assert "Traceback" not in completed.stderr


REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu_reports_every_stage_in_its_output_folder(tmp_path):
    """The GPU check as a GPU machine runs it (the shell wrapper, a folder to bring back), on the
    CPU: every stage leaves its figures or its reason in the summary and the log."""
    output = tmp_path / "out"
    completed = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(output), "--tests", "rendered or (fp32 and linear)"],
        cwd=REPOSITORY,
        env={**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-2000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["passed"]
    figures = {f"{stage}: {figure}": value for stage, figure, value in summary["rows"]}
    assert figures["tests: test_batches_rendered_on_the_gpu_are_the_cpus_bits"] == "passed"
    assert figures["tests: total"] == "2 passed"
    assert float(figures["renderer: rendered on cpu sequences/s"]) > 0
    for batch_size in gpu_check.Shape.for_device("cpu").batch_sizes:
        assert float(figures[f"step: batch {batch_size}: sequences/s"]) > 0
    assert float(figures["profile: matmul ms"]) > 0 and int(figures["profile: operators per step (CPU)"]) > 0
    assert figures["graph: skipped"] == "CUDA graphs need a CUDA device"
    log = (output / "gpu_check.log").read_text()
    # The log holds what stdout showed, the summary's last line included.
    assert log.strip().splitlines()[-1] == completed.stdout.strip().splitlines()[-1]
    for stage in ("test test_batches_rendered_on_the_gpu_are_the_cpus_bits", *gpu_check.STAGES):
        assert f"== {stage} (limit" in log
    assert (output / "summary.md").read_text().startswith("| stage: figure")


@pytest.mark.slow
def test_gpu_check_ends_a_hung_stage_at_its_limit_and_names_it(tmp_path):
    check = gpu_check.Check(tmp_path, "cpu", budget_seconds=60)
    hung = [
        sys.executable,
        "-c",
        "import subprocess, sys, time; print('started', flush=True); time.sleep(60)",
    ]
    code, lines = check.run("a stage that hangs", hung, limit=3)
    assert code is None and lines == ["started"]
    assert (tmp_path / "gpu_check.log").read_text().splitlines() == [
        "== a stage that hangs (limit 3 s)",
        "   started",
    ]


def test_gpu_check_needs_an_output_folder():
    completed = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=REPOSITORY, capture_output=True, text=True
    )
    assert completed.returncode == 2 and "usage: benchmarks/gpu_check.sh OUTPUT_DIR" in completed.stderr


def test_busy_time_counts_overlapping_kernels_once():
    assert gpu_check.busy_microseconds([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
