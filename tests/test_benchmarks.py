"""The benchmarks run and count FLOPs right (no timing is asserted)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import data as data_benchmark
from benchmarks import train_step
from lstm_ae.config import ModelConfig
from lstm_ae.model import CompositeLSTMAutoencoder


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
    with FlopCounterMode(display=False) as counter:
        model(frames[:, :4], frames[:, 4:]).loss.backward()
    assert train_step.step_flops(config, 5) == counter.get_total_flops()


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
