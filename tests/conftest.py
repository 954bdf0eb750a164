"""Shared fixtures. Tests are CPU-only and small; the Ray tests share one local cluster."""

from __future__ import annotations

import os

import pytest
import torch


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
