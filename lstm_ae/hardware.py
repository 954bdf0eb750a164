"""Facts about this machine's GPU that torch alone can tell: the NVIDIA driver, and why a
torch build cannot use a GPU here. Ray-free: the doctor prints them, and a worker or trial
that holds a GPU refuses to train on the CPU by surprise."""

from __future__ import annotations

import re
import socket
from pathlib import Path


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version, or None where there is none."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+([\d.]+)", text) or re.search(r"\b(\d{3,}\.\d+(?:\.\d+)?)\b", text)
    return match.group(1) if match else "present"


def gpu_problem(torch_module=None) -> str | None:
    """Why this process's torch cannot use a GPU (naming the node, the torch build and the
    driver), or None when it can."""
    import torch

    torch_module = torch_module or torch
    if torch_module.cuda.is_available():
        return None
    build = torch_module.version.cuda
    driver = nvidia_driver()
    return (
        f"node {socket.gethostname()}: torch {torch_module.__version__} "
        + (f"(built for CUDA {build})" if build else "(a CPU-only build)")
        + " cannot use a GPU: "
        + (f"NVIDIA driver {driver}" if driver else "no NVIDIA driver")
        + (" is too old for that CUDA or sees no GPU" if driver and build else "")
    )
