"""The results table of a search, and its plots.

One row per trial: the sampled config, the final and best validation metric, the other
final metrics, steps and sequences seen, wall time, status, and the best checkpoint. Rows
are sorted by the best metric; the best row is marked. A search of two objectives marks its
Pareto front (`front`), sorts it first, and marks as best the front trial its rule picks
(`lstm_ae/pareto.py`). Written to the experiment folder as `results.csv` and `results.md`,
with these plots:

    trials.png        the validation metric over steps, every trial on one figure
    parameters.png    each searched parameter against the trial's best metric
    pareto.png        two objectives: every trial, the front, the chosen trial
    optuna_*.png      Optuna's plots of the stored study (`plot_study`, from 4 completed trials):
                      importances, parallel coordinates; for two objectives the Pareto front and
                      the hypervolume history


A search of two objectives marks its Pareto front in the table (`mark_front`, the front and
the rule that picks one trial from it are `lstm_ae.pareto`'s) and draws it in `pareto.png`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lstm_ae.metrics import (
    BASELINE_COPY_LAST_MSE_FRAME,
    BASELINE_ZEROS_INK_SSIM,
    BASELINE_ZEROS_MSE_FRAME,
    BASELINE_ZEROS_SSIM,
    METRIC_MODES,
    PROBE_ACCURACY,
    VAL_BCE_NATS_FRAME,
    VAL_INK_SSIM,
    VAL_MSE_FRAME,
    VAL_PSNR_DB,
    VAL_RECONSTRUCTION_MSE_FRAME,
    VAL_SSIM,
    best_of,
    is_finite_number,
)
from lstm_ae.pareto import front_choice, pareto_front, rule_text
from lstm_ae.tables import to_csv, to_markdown
from records.checkpoints import best_checkpoint
from records.layout import RESULTS_CSV, RESULTS_MD
from records.sources import train_command
from records.storage import storage_filesystem
from tune.objectives import Objectives, is_multi
from tune.space import SearchSpace

BEST_MARK = "*"
FRONT_MARK = "*"
REFERENCE = "reference"  # the kind of a comparison row that is a reference (the paper, a baseline)
COMPLETED, STOPPED_BY_SCHEDULER, STOPPED_BY_PATIENCE, STOPPED, ERRORED = (
    "completed",
    "stopped early (ASHA)",
    "stopped early (patience)",
    "stopped (time budget or interrupted)",
    "errored",
)
FINAL_METRICS = (
    VAL_MSE_FRAME,
    VAL_BCE_NATS_FRAME,
    VAL_SSIM,
    VAL_INK_SSIM,
    VAL_PSNR_DB,
    VAL_RECONSTRUCTION_MSE_FRAME,
    BASELINE_ZEROS_MSE_FRAME,
    BASELINE_COPY_LAST_MSE_FRAME,
    BASELINE_ZEROS_SSIM,
    BASELINE_ZEROS_INK_SSIM,
    PROBE_ACCURACY,
    "probe_accuracy_untrained",
)
MIN_TRIALS_FOR_IMPORTANCES = 4


def trial_status(
    errored: bool,
    steps: int,
    max_steps: int | None,
    stopped_early: bool,
    stopped_by_scheduler: bool = False,
    final: bool = False,
) -> str:
    """What became of a trial: it errored, reached max_steps or the end of its own time budget
    (`final`: its last report said so), stopped early (its patience, or ASHA), or was cut
    short (the experiment's time budget or an interruption). max_steps None: not known."""
    if errored:
        return ERRORED
    if max_steps is not None and steps >= max_steps:
        return COMPLETED
    if stopped_early:
        return STOPPED_BY_PATIENCE
    if final:
        return COMPLETED
    if stopped_by_scheduler:
        return STOPPED_BY_SCHEDULER
    return STOPPED


def trial_rows(
    results,
    space: SearchSpace,
    metric: str,
    max_steps: int,
    stopped_by_scheduler: set[str],
    clock: str = "step",
    objectives: Objectives = (),
):
    """(rows, histories): one summary row per trial, and each trial's (clock readings, metric
    values); `clock` is a reported field, "step" or, for time-budgeted trials, "training_seconds".
    With two `objectives` (the first is `metric`) a row's second metric is its value at the report
    of the best first metric, and the rows are marked and sorted by the front (`mark_front`).

    From each Result's metrics_dataframe, not ResultGrid.get_dataframe(metric, mode): that one
    leaves out a trial that never reported (here: a row, errored) and raises on a trial whose
    metric is all NaN.
    """
    rows, histories = [], {}
    for result in results:
        frame = result.metrics_dataframe
        records = frame.to_dict("records") if frame is not None else []
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        reported = [row for row in records if is_finite_number(row.get(metric))]
        values = [row[metric] for row in reported]
        histories[trial_id] = ([row.get(clock) for row in reported], values)
        last = reported[-1] if reported else {}
        steps = int(last.get("step", 0)) if last else 0
        status = trial_status(
            result.error is not None,
            steps,
            max_steps,
            last.get("stopped_early") is True,
            trial_id in stopped_by_scheduler,
            final=last.get("final") is True,
        )
        row = {"trial": trial_id, "status": status}
        row.update({name: (result.config or {}).get(name) for name in space.names})
        best = best_of(reported, lambda report: report[metric], METRIC_MODES[metric])
        row[f"best_{metric}"] = best[metric] if best else None
        row[f"final_{metric}"] = values[-1] if values else None
        for name in FINAL_METRICS:
            if name != metric:
                row[name] = last.get(name)
        if is_multi(objectives):
            second = objectives[1][0]
            row[second] = best.get(second) if best else None
        row["steps"] = steps
        if is_finite_number(last.get("training_seconds")):
            row["training_seconds"] = round(float(last["training_seconds"]), 1)
        row["sequences_seen"] = int(last.get("sequences_seen", 0)) if last else 0
        row["wall_seconds"] = round(float(metrics.get("time_total_s", 0.0)), 1)
        row["best_checkpoint"] = _best_checkpoint(result, reported, metric)
        if result.error is not None:
            row["error"] = str(result.error).strip().splitlines()[-1][:200]
        rows.append(row)
    if is_multi(objectives):
        return mark_front(rows, objectives), histories
    return sort_rows(rows, f"best_{metric}", METRIC_MODES[metric]), histories


def _best_checkpoint(result, reported: list[dict[str, Any]], metric: str) -> str | None:
    """The kept checkpoint with the best metric.

    A one-worker trial reports its checkpoints to Tune, which keeps the best (Result.best_checkpoints).
    A multi-worker trial runs a Train run inside it whose TuneReportCallback reports each
    checkpoint only as a `checkpoint_path` metric: Tune holds none of them, so the best is
    the best of those rows (blank, NaN in the dataframe, on reports without a checkpoint).
    A checkpoint set aside as damaged (its folder left empty, `records/checkpoints.py`) never counts.
    """
    if result.best_checkpoints:
        candidates = [
            (row.get(metric), checkpoint.filesystem, checkpoint.path, checkpoint.path)
            for checkpoint, row in result.best_checkpoints
        ]
    else:
        candidates = [
            (row.get(metric), *_filesystem_of(row["checkpoint_path"]), row["checkpoint_path"])
            for row in reported
            if isinstance(row.get("checkpoint_path"), str)
        ]
    return best_checkpoint(candidates, METRIC_MODES[metric])


def _filesystem_of(path: str) -> tuple[Any, str]:
    """(filesystem, path) of a checkpoint a multi-worker trial reported; a local stand-in where
    its storage cannot be reached from here (it then counts, unseen)."""
    try:
        return storage_filesystem(path)
    except Exception:  # noqa: BLE001 (a URI whose filesystem is not reachable from here)
        import pyarrow.fs

        return pyarrow.fs.LocalFileSystem(), "/nonexistent"


def train_best_line(row: dict[str, Any], experiment: str) -> str:
    """The line that trains a search's best trial (`row`, a table row) again. The best is ranked
    by its best report whether or not the trial finished, and `--from` takes an unfinished one
    too; the line says when it errored or stopped early, and at which step."""
    line = f"train the best trial: {train_command(experiment, str(row['trial']))}"
    status = row.get("status")
    if status and status != COMPLETED:
        line += f"  (it did not finish: {status} at step {row.get('steps', '?')})"
    return line


def sort_rows(rows: list[dict[str, Any]], column: str, mode: str) -> list[dict[str, Any]]:
    """Best first; rows without a value last. Marks the best row."""

    def key(row):
        value = row.get(column)
        if not is_finite_number(value):
            return (1, 0.0)
        return (0, value if mode == "min" else -value)

    rows = sorted(rows, key=key)
    for index, row in enumerate(rows):
        row["best"] = BEST_MARK if index == 0 and is_finite_number(row.get(column)) else ""
    return [{"best": row.pop("best"), **row} for row in rows]


# ------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


CLOCK_LABELS = {"step": "step", "training_seconds": "seconds of training"}


def plot_trials(
    path: Path, histories: dict[str, tuple[list[float], list[float]]], metric: str, clock: str = "step"
) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    for trial_id, (readings, values) in histories.items():
        if readings:
            axis.plot(readings, values, marker="o", markersize=3, label=trial_id)
    axis.set_xlabel(CLOCK_LABELS.get(clock, clock))
    axis.set_ylabel(metric)
    axis.set_title("validation metric of every trial")
    if len(histories) <= 20:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_parameters(path: Path, rows: list[dict[str, Any]], space: SearchSpace, metric: str) -> None:
    plt = _pyplot()
    column = f"best_{metric}"
    count = len(space.dimensions)
    figure, axes = plt.subplots(1, count, figsize=(4 * count, 3.6), squeeze=False)
    for axis, dimension in zip(axes[0], space.dimensions):
        points = [(row[dimension.name], row[column]) for row in rows if is_finite_number(row.get(column))]
        if dimension.kind == "choice":
            labels = [str(value) for value in dimension.values]
            xs = [labels.index(str(value)) for value, _ in points if str(value) in labels]
            axis.set_xticks(range(len(labels)), labels, rotation=30)
            axis.set_xlim(-0.5, len(labels) - 0.5)
            ys = [metric_value for value, metric_value in points if str(value) in labels]
        else:
            xs = [value for value, _ in points]
            ys = [metric_value for _, metric_value in points]
            if dimension.kind == "loguniform":
                axis.set_xscale("log")
            elif dimension.kind == "int":
                axis.set_xticks(range(int(dimension.values[0]), int(dimension.values[1]) + 1))
        axis.scatter(xs, ys)
        axis.set_xlabel(dimension.name)
        axis.set_ylabel(column)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def hypervolume_reference(values: list[list[float]], modes: Sequence[str]) -> list[float]:
    """A point worse than every trial on each objective (by a tenth of the objective's spread, or
    of its size where all trials agree), from which the hypervolume is measured."""
    reference = []
    for index, mode in enumerate(modes):
        column = [point[index] for point in values]
        margin = 0.1 * ((max(column) - min(column)) or abs(column[0]) or 1.0)
        reference.append(max(column) + margin if mode == "min" else min(column) - margin)
    return reference


def plot_study(folder: Path, study, objectives: Objectives, metric: str) -> list[str]:
    """Optuna's own plots of the search's stored study (`optuna.visualization.matplotlib`), from
    MIN_TRIALS_FOR_IMPORTANCES completed trials on: parameter importances (fANOVA, each
    objective) and parallel coordinates (the first objective); for two objectives the Pareto
    front and the hypervolume history. Returns the names written."""
    import warnings

    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    plt = _pyplot()
    complete = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCES:
        return []
    metrics = [name for name, _ in objectives] or [metric]
    first = (
        {"target": lambda trial: trial.values[0], "target_name": metrics[0]} if is_multi(objectives) else {}
    )
    plots = {
        # fANOVA explains the objective's variance whatever its direction (Optuna 5's default,
        # PED-ANOVA, takes every objective as one to minimise) and is seeded.
        "optuna_importances.png": lambda: optuna_plots.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        ),
        "optuna_parallel_coordinate.png": lambda: optuna_plots.plot_parallel_coordinate(study, **first),
    }
    if is_multi(objectives):
        reference = hypervolume_reference(
            [trial.values for trial in complete], [mode for _, mode in objectives]
        )
        plots["optuna_pareto_front.png"] = lambda: optuna_plots.plot_pareto_front(study, target_names=metrics)
        plots["optuna_hypervolume.png"] = lambda: optuna_plots.plot_hypervolume_history(study, reference)
    written = []
    for name, draw in plots.items():
        with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = draw()
            except (RuntimeError, ValueError):  # e.g. importances of parameters that never varied
                plt.close("all")
                continue
        figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
        figure.savefig(folder / name, dpi=90, bbox_inches="tight")
        plt.close(figure)
        written.append(name)
    return written


def write_results(
    folder: Path,
    rows,
    histories,
    space: SearchSpace,
    metric: str,
    clock: str = "step",
    objectives: Objectives = (),
    study=None,
) -> list[str]:
    """results.csv, results.md and the plots (`pareto.png` for two objectives, Optuna's plots of
    the search's `study` where given); returns the names written."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULTS_CSV).write_text(to_csv(rows))
    (folder / RESULTS_MD).write_text(to_markdown(rows))
    written = [RESULTS_CSV, RESULTS_MD]
    if is_multi(objectives):
        plot_front(folder / "pareto.png", rows, objectives)
        written.append("pareto.png")
    if histories:
        plot_trials(folder / "trials.png", histories, metric, clock)
        plot_parameters(folder / "parameters.png", rows, space, metric)
        written += ["trials.png", "parameters.png"]
    if study is not None:
        written += plot_study(folder, study, objectives, metric)
    return written


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
    # The all-zeros prediction (a blank frame), where the rows carry its figures on both axes.
    blank = {
        VAL_MSE_FRAME: BASELINE_ZEROS_MSE_FRAME,
        VAL_SSIM: BASELINE_ZEROS_SSIM,
        VAL_INK_SSIM: BASELINE_ZEROS_INK_SSIM,
    }
    axes_blank = [blank.get(metric) for metric, _ in objectives]
    references = [
        row
        for row in points
        if None not in axes_blank and all(is_finite_number(row.get(key)) for key in axes_blank)
    ]
    if references:
        axis.scatter(
            [references[0][axes_blank[0]]],
            [references[0][axes_blank[1]]],
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
