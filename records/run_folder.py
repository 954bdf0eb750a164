"""A run folder (`python -m train`, `<storage>/<name>/`, Ray Train's own folder): whether a
command may start or resume it, what it says about its run, and the files the driver adds
after training. Ray-free: the driver hands in Ray's Result, read by its attributes.

Ray keeps the checkpoints there (`checkpoint_<step>/`, the best `keep_checkpoints` by the
validation metric plus the latest). A run locks the folder before Ray starts
(`records.folder_lock`); a resume first sets aside checkpoints that do not load
(`records.checkpoints`). After training the driver adds, from the final checkpoint:

    config.json      the experiment config and how it was scaled (and, for a run started
                     with --from, `source`: where its config came from; result.json too)
    metrics.csv      one row per report (losses, throughput, validation metrics)
    result.json      final metrics with units, best checkpoint, wall time, sequences seen
    prediction.gif, reconstruction.gif, frames.png, curves.png

A run folder without a checkpoint that loads (the run stopped before its first was stored,
or every one is damaged) is not resumed: `--resume` says so in one line, and a new start in
the folder sets what is damaged aside (`check_run_start`).

The resume policy lives here too: a resumed run keeps its saved config, and may change only
`RESUMABLE_FIELDS` (`python -m train --resume`).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any

from lstm_ae.config import ConfigError, ExperimentConfig
from lstm_ae.metrics import METRIC_MODES, UNITS
from lstm_ae.viz import RUN_PICTURES
from records.checkpoints import best_checkpoint, checkpoint_key, set_aside, stored_problem
from records.layout import CONFIG_FILE, DAMAGED_PREFIX, HISTORY_FILE, METRICS_FILE, RESULT_FILE, SNAPSHOT_FILE
from records.storage import path_exists, read_text, storage_filesystem, write_text


class RunFolderError(ValueError):
    """A run or experiment folder is in a state the command cannot act on (exists without
    --resume, nothing to resume, ...)."""


def check_folder(started: bool, resume: bool, folder: str, what: str, name: str, under: str) -> None:
    """A new run (or experiment) must not overwrite an old one; a resume needs something to
    resume. `what`: "run" or "experiment"."""
    if started and not resume:
        raise RunFolderError(
            f"{what} folder {folder} already exists: pass --resume to continue it, or choose another --name"
        )
    if resume and not started:
        raise RunFolderError(f"nothing to resume: no {what} named {name!r} under {under}")


def checkpoint_folders(filesystem, run_path: str) -> list[str]:
    """The names of a run folder's `checkpoint_<step>` folders, newest first."""
    import pyarrow.fs

    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(run_path, allow_not_found=True))
    named = [
        (checkpoint_key(info.base_name), info.base_name)
        for info in infos
        if info.type == pyarrow.fs.FileType.Directory and checkpoint_key(info.base_name) is not None
    ]
    return [name for _, name in sorted(named, reverse=True)]


def damaged_checkpoints(filesystem, run_path: str) -> tuple[bool, list[tuple[str, str]]]:
    """(whether one of the run folder's checkpoints loads, (name, why not) of those that do
    not, newest first)."""
    damaged = []
    for name in checkpoint_folders(filesystem, run_path):
        problem, _ = stored_problem(filesystem, f"{run_path}/{name}")
        if problem is None:
            return True, damaged
        damaged.append((name, problem))
    return False, damaged


def no_complete_checkpoint(what: str, damaged: list[tuple[str, str]]) -> str:
    """Why `what` ("run e") cannot be resumed when none of its checkpoints loads."""
    if not damaged:
        return (
            f"{what} has no checkpoint to resume from (it stopped before its first checkpoint was "
            "stored): start it again without --resume"
        )
    if len(damaged) == 1:
        (name, reason), = damaged  # fmt: skip
        return f"{what} has no complete checkpoint: its only checkpoint, {name}, is damaged ({reason}): start it again without --resume"
    names = ", ".join(name for name, _ in damaged)
    return f"{what} has no complete checkpoint: all {len(damaged)} of its checkpoints ({names}) are damaged: start it again without --resume"


def check_run_start(filesystem, run_path: str, name: str, started: bool, resume: bool, log=print) -> bool:
    """Whether the run folder holds a run that `--resume` continues (`started`: Ray's list of
    checkpoints is there). Where a run began (config.json) but none of its checkpoints
    loads, a resume is refused in one line saying so (`no_complete_checkpoint`), and a new
    start sets the damaged checkpoints and Ray's list aside (`damaged_<name>`, never deleted)
    so that Ray starts anew. Returns whether the folder counts as started."""
    if not path_exists(filesystem, f"{run_path}/{CONFIG_FILE}"):
        return started
    loads, damaged = damaged_checkpoints(filesystem, run_path)
    if loads:
        return started
    if resume:
        raise RunFolderError(no_complete_checkpoint(f"run {name}", damaged))
    for folder, reason in damaged:
        aside = set_aside(filesystem, f"{run_path}/{folder}")
        log(f"setting damaged checkpoint {folder} aside ({reason}){f': kept as {aside}' if aside else ''}")
    if started:
        filesystem.move(f"{run_path}/{SNAPSHOT_FILE}", f"{run_path}/{DAMAGED_PREFIX}{SNAPSHOT_FILE}")
    return False


def continue_line(command: str, flags: str, resumable: bool, unstarted: str) -> str:
    """How to go on with a stopped run or experiment: resume it where it can be, else start it
    again (`unstarted` says why it cannot be resumed)."""
    if resumable:
        return f"continue it with: python -m {command} {flags} --resume"
    return f"{unstarted}: start it again with python -m {command} {flags} and the same flags"


def check_resumed_flags(
    given: dict[str, Any], saved: dict[str, Any], what: str, may_change: frozenset[str] = frozenset()
) -> None:
    """The one resume rule of `train` and `tune`: a resumed run or experiment keeps its saved
    config. Config flags equal to it are accepted (the command recalled with `--resume` added);
    flags that differ, except `may_change`, are refused in one line naming each and both values."""
    changed = [
        f"--{name.replace('_', '-')} {value} (saved: {saved[name]})"
        for name, value in given.items()
        if name not in may_change and value != saved.get(name)
    ]
    if changed:
        raise ConfigError(
            f"--resume continues the {what} with its saved config, and these flags differ from it: "
            f"{', '.join(changed)}; drop them, or start a new --name"
        )


def folder_flags(name: str, storage: str) -> str:
    """The flags that name a run or experiment folder again."""
    return f"--name {name}" + (f" --output-dir {storage}" if storage != "runs" else "")


def write_run_config(
    filesystem,
    run_path: str,
    config: ExperimentConfig,
    scaling: dict[str, Any],
    source: dict[str, Any] | None,
) -> None:
    """config.json, written when a run starts (before Ray): its config, scaling and source."""
    filesystem.create_dir(run_path, recursive=True)
    record = {"config": config.to_dict(), "scaling": scaling, **({"source": source} if source else {})}
    write_text(filesystem, f"{run_path}/{CONFIG_FILE}", json.dumps(record, indent=2))


# Config fields a resumed run may change: they decide when it logs, validates, checkpoints
# or stops, and where it finds its data, not what it computes (max_steps may only grow).
RESUMABLE_FIELDS = frozenset(
    {
        "max_steps",
        "max_minutes",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "probe_sequences",
        "patience",
        "cache_dir",
        "mnist_root",
        "download",
    }
)


@dataclass(frozen=True)
class SavedRun:
    """What a run folder says about the run: its config and scaling (config.json) and, once
    it has ended, its result (result.json)."""

    config: ExperimentConfig
    num_workers: int
    result: dict[str, Any] | None

    def is_complete(self, config: ExperimentConfig) -> bool:
        """Ended, and `config` asks for no more steps or minutes (a run that stopped early
        stays ended)."""
        if self.result is None:
            return False
        planned_minutes = float(self.result.get("planned_minutes") or 0)
        return (
            self.result.get("status") == "stopped_early"
            or int(self.result.get("steps", 0)) >= config.training.max_steps
            or 0 < config.training.max_minutes <= planned_minutes
        )


def saved_run(storage: str, name: str) -> SavedRun | None:
    """The run folder's record of the run, or None where it has no config.json yet."""
    filesystem, root = storage_filesystem(storage)
    path = f"{root}/{name}"
    if not path_exists(filesystem, f"{path}/{CONFIG_FILE}"):
        return None
    try:
        record = json.loads(read_text(filesystem, f"{path}/{CONFIG_FILE}"))
        config = ExperimentConfig.from_dict(record["config"])
        num_workers = int(record.get("scaling", {}).get("num_workers", 1))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path}/config.json is not a readable run config: {error}") from None
    result = None
    if path_exists(filesystem, f"{path}/{RESULT_FILE}"):
        try:
            result = json.loads(read_text(filesystem, f"{path}/{RESULT_FILE}"))
        except ValueError as error:
            raise ConfigError(f"{path}/result.json is not readable: {error}") from None
    return SavedRun(config, num_workers, result)


def saved_source(filesystem, run_path: str) -> dict[str, Any] | None:
    """The `source` a run's config.json already holds (a resumed run started with --from)."""
    if not path_exists(filesystem, f"{run_path}/{CONFIG_FILE}"):
        return None
    try:
        return json.loads(read_text(filesystem, f"{run_path}/{CONFIG_FILE}")).get("source")
    except (ValueError, AttributeError):
        return None


def write_run_folder(
    result,
    config: ExperimentConfig,
    scaling: dict[str, Any],
    wall_seconds: float,
    storage: str,
    name: str,
    source: dict[str, Any] | None,
) -> tuple[str, dict[str, Any]]:
    """metrics.csv, result.json and the pictures, from the run's final checkpoint; returns
    (run folder, summary). `result` is Ray Train's Result (its `checkpoint` and
    `best_checkpoints`); `scaling` holds `num_workers` and `use_gpu`."""
    filesystem, root = storage_filesystem(storage)
    run_path = f"{root}/{name}"
    checkpoint_path = result.checkpoint.path
    checkpoint_fs = result.checkpoint.filesystem
    state = json.loads(read_text(checkpoint_fs, f"{checkpoint_path}/{HISTORY_FILE}"))
    history = state["history"]
    write_text(filesystem, f"{run_path}/{METRICS_FILE}", history_csv(history))
    for picture in RUN_PICTURES:
        picture_path = f"{checkpoint_path}/{picture}"
        if path_exists(checkpoint_fs, picture_path):
            with checkpoint_fs.open_input_stream(picture_path) as reader:
                data = reader.read()
            with filesystem.open_output_stream(f"{run_path}/{picture}") as writer:
                writer.write(data)
    metric = config.training.metric
    best, best_row = _best_kept_checkpoint(result.best_checkpoints, metric)
    summary = {
        "name": name,
        "status": "stopped_early" if state["stopped_early"] else "completed",
        "steps": state["step"],
        "sequences_seen": state["sequences_seen"],
        "training_seconds": state.get("training_seconds", state["elapsed_seconds"]),  # the steps
        "elapsed_seconds": state["elapsed_seconds"],  # the steps and the validations
        "planned_minutes": state.get("planned_minutes", 0.0),  # the time budget that set its end
        "wall_seconds": wall_seconds,
        "num_workers": scaling["num_workers"],
        "use_gpu": scaling["use_gpu"],
        "metric": metric,
        "metric_mode": METRIC_MODES[metric],
        # The best validation seen (best_step may fall between checkpoints when eval_every is
        # finer than checkpoint_every), and the best checkpoint kept, with its own step and value.
        "best_metric": state["best_metric"],
        "best_step": state["best_step"],
        "best_checkpoint": best,
        "best_checkpoint_step": best_row.get("step"),
        "best_checkpoint_metric": best_row.get(metric),
        "resumed_from": state["resumed_from"],
        "final_checkpoint": f"{checkpoint_path}",
        "final_metrics": {
            key: value for key, value in history[-1].items() if key in UNITS or key.endswith("loss")
        }
        if history
        else {},
        "units": {key: UNITS[key] for key in (history[-1] if history else {}) if key in UNITS},
        "replica_checksums": history[-1].get("replica_checksums") if history else None,
        # The precision the run trained in ('auto' resolved on the workers' hardware, and why).
        "precision": state.get("precision") or config.training.precision,
        "precision_choice": state.get("precision_choice", {}),
        "config": config.to_dict(),
    }
    if source:
        summary["source"] = source
    write_text(filesystem, f"{run_path}/{RESULT_FILE}", json.dumps(summary, indent=2))
    _record_precision(filesystem, run_path, summary["precision"], summary["precision_choice"])
    return run_path, summary


def _record_precision(filesystem, run_path: str, precision: str, choice: dict[str, Any]) -> None:
    """config.json gains the resolved precision beside the config as asked (which keeps
    'auto', so that `--resume` with the same flags matches it)."""
    path = f"{run_path}/{CONFIG_FILE}"
    if not path_exists(filesystem, path):
        return
    record = json.loads(read_text(filesystem, path))
    record["precision"] = {"resolved": precision, **{k: v for k, v in choice.items() if k != "precision"}}
    write_text(filesystem, path, json.dumps(record, indent=2))


def _best_kept_checkpoint(best_checkpoints, metric: str) -> tuple[str | None, dict[str, Any]]:
    """(path, reported row) of the best checkpoint Ray kept (Ray keeps their metrics)."""
    best = best_checkpoint(
        ((row.get(metric), checkpoint.filesystem, checkpoint.path, (checkpoint.path, row))
         for checkpoint, row in best_checkpoints),
        METRIC_MODES[metric],
    )  # fmt: skip
    return best or (None, {})


def history_csv(history: list[dict[str, Any]]) -> str:
    """One CSV row per report; columns are the union of the rows' keys, in first-seen order."""
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns and not isinstance(row[key], (list, dict))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()
