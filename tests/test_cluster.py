"""Every shipped cluster file passes Ray's own config checks and our invariants (offline).

The end-to-end proof (`ray up` on this machine, jobs submitted, `ray down`) is
scripts/cluster_local_e2e.sh, which CI runs after the tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted(ROOT.glob("cluster*.yaml"))
CLOUD_FILES = [
    path for path in CLUSTER_FILES if yaml.safe_load(path.read_text())["provider"]["type"] != "local"
]
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5)\.|^(g2|a2|a3)-")


def pinned_ray_version() -> str:
    match = re.search(r"^ray\[[^\]]*\]==([\w.]+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert match, "requirements.txt must pin ray"
    return match.group(1)


def test_the_project_ships_aws_gcp_and_local_cluster_files():
    names = {path.name for path in CLUSTER_FILES}
    assert {"cluster.yaml", "cluster.gcp.yaml", "cluster.local.yaml"} <= names
    assert yaml.safe_load((ROOT / "cluster.yaml").read_text())["provider"]["type"] == "aws"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda path: path.name)
def test_ray_accepts_the_cluster_file(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(path.read_text())))


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda path: path.name)
def test_head_type_exists_and_gpu_types_declare_gpus(path):
    config = yaml.safe_load(path.read_text())
    node_types = config.get("available_node_types", {})
    if config["provider"]["type"] == "local":
        assert config["max_workers"] == 0 and config["provider"]["head_ip"] == "127.0.0.1"
        return
    assert config["head_node_type"] in node_types
    gpu_types = []
    for name, node_type in node_types.items():
        node_config = node_type["node_config"]
        instance = node_config.get("InstanceType") or node_config.get("machineType", "")
        if GPU_INSTANCE.search(instance) or name.startswith("gpu"):
            gpu_types.append(name)
            assert node_type["resources"].get("GPU", 0) >= 1, f"{name} ({instance}) must declare its GPUs"
        else:
            assert node_type["resources"].get("GPU", 0) == 0, name
    assert gpu_types, "a cloud cluster needs GPU worker types"


@pytest.mark.parametrize("path", CLOUD_FILES, ids=lambda path: path.name)
def test_cloud_nodes_run_the_pinned_ray_and_install_the_requirements(path):
    config = yaml.safe_load(path.read_text())
    image = config["docker"]["image"]
    assert image.startswith("rayproject/ray:") and not image.startswith("rayproject/ray-ml")
    assert image.split(":")[1].split("-")[0] == pinned_ray_version()
    assert any("requirements.txt" in command for command in config["setup_commands"])


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda path: path.name)
def test_no_port_open_to_the_world_and_no_credentials(path):
    text = path.read_text()
    config = yaml.safe_load(text)
    assert "0.0.0.0" not in text
    assert all(
        "--dashboard-host=127.0.0.1" in command
        for command in config["head_start_ray_commands"]
        if "ray start" in command
    )
    for secret in ("aws_access_key_id", "aws_secret_access_key", "private_key_id", "begin private key"):
        assert secret not in text.lower()
    if config["provider"]["type"] == "aws":
        # Ray adds SSH from 0.0.0.0/0 to any security group it creates itself; it creates
        # none when every node type names its own group.
        for node_type in config["available_node_types"].values():
            assert node_type["node_config"].get("SecurityGroupIds"), node_type


def test_local_cluster_uses_the_project_environment():
    config = yaml.safe_load((ROOT / "cluster.local.yaml").read_text())
    assert all(".lstm-ae/venv/bin" in command for command in config["head_start_ray_commands"])
    script = (ROOT / "scripts" / "cluster_local_e2e.sh").read_text()
    for step in ('"$RAY" up', "job submit", "rsync-down", '"$RAY" down', "stop --force"):
        assert step in script
