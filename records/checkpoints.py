"""The checkpoints of a run as they lie in its folder: the training state each carries, and
the newest one that loads.

A checkpoint folder holds `checkpoint.pt` (`lstm_ae.checkpoint`: weights, optimizer,
schedule, config) and `history.json` (`TrainingState`: what the run has done so far: the
step, the clocks, the best validation and early stopping, the schedule's ends, the reports),
so that a restarted or resumed run carries on where it was.

A damaged checkpoint (a node lost mid-upload, a full disk) is skipped with one line, set
aside as `damaged_<name>` (never deleted) and never counted as the best; the run goes on
from the newest checkpoint before it. The worker meets one when Ray Train (or Tune) hands it
a checkpoint to restart or resume from (`newest_loadable`): it tries the handed one, then the
run folder's older `checkpoint_<step>` folders, newest first. Rank 0 sets a damaged one aside
and leaves an empty folder in its place, because Ray's controller still lists it and deletes
it when it drops out of the kept checkpoints; the checkpoints written after the fallback get
a fresh name where the skipped one's would repeat (`checkpoint_<step>_1`). The driver meets
them before Ray starts on `--resume`: `train.ray_internals.repair_snapshot` drops them from
Ray's own list of checkpoints.

A checkpoint that did not fit never looks complete (`store_checkpoint`): on a local disk it is
written aside (`.<name>.partial`) and renamed into place whole; on an object store, where a
folder cannot be renamed but each object appears whole, `checkpoint.pt` is written last. A
full disk ends the copy with `StorageFullError`, one line naming the disk, the space the
checkpoint needs and the space free.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import torch

from lstm_ae.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from lstm_ae.metrics import METRIC_MODES, best_of, is_finite_number
from records.layout import DAMAGED_PREFIX, HISTORY_FILE
from records.storage import is_local, local_copy, path_exists, read_text


@dataclass
class TrainingState:
    """Progress that must survive a restart; saved beside the weights in every checkpoint."""

    step: int = 0
    sequences_seen: int = 0
    elapsed_seconds: float = 0.0  # training steps and validations
    training_seconds: float = 0.0  # training steps only (what --max-minutes budgets)
    best_metric: float | None = None
    best_step: int | None = None
    evaluations_since_best: int = 0
    stopped_early: bool = False
    resumed_from: list[int] = field(default_factory=list)  # steps the run restarted at
    # max_minutes the schedule's end was last planned for (0: none; see TimeBudget).
    planned_minutes: float = 0.0
    # The precision the run trains in, resolved once at its start (train.worker)
    # and kept by every restart and resume, with the facts that decided it.
    precision: str = ""
    precision_choice: dict[str, Any] = field(default_factory=dict)
    # The learning-rate schedule's ends: [[0, max_steps]], then [step, new max_steps] for each
    # resume that raised max_steps (engine.learning_rate_factor keeps the rate continuous).
    schedule: list[list[int]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.stopped_early or (bool(self.schedule) and self.step >= self.schedule[-1][1])


def update_early_stopping(state: TrainingState, row: dict[str, Any], metric: str, patience: int) -> None:
    """Track the best value of `metric` in a validation row; stop after `patience` (0: never)
    validations without improvement."""
    value = row.get(metric)
    if value is None or not math.isfinite(value):
        return
    better = state.best_metric is None or (
        value < state.best_metric if METRIC_MODES[metric] == "min" else value > state.best_metric
    )
    if better:
        state.best_metric, state.best_step, state.evaluations_since_best = value, state.step, 0
    else:
        state.evaluations_since_best += 1
        state.stopped_early = patience > 0 and state.evaluations_since_best >= patience


T = TypeVar("T")
_NAME = re.compile(r"checkpoint_(\d+)(?:_(\d+))?")


def checkpoint_key(name: str) -> tuple[int, int] | None:
    """(step, repeat) of `checkpoint_<step>[_<repeat>]` (Tune's own names count reports); None
    for other names."""
    match = _NAME.fullmatch(name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def fresh_checkpoint_name(name: str, taken: set[str]) -> str:
    """`name`, or `name_1`, `name_2`, ... where `name` belongs to a skipped checkpoint."""
    candidate, repeat = name, 0
    while candidate in taken:
        repeat += 1
        candidate = f"{name}_{repeat}"
    return candidate


def _short(reason: str) -> str:
    """torch's miniz errors run on for a paragraph: keep their first sentence."""
    head, separator, _ = reason.partition(". ")
    return head if separator and len(reason) > 160 else reason


# ------------------------------------------------------------------------------ checking


def folder_problem(folder: str | os.PathLike) -> tuple[str | None, TrainingState | None]:
    """(why the local checkpoint folder does not load, or None; its state when it does).

    Loads the checkpoint as a resume would (memory-mapped, so cheap even for big models):
    torch's reader and our format and config checks; and its history.json."""
    folder = Path(folder)
    if not (folder / CHECKPOINT_FILE).is_file():
        return f"no {CHECKPOINT_FILE} in it", None
    try:
        load_checkpoint(folder, map_location="cpu", mmap=True)
    except CheckpointError as error:
        return _short(str(error)), None
    return _history_problem(lambda: (folder / HISTORY_FILE).read_text())


def _history_problem(read: Callable[[], str]) -> tuple[str | None, TrainingState | None]:
    try:
        return None, TrainingState(**json.loads(read()))
    except (OSError, ValueError, TypeError) as error:
        return f"{HISTORY_FILE} is not readable: {_short(str(error))}", None


def stored_problem(filesystem, path: str) -> tuple[str | None, TrainingState | None]:
    """`folder_problem` of a checkpoint folder on a pyarrow filesystem. A local one is loaded;
    on object stores the zip directory of checkpoint.pt is read (a truncated file has none)
    without downloading the weights."""
    import pyarrow.fs

    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return folder_problem(path)
    file = f"{path}/{CHECKPOINT_FILE}"
    if not path_exists(filesystem, file):
        return f"no {CHECKPOINT_FILE} in it", None
    try:
        with filesystem.open_input_file(file) as stream:
            size = stream.size()
            members = zipfile.ZipFile(stream).infolist()
        if not any(member.filename.endswith("data.pkl") for member in members):
            raise zipfile.BadZipFile("no data.pkl: not a torch.save file")
        if any(member.header_offset + member.compress_size > size for member in members):
            raise zipfile.BadZipFile("a record runs past the end of the file")
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        return f"{file} is not a readable checkpoint: {_short(str(error))}", None
    return _history_problem(lambda: read_text(filesystem, f"{path}/{HISTORY_FILE}"))


def left_empty(filesystem, path: str) -> bool:
    """Whether `path` is a checkpoint folder left empty when its damaged contents were set
    aside as `damaged_<name>` beside it (while Ray's controller still listed it). Such a
    folder is never the best checkpoint."""
    import pyarrow.fs

    path = path.rstrip("/")
    aside = f"{PurePosixPath(path).parent}/{DAMAGED_PREFIX}{PurePosixPath(path).name}"
    try:
        if filesystem.get_file_info(path).type != pyarrow.fs.FileType.Directory:
            return False
        return not filesystem.get_file_info(pyarrow.fs.FileSelector(path)) and path_exists(filesystem, aside)
    except OSError:
        return False


def best_checkpoint(
    candidates: Iterable[tuple[Any, Any, str, T]], mode: str, require_file: bool = False
) -> T | None:
    """The one rule for a run's or a trial's best checkpoint: of `(value, filesystem, path,
    item)` candidates, the `item` of the best finite value under `mode` (the earliest of
    equals, `lstm_ae.metrics.best_of`). A folder left empty as damaged never counts, nor, with
    `require_file`, one that no longer holds `checkpoint.pt` (deleted by Tune beyond
    `keep_checkpoints`). None when no candidate counts."""
    counted = [
        (value, item)
        for value, filesystem, path, item in candidates
        if is_finite_number(value)
        and not left_empty(filesystem, path)
        and (not require_file or path_exists(filesystem, f"{path}/{CHECKPOINT_FILE}"))
    ]
    best = best_of(counted, lambda pair: pair[0], mode)
    return best[1] if best else None


def set_aside(filesystem, path: str, placeholder: bool = False) -> str | None:
    """Move a damaged checkpoint folder to `damaged_<name>` beside it (never delete it) and
    return the new path; an empty folder is simply removed. `placeholder` leaves an empty
    folder at the old path (for Ray's controller, which deletes it later)."""
    import pyarrow.fs

    info = filesystem.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        return None
    if not filesystem.get_file_info(pyarrow.fs.FileSelector(path)):  # empty: nothing to keep
        if not placeholder:
            filesystem.delete_dir(path)
        return None
    parent, name = str(PurePosixPath(path).parent), PurePosixPath(path).name
    aside = f"{parent}/{DAMAGED_PREFIX}{name}"
    repeat = 1
    while path_exists(filesystem, aside):
        repeat += 1
        aside = f"{parent}/{DAMAGED_PREFIX}{name}.{repeat}"
    filesystem.move(path, aside)
    if placeholder:
        filesystem.create_dir(path)
    return aside


# ------------------------------------------------------------------------------ the worker


@contextlib.contextmanager
def stored_checkpoint(
    location: str, map_location: str | torch.device = "cpu", mmap: bool = False
) -> Iterator[dict]:
    """The checkpoint in the folder at `location` (a path or URI): read where it is when local,
    else from a temporary copy of its checkpoint file, kept until the block ends."""
    with tempfile.TemporaryDirectory(prefix="lstm_ae_checkpoint_") as folder:
        file = local_copy(f"{location.rstrip('/')}/{CHECKPOINT_FILE}", folder)
        yield load_checkpoint(file, map_location, mmap)


def _open_stored(filesystem, path: str) -> contextlib.AbstractContextManager[str]:
    """A local folder holding the checkpoint at (filesystem, path): itself, or a download."""
    import pyarrow.fs

    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return contextlib.nullcontext(path)

    @contextlib.contextmanager
    def downloaded() -> Iterator[str]:
        with tempfile.TemporaryDirectory(prefix="lstm_ae_restore_") as folder:
            pyarrow.fs.copy_files(path, folder, source_filesystem=filesystem)
            yield folder

    return downloaded()


def older_checkpoints(filesystem, path: str) -> list[str]:
    """The run folder's checkpoint folders written before the one at `path`, newest first."""
    import pyarrow.fs

    parent, name = str(PurePosixPath(path).parent), PurePosixPath(path).name
    key = checkpoint_key(name)
    if key is None:
        return []
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    older = [
        (checkpoint_key(info.base_name), info.path)
        for info in infos
        if info.type == pyarrow.fs.FileType.Directory and checkpoint_key(info.base_name) is not None
    ]
    return [found for found_key, found in sorted(older, reverse=True) if found_key < key]


@contextlib.contextmanager
def newest_loadable(
    filesystem,
    path: str | None,
    rank: int,
    skipped: set[str],
    open_folder: Callable[[object, str], contextlib.AbstractContextManager[str]] = _open_stored,
    log: Callable[[str], None] = print,
) -> Iterator[str | None]:
    """A local folder holding the newest loadable checkpoint of those at or before `path`
    (None where `path` is None). Skipped names are added to `skipped`; rank 0 sets them
    aside (leaving an empty folder for Ray's controller) and says so in one line each.
    CheckpointError when none loads."""
    if path is None:
        yield None
        return
    damaged: list[tuple[str, str, str | None]] = []
    for candidate in [path, *older_checkpoints(filesystem, path)]:
        with open_folder(filesystem, candidate) as folder:
            problem, state = folder_problem(folder)
            if problem is None:
                for name, reason, aside in damaged if rank == 0 else ():
                    kept = f"kept as {aside}" if aside else "nothing to keep"
                    log(
                        f"skipping damaged checkpoint {name} ({reason}; {kept}): resuming from step {state.step}"
                    )
                yield folder
                return
        name = PurePosixPath(candidate).name
        skipped.add(name)
        aside = set_aside(filesystem, candidate, placeholder=True) if rank == 0 else None
        damaged.append((candidate, problem, aside))
    reasons = "; ".join(f"{PurePosixPath(name).name}: {reason}" for name, reason, _ in damaged)
    raise CheckpointError(f"no checkpoint of this run loads ({reasons})")


# ------------------------------------------------------------------------------ storing

PARTIAL_SUFFIX = ".partial"  # a checkpoint being written aside: .<name>.partial beside its place
FULL_ERRORS = (errno.ENOSPC, errno.EDQUOT)
STORAGE_FULL = "no room for "  # how a StorageFullError's line begins (the driver finds it in Ray's errors)
COPY_CHUNK_BYTES = 1 << 22


class StorageFullError(OSError):
    """A checkpoint did not fit on the disk (or quota) of the run's storage; the message is
    one line that names the disk, the space needed and the space free."""


def store_checkpoint(source: str | os.PathLike, filesystem, target: str, staged: bool | None = None) -> None:
    """Copy the local checkpoint folder `source` to `target` on `filesystem`, so that a copy
    cut short (a full disk, a lost node) never leaves a folder that looks complete.

    `staged` (the default on a local disk): written into `.<name>.partial` beside `target`,
    then renamed into place in one step. Otherwise (object stores, which cannot rename a
    folder but show each object whole) `checkpoint.pt` is written last, so a folder without
    it is incomplete (`folder_problem`). What a failed copy wrote is removed. A folder already
    at `target` is the leftover of an upload cut short (Ray lists a checkpoint only once it is
    stored, and a stored one is never written again): it is replaced."""
    source = Path(source)
    staged = is_local(filesystem) if staged is None else staged
    files = sorted((path for path in source.rglob("*") if path.is_file()), key=lambda path: (
        path.name == CHECKPOINT_FILE, str(path)))  # fmt: skip
    target = target.rstrip("/")
    parent, name = str(PurePosixPath(target).parent), PurePosixPath(target).name
    destination = f"{parent}/.{name}{PARTIAL_SUFFIX}" if staged else target
    try:
        for leftover in {destination, target}:
            if path_exists(filesystem, leftover):
                filesystem.delete_dir(leftover)
        filesystem.create_dir(destination, recursive=True)
        for file in files:
            relative = file.relative_to(source).as_posix()
            if "/" in relative:
                filesystem.create_dir(f"{destination}/{PurePosixPath(relative).parent}", recursive=True)
            with (
                open(file, "rb") as reader,
                filesystem.open_output_stream(f"{destination}/{relative}") as writer,
            ):
                while chunk := reader.read(COPY_CHUNK_BYTES):
                    writer.write(chunk)
        if staged:
            filesystem.move(destination, target)
    except OSError as error:
        with contextlib.suppress(OSError):
            if path_exists(filesystem, destination):
                filesystem.delete_dir(destination)
        if error.errno in FULL_ERRORS:
            needed = sum(file.stat().st_size for file in files)
            raise StorageFullError(storage_full_message(name, needed, filesystem, parent)) from None
        raise


def storage_full_message(name: str, needed: int, filesystem, folder: str) -> str:
    """One line: which disk is full, what `name` needs there and what is free."""
    if not is_local(filesystem):
        return f"{STORAGE_FULL}{name} in {filesystem.type_name} storage at {folder}: it needs {_size(needed)}"
    disk, kind = mount_point(folder)
    free = shutil.disk_usage(disk).free
    return (
        f"{STORAGE_FULL}{name} on the disk mounted at {disk}{f' ({kind})' if kind else ''}, which holds {folder}: "
        f"it needs {_size(needed)}, {_size(free)} free"
    )


def mount_point(folder: str) -> tuple[str, str]:
    """(mount point, filesystem type) of the disk holding `folder` (type '' where unknown)."""
    path = Path(folder).resolve()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    kind = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[1] == str(path):
                kind = fields[2]  # the last mount at a point is the one in use
    return str(path), kind


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
