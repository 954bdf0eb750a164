"""What the command lines (`train`, `train.predict`, `train.probe`, `tune`, `tune.compare`)
share: one-line errors, the scaling and device flags, the batch-split and address checks,
Ctrl-C, and finding a run's checkpoint.

Bad input never shows a traceback: it exits with status 2 and one line naming the problem.
Ctrl-C (SIGINT) exits with status 130 and one line saying how to continue.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

from lstm_ae.config import ConfigError, ExperimentConfig, check_batch_split
from records.layout import RESULT_FILE


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


class InterruptWatch:
    """Notices a SIGINT even when Ray replaces the handler: Ray Train's and Ray Tune's own
    handlers (installed inside `fit`) stop the run gracefully and then return or raise
    something that does not say why. The interpreter writes the number of every signal it
    handles to the wakeup file descriptor, whoever's handler runs; this watch reads it."""

    def __init__(self) -> None:
        self._reader, self._writer = os.pipe()
        for descriptor in (self._reader, self._writer):
            flags = fcntl.fcntl(descriptor, fcntl.F_GETFL)
            fcntl.fcntl(descriptor, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self._previous = signal.set_wakeup_fd(self._writer, warn_on_full_buffer=False)
        self._seen = False

    def interrupted(self) -> bool:
        """Whether a SIGINT arrived since the watch began."""
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self._reader, 512):
                self._seen = self._seen or signal.SIGINT in chunk
        return self._seen

    def close(self) -> None:
        self.interrupted()
        signal.set_wakeup_fd(self._previous)
        os.close(self._reader)
        os.close(self._writer)


@contextlib.contextmanager
def watch_interrupts() -> Iterator[InterruptWatch]:
    watch = InterruptWatch()
    try:
        yield watch
    finally:
        watch.close()


def stopped_by_interrupt(what: str, resume_line: str) -> NoReturn:
    """Exit 130 with one line saying how to continue."""
    print(f"{what} stopped by Ctrl-C (SIGINT); {resume_line}", file=sys.stderr, flush=True)
    raise SystemExit(INTERRUPTED_STATUS)


def run_until_interrupted(
    command: Callable[[contextlib.ExitStack, Callable[[], bool]], int],
    what: str,
    continue_line: Callable[[], str],
) -> int:
    """`command(held, interrupted)` with Ctrl-C watched; `held` (what the command holds, such
    as its folder lock) is released however it ends. After a SIGINT, whatever Ray raised
    meanwhile, exit 130 with one line: `what` stopped, and `continue_line()`."""
    with watch_interrupts() as watch, contextlib.ExitStack() as held:
        try:
            return command(held, watch.interrupted)
        except BaseException:
            if not watch.interrupted():
                raise
        # Ray's own handler stopped the work; what it raises does not say so.
        stopped_by_interrupt(what, continue_line())


def root_cause(error: BaseException) -> str:
    """The first line of the innermost worker error Ray wrapped."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        error = next(iter(failures.values()))
    while getattr(error, "cause", None) is not None:
        error = error.cause
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ------------------------------------------------------------------------------- scaling


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=None, help="Ray cluster to join (default RAY_ADDRESS, else a local one)"
    )


def add_scaling_arguments(parser: argparse.ArgumentParser, scaling_class: type) -> None:
    """The scaling flags, from `scaling_class`'s fields (train's Scaling), and --address."""
    add_settings_arguments(parser, scaling_class)
    add_address_argument(parser)


def check_scaling_arguments(arguments: argparse.Namespace) -> None:
    """The flags of add_scaling_arguments that argparse's types alone do not check."""
    if arguments.cpus_per_worker is not None and not arguments.cpus_per_worker > 0:
        raise ConfigError(f"--cpus-per-worker must be positive, got {arguments.cpus_per_worker}")
    check_address(arguments.address)


def check_split(config: ExperimentConfig, num_workers: int) -> None:
    """The global batch splits evenly over the workers and micro-batches (ConfigError if not)."""
    try:
        check_batch_split(config.training.batch_size, num_workers, config.training.grad_accumulation_steps)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_address(address: str | None, timeout_seconds: float = 3.0) -> None:
    """A `host:port` address must have something listening: Ray itself would retry for
    minutes. ('auto', 'local', ray:// client and http addresses are left to Ray.)"""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address must be host:port (or auto), got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_seconds):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({reason})") from None


# ------------------------------------------------------------------------------- devices


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    import torch

    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )


def check_device(name: str) -> str:
    """`cpu`, `cuda` or `cuda:N`, and available here; else exit 2 with one line naming the problem."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device must be cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device must be cpu or cuda, got {name!r}")
    return name


# ------------------------------------------------------------------------------- run folders


def resolve_checkpoint(path: Path) -> Path:
    """A run folder means its best checkpoint (from result.json).

    result.json records where the checkpoint was written; a run folder copied elsewhere (say
    with `aws s3 sync`) finds it by its folder name inside the copy instead.
    """
    from lstm_ae.checkpoint import CheckpointError

    result_file = path / RESULT_FILE
    if not result_file.is_file():
        return path
    try:
        result = json.loads(result_file.read_text(encoding="utf-8"))
        recorded = str(result.get("best_checkpoint") or result["final_checkpoint"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(
            f"{result_file} names no checkpoint (is it a run folder of python -m train?)"
        ) from None
    for candidate in (path / PurePosixPath(recorded.rstrip("/")).name, Path(recorded)):
        if candidate.exists():
            return candidate
    raise CheckpointError(f"the run's checkpoint {recorded} is neither at that path nor inside {path}")


# ------------------------------------------------------------------------------ settings flags


def flag(default: Any, help: str, name: str | None = None, type: Callable[[str], Any] | None = None) -> Any:
    """A settings dataclass field that is also a command-line flag: the field's default is the
    flag's (declared once, here); `name` where the flag is not `--<field-name>`; `type` where
    the default (None) does not tell it. A bool field is a store_true switch."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": name, "type": type})


def add_settings_arguments(
    parser: argparse.ArgumentParser, settings_class: type, skip: Sequence[str] = ()
) -> None:
    """One flag for every `flag(...)` field of `settings_class` (a dataclass)."""
    for field in dataclasses.fields(settings_class):
        if "help" not in field.metadata or field.name in skip:
            continue
        option = _option(field)
        if isinstance(field.default, bool):
            parser.add_argument(option, action="store_true", help=field.metadata["help"])
            continue
        kind = field.metadata["type"] or type(field.default)
        parser.add_argument(
            option,
            type=kind,
            default=field.default,
            metavar=kind.__name__.upper(),
            help=field.metadata["help"],
        )


def settings_values(arguments: argparse.Namespace, settings_class: type) -> dict[str, Any]:
    """The values the flags of `settings_class` were given (every one: defaults included)."""
    values = {}
    for field in dataclasses.fields(settings_class):
        destination = _option(field)[2:].replace("-", "_") if "help" in field.metadata else None
        if destination and hasattr(arguments, destination):
            values[field.name] = getattr(arguments, destination)
    return values


def _option(field: dataclasses.Field) -> str:
    """A settings field's flag: its own name, or `--<field-name>`; the flag names its value in
    the parsed arguments, as argparse does."""
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")
