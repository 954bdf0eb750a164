"""When did a run first reach a given quality? Reads run folders written by `python -m train`.

    python benchmarks/time_to_quality.py runs/before runs/after [--thresholds 130 125 120 118]

For each run: the minutes of training and validation (`elapsed_seconds`, from the first step;
Ray's start-up and the end-of-run probe and pictures are not in it) at which the validation
MSE per frame first fell to each threshold, the best MSE and SSIM reached, and the run's
total wall time from result.json (the whole command: start-up to run folder). "-" marks a
threshold the run never reached. Times are only comparable between runs on the same machine,
ideally measured back to back.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

METRIC = "val_mse_frame"


def read_rows(folder: Path) -> list[dict[str, float]]:
    with open(folder / "metrics.csv", newline="") as stream:
        rows = []
        for record in csv.DictReader(stream):
            try:
                value = float(record.get(METRIC) or "nan")
            except ValueError:
                continue
            if math.isfinite(value):
                rows.append(
                    {key: float(record[key]) for key in ("step", "elapsed_seconds", METRIC, "val_ssim")}
                )
        return rows


def first_reached(rows: list[dict[str, float]], threshold: float) -> float | None:
    for row in rows:
        if row[METRIC] <= threshold:
            return row["elapsed_seconds"]
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with metrics.csv)")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[130, 125, 120, 118])
    arguments = parser.parse_args(argv)
    header = ["run", *(f"<= {t:g}" for t in arguments.thresholds), "best mse", "best ssim", "steps", "wall"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for folder in arguments.runs:
        rows = read_rows(folder)
        if not rows:
            print(f"| {folder.name} | no validation rows in {folder / 'metrics.csv'} |")
            continue
        cells = [folder.name]
        for threshold in arguments.thresholds:
            seconds = first_reached(rows, threshold)
            cells.append("-" if seconds is None else f"{seconds / 60:.1f} min")
        cells.append(f"{min(row[METRIC] for row in rows):.1f}")
        cells.append(f"{max(row['val_ssim'] for row in rows):.3f}")
        cells.append(f"{int(rows[-1]['step'])}")
        result_file = folder / "result.json"
        wall = json.loads(result_file.read_text()).get("wall_seconds") if result_file.is_file() else None
        cells.append("-" if wall is None else f"{wall / 60:.1f} min")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
