"""`python -m train.doctor`: can a run work here? A preflight check of every node.

    python -m train.doctor                                   # this machine
    python -m train.doctor --use-gpu --output-dir s3://bucket/lstm-ae
    ray job submit --working-dir . -- python -m train.doctor --use-gpu --output-dir s3://bucket/lstm-ae

One table row per node: its CPUs and GPUs, torch and the CUDA it was built for, the NVIDIA
driver, bf16 (native, emulated or none, with its measured matmul rate as a multiple of
fp32's), the Ray version against the one requirements.txt pins, and whether
`--output-dir` can be written and read back from that node (a small file, removed after).
Without `--address` (or RAY_ADDRESS) it checks this machine without starting Ray; with one,
it runs one small Ray task on every live node. Node types an autoscaler has not launched
yet cannot be checked; the doctor names them. It exits 1 with a one-line reason when the
requested run could not work, 2 on bad input.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lstm_ae.hardware import gpu_problem, nvidia_driver
from lstm_ae.precision import bf16_support
from lstm_ae.tables import to_markdown
from records.storage import storage_filesystem
from train.cluster import cluster_capacity
from train.commandline import OneLineParser, add_address_argument, check_address, fail
from train.driver import connect

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"
COLUMNS = ("node", "CPUs", "GPUs", "torch", "CUDA build", "driver", "bf16", "Ray", "output dir")


def pinned_ray_version() -> str | None:
    """The Ray version requirements.txt pins (`ray[...]==X`)."""
    match = re.search(r"^ray(\[[^\]]*\])?==([\w.]+)", REQUIREMENTS.read_text(), re.MULTILINE)
    return match.group(2) if match else None


def check_storage(output_dir: str) -> str:
    """Write, read back and remove a small file under `output_dir`: 'ok' or the reason."""
    try:
        filesystem, root = storage_filesystem(output_dir)
        filesystem.create_dir(root, recursive=True)
        path = f"{root}/.lstm_ae_doctor_{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        payload = f"written by {socket.gethostname()}".encode()
        with filesystem.open_output_stream(path) as stream:
            stream.write(payload)
        with filesystem.open_input_stream(path) as stream:
            back = stream.read()
        filesystem.delete_file(path)
    except Exception as error:  # any storage error is the answer, in one line
        return f"FAILED: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return "ok" if back == payload else "FAILED: read back different bytes"


def node_report(output_dir: str | None) -> dict[str, Any]:
    """This node's row."""
    import ray
    import torch

    cuda = torch.cuda.is_available()
    return {
        "node": socket.gethostname(),
        "CPUs": os.cpu_count(),
        "GPUs": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "CUDA build": torch.version.cuda or "none (CPU build)",
        "driver": nvidia_driver() or "none",
        "bf16": bf16_support("cuda" if cuda else "cpu"),
        "Ray": ray.__version__,
        "output dir": check_storage(output_dir) if output_dir else "not checked",
        "gpu_problem": gpu_problem() if not cuda else None,
        "platform": platform.platform(),
    }


def cluster_reports(output_dir: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    """Every live node's row (one task pinned to each), and the node types not launched yet."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    report = ray.remote(num_cpus=0)(node_report)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    futures = [
        report.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
            output_dir
        )
        for node in nodes
    ]
    rows = ray.get(futures, timeout=300)
    for node, row in zip(nodes, rows):
        row["GPUs (Ray)"] = node["Resources"].get("GPU", 0)
    capacity = cluster_capacity()
    live_shapes = [group.resources for group in capacity.live]
    unlaunched = [
        ", ".join(f"{amount:g} {name}" for name, amount in group.resources.items())
        for group in capacity.launchable or []
        if group.count != 0 and not any(_same_shape(group.resources, shape) for shape in live_shapes)
    ]
    return rows, unlaunched


def _same_shape(node_type: dict[str, float], live: dict[str, float]) -> bool:
    return all(live.get(name, 0) >= amount for name, amount in node_type.items() if name in ("CPU", "GPU"))


def problems(rows: list[dict[str, Any]], use_gpu: bool, unlaunched: list[str]) -> list[str]:
    """Why the requested run could not work on these nodes (empty: it can)."""
    found = []
    pinned = pinned_ray_version()
    for row in rows:
        if pinned and row["Ray"] != pinned:
            found.append(f"node {row['node']} runs Ray {row['Ray']}, the project pins {pinned}")
        if str(row["output dir"]).startswith("FAILED"):
            found.append(f"node {row['node']} cannot use the output dir: {row['output dir'][8:]}")
    if use_gpu:
        gpu_rows = [row for row in rows if row.get("GPUs (Ray)", row["GPUs"])]
        for row in gpu_rows:
            if row.get("gpu_problem"):
                found.append(row["gpu_problem"])
        if not gpu_rows and not any("GPU" in shape for shape in unlaunched):
            found.append("--use-gpu, but no node has a GPU and no node type that could be launched has one")
    return found


def to_table(rows: list[dict[str, Any]]) -> str:
    return to_markdown([{column: row.get(column, "") for column in COLUMNS} for row in rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m train.doctor", description=__doc__.splitlines()[0])
    add_address_argument(parser)
    parser.add_argument("--use-gpu", action="store_true", help="check that runs with --use-gpu can work")
    parser.add_argument("--output-dir", default=None, help="local folder or s3:// URI to write and read back")
    arguments = parser.parse_args(argv)
    address = arguments.address or os.environ.get("RAY_ADDRESS")
    try:
        check_address(address)
    except ValueError as error:
        fail(str(error))
    unlaunched: list[str] = []
    if address:
        connect(address)
        rows, unlaunched = cluster_reports(arguments.output_dir)
    else:
        rows = [node_report(arguments.output_dir)]
    print(to_table(rows))
    for shape in unlaunched:
        print(f"not checked: a node type with {shape} (not launched yet)")
    found = problems(rows, arguments.use_gpu, unlaunched)
    if found:
        print(
            f"error: {found[0]}" + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""),
            file=sys.stderr,
        )
        return 1
    print("ok: a run " + ("with --use-gpu " if arguments.use_gpu else "") + "can work here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
