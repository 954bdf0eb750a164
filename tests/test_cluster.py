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
    from train.ray_internals import validated_autoscaling_config

    validated_autoscaling_config(yaml.safe_load(path.read_text()))


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


@pytest.mark.parametrize("path", CLOUD_FILES, ids=lambda path: path.name)
def test_cloud_nodes_start_ray_with_token_authentication_and_the_shared_token(path):
    config = yaml.safe_load(path.read_text())
    starts = [
        command
        for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        if "ray start" in command
    ]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in command for command in starts)
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


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


# ---------------------------------------------------------------------------------------------
# The GPU stack: host image (NVIDIA driver), Ray image (CUDA), torch wheel (CUDA). Each cloud
# file names them in a `# gpu-stack:` line; docs/gpu_stack.md says where each number comes from.

# Lowest Linux driver branch for each CUDA major (NVIDIA, "CUDA Compatibility", Minor Version
# Compatibility, Table 1: CUDA 11.x >= 450, 12.x >= 525, 13.x >= 580). A build for any minor
# of a major runs on a driver at or above its major's floor (newer drivers: backward compatible).
CUDA_MIN_DRIVER = {11: 450, 12: 525, 13: 580}

# The host images the cloud files may boot, and the NVIDIA driver branch each one carries.
# Boot another image only after adding it here, with where its driver number comes from.
HOST_IMAGE_DRIVER = {
    # AWS "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04)", x86_64, newest release,
    # looked up at launch. AWS's release notes of this family: driver 580.105.08 (2025-12) to
    # 595.91.07 (2026-10), read for the arm64 build; see docs/gpu_stack.md.
    "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id": 580,
    # Google's Deep Learning VM family: the name carries the driver branch.
    "projects/deeplearning-platform-release/global/images/family/common-cu129-ubuntu-2204-nvidia-580": 580,
}

# CUDA of the Linux x86_64 torch wheel on PyPI, what `pip install torch==X` gets with no
# --index-url (read from each wheel's cuda-toolkit pin: 2.14.1 -> 13.0.3, 2.15.0 -> 13.2.2).
TORCH_PYPI_CUDA = {"2.14.1": "13.0", "2.15.0": "13.2"}

RAY_IMAGE = re.compile(r"^rayproject/ray:[\w.]+-py3\d+-(?P<platform>[\w]+)$")
TORCH_INDEX = re.compile(r"--index-url[= ]+https://download\.pytorch\.org/whl/(?P<tag>\w+)")


def cuda_of_tag(tag: str) -> str:
    """cu130 -> 13.0, cu128 -> 12.8, cu118 -> 11.8 (Ray's and PyTorch's tag style)."""
    match = re.fullmatch(r"cu(\d\d)(\d+)", tag)
    assert match, f"not a CUDA tag: {tag}"
    return f"{match.group(1)}.{match.group(2)}"


def cuda_major(version: str) -> int:
    return int(version.split(".")[0])


def declared_gpu_stack(text: str) -> dict[str, str]:
    match = re.search(r"^# gpu-stack: (.+)$", text, re.MULTILINE)
    return dict(item.split("=", 1) for item in match.group(1).split()) if match else {}


def host_images(config: dict) -> dict[str, str | None]:
    """The boot image of every node type (None: the provider's default)."""
    images = {}
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        if config["provider"]["type"] == "aws":
            images[name] = node_config.get("ImageId")
        else:
            boot = [disk for disk in node_config.get("disks", []) if disk.get("boot")]
            images[name] = boot[0].get("initializeParams", {}).get("sourceImage") if boot else None
    return images


def requirement_spec(name: str):
    from packaging.requirements import Requirement

    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and Requirement(line).name == name:
            return Requirement(line).specifier
    raise AssertionError(f"requirements.txt has no {name}")


def gpu_stack_problems(text: str) -> list[str]:
    """What is wrong with a cloud cluster file's GPU stack; empty when the pieces fit."""
    config = yaml.safe_load(text)
    problems = []

    docker = config.get("docker", {})
    images = [docker.get(key) for key in ("image", "head_image", "worker_image")]
    images += [node.get("docker", {}).get("worker_image") for node in config["available_node_types"].values()]
    ray_cudas = set()
    for image in filter(None, images):
        match = RAY_IMAGE.match(image)
        platform = match.group("platform") if match else ""
        if not platform.startswith("cu"):
            problems.append(f"Ray image {image} does not name its CUDA (-cuNNN); -gpu is an alias that moves")
        else:
            ray_cudas.add(cuda_of_tag(platform))
    if len(ray_cudas) != 1:
        problems.append(f"one Ray image CUDA expected, found {sorted(ray_cudas)}")
    ray_cuda = min(ray_cudas) if ray_cudas else None

    setup = " ".join(
        " ".join(config.get(key, []))
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
    )
    pins = {}
    for package in ("torch", "torchvision"):
        found = set(re.findall(rf"(?<![\w-]){package}==([\w.]+)", setup))
        if len(found) != 1:
            problems.append(f"setup must pin {package}==VERSION once, found {sorted(found)}")
            continue
        pins[package] = found.pop()
        if pins[package] not in requirement_spec(package):
            problems.append(
                f"{package}=={pins[package]} is outside requirements.txt's {requirement_spec(package)}"
            )
    if re.search(r"--extra-index-url[= ]+https://download\.pytorch\.org", setup):
        problems.append("give PyTorch's index with --index-url: with --extra-index-url pip may take either")
    indexes = set(TORCH_INDEX.findall(setup))
    if len(indexes) > 1 or indexes & {"cpu"}:
        problems.append(f"one CUDA wheel index expected, found {sorted(indexes)}")
    torch_index = indexes.pop() if len(indexes) == 1 else "pypi"
    if torch_index != "pypi":
        torch_cuda = cuda_of_tag(torch_index) if torch_index.startswith("cu") else None
    else:
        torch_cuda = TORCH_PYPI_CUDA.get(pins.get("torch", ""))
        if torch_cuda is None:
            problems.append(
                f"CUDA of PyPI's torch {pins.get('torch')} unknown: add it to TORCH_PYPI_CUDA from the wheel"
            )

    drivers = []
    for name, image in host_images(config).items():
        if image is None:
            problems.append(f"{name} boots the provider's default image (Ray's AWS default: CUDA 11.2 era)")
        elif image not in HOST_IMAGE_DRIVER:
            problems.append(f"{name} boots {image}, whose driver is not in HOST_IMAGE_DRIVER")
        else:
            drivers.append(HOST_IMAGE_DRIVER[image])
    driver = min(drivers) if drivers else None

    for piece, cuda in (("Ray image", ray_cuda), ("torch wheel", torch_cuda)):
        if cuda is None or driver is None:
            continue
        need = CUDA_MIN_DRIVER.get(cuda_major(cuda))
        if need is None:
            problems.append(f"no driver floor known for CUDA {cuda} ({piece})")
        elif driver < need:
            problems.append(
                f"{piece} is CUDA {cuda}, which needs driver >= {need}; the host image has {driver}"
            )
    if ray_cuda and torch_cuda and cuda_major(ray_cuda) != cuda_major(torch_cuda):
        problems.append(f"Ray image CUDA {ray_cuda} and torch CUDA {torch_cuda} are different majors")

    actual = {
        "host-driver": str(driver),
        "ray-image-cuda": str(ray_cuda),
        "torch": pins.get("torch", "?"),
        "torchvision": pins.get("torchvision", "?"),
        "torch-cuda": str(torch_cuda),
        "torch-index": torch_index,
    }
    declared = declared_gpu_stack(text)
    if declared != actual:
        line = " ".join(f"{key}={value}" for key, value in actual.items())
        problems.append(f"the `# gpu-stack:` line says {declared}; the file says: # gpu-stack: {line}")
    return problems


@pytest.mark.parametrize("path", CLOUD_FILES, ids=lambda path: path.name)
def test_gpu_stack_pieces_fit_each_other(path):
    assert gpu_stack_problems(path.read_text()) == []


def test_every_cloud_runs_the_same_ray_image_and_torch():
    stacks = {path.name: declared_gpu_stack(path.read_text()) for path in CLOUD_FILES}
    images = {path.name: yaml.safe_load(path.read_text())["docker"]["image"] for path in CLOUD_FILES}
    assert len(CLOUD_FILES) >= 2
    assert len({tuple(sorted(stack.items())) for stack in stacks.values()}) == 1, stacks
    assert len(set(images.values())) == 1, images


AWS_SSM_IMAGE = next(key for key in HOST_IMAGE_DRIVER if key.startswith("resolve:ssm:"))


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("-py311-cu130", "-py311-cu128", "different majors"),  # Ray image alone
        ("-py311-cu130", "-py311-gpu", "-gpu is an alias"),
        ("torch==2.14.1", "torch==2.15.0", "gpu-stack"),  # torch alone: now CUDA 13.2
        (
            "torchvision==0.29.1",
            "torchvision==0.29.1\n  - pip install -q torch==2.14.1 --index-url https://download.pytorch.org/whl/cu126",
            "different majors",
        ),  # a torch index alone
        (AWS_SSM_IMAGE, "ami-0a2b85e15b7c0ac34", "not in HOST_IMAGE_DRIVER"),  # Ray's old default AMI
        (f"      ImageId: {AWS_SSM_IMAGE}\n", "", "default image"),
        ("host-driver=580", "host-driver=570", "gpu-stack"),  # the summary line alone
    ],
    ids=["ray-image", "gpu-alias", "torch", "torch-index", "ami", "no-ami", "summary-line"],
)
def test_bumping_one_piece_alone_fails(old, new, expected):
    text = (ROOT / "cluster.yaml").read_text()
    assert old in text
    problems = gpu_stack_problems(text.replace(old, new))
    assert any(expected in problem for problem in problems), problems


def test_a_driver_below_the_cuda_floor_fails(monkeypatch):
    # The same files on an image with a 570 driver (enough for CUDA 12.x, not 13.x).
    for image in list(HOST_IMAGE_DRIVER):
        monkeypatch.setitem(HOST_IMAGE_DRIVER, image, 570)
    problems = gpu_stack_problems((ROOT / "cluster.yaml").read_text())
    assert any("needs driver >= 580" in problem for problem in problems), problems


def test_cuda_tags_and_floors():
    assert [cuda_of_tag(tag) for tag in ("cu118", "cu121", "cu128", "cu130")] == [
        "11.8",
        "12.1",
        "12.8",
        "13.0",
    ]
    assert CUDA_MIN_DRIVER[cuda_major("13.0")] == 580 and CUDA_MIN_DRIVER[cuda_major("12.8")] == 525


def test_pypi_torch_cuda_table_matches_an_installed_wheel():
    """Where this machine has a listed torch from PyPI, its own metadata names the same CUDA."""
    from importlib import metadata

    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        pytest.skip("torch is not installed")
    if version not in TORCH_PYPI_CUDA:
        pytest.skip(f"torch {version} is not a PyPI build listed in TORCH_PYPI_CUDA")
    cudas = set()
    for requirement in metadata.requires("torch") or []:
        match = re.match(
            r"(?:cuda-toolkit(?:\[[^\]]*\])?|nvidia-cuda-runtime-cu\d+)==(\d+)\.(\d+)", requirement
        )
        if match:
            cudas.add(f"{match.group(1)}.{match.group(2)}")
    if not cudas:
        pytest.skip(f"torch {version} here names no CUDA runtime (a CPU build)")
    assert cudas == {TORCH_PYPI_CUDA[version]}
