"""Shared fixtures. Tests are CPU-only and small; the Ray tests share one local cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Every test that starts or uses Ray is slow too: `-m "not slow"` is the fast tier."""
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (starting Ray takes tens of seconds here).

    Logical CPUs exceed the 2 cores so that a Tune trial and the Train workers it launches
    can be scheduled together; each worker still runs one torch thread.
    """
    from train.driver import RAY_ENVIRONMENT

    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    import ray

    ray.init(num_cpus=4, runtime_env={"env_vars": dict(RAY_ENVIRONMENT)})
    yield ray
    ray.shutdown()


@pytest.fixture
def small_disk(tmp_path):
    """`mount(size)`: a tmpfs of `size` (e.g. "8m") mounted at a fresh folder, unmounted at the
    end; `mount(size, remount=True)` resizes it. Skipped where mounting is not allowed (not
    root, or a container without the capability)."""
    import subprocess

    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = []

    def mount(size: str, remount: bool = False) -> Path:
        options = f"remount,size={size}" if remount else f"size={size}"
        try:
            completed = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
            )
        except OSError as error:  # no mount command
            pytest.skip(f"cannot mount a tmpfs here: {error}")
        if completed.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {completed.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    if mounted:
        subprocess.run(["umount", str(folder)], check=False)
