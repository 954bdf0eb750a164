"""The precision a run trains in: chosen from the hardware's answers and measured rates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lstm_ae import precision
from lstm_ae.config import preset
from lstm_ae.precision import (
    PrecisionChoice,
    agreed,
    choose_precision,
    cpu_native_bf16,
    decide_precision,
    matmul_gflops,
    model_products,
)
from records.layout import HISTORY_FILE
from train.worker import LocalSession, WorkerSettings, loop_config, train_function


def test_a_cpu_without_native_bf16_trains_in_fp32_and_says_why():
    choice = decide_precision("auto", "cpu", native_bf16=False, bf16_gflops=0.4, fp32_gflops=59.0)
    assert choice.precision == "fp32"
    assert choice.line() == (
        "precision: fp32 (auto: this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16); "
        "bf16 0.4 against fp32 59.0 GFLOP/s on the model's kinds of matmul)"
    )


def test_a_cpu_with_native_bf16_that_measures_clearly_faster_trains_in_bf16():
    choice = decide_precision("auto", "cpu", native_bf16=True, bf16_gflops=600.0, fp32_gflops=150.0)
    assert choice.precision == "bf16" and choice.bf16_speedup == 4.0
    assert "native bf16 on this CPU, bf16 600.0 against fp32 150.0 GFLOP/s" in choice.reason


def test_native_bf16_that_is_not_clearly_faster_stays_fp32():
    choice = decide_precision("auto", "cpu", native_bf16=True, bf16_gflops=180.0, fp32_gflops=150.0)
    assert choice.precision == "fp32" and "not clearly faster" in choice.reason


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_a_gpu_follows_its_native_bf16(native, expected):
    assert decide_precision("auto", "cuda", native_bf16=native).precision == expected


def test_a_gpu_that_only_emulates_bf16_resolves_to_fp32(monkeypatch):
    # A T4 or V100: torch answers True for bf16 unless emulation is excluded.
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    choice = choose_precision("auto", torch.device("cuda"), 512, 4096, 32)
    assert asked == [False] and choice.precision == "fp32"
    assert choice.reason == "auto: this GPU has no native bf16 (torch would emulate it)"


def test_explicit_precisions_are_kept_and_a_very_slow_bf16_warns_naming_the_ratio():
    assert decide_precision("fp32", "cpu", True, 600.0, 150.0).precision == "fp32"
    slow = decide_precision("bf16", "cpu", False, bf16_gflops=13.5, fp32_gflops=121.0)
    assert slow.precision == "bf16"
    assert slow.warning == (
        "warning: --precision bf16 runs 9x slower than fp32 on this CPU (bf16 13.5 against fp32 121.0 "
        "GFLOP/s on the model's kinds of matmul); --precision auto would choose fp32"
    )
    assert decide_precision("bf16", "cpu", False, bf16_gflops=40.0, fp32_gflops=121.0).warning is None
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16, got 'fp16'"):
        decide_precision("fp16", "cpu", True)


def test_any_worker_choosing_fp32_makes_every_worker_fp32():
    fast = decide_precision("auto", "cpu", True, 600.0, 150.0)
    assert agreed(fast, everyone_can_bf16=True) == fast
    slowest = agreed(fast, everyone_can_bf16=False)
    assert slowest.precision == "fp32" and "slowest rank decides" in slowest.reason
    assert slowest.bf16_gflops == 600.0  # this worker's own measurement stays on record


@pytest.mark.parametrize(
    "capabilities, native",
    [({"avx2": True}, False), ({"avx512_bf16": True}, True), ({"amx_bf16": True}, True), ({}, False)],
)
def test_native_bf16_on_a_cpu_is_avx512_bf16_or_amx(capabilities, native):
    assert cpu_native_bf16(capabilities) is native


def test_the_choice_on_this_cpu_follows_its_facts():
    choice = choose_precision("auto", torch.device("cpu"), 64, 4096, 4)
    assert choice.bf16_gflops > 0 and choice.fp32_gflops > 0
    if not cpu_native_bf16():
        assert choice.precision == "fp32"
    else:
        assert choice.precision == ("bf16" if choice.bf16_speedup >= precision.CLEARLY_FASTER else "fp32")


def test_every_timed_product_runs_in_both_dtypes():
    products = model_products(hidden_size=8, frame_size=16, batch_rows=2)
    assert [kind for *_, kind in products] == ["forward", "backward", "weight", "forward", "backward"]
    for dtype in (torch.float32, torch.bfloat16):
        assert matmul_gflops(products, dtype, torch.device("cpu")) > 0


@pytest.mark.slow
def test_a_run_records_its_resolved_precision_and_a_resume_keeps_it(tmp_path, capsys):
    config = preset(
        "smoke",
        hidden_size=16,
        cache_dir=str(tmp_path / "data"),
        max_steps=3,
        checkpoint_every=3,
        eval_every=3,
    )
    session = LocalSession()
    state = train_function(loop_config(config, WorkerSettings()), session)
    assert state.precision in ("fp32", "bf16") and state.precision_choice["precision"] == state.precision
    assert f"precision: {state.precision} (auto: " in capsys.readouterr().out
    # Pretend the run started on other hardware: its checkpoint says the other precision.
    other = "fp32" if state.precision == "bf16" else "bf16"
    history = Path(session.checkpoints[-1]) / HISTORY_FILE
    saved = json.loads(history.read_text())
    history.write_text(json.dumps({**saved, "precision": other}))
    resumed = train_function(loop_config(config.replace(max_steps=6), WorkerSettings()), session)
    assert resumed.step == 6 and resumed.precision == other
    assert f"precision: {other} (kept from the run's start)" in capsys.readouterr().out
    checkpoint = torch.load(Path(session.checkpoints[-1]) / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["training"]["precision"] == other


def test_precision_choice_round_trips_through_its_dictionary():
    choice = decide_precision("auto", "cpu", True, 600.0, 150.0)
    assert PrecisionChoice(**choice.to_dict()) == choice
