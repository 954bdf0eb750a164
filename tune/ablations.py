"""The paper's ablations as one command: `python -m tune --experiment ablations [--seeds 3]`.

A grid, not a search: five variants of the composite model, each trained with several seeds
for the same steps and batch (the same sequences seen; the single-task variants run one
decoder, so they do less work per step). The table gives the mean and spread over seeds of
prediction MSE and BCE per frame, reconstruction MSE and the linear digit probe, with the
paper's claims beside the rows they concern and, below, whether each claim held here.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lstm_ae.metrics import (
    PROBE_ACCURACY,
    VAL_BCE_NATS_FRAME,
    VAL_MSE_FRAME,
    VAL_RECONSTRUCTION_MSE_FRAME,
    is_finite_number,
)
from lstm_ae.tables import to_csv, to_markdown
from records.layout import ABLATIONS_CSV, ABLATIONS_MD
from tune.experiment import run_experiment
from tune.variants import VARIANTS, Variant  # noqa: F401  (Variant: part of this module's interface)

NEGLIGIBLE = 0.005  # relative difference below which a claim's two variants count as equal
TABLE_METRICS = (VAL_MSE_FRAME, VAL_BCE_NATS_FRAME, VAL_RECONSTRUCTION_MSE_FRAME, PROBE_ACCURACY)
PREDICTION_METRICS = (VAL_MSE_FRAME, VAL_BCE_NATS_FRAME)


@dataclass(frozen=True)
class Claim:
    statement: str
    better: str  # variant expected to be better
    worse: str
    metric: str
    higher_is_better: bool = False


CLAIMS = (
    Claim(
        "the composite predicts the future better than prediction alone",
        "composite",
        "prediction_only",
        VAL_MSE_FRAME,
    ),
    Claim(
        "the composite's representation holds more digit identity than reconstruction alone",
        "composite",
        "reconstruction_only",
        PROBE_ACCURACY,
        higher_is_better=True,
    ),
    Claim(
        "the composite's representation holds more digit identity than prediction alone",
        "composite",
        "prediction_only",
        PROBE_ACCURACY,
        higher_is_better=True,
    ),
    Claim(
        "conditioned decoders predict better than free-running ones",
        "composite_conditioned",
        "composite",
        VAL_MSE_FRAME,
    ),
    Claim(
        "reverse-order reconstruction is learned better than forward order",
        "composite",
        "composite_forward_order",
        VAL_RECONSTRUCTION_MSE_FRAME,
    ),
)


def run_ablations(base, seeds: int, settings, callbacks=()):
    """Run (or resume) the grid; returns (ResultGrid, experiment path, plan)."""

    def grid_setup(ray_tune, plan):
        space = {
            "variant": ray_tune.grid_search(list(VARIANTS)),
            "seed": ray_tune.grid_search(list(range(seeds))),
        }
        return space, {"num_samples": 1}

    record = {"experiment": "ablations", "seeds": seeds}
    return run_experiment(base, settings, grid_setup, record, callbacks, len(VARIANTS) * seeds)


def final_metrics(results, max_steps: int) -> list[dict[str, Any]]:
    """One record per trial: variant, seed, whether it finished, and its last reported metrics.

    A trial finished when it reached max_steps, the end of its own `--max-minutes` (its last
    report says `final`) or stopped on its patience; one cut short (the experiment's time
    budget, an interruption) or errored is listed but left out of the means.
    """
    records = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        finished = result.error is None and (
            (metrics.get("step") or 0) >= max_steps
            or metrics.get("stopped_early") is True
            or metrics.get("final") is True
        )
        records.append(
            {
                "variant": config.get("variant"),
                "seed": config.get("seed"),
                "finished": finished,
                "error": None if result.error is None else str(result.error).strip().splitlines()[-1][:200],
                **{name: metrics.get(name) for name in (*TABLE_METRICS, "step", "probe_accuracy_untrained")},
            }
        )
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """variant -> metric -> (mean, standard deviation, seeds) over the trials that finished."""
    summary: dict[str, dict[str, tuple[float, float, int]]] = {}
    for name in VARIANTS:
        summary[name] = {}
        for metric in (*TABLE_METRICS, "probe_accuracy_untrained"):
            values = [
                r[metric]
                for r in records
                if r["variant"] == name
                and r.get("finished", True)
                and not r["error"]
                and is_finite_number(r[metric])
            ]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                summary[name][metric] = (statistics.fmean(values), spread, len(values))
    return summary


def _cell(summary, name: str, metric: str) -> str:
    variant = VARIANTS[name]
    if metric in PREDICTION_METRICS and not variant.trains_prediction:
        return "n/a (not trained)"
    if metric == VAL_RECONSTRUCTION_MSE_FRAME and not variant.trains_reconstruction:
        return "n/a (not trained)"
    if metric not in summary[name]:
        return ""
    mean, spread, count = summary[name][metric]
    digits = 3 if metric == PROBE_ACCURACY else 2
    return f"{mean:.{digits}f} ± {spread:.{digits}f} (n={count})"


def verdicts(summary) -> list[tuple[Claim, str]]:
    """For each claim: held / not held (beyond the spread over seeds) / within noise / no difference
    (under 0.5%) / one seed (no spread to judge by) / not measured."""
    results = []
    for claim in CLAIMS:
        better, worse = summary[claim.better].get(claim.metric), summary[claim.worse].get(claim.metric)
        if better is None or worse is None:
            results.append((claim, "not measured"))
            continue
        difference = (better[0] - worse[0]) * (1 if claim.higher_is_better else -1)
        noise = math.hypot(better[1], worse[1])
        if abs(difference) < NEGLIGIBLE * abs(worse[0]):
            verdict = "no difference at this scale"
        elif min(better[2], worse[2]) < 2:
            verdict = "one seed: no spread to judge by"
        elif difference > noise and difference > 0:
            verdict = "held"
        elif -difference > noise and difference < 0:
            verdict = "not held"
        else:
            verdict = "within noise"
        results.append((claim, f"{verdict} ({better[0]:.5g} vs {worse[0]:.5g})"))
    return results


def ablation_markdown(summary, seeds: int) -> str:
    rows = [
        {
            "variant": variant.label,
            "prediction MSE/frame": _cell(summary, name, VAL_MSE_FRAME),
            "prediction BCE nats/frame": _cell(summary, name, VAL_BCE_NATS_FRAME),
            "reconstruction MSE/frame": _cell(summary, name, VAL_RECONSTRUCTION_MSE_FRAME),
            "digit probe accuracy": _cell(summary, name, PROBE_ACCURACY),
            "paper's claim": variant.claim,
        }
        for name, variant in VARIANTS.items()
    ]
    claims = [
        {"claim (Srivastava et al. 2015)": claim.statement, "here": verdict}
        for claim, verdict in verdicts(summary)
    ]
    untrained = [
        summary[name]["probe_accuracy_untrained"][0]
        for name in VARIANTS
        if "probe_accuracy_untrained" in summary[name]
    ]
    note = (
        f"\nMean ± standard deviation over {seeds} seed(s); every variant trained the same steps on the same "
        "batches. An untrained encoder's probe scores "
        + (f"{statistics.fmean(untrained):.3f}" if untrained else "n/a")
        + "; the paper's numbers are for its standard test file and far longer training.\n\n"
    )
    return to_markdown(rows) + note + to_markdown(claims)


def plot_ablations(path: Path, summary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TABLE_METRICS), figsize=(4.2 * len(TABLE_METRICS), 4), squeeze=False)
    names = list(VARIANTS)
    for axis, metric in zip(axes[0], TABLE_METRICS):
        positions, means, spreads = [], [], []
        for index, name in enumerate(names):
            cell = _cell(summary, name, metric)
            if metric in summary[name] and not cell.startswith("n/a"):
                positions.append(index)
                means.append(summary[name][metric][0])
                spreads.append(summary[name][metric][1])
        axis.bar(positions, means, yerr=spreads, capsize=4, color="tab:blue")
        axis.set_xticks(
            range(len(names)), [VARIANTS[name].label for name in names], rotation=40, ha="right", fontsize=7
        )
        axis.set_title(metric, fontsize=9)
        if means:
            low = min(m - s for m, s in zip(means, spreads))
            high = max(m + s for m, s in zip(means, spreads))
            margin = 0.15 * (high - low) or 0.05 * abs(high) or 1.0
            axis.set_ylim(low - margin, high + margin)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_ablations(folder: Path, records, seeds: int) -> str:
    """ablations.csv (every trial), ablations.md (the table and verdicts), ablations.png."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    (folder / ABLATIONS_CSV).write_text(to_csv(records))
    markdown = ablation_markdown(summary, seeds)
    (folder / ABLATIONS_MD).write_text(markdown)
    plot_ablations(folder / "ablations.png", summary)
    return markdown
