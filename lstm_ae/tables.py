"""Tables of rows (a list of dicts, one per run or trial): Markdown, CSV and HTML, and a CSV
read back. The search's results, the comparison of runs and the doctor's node table share
these writers, so a number reads the same everywhere."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd


def table_frame(rows: list[dict[str, Any]], columns: list[str] | None = None) -> pd.DataFrame:
    """The rows as a DataFrame of Python values: `columns` in that order (default: every key, in
    order of first appearance); a missing or NaN value is None. Object columns keep 6 an int."""
    frame = pd.DataFrame(rows, columns=columns, dtype=object)
    return frame.where(frame.notna(), None)


def read_table(path: Path) -> list[dict[str, Any]]:
    """The rows of a table that to_csv wrote: numbers as int or float, a blank cell None."""
    frame = pd.read_csv(path, dtype_backend="numpy_nullable").astype(object)
    return frame.where(frame.notna(), None).to_dict("records")


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return (
            f"{value:.4g}"
            if abs(value) < 1e-2 or abs(value) >= 1e5
            else f"{value:.2f}".rstrip("0").rstrip(".")
        )
    return str(value)


def to_markdown(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A Markdown table, numbers as _format writes them. Our own writer: pandas' to_markdown
    needs the tabulate package, which this project does not install."""
    cells = table_frame(rows, columns).map(_format)

    def line(values) -> str:
        return "| " + " | ".join(value.replace("|", "\\|") for value in values) + " |"

    lines = [line(cells.columns), "|" + "|".join(" --- " for _ in cells.columns) + "|"]
    lines += [line(values) for values in cells.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """CSV of the rows: full-precision numbers, a missing value blank (read_table reads it back)."""
    return table_frame(rows, columns).to_csv(index=False)


def to_html(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """An HTML table, numbers as in the Markdown table."""
    return table_frame(rows, columns).map(_format).to_html(index=False, border=0) + "\n"
