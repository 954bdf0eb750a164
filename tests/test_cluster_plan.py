"""Sizing a search from the cluster: live nodes, autoscaler node types, the head's driver slot.
Plain data in, plan out: no Ray cluster needed."""

from __future__ import annotations

import pytest

from lstm_ae.config import ConfigError
from train.cluster import HEAD_RESOURCE, ClusterCapacity, NodeGroup
from train.commandline import check_address
from tune.experiment import SearchSettings, plan_trials

HEAD = NodeGroup({"CPU": 0.0, HEAD_RESOURCE: 1.0}, 1)
CPU_WORKER_TYPE = NodeGroup({"CPU": 1.0}, 4)
GPU_1X = NodeGroup({"CPU": 4.0, "GPU": 1.0}, 16)
GPU_4X = NodeGroup({"CPU": 48.0, "GPU": 4.0}, 4)


def settings(**overrides) -> SearchSettings:
    return SearchSettings(name="plan", **overrides)


def test_an_autoscaling_cluster_with_no_workers_yet_runs_trials_side_by_side():
    cluster = ClusterCapacity(live=[HEAD], launchable=[HEAD, CPU_WORKER_TYPE])
    plan = plan_trials(settings(), cluster, num_trials=8)
    assert plan.cpus_per_worker == 1.0 and plan.capacity == 4 and plan.max_concurrent == 4
    assert plan.trial_resources == {"CPU": 1.0}  # single-worker trials go to the workers


def test_gpu_trials_are_sized_from_the_gpu_node_types_not_from_the_cpu_head():
    cluster = ClusterCapacity(
        live=[NodeGroup({"CPU": 8.0, HEAD_RESOURCE: 1.0}, 1)], launchable=[GPU_1X, GPU_4X]
    )
    plan = plan_trials(settings(use_gpu=True), cluster, num_trials=64)
    assert plan.capacity == 16 + 16 and plan.max_concurrent == 32
    assert plan.worker_resources == {"CPU": 2.0, "GPU": 1.0}
    multi = plan_trials(settings(use_gpu=True, workers_per_trial=4), cluster, num_trials=64)
    assert multi.capacity == 8 and multi.max_concurrent == 8
    assert multi.trial_resources == {"CPU": 0.0, HEAD_RESOURCE: 0.01}  # the trainer's driver on the head


def test_max_concurrent_and_the_number_of_trials_cap_the_plan():
    cluster = ClusterCapacity(live=[HEAD], launchable=[HEAD, CPU_WORKER_TYPE])
    assert plan_trials(settings(max_concurrent=2), cluster, num_trials=8).max_concurrent == 2
    assert plan_trials(settings(), cluster, num_trials=3).max_concurrent == 3


def test_trainers_wait_ten_minutes_for_their_workers_unless_the_search_environment_says_otherwise(
    monkeypatch,
):
    cluster = ClusterCapacity(live=[HEAD], launchable=[HEAD, CPU_WORKER_TYPE])
    two_workers = settings(workers_per_trial=2)
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    assert plan_trials(two_workers, cluster, num_trials=4).worker_group_start_timeout_s == 600
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "90")
    assert plan_trials(two_workers, cluster, num_trials=4).worker_group_start_timeout_s == 90


def test_a_fixed_cluster_without_the_head_resource_places_drivers_anywhere():
    cluster = ClusterCapacity(live=[NodeGroup({"CPU": 2.0}, 1)])
    plan = plan_trials(settings(workers_per_trial=2), cluster, num_trials=4)
    assert plan.cpus_per_worker == 1.0 and plan.capacity == 1 and plan.max_concurrent == 1
    assert plan.trial_resources == {"CPU": 0.01}
    one = plan_trials(settings(), cluster, num_trials=4)  # a laptop: one trial with both cores
    assert one.cpus_per_worker == 2.0 and one.threads == 2 and one.max_concurrent == 1
    assert "up to 1 trial(s) at once" in one.describe()


def test_a_cluster_that_can_never_hold_a_gpu_says_so():
    cluster = ClusterCapacity(live=[NodeGroup({"CPU": 2.0}, 1)], launchable=[CPU_WORKER_TYPE])
    assert not cluster.can_ever_hold({"GPU": 1.0})
    assert ClusterCapacity(live=[], launchable=[GPU_1X]).can_ever_hold({"GPU": 1.0, "CPU": 2.0})


def test_an_address_where_no_ray_runs_is_refused_at_once():
    with pytest.raises(ConfigError, match=r"--address 127.0.0.1:1: no Ray cluster answers there"):
        check_address("127.0.0.1:1")
    with pytest.raises(ConfigError, match="host:port"):
        check_address("nonsense")
    check_address(None)
    check_address("auto")


def test_node_types_come_from_the_shipped_cluster_files():
    from pathlib import Path

    from train.cluster import node_types_from_file

    root = Path(__file__).resolve().parents[1]
    aws = node_types_from_file(root / "cluster.yaml")
    head = next(group for group in aws if HEAD_RESOURCE in group.resources)
    assert head.count == 1 and "GPU" not in head.resources
    plan = plan_trials(settings(use_gpu=True), ClusterCapacity(live=[head], launchable=aws), num_trials=64)
    assert plan.max_concurrent >= 8  # the GPU node types, not the GPU-less head, size the search
    assert plan_trials(
        settings(use_gpu=True, workers_per_trial=4), ClusterCapacity([head], aws), 8
    ).trial_resources == {
        "CPU": 0.0,
        HEAD_RESOURCE: 0.01,
    }


def test_a_gpu_run_on_an_autoscaling_cluster_says_it_waits_for_gpu_nodes():
    from train.cluster import waiting_line

    head = NodeGroup({"CPU": 8.0, HEAD_RESOURCE: 1.0}, 1)
    bundle = {"CPU": 2.0, "GPU": 1.0}
    line = waiting_line(ClusterCapacity(live=[head], launchable=[GPU_1X]), bundle, 4)
    assert line.startswith("waiting for the autoscaler: 4 x (2 CPU, 1 GPU) wanted, the live nodes hold 0")
    assert waiting_line(ClusterCapacity(live=[head, GPU_4X], launchable=[GPU_1X]), bundle, 4) is None
    assert waiting_line(ClusterCapacity(live=[head]), bundle, 4) is None  # no autoscaler: refused earlier
