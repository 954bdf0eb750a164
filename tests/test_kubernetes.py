"""The Kubernetes manifests in k8s/ (KubeRay RayCluster and RayJobs) checked offline.

- Ray's own KubeRay autoscaler code turns each cluster into node types: a head with no CPU for
  training, GPU groups that scale from 0, the node types k8s/node-types.yaml gives the planner,
  and a config Ray's own checks of `ray up` files accept.
- Pod templates validate against Kubernetes' schemas (KUBERNETES_VERSION, from the
  kubernetes-validate package, offline); the KubeRay fields around them against a table of the
  fields this project uses, with their types as KubeRay KUBERAY_VERSION's CRDs declare them.
- Image, Ray version, Python packages and the setup command agree with cluster.yaml; the
  RayJobs' clusters are the RayCluster; each entrypoint is a command of README's.
- Nothing listens outside the cluster and token authentication is on.

Every check returns lines naming what is wrong, so the broken variants at the end can show
that each check fails where it should. What needs a real cluster is in docs/kubernetes.md.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from test_cluster import pinned_ray_version

from train.cluster import AUTOSCALING_CONFIG_VARIABLE, HEAD_RESOURCE, ClusterCapacity, node_types_from_config
from train.ray_internals import kuberay_autoscaling_config, validated_autoscaling_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
RAY_CLUSTER_FILE = "raycluster.yaml"
JOB_FILES = ("rayjob-train.yaml", "rayjob-tune.yaml", "rayjob-compare.yaml")
COMPARE_FILE = "rayjob-compare.yaml"  # a head-only cluster that reads the run folders from the PVC
NODE_TYPES_FILE = "node-types.yaml"
PVC_FILE = "runs-pvc.yaml"

# The operator whose CRDs (ray.io/v1 RayCluster and RayJob, config/crd/bases/ in its
# repository at tag v1.7.0) the field table below was read from, and the Kubernetes API that
# release builds against (its go.mod: k8s.io/api v0.36.0).
KUBERAY_VERSION = "1.7.0"
KUBERNETES_VERSION = "1.36.0"

CONFIG_MOUNT = "/home/ray/lstm-ae"  # the ConfigMap lstm-ae: requirements.txt and node-types.yaml
CLUSTER_RUNS = "/home/ray/runs"  # the `runs` volume: scratch with a bucket, the PVC otherwise
RUNS_CLAIM = "lstm-ae-runs"
GPU_LIMIT = "nvidia.com/gpu"

# ------------------------------------------------------------------------------ KubeRay fields

# Types as the CRDs' openAPIV3Schema declares them: string, integer (int32), boolean, object,
# array; a tuple is a string enum; STRING_MAP an object of strings (additionalProperties:
# string); POD_TEMPLATE a core/v1 PodTemplateSpec, checked against Kubernetes' own schema.
STRING, INTEGER, BOOLEAN, OBJECT, LIST = "string", "integer", "boolean", "object", "array"
STRING_MAP, POD_TEMPLATE, CLUSTER_SPEC = "map of strings", "PodTemplateSpec", "RayClusterSpec"

# RayClusterSpec (RayCluster.spec, RayJob.spec.rayClusterSpec): the fields the manifests use.
CLUSTER_SPEC_FIELDS = {
    "rayVersion": STRING,
    "enableInTreeAutoscaling": BOOLEAN,
    "autoscalerOptions": OBJECT,
    "autoscalerOptions.idleTimeoutSeconds": INTEGER,
    "autoscalerOptions.upscalingMode": ("Default", "Aggressive", "Conservative"),
    "authOptions": OBJECT,
    "authOptions.mode": ("disabled", "token"),
    "headGroupSpec": OBJECT,
    "headGroupSpec.serviceType": STRING,
    "headGroupSpec.resources": STRING_MAP,
    "headGroupSpec.rayStartParams": STRING_MAP,
    "headGroupSpec.template": POD_TEMPLATE,
    "workerGroupSpecs": LIST,
    "workerGroupSpecs[]": OBJECT,
    "workerGroupSpecs[].groupName": STRING,
    "workerGroupSpecs[].minReplicas": INTEGER,
    "workerGroupSpecs[].maxReplicas": INTEGER,
    "workerGroupSpecs[].replicas": INTEGER,
    "workerGroupSpecs[].rayStartParams": STRING_MAP,
    "workerGroupSpecs[].resources": STRING_MAP,
    "workerGroupSpecs[].template": POD_TEMPLATE,
}
CLUSTER_SPEC_REQUIRED = {
    "": ("headGroupSpec",),
    "headGroupSpec": ("template",),
    "workerGroupSpecs[]": ("groupName", "maxReplicas", "minReplicas", "template"),
}
# RayJobSpec (RayJob.spec): the fields the manifests use.
JOB_SPEC_FIELDS = {
    "entrypoint": STRING,
    "runtimeEnvYAML": STRING,
    "shutdownAfterJobFinishes": BOOLEAN,
    "ttlSecondsAfterFinished": INTEGER,
    "backoffLimit": INTEGER,
    "rayClusterSpec": CLUSTER_SPEC,
}
JOB_SPEC_REQUIRED: dict[str, tuple[str, ...]] = {}
INT32 = range(-(2**31), 2**31)


def type_problem(value, kind) -> str | None:
    """Why `value` is not of the CRD type `kind` (None when it is)."""
    if isinstance(kind, tuple):
        return None if value in kind else f"is {value!r}, not one of {', '.join(kind)}"
    expected = {
        STRING: lambda: isinstance(value, str),
        INTEGER: lambda: isinstance(value, int) and not isinstance(value, bool) and value in INT32,
        BOOLEAN: lambda: isinstance(value, bool),
        OBJECT: lambda: isinstance(value, dict),
        LIST: lambda: isinstance(value, list),
        STRING_MAP: lambda: isinstance(value, dict) and all(isinstance(item, str) for item in value.values()),
        POD_TEMPLATE: lambda: isinstance(value, dict),
        CLUSTER_SPEC: lambda: isinstance(value, dict),
    }[kind]()
    return None if expected else f"is {value!r}, not a {kind} (quote numbers in maps of strings)"


def field_problems(value: dict, fields: dict, required: dict, where: str, prefix: str = "") -> list[str]:
    """Every key of `value` (an object at `prefix`) must be a field of the table, of its type."""
    problems = [
        f"{where}: {prefix or 'spec'} lacks {key}, which KubeRay {KUBERAY_VERSION} requires"
        for key in required.get(prefix, ())
        if key not in value
    ]
    for key, item in value.items():
        path = f"{prefix}.{key}" if prefix else key
        kind = fields.get(path)
        if kind is None:
            problems.append(
                f"{where}: {path} is not a field of KubeRay {KUBERAY_VERSION}'s CRD "
                "(or not one tests/test_kubernetes.py checked: add it from the CRD)"
            )
            continue
        problem = type_problem(item, kind)
        if problem:
            problems.append(f"{where}: {path} {problem}")
        elif kind == OBJECT:
            problems += field_problems(item, fields, required, where, path)
        elif kind == LIST:
            for element in item:
                element_kind = fields.get(f"{path}[]")
                problem = type_problem(element, element_kind)
                if problem:
                    problems.append(f"{where}: {path}[] {problem}")
                elif element_kind == OBJECT:
                    problems += field_problems(element, fields, required, where, f"{path}[]")
        elif kind == CLUSTER_SPEC:
            problems += field_problems(item, CLUSTER_SPEC_FIELDS, CLUSTER_SPEC_REQUIRED, f"{where} {path}")
    return problems


def kuberay_problems(manifest: dict, where: str) -> list[str]:
    kind = manifest.get("kind")
    problems = []
    if manifest.get("apiVersion") != "ray.io/v1" or kind not in ("RayCluster", "RayJob"):
        return [f"{where}: not a ray.io/v1 RayCluster or RayJob"]
    name = manifest.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", name):  # KubeRay: a DNS-1035 label
        problems.append(f"{where}: metadata.name {name!r} is not a short DNS-1035 label")
    if kind == "RayCluster":
        return problems + field_problems(manifest["spec"], CLUSTER_SPEC_FIELDS, CLUSTER_SPEC_REQUIRED, where)
    return problems + field_problems(manifest["spec"], JOB_SPEC_FIELDS, JOB_SPEC_REQUIRED, where)


# ------------------------------------------------------------------------------ Kubernetes schemas


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


def pod_templates(manifest: dict) -> list[tuple[str, dict]]:
    """(group name, pod template) of the head and of every worker group."""
    spec = cluster_spec(manifest)
    templates = [("head", spec["headGroupSpec"]["template"])]
    templates += [(group["groupName"], group["template"]) for group in spec.get("workerGroupSpecs") or []]
    return templates


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay: the Ray container comes first


def kubernetes_problems(resource: dict, where: str) -> list[str]:
    """What Kubernetes' schema (strict: no unknown fields) says against a core resource."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.absolute_path)
        return [f"{where}: Kubernetes {KUBERNETES_VERSION} schema: {error.message} (at {path})"]
    return []


def pod_template_problems(manifest: dict, where: str) -> list[str]:
    problems = []
    for group, template in pod_templates(manifest):
        resource = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": group},
            "template": template,
        }
        problems += kubernetes_problems(resource, f"{where} {group} pod template")
    return problems


# ------------------------------------------------------------------------------ against cluster.yaml


def cluster_file() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def stack_problems(manifest: dict, where: str) -> list[str]:
    """The image, Ray and packages of cluster.yaml, and the files the pods read where they are."""
    reference = cluster_file()
    image, setup = reference["docker"]["image"], reference["setup_commands"]
    problems = []
    ray_version = pinned_ray_version()
    if cluster_spec(manifest).get("rayVersion") != ray_version:
        problems.append(
            f"{where}: rayVersion {cluster_spec(manifest).get('rayVersion')!r} is not {ray_version}"
        )
    for group, template in pod_templates(manifest):
        containers = template["spec"].get("containers", [])
        for container in containers:
            if container.get("image") != image:
                problems.append(
                    f"{where} {group}: image {container.get('image')} is not cluster.yaml's {image}"
                )
        container = ray_container(template)
        if container.get("args") != setup or container.get("command"):
            problems.append(f"{where} {group}: the Ray container's args must be cluster.yaml's setup {setup}")
        mounts = {mount["name"]: mount["mountPath"] for mount in container.get("volumeMounts", [])}
        volumes = {volume["name"]: volume for volume in template["spec"].get("volumes", [])}
        if mounts.get("lstm-ae") != CONFIG_MOUNT or volumes.get("lstm-ae", {}).get("configMap") != {
            "name": "lstm-ae"
        }:
            problems.append(f"{where} {group}: the ConfigMap lstm-ae must be mounted at {CONFIG_MOUNT}")
        if mounts.get("runs") != CLUSTER_RUNS:
            problems.append(f"{where} {group}: the volume runs must be mounted at {CLUSTER_RUNS}")
    for command in setup:
        if f"{CONFIG_MOUNT}/requirements.txt" not in command:
            problems.append(f"cluster.yaml's setup no longer reads {CONFIG_MOUNT}/requirements.txt")
    return problems


def exposure_problems(manifest: dict, where: str) -> list[str]:
    """Token authentication on; the dashboard, the job API and the token not outside the cluster."""
    spec = cluster_spec(manifest)
    problems = []
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{where}: authOptions.mode must be token")
    head = spec["headGroupSpec"]
    if (
        head.get("serviceType", "ClusterIP") != "ClusterIP"
        or head.get("enableIngress")
        or head.get("headService")
    ):
        problems.append(
            f"{where}: the head service must be the operator's ClusterIP (reach it by port-forward)"
        )
    if "dashboard-host" in head.get("rayStartParams", {}):
        problems.append(f"{where}: leave dashboard-host to the operator (the ClusterIP service needs it)")
    for group, template in pod_templates(manifest):
        pod = template["spec"]
        ports = [port for container in pod.get("containers", []) for port in container.get("ports", [])]
        if pod.get("hostNetwork") or any("hostPort" in port for port in ports):
            problems.append(f"{where} {group}: no host network or host ports")
        for container in pod.get("containers", []):
            for variable in container.get("env", []):
                if variable["name"] in ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY") and "value" in variable:
                    problems.append(f"{where} {group}: {variable['name']} written in the manifest")
    return problems


# ------------------------------------------------------------------------------ node types


def as_ray_cluster(manifest: dict) -> dict:
    """The RayCluster a manifest makes (a RayJob's: its rayClusterSpec under the job's name)."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": manifest["metadata"]["name"]},
        "spec": cluster_spec(manifest),
    }


def planner_view(autoscaling_config: dict) -> dict:
    """What train/cluster.py reads of an autoscaling config: k8s/node-types.yaml's keys."""
    return {
        "head_node_type": autoscaling_config["head_node_type"],
        "max_workers": autoscaling_config["max_workers"],
        "available_node_types": {
            name: {key: node_type[key] for key in ("min_workers", "max_workers", "resources")}
            for name, node_type in autoscaling_config["available_node_types"].items()
        },
    }


def node_types_file() -> dict:
    return yaml.safe_load((K8S / NODE_TYPES_FILE).read_text())


def planned(node_types: list, **settings):
    """The search plan for a GPU search of 64 trials on a cluster whose head alone is up."""
    from tune.experiment import SearchSettings, plan_trials

    head = next(group for group in node_types if HEAD_RESOURCE in group.resources)
    capacity = ClusterCapacity(live=[head], launchable=node_types)
    return plan_trials(SearchSettings(name="k8s", use_gpu=True, **settings), capacity, num_trials=64)


def node_type_problems(manifest: dict, where: str) -> list[str]:
    """Ray's KubeRay autoscaler code on the manifest's cluster, against what the planner expects."""
    try:
        derived = kuberay_autoscaling_config(as_ray_cluster(manifest))
        validated_autoscaling_config(derived)
    except Exception as error:  # Ray's own refusal, whatever its type, is the finding
        return [f"{where}: Ray's KubeRay autoscaler refuses the cluster: {error!r}"]
    types = derived["available_node_types"]
    head = types[derived["head_node_type"]]["resources"]
    problems = []
    if head.get("CPU") != 0 or head.get("GPU") or head.get(HEAD_RESOURCE) != 1:
        problems.append(
            f"{where}: the head must have 0 CPUs, no GPU and {HEAD_RESOURCE}: 1 for Ray, has {head}"
        )
    spec = cluster_spec(manifest)
    for group in spec.get("workerGroupSpecs") or []:
        name, limits = group["groupName"], ray_container(group["template"]).get("resources", {})
        node_type = types[name]
        if not node_type["resources"].get("GPU"):
            problems.append(f"{where}: worker group {name} has no GPU for Ray")
        if GPU_LIMIT not in limits.get("limits", {}):
            problems.append(
                f"{where}: worker group {name} has no {GPU_LIMIT} limit (Kubernetes schedules by it)"
            )
        elif (
            limits.get("requests", {}).get(GPU_LIMIT, limits["limits"][GPU_LIMIT])
            != limits["limits"][GPU_LIMIT]
        ):
            problems.append(f"{where}: worker group {name}: {GPU_LIMIT} request and limit differ")
        if "memory" not in node_type["resources"]:
            problems.append(f"{where}: worker group {name} declares no memory limit")
        if node_type["min_workers"] != 0:
            problems.append(
                f"{where}: worker group {name} must scale from 0, has minReplicas {group['minReplicas']}"
            )
    if not spec.get("workerGroupSpecs"):
        return problems  # a head-only cluster (the table's): nothing to plan
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}: enableInTreeAutoscaling must be true")
    if planner_view(derived) != node_types_file():
        text = yaml.safe_dump(planner_view(derived), sort_keys=False)
        problems.append(
            f"{where}: k8s/{NODE_TYPES_FILE} is not what Ray derives from it; the derivation:\n{text}"
        )
    kubernetes_plan = planned(node_types_from_config(derived) or [])
    aws_plan = planned(node_types_from_config(cluster_file()) or [])
    if (kubernetes_plan.max_concurrent, kubernetes_plan.worker_resources) != (
        aws_plan.max_concurrent,
        aws_plan.worker_resources,
    ):
        problems.append(
            f"{where}: a GPU search plans {kubernetes_plan.describe()}; on cluster.yaml {aws_plan.describe()}"
        )
    multi_worker = planned(node_types_from_config(derived) or [], workers_per_trial=4)
    if multi_worker.trial_resources.get("CPU") != 0.0 or HEAD_RESOURCE not in multi_worker.trial_resources:
        problems.append(f"{where}: the drivers of data-parallel trials do not go to the head")
    for group, template in pod_templates(manifest):
        environment = {item["name"]: item.get("value") for item in ray_container(template).get("env", [])}
        if (
            group == "head"
            and environment.get(AUTOSCALING_CONFIG_VARIABLE) != f"{CONFIG_MOUNT}/{NODE_TYPES_FILE}"
        ):
            problems.append(
                f"{where}: the head must set {AUTOSCALING_CONFIG_VARIABLE}={CONFIG_MOUNT}/{NODE_TYPES_FILE}"
            )
    return problems


# ------------------------------------------------------------------------------ the RayJobs


def readme_commands() -> list[list[str]]:
    """README's `python -m ...` commands, as words: from its bash blocks, lines joined at a
    trailing backslash, comments dropped, a `ray job submit ... --` prefix dropped."""
    readme = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "--" in words and words[:3] == ["ray", "job", "submit"]:
                words = words[words.index("--") + 1 :]
            if words[:2] == ["python", "-m"]:
                commands.append(words)
    return commands


PLACEMENT_FLAGS = ("--output-dir", "--name")  # what README's cluster commands add to a local one


def entrypoint_problems(manifest: dict, where: str) -> list[str]:
    """The entrypoint is a README command, with at most the run folder's place and name added
    (`runs/` in README stands for the cluster's run folder); train and tune keep their runs
    where they outlive the cluster."""
    entrypoint = manifest["spec"].get("entrypoint", "")
    words = ["runs/" if word == CLUSTER_RUNS else word for word in shlex.split(entrypoint)]
    for command in readme_commands():
        if words[: len(command)] != command:
            continue
        added = words[len(command) :]
        flags = dict(zip(added[::2], added[1::2]))
        if len(added) % 2 or set(flags) - set(PLACEMENT_FLAGS):
            continue
        output = words[words.index("--output-dir") + 1] if "--output-dir" in words else ""
        if command[2] in ("train", "tune") and not (output.startswith("s3://") or output == "runs/"):
            return [f"{where}: --output-dir must be the bucket (s3://) or {CLUSTER_RUNS}, not {output!r}"]
        return []
    return [
        f"{where}: entrypoint {entrypoint!r} is none of README's commands (plus {', '.join(PLACEMENT_FLAGS)})"
    ]


def job_problems(manifest: dict, where: str) -> list[str]:
    spec = manifest["spec"]
    problems = entrypoint_problems(manifest, where)
    if spec.get("shutdownAfterJobFinishes") is not True or not spec.get("ttlSecondsAfterFinished"):
        problems.append(f"{where}: the cluster must go after the job: shutdownAfterJobFinishes and a TTL")
    if "working_dir" not in yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"):
        problems.append(f"{where}: runtimeEnvYAML must bring the code (working_dir)")
    return problems


def compare_cluster_spec(spec: dict) -> dict:
    """The table's cluster: the RayCluster's head alone, reading the run folders from the PVC."""
    head_only = copy.deepcopy(spec)
    head_only["workerGroupSpecs"] = []
    head_only.pop("autoscalerOptions")
    head_only["enableInTreeAutoscaling"] = False
    template = head_only["headGroupSpec"]["template"]
    ray_container(template).pop("env")  # no search to plan
    return with_runs_claim(head_only)


def with_runs_claim(spec: dict) -> dict:
    """A cluster spec with the PVC as every pod's `runs` volume (docs/kubernetes.md's edit)."""
    spec = copy.deepcopy(spec)
    groups = [spec["headGroupSpec"], *(spec.get("workerGroupSpecs") or [])]
    for group in groups:
        for volume in group["template"]["spec"]["volumes"]:
            if volume["name"] == "runs":
                volume.pop("emptyDir", None)
                volume["persistentVolumeClaim"] = {"claimName": RUNS_CLAIM}
    return spec


# ------------------------------------------------------------------------------ all of it


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def manifest_problems(name: str, manifest: dict) -> list[str]:
    problems = kuberay_problems(manifest, name)
    if problems:
        return problems  # the rest reads the fields KubeRay's check just refused
    problems += pod_template_problems(manifest, name)
    problems += stack_problems(manifest, name)
    problems += exposure_problems(manifest, name)
    problems += node_type_problems(manifest, name)
    if manifest["kind"] == "RayJob":
        problems += job_problems(manifest, name)
        expected = cluster_spec(load(RAY_CLUSTER_FILE))
        if name == COMPARE_FILE:
            expected = compare_cluster_spec(expected)
        if cluster_spec(manifest) != expected:
            problems.append(
                f"{name}: rayClusterSpec is not k8s/{RAY_CLUSTER_FILE}'s spec (see compare_cluster_spec)"
            )
    return problems


def test_the_project_ships_a_raycluster_and_a_rayjob_for_each_main_command():
    assert load(RAY_CLUSTER_FILE)["kind"] == "RayCluster"
    modules = {shlex.split(load(name)["spec"]["entrypoint"])[2] for name in JOB_FILES}
    assert modules == {"train", "tune", "tune.compare"}


@pytest.mark.parametrize("name", (RAY_CLUSTER_FILE, *JOB_FILES))
def test_the_manifest_passes_every_check(name):
    assert manifest_problems(name, load(name)) == []


def test_the_pvc_choice_passes_the_same_checks():
    """The other storage: the claim itself, and the cluster with it as `runs`."""
    claim = load(PVC_FILE)
    assert kubernetes_problems(claim, PVC_FILE) == []
    assert claim["metadata"]["name"] == RUNS_CLAIM and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    manifest = load(RAY_CLUSTER_FILE)
    manifest["spec"] = with_runs_claim(manifest["spec"])
    assert manifest_problems(RAY_CLUSTER_FILE, manifest) == []
    text = (K8S / RAY_CLUSTER_FILE).read_text()  # the comment that shows the edit names the claim
    assert text.count(f"persistentVolumeClaim: {{claimName: {RUNS_CLAIM}}}") == len(pod_templates(manifest))


def test_the_node_types_the_planner_reads_are_the_ones_it_expects():
    node_types = node_types_from_config(node_types_file())
    assert node_types is not None
    head = next(group for group in node_types if HEAD_RESOURCE in group.resources)
    assert head.resources["CPU"] == 0 and "GPU" not in head.resources
    gpu_groups = [group for group in node_types if group.resources.get("GPU")]
    assert gpu_groups and all(
        group.resources["memory"] >= 16 * 2**30 * group.resources["GPU"] for group in gpu_groups
    )


def test_the_checks_are_pinned_to_the_versions_they_name():
    import kubernetes_validate

    assert KUBERNETES_VERSION in kubernetes_validate.utils.all_versions()  # its schemas ship with it
    header = (K8S / RAY_CLUSTER_FILE).read_text()
    assert (
        f"KubeRay {KUBERAY_VERSION}" in header
        and f"Kubernetes {KUBERNETES_VERSION.rsplit('.', 1)[0]}" in header
    )


# ------------------------------------------------------------------------------ broken on purpose


def gpu_1x(manifest: dict) -> dict:
    return ray_container(cluster_spec(manifest)["workerGroupSpecs"][0]["template"])


def rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


BROKEN = {
    # name: (file, how to break it, what a check must say)
    "gpu-limit-missing": (
        RAY_CLUSTER_FILE,
        lambda m: gpu_1x(m)["resources"]["limits"].pop(GPU_LIMIT),
        f"no {GPU_LIMIT} limit",
    ),
    "gpu-missing": (
        RAY_CLUSTER_FILE,
        lambda m: [gpu_1x(m)["resources"][key].pop(GPU_LIMIT) for key in ("limits", "requests")],
        "has no GPU for Ray",
    ),
    "kuberay-field-typo": (
        RAY_CLUSTER_FILE,
        lambda m: rename(m["spec"]["workerGroupSpecs"][0], "minReplicas", "minReplica"),
        "workerGroupSpecs[].minReplica is not a field",
    ),
    "kuberay-top-level-typo": (
        "rayjob-tune.yaml",
        lambda m: rename(m["spec"]["rayClusterSpec"], "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
        "enableInTreeAutoScaling is not a field",
    ),
    "kuberay-type": (
        RAY_CLUSTER_FILE,
        lambda m: m["spec"]["headGroupSpec"]["resources"].update({HEAD_RESOURCE: 1}),
        "not a map of strings",
    ),
    "pod-template-typo": (
        RAY_CLUSTER_FILE,
        lambda m: rename(
            cluster_spec(m)["headGroupSpec"]["template"]["spec"], "serviceAccountName", "serviceAcountName"
        ),
        "'serviceAcountName' was unexpected",
    ),
    "image-differs": (
        "rayjob-train.yaml",
        lambda m: gpu_1x(m).update(image="rayproject/ray:2.60.0-py311-gpu"),
        "is not cluster.yaml's",
    ),
    "ray-version-differs": (RAY_CLUSTER_FILE, lambda m: m["spec"].update(rayVersion="2.59.0"), "rayVersion"),
    "packages-differ": (
        RAY_CLUSTER_FILE,
        lambda m: gpu_1x(m).update(args=["pip install -q -r /home/ray/lstm-ae/requirements.txt"]),
        "setup",
    ),
    "head-trains": (
        RAY_CLUSTER_FILE,
        lambda m: m["spec"]["headGroupSpec"]["resources"].update(CPU="4"),
        "the head must have 0 CPUs",
    ),
    "workers-never-scale-to-zero": (
        RAY_CLUSTER_FILE,
        lambda m: m["spec"]["workerGroupSpecs"][1].update(minReplicas=1),
        "must scale from 0",
    ),
    "node-types-stale": (
        RAY_CLUSTER_FILE,
        lambda m: m["spec"]["workerGroupSpecs"][0].update(maxReplicas=4),
        f"k8s/{NODE_TYPES_FILE} is not what Ray derives",
    ),
    "dashboard-exposed": (
        RAY_CLUSTER_FILE,
        lambda m: m["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
        "ClusterIP",
    ),
    "token-off": (RAY_CLUSTER_FILE, lambda m: m["spec"].update(authOptions={"mode": "disabled"}), "token"),
    "entrypoint-drifts": (
        "rayjob-tune.yaml",
        lambda m: m["spec"].update(entrypoint=m["spec"]["entrypoint"].replace("--num-samples", "--samples")),
        "none of README's commands",
    ),
    "runs-left-in-the-pod": (
        "rayjob-train.yaml",
        lambda m: m["spec"].update(
            entrypoint=m["spec"]["entrypoint"].replace("s3://YOUR-BUCKET/lstm-ae", "runs")
        ),
        "--output-dir must be the bucket",
    ),
    "cluster-kept": (
        "rayjob-tune.yaml",
        lambda m: m["spec"].update(shutdownAfterJobFinishes=False),
        "the cluster must go after the job",
    ),
    "job-cluster-drifts": (
        "rayjob-tune.yaml",
        lambda m: m["spec"]["rayClusterSpec"]["autoscalerOptions"].update(idleTimeoutSeconds=60),
        "rayClusterSpec is not",
    ),
}


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_a_broken_manifest_fails(variant):
    name, breaking, expected = BROKEN[variant]
    manifest = load(name)
    breaking(manifest)
    problems = manifest_problems(name, manifest)
    assert any(expected in problem for problem in problems), problems
