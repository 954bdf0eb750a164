"""The page of `python -m tune.compare --format html`: one self-contained HTML file (no
network access: inline CSS, pictures as data URIs) with the comparison table, its best row
marked, then a section per train run (its curves.png, prediction.gif and frames.png), per
search (the same pictures of its best trial, from that trial's best checkpoint, and
trials.png) and per ablation grid (ablations.png), in the table's order.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from lstm_ae.metrics import TABLE_METRIC_MODES, is_finite_number
from lstm_ae.tables import to_html
from tune.results import REFERENCE

RUN_PICTURES = (
    ("curves.png", "training losses and the validation metric, with the trivial baselines"),
    ("prediction.gif", "left: the true sequence; right: the same past, then the model's prediction "
     "(the bar on top lights while frames are predicted)"),
    ("frames.png", "per sequence: input, true future, predicted future, reconstruction"),
)  # fmt: skip
EXPERIMENT_PICTURES = {
    "tune experiment": (
        ("trials.png", "the validation metric over steps, every trial of the search"),
        ("pareto.png", "two objectives: every trial, the Pareto front, the trial the rule picks"),
        ("optuna_importances.png", "Optuna's parameter importances (fANOVA), from the search's study"),
        (
            "optuna_parallel_coordinate.png",
            "Optuna's parallel coordinates: each trial's parameters and value",
        ),
        ("optuna_pareto_front.png", "two objectives: Optuna's Pareto front of the study"),
        ("optuna_hypervolume.png", "two objectives: the hypervolume of the front as trials completed"),
    ),
    "ablation grid": (("ablations.png", "each variant's metrics, mean over seeds"),),
}
MIME_TYPES = {".png": "image/png", ".gif": "image/gif"}
STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ccc; }
.table-wrap { overflow-x: auto; }
table.dataframe { border-collapse: collapse; font-size: 0.75em; }
table.dataframe th, table.dataframe td { padding: 0.25em 0.35em; border-bottom: 1px solid #ddd;
  text-align: right; overflow-wrap: break-word; }
table.dataframe th { background: #f0f0f0; vertical-align: bottom; }
table.dataframe :is(th, td):is(:nth-child(-n+5), :last-child) { text-align: left; }
table.dataframe td:first-child { white-space: nowrap; }
table.dataframe td:nth-child(2) { min-width: 10em; }
table.dataframe td:last-child { min-width: 14em; overflow-wrap: anywhere; }
tr.reference td { color: #666; font-style: italic; background: #fafafa; }
tr.front td:first-child { box-shadow: inset 4px 0 0 #1f77b4; }
tr.best td { background: #fff3b0; font-weight: bold; }
tr.best td:first-child::before { content: "\\2605  "; color: #c08000; }
.legend, .note, figcaption { font-size: 0.85em; color: #555; }
.pictures { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
figure { margin: 0; max-width: 100%; display: table; }
figcaption { display: table-caption; caption-side: bottom; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figure img[src^="data:image/gif"] { image-rendering: pixelated; }
"""


def _local_checkpoint(recorded: Any, folder: Path) -> Path | None:
    """A checkpoint folder on this machine: the recorded path's tail below `folder` (a run or
    experiment copied from the cluster keeps its layout under its own name), else the recorded
    path itself; None when neither exists."""
    if not isinstance(recorded, str) or not recorded:
        return None
    parts = PurePosixPath(recorded.split("://", 1)[-1].rstrip("/")).parts
    name = folder.resolve().name
    candidates = []
    if name in parts:
        last = len(parts) - 1 - parts[::-1].index(name)
        candidates.append(folder.joinpath(*parts[last + 1 :]))
    candidates.append(Path(recorded))
    return next((candidate for candidate in candidates if candidate.is_dir()), None)


def _figure(path: Path, caption: str) -> str:
    """A <figure> with the picture as a data URI, or a note when it cannot be read."""
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as error:
        return f'<p class="note">could not read {html.escape(str(path))}: {html.escape(error.strerror or str(error))}</p>'
    return (
        f'<figure><img src="data:{MIME_TYPES[path.suffix]};base64,{data}" alt="{html.escape(path.name)}">'
        f"<figcaption><b>{html.escape(path.name)}</b>: {html.escape(caption)}<br>"
        f"<code>{html.escape(str(path))}</code></figcaption></figure>"
    )


def _pictures(folders: Sequence[Path | None], pictures: Sequence[tuple[str, str]]) -> list[str]:
    """Figures of the pictures in the first of `folders` that holds any of them."""
    for folder in folders:
        if folder is not None and any((folder / name).is_file() for name, _ in pictures):
            return [
                _figure(folder / name, caption) for name, caption in pictures if (folder / name).is_file()
            ]
    return []


def _section(best: dict[str, Any], metric: str) -> str:
    """A run's or experiment's heading, what its best row says, and its pictures."""
    folder, kind = best["_folder"], best["kind"]
    value = best.get(metric)
    has_value = is_finite_number(value)
    checkpoint = _local_checkpoint(best.get("checkpoint"), folder)
    figures: list[str] = []
    if kind == "train run":
        title = f"Train run {folder.resolve().name}"
        summary = f"{metric} {_format_value(value)}, {best.get('status')}, {best.get('steps')} steps"
        figures = _pictures([folder, checkpoint], RUN_PICTURES)
    elif kind == "tune trial":
        title = f"Search {folder.resolve().name}" + (f": best trial {best.get('trial')}" if has_value else "")
        summary = (
            f"{metric} {_format_value(value)}, {best.get('status')}, {best.get('steps')} steps; "
            f"pictures from its best checkpoint, {best.get('checkpoint') or 'not recorded'}"
            if has_value
            else f"no trial reported {metric}"
        )
        if has_value:
            figures = _pictures([checkpoint], RUN_PICTURES)
        figures += _pictures([folder], EXPERIMENT_PICTURES["tune experiment"])
    else:
        title = f"Ablation grid {folder.resolve().name}"
        summary = (
            f"best trial {best.get('trial')}: {metric} {_format_value(value)}; "
            "the grid keeps no pictures per trial"
        )
        figures = _pictures([folder], EXPERIMENT_PICTURES["ablation grid"])
    if not figures:
        figures = [f'<p class="note">no pictures found in {html.escape(str(checkpoint or folder))}</p>']
    return "\n".join(
        [
            f"<section><h2>{html.escape(title)}</h2>",
            f'<p class="note">{html.escape(summary)}. Folder: <code>{html.escape(str(folder))}</code></p>',
            '<div class="pictures">',
            *figures,
            "</div></section>",
        ]
    )


def _format_value(value: Any) -> str:
    return f"{value:.4g}" if is_finite_number(value) else "-"


def _marked_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """pandas' HTML table with each body row's class: `best`, `reference`, `front` (on a
    two-objective search's Pareto front) or none."""
    table = to_html(rows, columns)
    head, body = table.split("<tbody>", 1)
    head = head.replace("_", "_<wbr>")  # column names break after an underscore, not mid-word
    pieces = body.split("<tr>")  # cells are escaped: every <tr> opens a row, in order
    if len(pieces) != len(rows) + 1:
        raise RuntimeError(f"expected {len(rows)} rows in pandas' table, found {len(pieces) - 1}")
    classes = [
        "best"
        if row.get("best")
        else "reference"
        if row["kind"] == REFERENCE
        else "front"
        if row.get("front")
        else ""
        for row in rows
    ]
    marked = [f'<tr class="{name}">' if name else "<tr>" for name in classes]
    return head + "<tbody>" + pieces[0] + "".join(tag + piece for tag, piece in zip(marked, pieces[1:]))


def html_report(rows: list[dict[str, Any]], metric: str, paths: Sequence[Path], columns: list[str]) -> str:
    """The whole page: the table (rows as `tune.compare.ranked_rows` returns them, in
    `columns`), then one section per run or experiment folder, in the order of its best row."""
    direction = "lower" if TABLE_METRIC_MODES[metric] == "min" else "higher"
    best_rows: dict[Path, dict[str, Any]] = {}
    for row in rows:
        if "_folder" in row:
            best_rows.setdefault(row["_folder"], row)  # rows are best first
    marked = [{**row, "best": "best" if row.get("best") else ""} for row in rows]
    table = _marked_table(marked, columns)
    inputs = ", ".join(str(path) for path in paths)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>lstm-ae comparison: {html.escape(inputs)}</title>",
            f"<style>{STYLE}</style></head><body>",
            f"<h1>Runs and trials by {html.escape(metric)} ({direction} is better)</h1>",
            f'<p class="legend">From <code>{html.escape(inputs)}</code>. The highlighted row, marked '
            "&#9733; best, is the best run or trial; grey italic rows are references (the paper, "
            "the trivial baselines)"
            + (
                "; rows with a blue edge are on the Pareto front of a two-objective search"
                if any(row.get("front") for row in rows)
                else ""
            )
            + ". Below the table, each run and the best trial of each search "
            "with its pictures, best first.</p>",
            f'<div class="table-wrap">{table}</div>',
            *(_section(best, metric) for best in best_rows.values()),
            "</body></html>",
            "",
        ]
    )
