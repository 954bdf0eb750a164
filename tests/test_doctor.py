"""The preflight command on this machine (no Ray), and the GPU check a worker runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lstm_ae.hardware import gpu_problem
from train.doctor import COLUMNS, pinned_ray_version, problems


def doctor(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train.doctor", *flags], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_the_doctor_prints_this_machine_and_checks_the_output_dir(tmp_path):
    completed = doctor("--output-dir", str(tmp_path / "runs"))
    assert completed.returncode == 0, completed.stderr
    header, _, row = completed.stdout.splitlines()[:3]
    assert header == "| " + " | ".join(COLUMNS) + " |"
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[COLUMNS.index("torch")] == torch.__version__
    assert cells[COLUMNS.index("Ray")] == pinned_ray_version() == "2.60.0"
    assert cells[COLUMNS.index("output dir")] == "ok"
    assert list((tmp_path / "runs").iterdir()) == []  # the probe file is removed again
    bf16 = cells[COLUMNS.index("bf16")]
    assert re.fullmatch(
        r"(native|emulated|none|native in the CPU, unused by torch here) \([\d.e+-]+x fp32\)", bf16
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU node's bf16 column")
def test_the_doctor_names_the_slow_bf16_path_of_a_cpu_capped_at_avx2():
    # Capped at AVX2, a CPU's bf16 matmuls take the generic slow path (docs/scaling.md).
    environment = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    completed = subprocess.run(
        [sys.executable, "-m", "train.doctor"], capture_output=True, text=True, timeout=120, env=environment
    )
    row = completed.stdout.splitlines()[2]
    cell = [cell.strip() for cell in row.strip("|").split("|")][COLUMNS.index("bf16")]
    kind, ratio = re.fullmatch(r"(.+) \(([\d.e+-]+)x fp32\)", cell).groups()
    assert float(ratio) < 0.5
    assert kind in ("native in the CPU, unused by torch here", "emulated", "none")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_use_gpu_without_a_gpu_fails_with_one_line():
    completed = doctor("--use-gpu")
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        "error: --use-gpu, but no node has a GPU and no node type that could be launched has one"
    ]


@pytest.mark.slow
def test_an_output_dir_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    completed = doctor("--output-dir", str(blocker / "runs"))
    assert completed.returncode == 1
    assert completed.stderr.startswith("error: node ") and "cannot use the output dir" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_cpu_only_torch_on_a_gpu_node_is_named_with_its_build_and_driver():
    fake_torch = SimpleNamespace(
        __version__="2.14.1+cpu",
        version=SimpleNamespace(cuda=None),
        cuda=SimpleNamespace(is_available=lambda: False),
    )
    message = gpu_problem(fake_torch)
    assert "torch 2.14.1+cpu (a CPU-only build) cannot use a GPU" in message and message.startswith("node ")
    rows = [
        {
            "node": "gpu-1",
            "Ray": "2.60.0",
            "output dir": "ok",
            "GPUs": 0,
            "GPUs (Ray)": 1,
            "gpu_problem": message,
        }
    ]
    assert problems(rows, use_gpu=True, unlaunched=[]) == [message]
    assert problems(rows, use_gpu=False, unlaunched=[]) == []
    assert problems([{**rows[0], "Ray": "2.59.0"}], use_gpu=False, unlaunched=[]) == [
        "node gpu-1 runs Ray 2.59.0, the project pins 2.60.0"
    ]
