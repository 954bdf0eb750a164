"""Run a command line's `main` in this process, as `python -m ...` would run it, and return
what the shell would see: the exit status, stdout and stderr.

Starting a Python that imports torch and Ray costs 5-8 s on 2 cores; the refusals and usage
errors the tests check happen before Ray starts, in `main` itself, so most of them call it
here. One test per command still starts the real `python -m train` / `python -m tune`."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence


def run_main(
    main: Callable[[Sequence[str]], int], arguments: Sequence[str], capsys
) -> subprocess.CompletedProcess:
    """`main(arguments)` with its output captured by pytest's `capsys` (whatever was captured
    before is dropped); SystemExit becomes the return code, as the interpreter makes it."""
    capsys.readouterr()
    try:
        code = main(list(arguments))
    except SystemExit as exit_:
        code = exit_.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): printed, status 1
        code = 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(arguments), code, out, err)
