"""What a Ray cluster can hold: its live nodes and, under an autoscaler, the node types it
may still launch. Used to size searches (`tune.experiment.plan_trials`) and to refuse GPU
runs on clusters that can never get a GPU.

`ray.cluster_resources()` only counts nodes that are up: an autoscaling cluster starts with
few or none, so a plan sized from it alone would run one trial at a time. The node types
come from, in order:

1. the GCS's cluster config (`train.ray_internals.autoscaler_node_groups`, what Ray Train
   reads); Ray 2.60's own autoscalers do not publish it yet, so usually:
2. the autoscaling config file: `$LSTM_AE_AUTOSCALING_CONFIG`, else
   `~/ray_bootstrap_config.yaml`, where `ray up` puts it on the head node (where
   `ray job submit` runs drivers); under KubeRay, which writes no such file, the manifests
   in k8s/ point the variable at k8s/node-types.yaml, the node types Ray's KubeRay
   autoscaler derives from them. Each type counts at most `max_workers` nodes, capped by
   the file's global `max_workers`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lstm_ae.config import ConfigError
from train.ray_internals import autoscaler_node_groups

HEAD_RESOURCE = "lstm_ae_head"  # the cluster files give only the head node this resource
AUTOSCALING_CONFIG_VARIABLE = "LSTM_AE_AUTOSCALING_CONFIG"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class NodeGroup:
    """Nodes of one shape: `count` of them, each with `resources` (CPU, GPU, custom)."""

    resources: dict[str, float]
    count: int  # -1: no limit


@dataclass(frozen=True)
class ClusterCapacity:
    live: list[NodeGroup] = field(default_factory=list)  # nodes up now, one group per node
    launchable: list[NodeGroup] | None = None  # the autoscaler's node types, None without one

    def fits(self, bundle: dict[str, float]) -> int:
        """How many bundles the cluster holds at its largest (live nodes, or every node type
        at its max count, whichever is more); a bundle never spans nodes. -1: no limit."""
        live = _fits(self.live, bundle)
        if self.launchable is None:
            return live
        launchable = _fits(self.launchable, bundle)
        return -1 if launchable == -1 else max(live, launchable)

    def can_ever_hold(self, bundle: dict[str, float]) -> bool:
        return self.fits(bundle) != 0

    def largest(self, resource: str) -> float:
        """The most of `resource` one node has or can have."""
        groups = self.live + (self.launchable or [])
        return max((group.resources.get(resource, 0.0) for group in groups), default=0.0)

    def has(self, resource: str) -> bool:
        return self.largest(resource) > 0


def _fits(groups: list[NodeGroup], bundle: dict[str, float]) -> int:
    total = 0
    for group in groups:
        per_node = min(
            (
                math.floor(group.resources.get(name, 0.0) / amount + 1e-9)
                for name, amount in bundle.items()
                if amount > 0
            ),
            default=0,
        )
        if per_node == 0 or group.count == 0:
            continue
        if group.count < 0:
            return -1
        total += per_node * group.count
    return total


def cluster_capacity(joined: bool = True) -> ClusterCapacity:
    """The capacity of the cluster this process is connected to (ray.init first); a
    cluster the process started itself (`joined` False) has no autoscaler."""
    import ray

    live = [
        NodeGroup({name: float(value) for name, value in node["Resources"].items()}, 1)
        for node in ray.nodes()
        if node.get("Alive")
    ]
    return ClusterCapacity(live, _autoscaler_node_types() if joined else None)


def _autoscaler_node_types() -> list[NodeGroup] | None:
    """The autoscaler's node types, or None where no autoscaler is known."""
    groups = autoscaler_node_groups()
    if groups:
        return [NodeGroup(resources, count) for resources, count in groups]
    path = Path(os.environ.get(AUTOSCALING_CONFIG_VARIABLE) or BOOTSTRAP_CONFIG).expanduser()
    return node_types_from_file(path) if path.is_file() else None


def node_types_from_file(path: Path) -> list[NodeGroup] | None:
    """Node types of an autoscaling config file (YAML or JSON); None where it cannot be read."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return node_types_from_config(config)


def node_types_from_config(config: dict) -> list[NodeGroup] | None:
    """Node types of an autoscaling config (`ray up`'s, or the one Ray's KubeRay autoscaler
    derives from a RayCluster): the head type counts once; None without a worker to launch."""
    try:
        types = config.get("available_node_types") or {}
        overall = config.get("max_workers")
        groups, launchable_workers = [], 0
        for name, node_type in types.items():
            count = 1 if name == config.get("head_node_type") else int(node_type.get("max_workers", 0))
            if overall is not None and name != config.get("head_node_type"):
                count = min(count, int(overall))
            resources = {key: float(value) for key, value in (node_type.get("resources") or {}).items()}
            if resources:  # a type without declared resources (detected at start) tells nothing
                groups.append(NodeGroup(resources, count))
                launchable_workers += count if name != config.get("head_node_type") else 0
    except (ValueError, TypeError, AttributeError):
        return None
    launchable_workers = sum(group.count for group in groups) - (
        1 if config.get("head_node_type") in types else 0
    )
    return groups if groups and launchable_workers != 0 else None  # no worker to launch: no autoscaler


def check_can_hold(capacity: ClusterCapacity, bundle: dict[str, float], count: int, what: str) -> None:
    """Raise ConfigError when the cluster, even fully scaled, holds fewer than `count`
    bundles: Ray would otherwise wait forever for resources that never come."""
    fits = capacity.fits(bundle)
    if fits < 0 or fits >= count:
        return
    wanted = ", ".join(f"{amount:g} {name}" for name, amount in bundle.items())
    scope = (
        "its live nodes and the node types its autoscaler can launch"
        if capacity.launchable
        else "its nodes (no autoscaler)"
    )
    hint = (
        " (no node has a GPU: drop --use-gpu, or add a GPU node type)"
        if "GPU" in bundle and not capacity.has("GPU")
        else ""
    )
    raise ConfigError(
        f"{what} need(s) {count} x ({wanted}) but the cluster holds at most {fits} across {scope}{hint}"
    )


def waiting_line(capacity: ClusterCapacity, bundle: dict[str, float], count: int) -> str | None:
    """One progress line when the live nodes cannot hold `count` bundles yet but the
    autoscaler can launch nodes that will (None when nothing needs to be waited for)."""
    live = _fits(capacity.live, bundle)
    if live < 0 or live >= count or capacity.launchable is None:
        return None
    wanted = ", ".join(f"{amount:g} {name}" for name, amount in bundle.items())
    return (
        f"waiting for the autoscaler: {count} x ({wanted}) wanted, the live nodes hold {live}; "
        "new nodes take minutes to start"
    )
