"""Metrics with their units in their names, and the trivial baselines.

Conventions, so our numbers compare with the literature:
- Every metric scores the same frame: the prediction clipped to [0, 1], the range of the
  targets (a linear head's outputs can leave it; a logistic head's cannot, so for it the
  clip changes nothing). Clipping can only move a pixel towards its target, so the clipped
  errors are never larger. PredRNN (Wang et al. 2017, whose Table 1 holds the FC-LSTM
  figures we compare with) clips before MSE, SSIM and PSNR alike; OpenSTL computes MSE and
  MAE before its clip and SSIM and PSNR after, so its MSE/MAE of a linear-head model can be
  higher than ours where outputs leave [0, 1]. One clipped frame keeps the metrics
  consistent with each other: PSNR = 10 * log10(C*H*W / MSE per frame).
- MSE and MAE per frame: summed over the C*H*W pixels of a frame, averaged over frames and
  sequences (OpenSTL's and PredRNN's unit; the Moving MNIST tables quote these).
- BCE in nats per frame: binary cross-entropy summed over pixels, averaged over frames and
  sequences (the unit of Srivastava et al. 2015, Table 1); predictions are clamped to
  [eps, 1 - eps] so that the logarithms stay finite.
- SSIM as `skimage.metrics.structural_similarity(data_range=1)` computes it by default
  (7x7 uniform window, sample covariance, K1 = 0.01, K2 = 0.03, borders excluded), per
  frame and channel, averaged; PSNR in dB per frame with data range 1, averaged.
- Ink SSIM: the same SSIM map averaged over the windows that hold ink (a pixel of at least
  INK_LEVEL) in the target or in the prediction, so that the empty background, most of a
  Moving MNIST frame, counts for nothing. An all-blank prediction scores 0.77 SSIM on the
  cpu validation set, above trained models, but 0.02 ink SSIM, with the mean frame the
  lowest of the trivial predictions; the target scores 1 (`python benchmarks/baselines.py`
  prints the table). A frame with no ink in either scores 1. The gradient-difference
  sharpness of Mathieu et al. was tried too and ranks the blank above the last frame copied,
  blurred or not: it charges an edge in the wrong place twice, a missing one once.
- Targets are used as given (data in [0, 1]); a NaN prediction gives a NaN metric.

Every per-frame function takes (B, T, C, H, W) tensors and returns (B, T) values, so
callers can accumulate sums over batches and divide once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

T = TypeVar("T")


def is_finite_number(value: Any) -> bool:
    """An int or float that is neither NaN nor infinite (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_of(items: Iterable[T], value: Callable[[T], Any], mode: str) -> T | None:
    """The item whose `value` is best under `mode` ("min" or "max"), the earliest of equals;
    items without a finite value are passed over, and None is returned when none has one."""
    sign = 1.0 if mode == "min" else -1.0
    scored = [(sign * float(value(item)), index, item) for index, item in enumerate(items)
              if is_finite_number(value(item))]  # fmt: skip
    return min(scored, key=lambda entry: entry[:2])[2] if scored else None


# Names of reported metrics. Validation metrics describe the prediction of the future
# unless the name says otherwise.
VAL_MSE_FRAME = "val_mse_frame"
VAL_MAE_FRAME = "val_mae_frame"
VAL_BCE_NATS_FRAME = "val_bce_nats_frame"
VAL_SSIM = "val_ssim"
VAL_INK_SSIM = "val_ink_ssim"
VAL_PSNR_DB = "val_psnr_db"
VAL_RECONSTRUCTION_MSE_FRAME = "val_reconstruction_mse_frame"
VAL_RECONSTRUCTION_BCE_NATS_FRAME = "val_reconstruction_bce_nats_frame"
BASELINE_COPY_LAST_MSE_FRAME = "baseline_copy_last_mse_frame"
BASELINE_ZEROS_MSE_FRAME = "baseline_zeros_mse_frame"
BASELINE_COPY_LAST_SSIM = "baseline_copy_last_ssim"
BASELINE_ZEROS_SSIM = "baseline_zeros_ssim"
BASELINE_COPY_LAST_INK_SSIM = "baseline_copy_last_ink_ssim"
BASELINE_ZEROS_INK_SSIM = "baseline_zeros_ink_ssim"
PROBE_ACCURACY = "probe_accuracy"

# Whether smaller or larger is better, for every metric a run can be selected or stopped on.
METRIC_MODES = {
    VAL_MSE_FRAME: "min",
    VAL_MAE_FRAME: "min",
    VAL_BCE_NATS_FRAME: "min",
    VAL_SSIM: "max",
    VAL_INK_SSIM: "max",
    VAL_PSNR_DB: "max",
    VAL_RECONSTRUCTION_MSE_FRAME: "min",
    VAL_RECONSTRUCTION_BCE_NATS_FRAME: "min",
}

# Every metric a results table can be sorted by: the above, and the probe (end of training).
TABLE_METRIC_MODES = {**METRIC_MODES, PROBE_ACCURACY: "max"}

UNITS = {
    VAL_MSE_FRAME: "squared error per frame (sum over pixels)",
    VAL_MAE_FRAME: "absolute error per frame (sum over pixels)",
    VAL_BCE_NATS_FRAME: "nats per frame",
    VAL_SSIM: "SSIM (1 = identical)",
    VAL_INK_SSIM: "SSIM over the windows with ink in the target or prediction (1 = identical, blank ~0)",
    VAL_PSNR_DB: "dB",
    VAL_RECONSTRUCTION_MSE_FRAME: "squared error per frame (sum over pixels)",
    VAL_RECONSTRUCTION_BCE_NATS_FRAME: "nats per frame",
    BASELINE_COPY_LAST_MSE_FRAME: "squared error per frame (sum over pixels)",
    BASELINE_ZEROS_MSE_FRAME: "squared error per frame (sum over pixels)",
    BASELINE_COPY_LAST_SSIM: "SSIM (1 = identical)",
    BASELINE_ZEROS_SSIM: "SSIM (1 = identical): high, since most of a frame is empty background",
    BASELINE_COPY_LAST_INK_SSIM: "ink SSIM (1 = identical)",
    BASELINE_ZEROS_INK_SSIM: "ink SSIM (1 = identical): near 0, a blank frame matches no ink",
    PROBE_ACCURACY: "fraction of held-out sequences' digits a linear probe of encode(past) finds",
    "probe_accuracy_untrained": "the same probe on an untrained encoder (baseline)",
    "probe_chance": "the probe's score when guessing the most frequent digits",
}

# What `lstm_ae.engine.evaluate` measures, in a fixed order (for combining shards).
EVALUATION_METRICS = (
    VAL_MSE_FRAME,
    VAL_MAE_FRAME,
    VAL_BCE_NATS_FRAME,
    VAL_SSIM,
    VAL_INK_SSIM,
    VAL_PSNR_DB,
    VAL_RECONSTRUCTION_MSE_FRAME,
    VAL_RECONSTRUCTION_BCE_NATS_FRAME,
    BASELINE_COPY_LAST_MSE_FRAME,
    BASELINE_ZEROS_MSE_FRAME,
    BASELINE_COPY_LAST_SSIM,
    BASELINE_ZEROS_SSIM,
    BASELINE_COPY_LAST_INK_SSIM,
    BASELINE_ZEROS_INK_SSIM,
)

# The trivial predictions' metrics: the same at every validation on the same sequences.
BASELINE_METRICS = (
    BASELINE_COPY_LAST_MSE_FRAME,
    BASELINE_ZEROS_MSE_FRAME,
    BASELINE_COPY_LAST_SSIM,
    BASELINE_ZEROS_SSIM,
    BASELINE_COPY_LAST_INK_SSIM,
    BASELINE_ZEROS_INK_SSIM,
)

# Reference figures for results tables (docs/model.md, "Reference numbers").
PAPER_COMPOSITE_CONDITIONAL_BCE_NATS_FRAME = 341.2

BCE_EPSILON = 1e-7
SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03
INK_LEVEL = 0.1  # a pixel at least this bright is ink (the digits' anti-aliased edges fade below it)
PSNR_MIN_MSE = 1e-10  # identical frames score 100 dB instead of infinity


def _per_frame_sum(values: Tensor) -> Tensor:
    """(B, T, C, H, W) -> (B, T): sum over each frame's pixels."""
    return values.flatten(2).sum(-1)


def clip_prediction(prediction: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The frame every metric scores: `prediction` in `dtype`, clipped to [0, 1] (NaN stays NaN)."""
    return prediction.to(dtype).clamp(0, 1)


def squared_error_per_frame(prediction: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over pixels, prediction clipped to [0, 1]: (B, T, C, H, W) -> (B, T)."""
    return _per_frame_sum((clip_prediction(prediction) - target.float()) ** 2)


def absolute_error_per_frame(prediction: Tensor, target: Tensor) -> Tensor:
    """Absolute error summed over pixels, prediction clipped to [0, 1]: (B, T, C, H, W) -> (B, T)."""
    return _per_frame_sum((clip_prediction(prediction) - target.float()).abs())


def bce_nats_per_frame(prediction: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy in nats summed over pixels, predictions clamped to [eps, 1 - eps].

    (B, T, C, H, W) -> (B, T).
    """
    probability = prediction.float().clamp(BCE_EPSILON, 1 - BCE_EPSILON)
    target = target.float()
    # Written out (not F.binary_cross_entropy) so that a NaN prediction gives NaN, not an error.
    nats = -(target * torch.log(probability) + (1 - target) * torch.log1p(-probability))
    return _per_frame_sum(nats)


def psnr_per_frame(prediction: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB with data range 1, on predictions clipped to [0, 1]: (B, T, C, H, W) -> (B, T)."""
    error = (clip_prediction(prediction) - target.float()) ** 2
    mean_error = error.flatten(2).mean(-1).clamp_min(PSNR_MIN_MSE)
    return -10.0 * torch.log10(mean_error)


def ssim_and_ink_ssim_per_frame(prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """SSIM and ink SSIM with data range 1 on predictions clipped to [0, 1]: two (B, T) tensors
    from one SSIM map.

    SSIM is the mean over channels of skimage's `structural_similarity(data_range=1)` with its
    defaults (H and W at least SSIM_WINDOW); ink SSIM averages the same map over the windows
    holding a pixel of at least INK_LEVEL in the target or the prediction (1 where no window
    does). Computed in float64: the variances are differences of nearly equal window means.
    """
    batch, steps = prediction.shape[:2]
    x = clip_prediction(prediction, torch.float64).flatten(0, 2).unsqueeze(1)  # (B*T*C, 1, H, W)
    y = target.double().flatten(0, 2).unsqueeze(1)

    def window_mean(image: Tensor) -> Tensor:
        # Every 7x7 window's mean ("valid" positions, as avg_pool2d with stride 1) from an
        # integral image: four lookups per window instead of 49 additions.
        k = SSIM_WINDOW
        integral = F.pad(image.cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        window_sum = (
            integral[..., k:, k:] - integral[..., :-k, k:] - integral[..., k:, :-k] + integral[..., :-k, :-k]
        )
        return window_sum / (k * k)

    count = SSIM_WINDOW**2
    covariance_scale = count / (count - 1)  # sample covariance, as skimage
    mean_x, mean_y = window_mean(x), window_mean(y)
    variance_x = covariance_scale * (window_mean(x * x) - mean_x**2)
    variance_y = covariance_scale * (window_mean(y * y) - mean_y**2)
    covariance = covariance_scale * (window_mean(x * y) - mean_x * mean_y)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)) / (
        (mean_x**2 + mean_y**2 + c1) * (variance_x + variance_y + c2)
    )
    ssim_map = ssim_map.flatten(1)

    def per_frame(values: Tensor) -> Tensor:
        return values.view(batch, steps, -1).mean(-1).float()

    if ssim_map.shape[1] == 0:  # frames smaller than a window: no SSIM of either kind
        nan = per_frame(ssim_map.new_full((ssim_map.shape[0],), float("nan")))
        return nan, nan.clone()
    # A window holds ink where its brightest pixel, in either frame, reaches INK_LEVEL
    # (NaN predictions compare False here, and their SSIM map is NaN anyway).
    brightest = F.max_pool2d(torch.maximum(x, y), SSIM_WINDOW, stride=1).flatten(1)
    ink = (brightest >= INK_LEVEL).double()
    windows_with_ink = ink.sum(-1)
    ink_ssim = torch.where(
        windows_with_ink > 0,
        (ssim_map * ink).sum(-1) / windows_with_ink.clamp_min(1),
        torch.ones_like(windows_with_ink),
    )
    return per_frame(ssim_map.mean(-1)), per_frame(ink_ssim)


def ssim_per_frame(prediction: Tensor, target: Tensor) -> Tensor:
    """SSIM with data range 1 on predictions clipped to [0, 1]: (B, T, C, H, W) -> (B, T)."""
    return ssim_and_ink_ssim_per_frame(prediction, target)[0]


def copy_last_frame(past: Tensor, steps: int) -> Tensor:
    """Baseline prediction: the last past frame repeated `steps` times."""
    return past[:, -1:].expand(-1, steps, *past.shape[2:])


class MetricAccumulator:
    """Sums (B, T) per-frame values over batches; `means()` averages over all frames."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, name: str, per_frame: Tensor) -> None:
        self._sums[name] = self._sums.get(name, 0.0) + float(per_frame.double().sum())
        self._counts[name] = self._counts.get(name, 0) + per_frame.numel()

    def means(self) -> dict[str, float]:
        return {name: self._sums[name] / self._counts[name] for name in self._sums if self._counts[name]}

    def totals(self, names: tuple[str, ...] = EVALUATION_METRICS) -> Tensor:
        """(2, len(names)) float64: sums and counts, zero for names never added (to all-reduce)."""
        return torch.tensor(
            [[self._sums.get(name, 0.0) for name in names], [self._counts.get(name, 0) for name in names]],
            dtype=torch.float64,
        )

    @classmethod
    def from_totals(cls, totals: Tensor, names: tuple[str, ...] = EVALUATION_METRICS) -> MetricAccumulator:
        accumulator = cls()
        for name, total, count in zip(names, totals[0].tolist(), totals[1].tolist()):
            accumulator._sums[name], accumulator._counts[name] = total, int(count)
        return accumulator


def add_prediction_metrics(accumulator: MetricAccumulator, prediction: Tensor, target: Tensor) -> None:
    accumulator.add(VAL_MSE_FRAME, squared_error_per_frame(prediction, target))
    accumulator.add(VAL_MAE_FRAME, absolute_error_per_frame(prediction, target))
    accumulator.add(VAL_BCE_NATS_FRAME, bce_nats_per_frame(prediction, target))
    ssim, ink_ssim = ssim_and_ink_ssim_per_frame(prediction, target)
    accumulator.add(VAL_SSIM, ssim)
    accumulator.add(VAL_INK_SSIM, ink_ssim)
    accumulator.add(VAL_PSNR_DB, psnr_per_frame(prediction, target))


def add_reconstruction_metrics(accumulator: MetricAccumulator, reconstruction: Tensor, past: Tensor) -> None:
    """`reconstruction` and `past` in the same (chronological) order."""
    accumulator.add(VAL_RECONSTRUCTION_MSE_FRAME, squared_error_per_frame(reconstruction, past))
    accumulator.add(VAL_RECONSTRUCTION_BCE_NATS_FRAME, bce_nats_per_frame(reconstruction, past))


def add_baselines(accumulator: MetricAccumulator, past: Tensor, future: Tensor) -> None:
    """MSE, SSIM and ink SSIM of the two trivial predictions. SSIM needs them: an empty (all-zeros)
    prediction scores a high SSIM on Moving MNIST, whose frames are mostly background."""
    copy_last, zeros = copy_last_frame(past, future.shape[1]), torch.zeros_like(future)
    accumulator.add(BASELINE_COPY_LAST_MSE_FRAME, squared_error_per_frame(copy_last, future))
    accumulator.add(BASELINE_ZEROS_MSE_FRAME, squared_error_per_frame(zeros, future))
    for name, ink_name, prediction in (
        (BASELINE_COPY_LAST_SSIM, BASELINE_COPY_LAST_INK_SSIM, copy_last),
        (BASELINE_ZEROS_SSIM, BASELINE_ZEROS_INK_SSIM, zeros),
    ):
        ssim, ink_ssim = ssim_and_ink_ssim_per_frame(prediction, future)
        accumulator.add(name, ssim)
        accumulator.add(ink_name, ink_ssim)
