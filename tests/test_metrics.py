"""Metrics against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lstm_ae import metrics


def frames(*values):
    """(1, T, 1, 2, 2) from T lists of 4 pixel values."""
    return torch.tensor(values, dtype=torch.float32).view(1, len(values), 1, 2, 2)


def test_squared_and_absolute_error_sum_over_pixels_per_frame():
    prediction = frames([0.5, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    target = frames([0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.5])
    assert metrics.squared_error_per_frame(prediction, target).tolist() == [[0.25 + 1.0, 0.25]]
    assert metrics.absolute_error_per_frame(prediction, target).tolist() == [[1.5, 0.5]]


def test_bce_in_nats_per_frame():
    prediction = frames([0.5, 0.5, 0.9, 0.1])
    target = frames([1.0, 0.0, 1.0, 0.0])
    expected = 2 * math.log(2) + 2 * -math.log(0.9)
    assert metrics.bce_nats_per_frame(prediction, target).item() == pytest.approx(expected, rel=1e-6)


def test_psnr_of_a_known_error_and_of_identical_frames():
    prediction = frames([0.1, 0.1, 0.1, 0.1])
    target = frames([0.0, 0.0, 0.0, 0.0])
    assert metrics.psnr_per_frame(prediction, target).item() == pytest.approx(20.0, rel=1e-5)
    assert metrics.psnr_per_frame(target, target).item() == pytest.approx(100.0)
    # Predictions are clipped to [0, 1] first: 1.5 scores like 1.0.
    assert metrics.psnr_per_frame(frames([1.5] * 4), target).item() == pytest.approx(0.0, abs=1e-6)


def test_ssim_of_constant_images_has_the_closed_form():
    # Constant images a and b: SSIM = (2ab + C1) / (a^2 + b^2 + C1) (variance terms cancel).
    a, b = 0.2, 0.6
    prediction = torch.full((1, 1, 1, 9, 9), a)
    target = torch.full((1, 1, 1, 9, 9), b)
    c1 = (0.01) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert metrics.ssim_per_frame(prediction, target).item() == pytest.approx(expected, rel=1e-5)
    noise = torch.rand(2, 3, 1, 16, 16)
    assert torch.allclose(metrics.ssim_per_frame(noise, noise), torch.ones(2, 3), atol=1e-5)
    assert (metrics.ssim_per_frame(noise, torch.rand(2, 3, 1, 16, 16)) < 0.5).all()


def test_baselines_and_accumulator_average_over_all_frames():
    past = frames([0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    future = frames([1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    accumulator = metrics.MetricAccumulator()
    metrics.add_baselines(accumulator, past, future)
    metrics.add_baselines(accumulator, past, torch.zeros_like(future))
    means = accumulator.means()
    # copy-last predicts [1,0,0,0] twice: errors 1 and 1 (first batch), 1 and 1 (second).
    assert means[metrics.BASELINE_COPY_LAST_MSE_FRAME] == pytest.approx(1.0)
    # zeros: errors 2 and 0 (first batch), 0 and 0 (second).
    assert means[metrics.BASELINE_ZEROS_MSE_FRAME] == pytest.approx(0.5)


def test_metric_names_carry_units():
    for name in metrics.METRIC_MODES:
        assert name in metrics.UNITS
    assert metrics.VAL_MSE_FRAME.endswith("_frame") and metrics.VAL_BCE_NATS_FRAME.endswith("nats_frame")


def test_accumulator_totals_round_trip_and_combine_shards():
    whole, first, second = (
        metrics.MetricAccumulator(),
        metrics.MetricAccumulator(),
        metrics.MetricAccumulator(),
    )
    values = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    whole.add(metrics.VAL_MSE_FRAME, values)
    first.add(metrics.VAL_MSE_FRAME, values[:1])
    second.add(metrics.VAL_MSE_FRAME, values[1:])
    combined = metrics.MetricAccumulator.from_totals(first.totals() + second.totals())
    assert combined.means() == whole.means() == {metrics.VAL_MSE_FRAME: 4.0}
