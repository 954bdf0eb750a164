"""Shared fixtures. Tests are CPU-only and small; the Ray tests share one local cluster."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
