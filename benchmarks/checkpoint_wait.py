"""How long the ranks of a Ray Train run wait at a checkpoint: uploaded synchronously, against
beside training (Ray Train's ASYNC upload mode, what `train.worker.RayTrainSession` uses).

    python benchmarks/checkpoint_wait.py [--gigabytes 1.1] [--workers 2]

For each storage (a local folder; the same folder through a Python pyarrow filesystem, the
path of fsspec-backed object stores such as s3fs and gcsfs) and each mode, one TorchTrainer
run on the CPU: rank 0 writes a checkpoint folder of `--gigabytes` (one `torch.save`d
tensor: an upload's cost is its bytes), then every rank reports through the production
session and meets the others at a barrier (where the next step's gradient all-reduce would
meet them). It prints, per rank, the seconds from the report to the barrier; rank 0's local
write (torch.save to its temporary folder: it holds every rank in both modes, since the
others wait for rank 0 at the next all-reduce); the seconds until the run ended (after its
last upload); and for each storage the ASYNC wait as a share of the SYNC one. The last line is
`async_share=<largest ASYNC wait / smallest SYNC wait, over storages>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("SYNC", "ASYNC")
STORAGES = ("local folder", "pyarrow PyFileSystem (fsspec)")


def train_function(loop_config: dict) -> None:
    """One checkpoint: rank 0 writes it, every rank reports and meets the others at a barrier."""
    import ray.train
    import torch
    import torch.distributed as dist

    from train.worker import RayTrainSession

    session = RayTrainSession()
    session.upload_mode = loop_config["mode"]
    folder = None
    write_seconds = 0.0
    if session.world_rank == 0:
        start = time.perf_counter()
        folder = tempfile.mkdtemp(prefix="checkpoint_wait_")
        size = int(loop_config["gigabytes"] * 1e9)
        torch.save(
            {"weights": torch.ones(size // 4, dtype=torch.float32)}, os.path.join(folder, "checkpoint.pt")
        )
        write_seconds = time.perf_counter() - start
    dist.barrier()
    start = time.perf_counter()
    session.report({"step": 1}, folder, 1)
    dist.barrier()  # the next step's all-reduce
    waited = time.perf_counter() - start
    waits = [None] * session.world_size
    dist.all_gather_object(waits, waited)
    ray.train.report({"step": 2})  # waits for the upload (reports keep their order)
    if session.world_rank == 0:
        figures = {"waits": waits, "write_seconds": write_seconds}
        Path(loop_config["figures"]).write_text(json.dumps(figures))


def storage_settings(kind: str, root: str) -> dict:
    """RunConfig arguments for a storage kind under the local folder `root`."""
    if kind == STORAGES[0]:
        return {"storage_path": root}
    import fsspec
    import pyarrow.fs

    filesystem = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fsspec.filesystem("file")))
    return {"storage_path": root, "storage_filesystem": filesystem}


def measure(kind: str, mode: str, gigabytes: float, workers: int) -> dict:
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root = tempfile.mkdtemp(prefix="checkpoint_wait_storage_")
    try:
        trainer = TorchTrainer(
            train_function,
            train_loop_config={"mode": mode, "gigabytes": gigabytes, "figures": f"{root}/figures.json"},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="wait", **storage_settings(kind, root)),
        )
        start = time.perf_counter()
        result = trainer.fit()
        ended = time.perf_counter() - start
        stored = Path(result.checkpoint.path) / "checkpoint.pt"
        figures = json.loads(Path(root, "figures.json").read_text())
        return {**figures, "run_seconds": ended, "stored_bytes": stored.stat().st_size}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gigabytes", type=float, default=1.1, help="checkpoint size (GB, 1e9 bytes)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (1 CPU each)")
    arguments = parser.parse_args(argv)

    import ray

    ray.init(num_cpus=arguments.workers, include_dashboard=False, log_to_driver=False)
    shares = []
    worst_async, best_sync = 0.0, float("inf")
    try:
        for kind in STORAGES:
            waits = {}
            for mode in MODES:
                figures = measure(kind, mode, arguments.gigabytes, arguments.workers)
                waits[mode] = figures["waits"]
                ranks = ", ".join(f"rank {rank} {wait:.2f} s" for rank, wait in enumerate(figures["waits"]))
                print(
                    f"{kind}, {mode}: {figures['stored_bytes'] / 1e9:.2f} GB stored; wait at the checkpoint: "
                    f"{ranks}; rank 0's local write {figures['write_seconds']:.2f} s; run ended after "
                    f"{figures['run_seconds']:.1f} s",
                    flush=True,
                )
            share = max(waits["ASYNC"]) / min(waits["SYNC"])
            shares.append(share)
            worst_async = max(worst_async, max(waits["ASYNC"]))
            best_sync = min(best_sync, min(waits["SYNC"]))
            print(f"{kind}: the ranks wait {share:.1%} as long with ASYNC as with SYNC", flush=True)
    finally:
        ray.shutdown()
    async_share = worst_async / best_sync
    print(f"async_share={async_share:.3f}")
    return async_share


if __name__ == "__main__":
    main()
