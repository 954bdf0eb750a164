"""Joining a Ray cluster or starting a local one, with the environment every run's workers get."""

from __future__ import annotations

import os

# Quieter Ray: no duplicated worker prints. Ray Train's preemption watcher stays on (its
# default): when Ray drains a node (a spot notice where the autoscaler turns it into a
# drain), the run checkpoints on its schedule and restarts elsewhere without spending
# --max-failures. It costs one 0-CPU actor and one harmless ERROR line from Ray's core per
# run ("PreemptionWatcher ... has constructor arguments in the object store").
RAY_ENVIRONMENT = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# oneDNN's and ATen's instruction-set caps: a run started under them trains under them.
FORWARDED_ENVIRONMENT = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def connect(address: str | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local one. True when it
    joined a cluster that was already running (which may have an autoscaler)."""
    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    import ray

    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    # CPU capability caps set for this command reach its workers too (see README, Performance).
    forwarded = {key: os.environ[key] for key in FORWARDED_ENVIRONMENT if key in os.environ}
    if not ray.is_initialized():
        ray.init(
            address=address,
            runtime_env={"env_vars": {**RAY_ENVIRONMENT, **forwarded}},
            log_to_driver=True,
        )
    return joined
