"""The Pareto front of a two-objective search in its results table and in `pareto.png`.

The rows come from `tune.results.trial_rows`; the front and the rule that picks one trial from
it are `lstm_ae/pareto.py`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lstm_ae.metrics import is_finite_number
from lstm_ae.pareto import front_choice, pareto_front, rule_text
from tune.objectives import Objectives

BEST_MARK = "*"
FRONT_MARK = "*"


def front_columns(objectives: Objectives) -> tuple[str, str]:
    """The table's columns of the two objectives: the best first metric, the second at it."""
    return f"best_{objectives[0][0]}", objectives[1][0]


def mark_front(rows: list[dict[str, Any]], objectives: Objectives) -> list[dict[str, Any]]:
    """Rows of a two-objective search: `front` marks the Pareto front, which comes first (each
    part sorted by the first metric), and `best` the trial `lstm_ae.pareto.front_choice` picks
    (the best second metric within 2% of the best first)."""
    columns, modes = front_columns(objectives), tuple(mode for _, mode in objectives)
    points = [tuple(row.get(column) for column in columns) for row in rows]
    on_front = pareto_front(points, modes)
    chosen = front_choice(points, modes)
    for index, row in enumerate(rows):
        row["best"] = BEST_MARK if index == chosen else ""
        row["front"] = FRONT_MARK if on_front[index] else ""
    first, mode = columns[0], modes[0]

    def key(row):
        value = row.get(first)
        missing = not is_finite_number(value)
        return (row["front"] != FRONT_MARK, missing, 0.0 if missing else (value if mode == "min" else -value))

    ordered = sorted(rows, key=key)
    return [{"best": row.pop("best"), "front": row.pop("front"), **row} for row in ordered]


def plot_front(path: Path, rows: list[dict[str, Any]], objectives: Objectives) -> None:
    """The two objectives of every trial, the Pareto front drawn through its trials, and the
    trial the rule picks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (first, second), modes = front_columns(objectives), [mode for _, mode in objectives]
    points = [row for row in rows if is_finite_number(row.get(first)) and is_finite_number(row.get(second))]
    front = sorted((row for row in points if row.get("front")), key=lambda row: row[first])
    others = [row for row in points if not row.get("front")]
    figure, axis = plt.subplots(figsize=(7, 5))
    axis.scatter([r[first] for r in others], [r[second] for r in others], color="0.6", label="other trials")
    axis.step(
        [r[first] for r in front],
        [r[second] for r in front],
        where="post",  # each front trial's second value holds until the next trial's first value
        color="tab:blue",
        marker="o",
        label=f"Pareto front ({len(front)} of {len(points)} trials)",
    )
    for row in front:
        axis.annotate(
            str(row["trial"]).split("_")[-1],
            (row[first], row[second]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    references = [  # the all-zeros prediction, where the rows carry its figures (MSE/frame and SSIM)
        row
        for row in points
        if is_finite_number(row.get("baseline_zeros_mse_frame"))
        and is_finite_number(row.get("baseline_zeros_ssim"))
    ]
    if objectives == (("val_mse_frame", "min"), ("val_ssim", "max")) and references:
        reference = references[0]
        axis.scatter(
            [reference["baseline_zeros_mse_frame"]],
            [reference["baseline_zeros_ssim"]],
            marker="x",
            s=80,
            color="black",
            label="all-zeros prediction (a blank frame)",
        )
    chosen = [row for row in points if row.get("best")]
    if chosen:
        axis.scatter(
            [chosen[0][first]],
            [chosen[0][second]],
            marker="*",
            s=260,
            color="tab:orange",
            zorder=3,
            label=f"chosen: {rule_text([metric for metric, _ in objectives])}",
        )
    better = {"min": "lower is better", "max": "higher is better"}
    axis.set_xlabel(f"{first} ({better[modes[0]]})")
    axis.set_ylabel(f"{second} ({better[modes[1]]})")
    axis.set_title("two objectives: every trial and the Pareto front")
    axis.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
