"""Fault injection for tests: a session that fails once, and a Ray Train loop that uses it.

The production loop has no fault hooks; tests wrap its session instead. A marker file makes
the fault happen once, so the run's restart (Ray's FailureConfig, or a resume) gets past it.
Ray workers cannot import this module from tests/, so the test modules that hand
`FaultyTrainLoop` to Ray register it to be pickled by value.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.fs


class InjectedFailure(RuntimeError):
    pass


def wait_until_registered(run: str | Path, checkpoint: str, timeout: float = 120.0) -> None:
    """Until Ray Train's checkpoint list in `run` (checkpoint_manager_snapshot.json) holds
    `checkpoint`. Checkpoints upload beside training (ASYNC): one is registered only once its
    upload ends, so a crash right after a report may come before it."""
    import json
    import time

    snapshot, deadline = Path(run) / "checkpoint_manager_snapshot.json", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            entries = json.loads(snapshot.read_text())["checkpoint_results"]
            if checkpoint in [entry["checkpoint_dir_name"] for entry in entries]:
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"Ray Train did not register {checkpoint} in {snapshot} within {timeout:.0f} s")


class FailOnceSession:
    """Wraps a session; the last rank raises when it reports step `at_step` (once), after
    Ray Train registered the checkpoint `registered` = (run folder, checkpoint name) if given."""

    def __init__(self, session, at_step: int, marker: str | Path, registered: tuple[str, str] | None = None):
        self.session, self.at_step, self.marker = session, at_step, Path(marker)
        self.registered = registered
        self.world_rank, self.world_size = session.world_rank, session.world_size
        self.device = session.device

    def prepare_model(self, model):
        return self.session.prepare_model(model)

    def latest_checkpoint(self):
        return self.session.latest_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        if step == self.at_step and self.world_rank == self.world_size - 1 and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"failed at step {step}\n")
            if checkpoint_dir:  # the session owns the folder it was handed
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
            if self.registered is not None:
                wait_until_registered(*self.registered)
            raise InjectedFailure(f"injected failure at step {step} on rank {self.world_rank}")
        self.session.report(metrics, checkpoint_dir, step)


class FaultyTrainLoop:
    """`train.worker.train_loop_per_worker` whose session fails once at `at_step`, once the
    checkpoint `registered` = (run folder, checkpoint name) is registered if given."""

    def __init__(self, at_step: int, marker: str | Path, registered: tuple[Path, str] | None = None):
        self.at_step, self.marker = at_step, str(marker)
        self.registered = (str(registered[0]), registered[1]) if registered else None

    def __call__(self, loop_config: dict[str, Any]) -> None:
        from train.ray_internals import quiet_report_logging
        from train.worker import RayTrainSession, train_function

        quiet_report_logging()
        session = FailOnceSession(RayTrainSession(), self.at_step, self.marker, self.registered)
        train_function(loop_config, session)


class KilledMidUploadLoop:
    """`train.worker.train_loop_per_worker` whose rank 0 process dies halfway through
    uploading the checkpoint of step `at_step` (once), after training has gone on to report
    the step after it: a node lost while an upload is in flight. The upload writes half of
    checkpoint.pt into the run's storage, then the process is killed (SIGKILL)."""

    def __init__(self, at_step: int, marker: str | Path):
        self.at_step, self.marker = at_step, str(marker)

    def __call__(self, loop_config: dict[str, Any]) -> None:
        from train.ray_internals import quiet_report_logging
        from train.worker import train_function

        quiet_report_logging()
        train_function(loop_config, _killed_mid_upload_session(self.at_step, Path(self.marker)))


def _killed_mid_upload_session(at_step: int, marker: Path):
    import os
    import signal
    import threading

    import ray.train

    from train.worker import RayTrainSession

    trained_past = threading.Event()  # set when training reports the step after `at_step`

    class KilledMidUpload(RayTrainSession):
        def report(self, metrics, checkpoint_dir, step):
            if step == at_step + 1:
                trained_past.set()
            super().report(metrics, checkpoint_dir, step)

        def upload_checkpoint(self, checkpoint, name):
            storage = ray.train.get_context().get_storage()
            if name == f"checkpoint_{at_step:08d}" and not marker.exists():
                if not trained_past.wait(timeout=120):
                    raise AssertionError(f"training did not go on past step {at_step} during its upload")
                marker.write_text(f"killed uploading {name}\n")
                target = Path(storage.build_checkpoint_path_from_name(name))
                target.mkdir(parents=True, exist_ok=True)
                written = (Path(checkpoint.path) / "checkpoint.pt").read_bytes()
                (target / "checkpoint.pt").write_bytes(written[: len(written) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return storage.persist_current_checkpoint(checkpoint, name)

    return KilledMidUpload()


class FullDiskHandler(pyarrow.fs.FileSystemHandler):
    """A pyarrow filesystem handler over local paths whose writes fail with ENOSPC once
    `room` bytes are written in all (the bytes that fit stay, as on a full disk). Wrap it
    as `pyarrow.fs.PyFileSystem(FullDiskHandler(room))`; `room` may be raised later."""

    def __init__(self, room: int):
        self.room, self.written = room, 0
        self.local = pyarrow.fs.LocalFileSystem()

    def get_type_name(self) -> str:
        return "full-disk"

    def normalize_path(self, path):
        return path

    def equals(self, other) -> bool:
        return other is self

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self, path):
        self.local.delete_dir_contents(path)

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, source, destination):
        self.local.move(source, destination)

    def copy_file(self, source, destination):
        self.local.copy_file(source, destination)

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(_FillingFile(open(path, "wb"), self), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError


class _FillingFile:
    def __init__(self, file, disk: FullDiskHandler):
        self.file, self.disk, self.closed = file, disk, False

    def write(self, data) -> int:
        import errno

        data = bytes(data)
        fits = max(0, min(len(data), self.disk.room - self.disk.written))
        self.file.write(data[:fits])
        self.disk.written += fits
        if fits < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        return fits

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self.closed = True
