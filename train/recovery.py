"""The newest checkpoint that loads: a damaged checkpoint (a node lost mid-upload, a full
disk) is skipped with one line, set aside as `damaged_<name>` (never deleted) and never
counted as the best; the run goes on from the newest checkpoint before it.

Two places meet damaged checkpoints:

- the worker, when Ray Train (or Tune) hands it a checkpoint to restart or resume from
  (`newest_loadable`, used by the sessions): it tries the handed one, then the run folder's
  older `checkpoint_<step>` folders, newest first. Rank 0 sets a damaged one aside and leaves
  an empty folder in its place, because Ray's controller still lists it and deletes it when
  it drops out of the kept checkpoints; the checkpoints written after the fallback get a
  fresh name where the skipped one's would repeat (`checkpoint_<step>_1`).
- the driver, before Ray starts on `--resume` (and after a run, to tidy up): Ray's
  checkpoint list (`checkpoint_manager_snapshot.json`) loses the damaged checkpoints and
  the empty folders left for the controller, and its latest becomes the newest that loads
  (`repair_snapshot`). Ray's own resume then hands that one to the workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from lstm_ae.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from train.state import HISTORY_FILE, TrainingState
from train.storage import local_copy, path_exists, read_text, write_text

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's list of kept checkpoints
DAMAGED_PREFIX = "damaged_"
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


# ------------------------------------------------------------------------------ the driver


@dataclass(frozen=True)
class Repair:
    """What `repair_snapshot` changed: the checkpoints dropped, and the newest one left."""

    dropped: tuple[str, ...] = ()
    newest: str | None = None
    step: int | None = None


def repair_snapshot(
    filesystem, run_path: str, load: bool = True, log: Callable[[str], None] = print
) -> Repair:
    """Drop from Ray's checkpoint list (and set aside) every checkpoint that does not load;
    its latest becomes the newest that does. `load=False` only drops the empty folders the
    workers left for Ray's controller (after a run). CheckpointError (one line) when none
    loads: the folder is then left as it is."""
    snapshot_path = f"{run_path}/{SNAPSHOT_FILE}"
    if not path_exists(filesystem, snapshot_path):
        return Repair()
    try:
        snapshot = json.loads(read_text(filesystem, snapshot_path))
        entries = snapshot["checkpoint_results"]
        indices = snapshot["checkpoint_report_indices"]
        names = [entry["checkpoint_dir_name"] for entry in entries]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{snapshot_path} is not Ray Train's checkpoint list: {error}") from None
    problems: dict[str, str] = {}
    states: dict[str, TrainingState] = {}
    for name in names:
        folder = f"{run_path}/{name}"
        if load:
            problem, state = stored_problem(filesystem, folder)
        else:
            problem = None if path_exists(filesystem, f"{folder}/{CHECKPOINT_FILE}") else "left empty"
            state = None
        if problem is None:
            states[name] = state
        else:
            problems[name] = problem
    if not problems:
        return Repair()
    good = sorted((index, name) for name, index in zip(names, indices) if name not in problems)
    if not good:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in problems.items())
        raise CheckpointError(f"no checkpoint of {run_path} loads ({reasons}): nothing to resume from")
    newest = good[-1][1]
    step = states[newest].step if states.get(newest) is not None else None
    for name in sorted(problems, key=lambda name: checkpoint_key(name) or (0, 0), reverse=True):
        aside = set_aside(filesystem, f"{run_path}/{name}")
        if load:
            kept = f"kept as {aside}" if aside else "nothing to keep"
            log(
                f"skipping damaged checkpoint {run_path}/{name} ({problems[name]}; {kept}): resuming from step {step}"
            )
        elif aside:
            log(
                f"checkpoint {run_path}/{name} has no {CHECKPOINT_FILE}: kept as {aside}, out of the run's list"
            )
    keep = [index for index, name in enumerate(names) if name not in problems]
    snapshot["checkpoint_results"] = [entries[index] for index in keep]
    snapshot["checkpoint_report_indices"] = [indices[index] for index in keep]
    latest = snapshot.get("latest_checkpoint_result")
    if latest is None or latest.get("checkpoint_dir_name") in problems:
        snapshot["latest_checkpoint_result"] = entries[names.index(newest)]
    pending = list(
        zip(snapshot.get("pending_training_results", []), snapshot.get("pending_validation_specs", []))
    )
    pending = [
        (result, spec) for result, spec in pending if result.get("checkpoint_dir_name") not in problems
    ]
    snapshot["pending_training_results"] = [result for result, _ in pending]
    snapshot["pending_validation_specs"] = [spec for _, spec in pending]
    for key in (
        "validated_checkpoint_dir_names",
        "timed_out_validation_checkpoint_dir_names",
        "failed_validation_checkpoint_dir_names",
    ):
        if key in snapshot:
            snapshot[key] = [name for name in snapshot[key] if name not in problems]
    _write_atomically(filesystem, snapshot_path, json.dumps(snapshot))
    return Repair(tuple(sorted(problems)), newest, step)


def _write_atomically(filesystem, path: str, text: str) -> None:
    """A local file through a temporary name and a rename; an object store's put is whole."""
    import pyarrow.fs

    if not isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        write_text(filesystem, path, text)
        return
    temporary = f"{path}.tmp"
    Path(temporary).write_text(text)
    os.replace(temporary, path)
