"""Who holds a run folder: a run (or a search) locks its folder before Ray starts and gives
it back at the end, so that two runs with one name never train into the same folder.

The lock is a marker file, `lock.json`, in the folder: host, pid, start time and command
of the holder. It is created exclusively: on a local folder (and any `file://` URI) by a hard
link of a finished file onto the name, which fails when the name exists, so of two runs
started at once exactly one wins. Object stores (s3://, gs://) have no exclusive create in
pyarrow: there the lock is written after a check and read back, which shrinks the window
in which two runs could both proceed but cannot close it.

A lock left by a dead holder is taken over with one line: on the same host when the pid is
gone (or belongs to a newer process, or the host rebooted); from another host when the
holder has not renewed it for `STALE_SECONDS` (a live holder renews it every
`RENEW_SECONDS`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from records.layout import LOCK_FILE

RENEW_SECONDS = 60.0
STALE_SECONDS = 600.0  # a lock from another host not renewed for this long is taken over
ATTEMPTS = 3

_held: dict[str, FolderLock] = {}  # folders this process holds (a nested lock is a no-op)


class FolderLockedError(ValueError):
    """The folder is locked by a live run (or could not be locked)."""


def _proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether `pid` runs on this host (and is the process that started at `start_ticks`)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    except OSError:
        return False
    if start_ticks is not None:
        ticks = _proc_start_ticks(pid)
        if ticks is not None and ticks != start_ticks:
            return False  # the pid was reused by a newer process
    return True


def describe_holder(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"


class FolderLock:
    """The lock of one folder, `<root>/<name>` on a pyarrow filesystem.

    `host`, `pid`, `now` and `process_alive` are the facts the lock is made of and judged by;
    tests inject them instead of waiting or killing processes.
    """

    def __init__(
        self,
        filesystem,
        folder: str,
        what: str = "run folder",
        *,
        host: str | None = None,
        pid: int | None = None,
        now: Callable[[], float] = time.time,
        alive: Callable[[int, int | None], bool] = process_alive,
        log: Callable[[str], None] = print,
    ):
        import pyarrow.fs

        self.filesystem, self.folder, self.what = filesystem, folder.rstrip("/"), what
        self.path = f"{self.folder}/{LOCK_FILE}"
        self.local = isinstance(filesystem, pyarrow.fs.LocalFileSystem)
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.now, self.alive, self.log = now, alive, log
        self.token = uuid.uuid4().hex
        self.held = False
        self.created_folder = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ------------------------------------------------------------------ the record

    def record(self) -> dict[str, Any]:
        now = self.now()
        own = self.pid == os.getpid()
        return {
            "host": self.host,
            "pid": self.pid,
            "pid_start_ticks": _proc_start_ticks(self.pid) if own else None,
            "boot_id": _boot_id() if own else None,
            "started": now,
            "renewed": now,
            "command": " ".join(sys.argv)[:500],
            "token": self.token,
        }

    def read(self) -> dict[str, Any] | None:
        """The lock on the folder now, or None where there is none ({} if unreadable)."""
        import pyarrow.fs

        try:
            with self.filesystem.open_input_stream(self.path) as stream:
                text = stream.read().decode()
        except (FileNotFoundError, OSError):
            if self.filesystem.get_file_info(self.path).type == pyarrow.fs.FileType.NotFound:
                return None
            return {}
        try:
            record = json.loads(text)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the lock `holder` is left by a run that is gone, or None if it may be live."""
        now = self.now()
        renewed = float(holder.get("renewed") or holder.get("started") or 0)
        if holder.get("host") == self.host and isinstance(holder.get("pid"), int):
            boot = holder.get("boot_id")
            if boot and _boot_id() and boot != _boot_id():
                return "this host has restarted since"
            if not self.alive(holder["pid"], holder.get("pid_start_ticks")):
                return "that process is gone"
            return None
        if now - renewed > STALE_SECONDS:
            return f"not renewed for {(now - renewed) / 60:.0f} min (a live run renews it every {RENEW_SECONDS:.0f} s)"
        return None

    # ------------------------------------------------------------------ locking

    def acquire(self) -> FolderLock:
        """Lock the folder, taking over a dead holder's lock; FolderLockedError if a live
        run holds it."""
        import pyarrow.fs

        if self.filesystem.get_file_info(self.folder).type == pyarrow.fs.FileType.NotFound:
            self.filesystem.create_dir(self.folder, recursive=True)
            self.created_folder = True
        for _ in range(ATTEMPTS):
            if self._create():
                self.held = True
                return self
            holder = self.read()
            if holder is None:
                continue  # released meanwhile
            if holder.get("token") == self.token:
                self.held = True
                return self
            reason = self.stale_reason(holder) if holder else None
            if reason is None:
                if not holder:  # being written right now, or garbage: judge by the file's age
                    info = self.filesystem.get_file_info(self.path)
                    age = self.now() - (info.mtime.timestamp() if info.mtime else self.now())
                    if age > STALE_SECONDS:
                        reason = f"unreadable and {age / 60:.0f} min old"
                if reason is None:
                    raise FolderLockedError(
                        f"{self.what} {self.folder} is in use by another run ({describe_holder(holder)}): "
                        "wait for it to end, or choose another --name"
                    )
            if self._remove_stale(holder):
                self.log(f"taking over the lock on {self.folder} left by {describe_holder(holder)}: {reason}")
        raise FolderLockedError(f"{self.what} {self.folder}: could not lock it (other runs keep locking it)")

    def _create(self) -> bool:
        """Create the lock if there is none; True if this call created it."""
        text = json.dumps(self.record(), indent=2)
        if self.local:
            # A finished file, hard-linked onto the name: atomic, and fails if the name exists.
            parent = str(Path(self.folder).parent)
            temporary = f"{parent}/.{Path(self.folder).name}.lock.{self.token}"
            Path(temporary).write_text(text)
            try:
                os.link(temporary, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here: an exclusive create, then the contents
                try:
                    handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(handle, "w") as file:
                    file.write(text)
                return True
            finally:
                Path(temporary).unlink(missing_ok=True)
        # Object stores: no exclusive create. Check, write, read back (see the module docstring).
        if self.read() is not None:
            return False
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(text.encode())
        return (self.read() or {}).get("token") == self.token

    def _remove_stale(self, holder: dict[str, Any]) -> bool:
        """Remove the stale lock `holder`, and only it; False if another run got there first."""
        if not self.local:
            if self.read() != holder:
                return False
            self.filesystem.delete_file(self.path)
            return True
        aside = f"{self.path}.stale.{self.token}"
        try:
            os.rename(self.path, aside)  # of several runs taking over at once, one moves it
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(Path(aside).read_text())
        except ValueError:
            moved = {}
        if moved != holder:  # a fresh lock was moved: put it back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            Path(aside).unlink(missing_ok=True)
            return False
        Path(aside).unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------------ holding

    def renew(self) -> bool:
        """Refresh `renewed` (other hosts judge the lock by it); False if it is no longer ours."""
        holder = self.read()
        if not holder or holder.get("token") != self.token:
            return False
        holder["renewed"] = self.now()
        text = json.dumps(holder, indent=2)
        if self.local:
            temporary = f"{self.path}.{self.token}.tmp"
            Path(temporary).write_text(text)
            os.replace(temporary, self.path)
        else:
            with self.filesystem.open_output_stream(self.path) as stream:
                stream.write(text.encode())
        return True

    def _renew_until_released(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            try:
                if not self.renew():
                    self.log(f"warning: the lock on {self.folder} was taken over by another run")
                    return
            except OSError:
                pass  # storage hiccup: try again at the next renewal

    def release(self) -> None:
        """Give the folder back (only if the lock is still ours); remove the folder if the
        lock created it and nothing else was written there."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        if not self.held:
            return
        self.held = False
        _held.pop(self.folder, None)
        with contextlib.suppress(OSError):
            if (self.read() or {}).get("token") == self.token:
                self.filesystem.delete_file(self.path)
        if self.created_folder:
            import pyarrow.fs

            with contextlib.suppress(OSError):
                if not self.filesystem.get_file_info(pyarrow.fs.FileSelector(self.folder)):
                    self.filesystem.delete_dir(self.folder)

    def __enter__(self) -> FolderLock:
        if not self.held:
            self.acquire()
        _held[self.folder] = self
        self._renewer = threading.Thread(target=self._renew_until_released, name="lock-renewer", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def locked(filesystem, folder: str, what: str = "run folder") -> contextlib.AbstractContextManager:
    """A context holding the lock on `folder`; a no-op where this process holds it already
    (the command line locks before its checks, the driver again before Ray)."""
    if folder.rstrip("/") in _held:
        return contextlib.nullcontext(_held[folder.rstrip("/")])
    return FolderLock(filesystem, folder, what)
