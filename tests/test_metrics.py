"""Metrics against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

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


def test_every_metric_scores_the_prediction_clipped_to_the_target_range():
    # A linear head can predict outside [0, 1]: -0.5 scores like 0 and 1.5 like 1.
    prediction = frames([1.5, -0.5, 0.5, 0.2], [2.0, -1.0, 0.0, 1.0])
    clipped = frames([1.0, 0.0, 0.5, 0.2], [1.0, 0.0, 0.0, 1.0])
    target = frames([1.0, 0.0, 0.25, 0.2], [0.5, 0.5, 0.5, 0.5])
    squared = metrics.squared_error_per_frame(prediction, target)
    assert squared[0].tolist() == pytest.approx([0.0625, 1.0])
    assert metrics.absolute_error_per_frame(prediction, target)[0].tolist() == pytest.approx([0.25, 2.0])
    for metric in (
        metrics.squared_error_per_frame,
        metrics.absolute_error_per_frame,
        metrics.bce_nats_per_frame,
        metrics.psnr_per_frame,
    ):
        assert torch.equal(metric(prediction, target), metric(clipped, target)), metric.__name__
    # One scored frame: PSNR and MSE per frame agree (4 pixels per frame here).
    assert torch.allclose(metrics.psnr_per_frame(prediction, target), 10 * torch.log10(4 / squared))
    big_prediction = 3 * torch.rand(2, 3, 1, 9, 9) - 1
    big_target = torch.rand(2, 3, 1, 9, 9)
    assert torch.equal(
        metrics.ssim_per_frame(big_prediction, big_target),
        metrics.ssim_per_frame(big_prediction.clamp(0, 1), big_target),
    )


def test_a_nan_prediction_gives_nan_metrics():
    prediction = frames([float("nan"), 0.0, 0.0, 0.0])
    target = frames([0.0, 0.0, 0.0, 0.0])
    for metric in (
        metrics.squared_error_per_frame,
        metrics.absolute_error_per_frame,
        metrics.bce_nats_per_frame,
        metrics.psnr_per_frame,
    ):
        assert torch.isnan(metric(prediction, target)).all(), metric.__name__


@pytest.mark.parametrize("channels, height, width", [(1, 7, 7), (1, 16, 16), (1, 12, 20), (3, 10, 9)])
def test_ssim_equals_scikit_image(channels, height, width):
    """Ours against `skimage.metrics.structural_similarity` with the parameters we claim."""
    generator = torch.Generator().manual_seed(channels * 1000 + height * 10 + width)
    target = torch.rand(2, 3, channels, height, width, generator=generator, dtype=torch.float64)
    noise = torch.tensor([0.02, 0.1, 0.2, 0.4, 0.8, 1.6], dtype=torch.float64).view(2, 3, 1, 1, 1)
    disturbance = noise * torch.randn(target.shape, generator=generator, dtype=torch.float64)
    prediction = target + disturbance  # leaves [0, 1]: both sides score it clipped
    ours = metrics.ssim_per_frame(prediction, target)
    expected = torch.tensor(
        [
            [
                structural_similarity(
                    prediction[b, t].clamp(0, 1).numpy(),
                    target[b, t].numpy(),
                    data_range=1.0,
                    win_size=metrics.SSIM_WINDOW,
                    gaussian_weights=False,
                    use_sample_covariance=True,
                    K1=metrics.SSIM_K1,
                    K2=metrics.SSIM_K2,
                    channel_axis=0,
                )
                for t in range(3)
            ]
            for b in range(2)
        ]
    )
    assert ours.shape == (2, 3)
    assert torch.allclose(ours.double(), expected, rtol=1e-6, atol=1e-6)
    assert expected.max() - expected.min() > 0.5  # frames from near-identical to unrelated


def test_ssim_of_one_window_by_hand():
    """A 7x7 frame is one window: SSIM is the textbook formula with sample (n - 1) statistics."""
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(49, generator=generator, dtype=torch.float64)
    y = (0.6 * x + 0.4 * torch.rand(49, generator=generator, dtype=torch.float64)).clamp(0, 1)
    mean_x, mean_y = x.mean(), y.mean()
    variance_x, variance_y = x.var(correction=1), y.var(correction=1)
    covariance = ((x - mean_x) * (y - mean_y)).sum() / 48
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)) / (
        (mean_x**2 + mean_y**2 + c1) * (variance_x + variance_y + c2)
    )
    ours = metrics.ssim_per_frame(x.view(1, 1, 1, 7, 7), y.view(1, 1, 1, 7, 7))
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics.ssim_per_frame(x.view(1, 1, 1, 7, 7), x.view(1, 1, 1, 7, 7)).item() == pytest.approx(1.0)


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


def test_the_trivial_predictions_ssim_is_reported_beside_their_mse():
    """Copying a frame that does not move scores SSIM 1; an empty prediction of a mostly empty
    frame scores far above zero (why the SSIM column needs this baseline)."""
    torch.manual_seed(0)
    still = torch.zeros(2, 3, 1, 16, 16)
    still[:, :, :, 4:7, 4:7] = 1.0  # a small square that stays where it is
    accumulator = metrics.MetricAccumulator()
    metrics.add_baselines(accumulator, still, still)
    means = accumulator.means()
    assert means[metrics.BASELINE_COPY_LAST_SSIM] == pytest.approx(1.0, abs=1e-6)
    assert means[metrics.BASELINE_COPY_LAST_MSE_FRAME] == 0.0
    assert 0.3 < means[metrics.BASELINE_ZEROS_SSIM] < 1.0
    expected = metrics.ssim_per_frame(torch.zeros_like(still), still).mean().item()
    assert means[metrics.BASELINE_ZEROS_SSIM] == pytest.approx(expected)
    assert {metrics.BASELINE_COPY_LAST_SSIM, metrics.BASELINE_ZEROS_SSIM} <= set(metrics.EVALUATION_METRICS)


def test_ink_ssim_averages_scikit_images_ssim_map_over_the_windows_with_ink():
    """skimage's full SSIM map, borders cropped as its mean does, averaged over the windows whose
    brightest pixel in either frame reaches INK_LEVEL; a frame with ink nowhere scores 1."""
    generator = torch.Generator().manual_seed(5)
    target = torch.zeros(1, 3, 1, 20, 20, dtype=torch.float64)
    target[0, :, 0, 3:8, 4:9] = torch.rand(3, 5, 5, generator=generator, dtype=torch.float64)
    prediction = (
        target.roll(shifts=2, dims=-1) + 0.05 * torch.rand(target.shape, generator=generator).double()
    )
    prediction[0, 2] = 0.0  # frame 3: a blank prediction of an inked target
    target[0, 1], prediction[0, 1] = 0.0, 0.0  # frame 2: nothing anywhere
    ssim, ink_ssim = metrics.ssim_and_ink_ssim_per_frame(prediction, target)
    crop = (metrics.SSIM_WINDOW - 1) // 2
    for t in (0, 2):
        x, y = prediction[0, t, 0].clamp(0, 1).numpy(), target[0, t, 0].numpy()
        mean, full = structural_similarity(
            x, y, data_range=1.0, gaussian_weights=False, use_sample_covariance=True, full=True
        )
        ssim_map = torch.from_numpy(full[crop:-crop, crop:-crop])
        brightest = torch.nn.functional.max_pool2d(
            torch.from_numpy(np.maximum(x, y))[None, None], metrics.SSIM_WINDOW, stride=1
        )[0, 0]
        ink = brightest >= metrics.INK_LEVEL
        assert 0 < ink.sum() < ink.numel()
        assert ssim[0, t].item() == pytest.approx(mean, abs=1e-6)
        assert ink_ssim[0, t].item() == pytest.approx(ssim_map[ink].mean().item(), abs=1e-6)
    assert ink_ssim[0, 1].item() == 1.0 and ssim[0, 1].item() == pytest.approx(1.0)
    assert ink_ssim[0, 2].item() < 0.01 < 0.5 < ssim[0, 2].item()  # blank: high SSIM, no ink SSIM


def test_ink_ssim_ranks_the_blank_prediction_worst_and_the_target_best_where_ssim_does_not():
    """On generated Moving MNIST: the trivial predictions of benchmarks/baselines.py. SSIM puts
    the blank above the last frame copied; ink SSIM puts it at the bottom (the mean frame, as
    featureless, may tie it) and the target at 1, a blurred target between."""
    from benchmarks.baselines import scores, trivial_predictions
    from lstm_ae.config import preset
    from lstm_ae.data import load_test_set

    config = preset("smoke", test_sequences=64)
    sequences = next(load_test_set(config.model, config.data).batches(64)).float()
    past, future = sequences[:, :10], sequences[:, 10:]
    table = {
        name: scores(prediction, future) for name, prediction in trivial_predictions(past, future).items()
    }
    blank, target = table["all-zeros (blank)"], table["target"]
    assert blank["ssim"] > table["last frame copied"]["ssim"]  # why SSIM cannot be searched on
    others = [row["ink_ssim"] for name, row in table.items() if name != "all-zeros (blank)"]
    assert blank["ink_ssim"] < 0.05 and blank["ink_ssim"] <= min(others) + 0.01
    assert target["ink_ssim"] == pytest.approx(1.0)
    assert 0.3 < table["target blurred"]["ink_ssim"] < 0.9
    for name in ("last frame copied", "last frame copied, blurred"):
        assert blank["ink_ssim"] < table[name]["ink_ssim"], name


def test_validation_and_baselines_report_ink_ssim_beside_ssim():
    past = torch.zeros(2, 3, 1, 16, 16)
    past[:, :, :, 4:7, 4:7] = 1.0
    accumulator = metrics.MetricAccumulator()
    metrics.add_prediction_metrics(accumulator, past, past)
    metrics.add_baselines(accumulator, past, past)
    means = accumulator.means()
    assert means[metrics.VAL_INK_SSIM] == pytest.approx(1.0) == means[metrics.BASELINE_COPY_LAST_INK_SSIM]
    assert means[metrics.BASELINE_ZEROS_INK_SSIM] < 0.01 < means[metrics.BASELINE_ZEROS_SSIM]
    assert metrics.METRIC_MODES[metrics.VAL_INK_SSIM] == "max"
    assert {metrics.VAL_INK_SSIM, metrics.BASELINE_ZEROS_INK_SSIM} <= set(metrics.EVALUATION_METRICS)


def test_best_of_follows_the_mode_skips_missing_values_and_keeps_the_earliest_of_equals():
    reports = [
        {"v": 3.0, "at": 1},
        {"v": float("nan"), "at": 2},
        {"v": 1.0, "at": 3},
        {"v": 1.0, "at": 4},
        {},
    ]
    assert metrics.best_of(reports, lambda r: r.get("v"), "min")["at"] == 3
    assert metrics.best_of(reports, lambda r: r.get("v"), "max")["at"] == 1
    assert metrics.best_of([{}, {"v": float("inf")}], lambda r: r.get("v"), "min") is None
    assert metrics.best_of([], lambda r: r, "max") is None
