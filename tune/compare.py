"""`python -m tune.compare PATH [PATH ...]`: train runs and tune experiments in one table.

    python -m tune.compare runs/ --format markdown
    python -m tune.compare runs/search-a runs/search-b runs/my-run --metric val_bce_nats_frame
    python -m tune.compare runs/ --format html --output report.html

A PATH is a train run folder (it holds result.json), a tune experiment folder (results.csv),
an ablation grid (ablations.csv), or a folder of such folders. Every trial and run becomes a row with its config, metrics,
steps, wall time, status and checkpoint; reference rows are added and marked as such: the
paper's composite model (341.2 BCE nats per frame on the standard test file) and the
trivial baselines (all-zeros, copy-last-frame) as measured on each validation set the runs
used. Rows are sorted by --metric, best first. Trials on the Pareto front of a two-objective
search keep its mark (`front`).

`--format html` writes one self-contained page with each run's pictures (`tune.report`).
Where the best row is a search's trial, the command that trains it follows the table
(`train the best trial: python -m train --from ... --trial ...`; on stderr for csv and html).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lstm_ae.metrics import (
    BASELINE_COPY_LAST_MSE_FRAME,
    BASELINE_ZEROS_MSE_FRAME,
    PAPER_COMPOSITE_CONDITIONAL_BCE_NATS_FRAME,
    PROBE_ACCURACY,
    TABLE_METRIC_MODES,
    VAL_BCE_NATS_FRAME,
    VAL_INK_SSIM,
    VAL_MSE_FRAME,
    VAL_SSIM,
    is_finite_number,
)
from lstm_ae.tables import read_table, to_csv, to_markdown
from records.layout import ABLATIONS_CSV, RESULT_FILE, RESULTS_CSV, SEARCH_FILE
from train.commandline import OneLineParser, fail
from tune.report import html_report
from tune.results import (
    BEST_MARK,
    COMPLETED,
    FRONT_MARK,
    REFERENCE,
    STOPPED,
    sort_rows,
    train_best_line,
    trial_status,
)
from tune.variants import VARIANTS

CONFIG_COLUMNS = ("hidden_size", "num_layers", "learning_rate", "reconstruction_weight", "decoder_mode")


class CompareError(ValueError):
    """A path that holds no readable run or experiment; the message names it."""


def _read_json(path: Path) -> dict[str, Any]:
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _experiment_record(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """An experiment's search.json ({} if absent) and its base config as flat fields."""
    search = _read_json(folder / SEARCH_FILE) if (folder / SEARCH_FILE).exists() else {}
    base = {name: value for section in search.get("base", {}).values() for name, value in section.items()}
    return search, base


def _final(record: dict[str, Any], name: str) -> Any:
    """A trial's last reported value of a metric (results.csv names the searched one final_*)."""
    value = record.get(name)
    return value if value is not None else record.get(f"final_{name}")


def train_run_rows(folder: Path, metric: str) -> list[dict[str, Any]]:
    result = _read_json(folder / RESULT_FILE)
    if not isinstance(result.get("config"), dict):
        raise ValueError("no 'config' section")
    config = {name: value for section in result["config"].values() for name, value in section.items()}
    final = result.get("final_metrics") or {}
    value = result.get("best_metric") if result.get("metric") == metric else final.get(metric)
    row = {
        "source": folder.name,
        "kind": "train run",
        "trial": "",
        "status": result.get("status"),
        **{name: config.get(name) for name in CONFIG_COLUMNS},
        metric: value,
        VAL_BCE_NATS_FRAME: final.get(VAL_BCE_NATS_FRAME) if metric != VAL_BCE_NATS_FRAME else value,
        VAL_MSE_FRAME: final.get(VAL_MSE_FRAME) if metric != VAL_MSE_FRAME else value,
        VAL_SSIM: final.get(VAL_SSIM) if metric != VAL_SSIM else value,
        VAL_INK_SSIM: final.get(VAL_INK_SSIM) if metric != VAL_INK_SSIM else value,
        PROBE_ACCURACY: final.get(PROBE_ACCURACY),
        "steps": result.get("steps"),
        "sequences_seen": result.get("sequences_seen"),
        "wall_seconds": _rounded(result.get("wall_seconds")),
        "workers": result.get("num_workers"),
        "checkpoint": result.get("best_checkpoint") or result.get("final_checkpoint"),
        "_baselines": (final.get(BASELINE_ZEROS_MSE_FRAME), final.get(BASELINE_COPY_LAST_MSE_FRAME)),
        "_test_set": _test_set_description(result["config"]["data"]),
    }
    return [row]


def experiment_rows(folder: Path, metric: str) -> list[dict[str, Any]]:
    search, base = _experiment_record(folder)
    workers = search.get("settings", {}).get("workers_per_trial")
    rows = []
    for record in read_table(folder / RESULTS_CSV):
        best = record.get(f"best_{metric}")
        value = best if best is not None else _final(record, metric)
        rows.append(
            {
                "source": folder.name,
                "kind": "tune trial",
                "trial": record.get("trial"),
                "front": FRONT_MARK if record.get("front") == FRONT_MARK else "",
                "status": record.get("status"),
                **{name: record.get(name, base.get(name)) for name in CONFIG_COLUMNS},
                metric: value,
                VAL_BCE_NATS_FRAME: value
                if metric == VAL_BCE_NATS_FRAME
                else _final(record, VAL_BCE_NATS_FRAME),
                VAL_MSE_FRAME: value if metric == VAL_MSE_FRAME else _final(record, VAL_MSE_FRAME),
                VAL_SSIM: value if metric == VAL_SSIM else _final(record, VAL_SSIM),
                VAL_INK_SSIM: value if metric == VAL_INK_SSIM else _final(record, VAL_INK_SSIM),
                PROBE_ACCURACY: value if metric == PROBE_ACCURACY else _final(record, PROBE_ACCURACY),
                "steps": record.get("steps"),
                "sequences_seen": record.get("sequences_seen"),
                "wall_seconds": record.get("wall_seconds"),
                "workers": workers,
                "checkpoint": record.get("best_checkpoint"),
                "_baselines": (
                    record.get(BASELINE_ZEROS_MSE_FRAME),
                    record.get(BASELINE_COPY_LAST_MSE_FRAME),
                ),
                "_test_set": _test_set_description(search.get("base", {}).get("data", {})),
            }
        )
    return rows


def ablation_rows(folder: Path, metric: str) -> list[dict[str, Any]]:
    """One row per trial of an ablation grid (ablations.csv): the variant's config on the base."""
    search, base = _experiment_record(folder)
    rows = []
    for record in read_table(folder / ABLATIONS_CSV):
        variant = VARIANTS.get(record.get("variant"))
        config = {**base, **(variant.overrides if variant else {})}

        def measured(name: str, record=record, variant=variant) -> Any:
            """Blank for the prediction metrics of a variant that does not train prediction."""
            untrained = variant is not None and not variant.trains_prediction
            return None if untrained and name in (VAL_MSE_FRAME, VAL_BCE_NATS_FRAME) else record.get(name)

        rows.append(
            {
                "source": folder.name,
                "kind": "ablation trial",
                "trial": f"{record.get('variant')} seed {record.get('seed')}",
                "status": _ablation_status(record, base.get("max_steps"), bool(base.get("max_minutes"))),
                **{name: config.get(name) for name in CONFIG_COLUMNS},
                **{
                    name: measured(name)
                    for name in (metric, VAL_BCE_NATS_FRAME, VAL_MSE_FRAME, PROBE_ACCURACY)
                },
                "steps": record.get("step"),
                "sequences_seen": _product(record.get("step"), base.get("batch_size")),
                "workers": search.get("settings", {}).get("workers_per_trial"),
                "_baselines": (None, None),
                "_test_set": _test_set_description(search.get("base", {}).get("data", {})),
            }
        )
    return rows


def _ablation_status(record: dict[str, Any], max_steps: int | None, timed: bool = False) -> str:
    """A grid trial's status in results.csv's words. ablations.csv says whether a trial
    `finished` (reached max_steps or stopped on its patience; older tables lack the column);
    the step against the base's max_steps tells which. Without search.json beside the table
    (the local copy of a grid in remote storage) max_steps is unknown: `finished` alone."""
    errored, finished = bool(record.get("error")), record.get("finished")
    if timed and finished is True and not errored:
        return COMPLETED  # ended at its own --max-minutes (ablations.csv does not tell it from patience)
    if max_steps is None and not errored:
        return STOPPED if finished is False else COMPLETED
    return trial_status(errored, record.get("step") or 0, max_steps, stopped_early=finished is True)


def _rounded(seconds: Any) -> float | None:
    return round(float(seconds), 1) if isinstance(seconds, (int, float)) else None


def _product(left: Any, right: Any) -> Any:
    return left * right if isinstance(left, int) and isinstance(right, int) else None


def _test_set_description(data: dict[str, Any]) -> str:
    if data.get("test_file"):
        return f"file {data['test_file']}"
    return f"generated: {data.get('digit_source')} digits, {data.get('test_sequences')} sequences, seed {data.get('test_seed')}"


def collect(paths: Sequence[Path], metric: str) -> list[dict[str, Any]]:
    """Rows of every run and trial under `paths` (folders of runs are searched one level down)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"not a folder: {path}")
        candidates = [path] if _kind(path) else sorted(child for child in path.iterdir() if child.is_dir())
        found = False
        for folder in candidates:
            kind = _kind(folder)
            read = {
                "train run": train_run_rows,
                "tune experiment": experiment_rows,
                "ablation grid": ablation_rows,
            }.get(kind)
            if read is None:
                continue
            try:
                rows += [{**row, "_folder": folder} for row in read(folder, metric)]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise CompareError(f"{folder}: not a readable {kind}: {error}") from None
            found = True
        if not found:
            raise FileNotFoundError(
                f"{path} holds no train run (result.json), tune experiment (results.csv) "
                "or ablation grid (ablations.csv)"
            )
    return rows


def _kind(folder: Path) -> str | None:
    if (folder / RESULT_FILE).is_file():
        return "train run"
    if (folder / RESULTS_CSV).is_file():
        return "tune experiment"
    if (folder / ABLATIONS_CSV).is_file():
        return "ablation grid"
    return None


def reference_rows(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The paper's figure and, per validation set seen, the trivial baselines measured on it."""
    references = [
        {
            "source": "Srivastava et al. 2015, composite model, conditional future predictor (standard test file)",
            "kind": REFERENCE,
            VAL_BCE_NATS_FRAME: PAPER_COMPOSITE_CONDITIONAL_BCE_NATS_FRAME,
            metric: PAPER_COMPOSITE_CONDITIONAL_BCE_NATS_FRAME if metric == VAL_BCE_NATS_FRAME else None,
        }
    ]
    seen: dict[str, tuple] = {}
    for row in rows:
        zeros, copy_last = row.get("_baselines", (None, None))
        if zeros is not None and row["_test_set"] not in seen:
            seen[row["_test_set"]] = (zeros, copy_last)
    for test_set, (zeros, copy_last) in seen.items():
        for label, value in (("all-zeros prediction", zeros), ("copy-last-frame prediction", copy_last)):
            references.append(
                {
                    "source": f"{label} ({test_set})",
                    "kind": REFERENCE,
                    metric: value if metric == VAL_MSE_FRAME else None,
                    VAL_MSE_FRAME: value,
                }
            )
    return references


def ranked_rows(paths: Sequence[Path], metric: str) -> list[dict[str, Any]]:
    """comparison_table's rows; those of runs and trials keep `_folder`, the run or experiment
    folder they came from."""
    rows = collect(paths, metric)
    rows += reference_rows(rows, metric)
    for row in rows:
        row.pop("_baselines", None)
        row.pop("_test_set", None)
    ordered = sort_rows(rows, metric, TABLE_METRIC_MODES[metric])
    # The best mark is for runs, not references.
    for row in ordered:
        row["best"] = ""
    first_run = next(
        (row for row in ordered if row["kind"] != REFERENCE and is_finite_number(row.get(metric))), None
    )
    if first_run is not None:
        first_run["best"] = BEST_MARK
    return ordered


def comparison_table(paths: Sequence[Path], metric: str) -> list[dict[str, Any]]:
    return [
        {name: value for name, value in row.items() if name != "_folder"}
        for row in ranked_rows(paths, metric)
    ]


def best_trial_line(rows: list[dict[str, Any]]) -> str | None:
    """The command that trains the best row again, where that row is a search's trial."""
    best = next((row for row in rows if row.get("best") == BEST_MARK), None)
    if best is None or best.get("kind") != "tune trial" or not best.get("trial"):
        return None
    return train_best_line(best, str(Path(best["_folder"]).resolve()))


def table_columns(metric: str, rows: Sequence[dict[str, Any]] = ()) -> list[str]:
    """The table's columns: the sort metric after the config, then the other metrics; `front`
    (a two-objective search's Pareto front, from its results.csv) where a row has the mark."""
    front = ["front"] if any(row.get("front") for row in rows) else []
    columns = ["best", *front, "source", "kind", "trial", "status", *CONFIG_COLUMNS, metric]
    others = (VAL_BCE_NATS_FRAME, VAL_MSE_FRAME, VAL_SSIM, VAL_INK_SSIM, PROBE_ACCURACY)
    columns += [name for name in others if name != metric]
    return columns + ["steps", "sequences_seen", "wall_seconds", "workers", "checkpoint"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m tune.compare", description=__doc__.split("\n")[0].split(": ", 1)[1]
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, help="train runs, tune experiments, or folders of them"
    )
    parser.add_argument(
        "--format",
        choices=("markdown", "csv", "html"),
        default="markdown",
        help="output format; html is a self-contained page with each run's pictures",
    )
    parser.add_argument(
        "--metric", choices=tuple(TABLE_METRIC_MODES), default=VAL_MSE_FRAME, help="sort by this metric"
    )
    parser.add_argument("--output", type=Path, default=None, help="write to this file (default: stdout)")
    arguments = parser.parse_args(argv)
    try:
        rows = ranked_rows(arguments.paths, arguments.metric)
    except (FileNotFoundError, CompareError) as error:
        fail(str(error))
    if arguments.format == "html":
        text = html_report(rows, arguments.metric, arguments.paths, table_columns(arguments.metric, rows))
    else:
        render = {"markdown": to_markdown, "csv": to_csv}[arguments.format]
        text = render(rows, table_columns(arguments.metric, rows))
    winner = best_trial_line(rows)  # on stdout below a markdown table, else beside the file or on stderr
    if arguments.output is None:
        sys.stdout.write(text)
        if winner and arguments.format == "markdown":
            print(("\n" if text.endswith("\n") else "\n\n") + winner)
        elif winner:
            print(winner, file=sys.stderr)
        return 0
    try:
        arguments.output.write_text(text, encoding="utf-8")
    except OSError as error:
        fail(f"cannot write {arguments.output}: {error.strerror or error}")
    print(f"wrote {arguments.output}" + (f"\n{winner}" if winner else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
