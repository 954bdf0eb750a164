"""Every private API of Ray and MLflow the suite uses, in one place.

Each is a workaround for something the public API does not offer. `PRIVATE_APIS` lists them
with the version each was checked against; `missing_private_apis()` says which the installed
versions no longer have (tests/test_ray_internals.py fails with those lines, so an upgrade
shows at once what to look at). Every caller degrades on its own where one is missing: a
note, never a crash.

| what | private API | checked against |
| --- | --- | --- |
| repair a resume's checkpoint list | Ray Train V2's `checkpoint_manager_snapshot.json` (`_CheckpointManagerState`) | Ray 2.60.0 |
| where a worker stores a checkpoint | the Train context's `get_storage()` (a DeveloperAPI `StorageContext`): `storage_filesystem`, `build_checkpoint_path_from_name` | Ray 2.60.0 |
| quiet report logging | the loggers of `ray.train.v2._internal.execution.storage` and `.context` | Ray 2.60.0 |
| an autoscaler's node types | `ray._private.state.state.get_cluster_config()` | Ray 2.60.0 |
| placement groups of dead trainers | `ray._private.state.state` GCS tables, `ray.core.generated.gcs_pb2`, the `TrainController` actor | Ray 2.60.0 |
| MLflow URI schemes | `mlflow.tracking._tracking_service.utils._tracking_store_registry`, `_model_registry.utils._get_store_registry` | mlflow-skinny 3.18.0 |
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lstm_ae.checkpoint import CHECKPOINT_FILE, CheckpointError
from records.checkpoints import TrainingState, checkpoint_key, set_aside, stored_problem
from records.layout import SNAPSHOT_FILE
from records.storage import path_exists, read_text, write_text

RAY_CHECKED = "2.60.0"
MLFLOW_CHECKED = "3.18.0"

# (what it is for, module, attribute path inside it or "", version checked)
PRIVATE_APIS = (
    (
        "the checkpoint list a resume repairs",
        "ray.train.v2._internal.execution.checkpoint.checkpoint_manager",
        "_CheckpointManagerState",
        f"Ray {RAY_CHECKED}",
    ),
    (
        "where a worker stores a checkpoint",
        "ray.train.v2._internal.execution.storage",
        "StorageContext.build_checkpoint_path_from_name",
        f"Ray {RAY_CHECKED}",
    ),
    ("quiet report logging", "ray.train.v2._internal.execution.storage", "", f"Ray {RAY_CHECKED}"),
    ("quiet report logging", "ray.train.v2._internal.execution.context", "", f"Ray {RAY_CHECKED}"),
    ("an autoscaler's node types", "ray._private.state", "state.get_cluster_config", f"Ray {RAY_CHECKED}"),
    (
        "placement groups of dead trainers",
        "ray._private.state",
        "state._connect_and_get_accessor",
        f"Ray {RAY_CHECKED}",
    ),
    (
        "placement groups of dead trainers",
        "ray.core.generated.gcs_pb2",
        "PlacementGroupTableData",
        f"Ray {RAY_CHECKED}",
    ),
    (
        "placement groups of dead trainers",
        "ray.train.v2._internal.execution.controller.controller",
        "TrainController",
        f"Ray {RAY_CHECKED}",
    ),
    (
        "MLflow URI schemes",
        "mlflow.tracking._tracking_service.utils",
        "_tracking_store_registry._registry",
        f"mlflow-skinny {MLFLOW_CHECKED}",
    ),
    (
        "MLflow URI schemes",
        "mlflow.tracking._model_registry.utils",
        "_get_store_registry",
        f"mlflow-skinny {MLFLOW_CHECKED}",
    ),
)


def missing_private_apis() -> list[str]:
    """One line per private API the installed Ray or MLflow no longer has."""
    missing = []
    for purpose, module_name, attributes, checked in PRIVATE_APIS:
        try:
            value = importlib.import_module(module_name)
            for attribute in filter(None, attributes.split(".")):
                value = getattr(value, attribute)
        except (ImportError, AttributeError) as error:
            where = f"{module_name}.{attributes}" if attributes else module_name
            missing.append(f"{purpose}: {where} is gone ({error}); checked against {checked}")
    return missing


# ------------------------------------------------------------------------------ logging


def quiet_report_logging() -> None:
    """Ray logs every report's full metrics and every checkpoint's path at INFO (from the
    worker or trial process); our own progress line and results table say the same."""
    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


# ------------------------------------------------------------------------------ storing


def checkpoint_destination(name: str) -> tuple[object, str]:
    """(pyarrow filesystem, path) where this Ray Train worker's run stores checkpoint `name`
    (what Ray's own upload copies to)."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    return storage.storage_filesystem, storage.build_checkpoint_path_from_name(name)


# ------------------------------------------------------------------------------ the cluster


def autoscaler_node_groups() -> list[tuple[dict[str, float], int]] | None:
    """(resources, max count) of each node type the GCS's cluster config holds (what Ray
    Train's own autoscaling reads); None where it holds none or cannot be read."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # private API: absent or changed in another Ray version
        return None
    if config is None or not config.node_group_configs:
        return None
    return [
        ({name: float(value) for name, value in group.resources.items()}, int(group.max_count))
        for group in config.node_group_configs
    ]


TRAIN_CONTROLLER_CLASS = "TrainController"  # Ray Train V2's controller actor


class DeadTrainerReaper:
    """While a search runs, release the placement groups its dead Ray Train controllers hold.

    A placement group made by an actor lives until that actor *and* its job (here the
    search's driver) are dead: Ray core's `PlacementGroupSpecBuilder` marks the creator
    actor dead up front only for groups a driver made, and the GCS removes a group once
    `IsPlacementGroupLifetimeDone`. So when Tune kills a trial while its TorchTrainer runs,
    the workers' group stays CREATED with nothing on it. Every `interval_s` this removes the
    groups of this job whose maker was a Train controller that is now dead. It reads the GCS
    tables through Ray's private state accessor; where that is missing or changed, it says
    so once and stops.
    """

    def __init__(self, interval_s: float = 2.0, settle_s: float = 30.0):
        self.interval_s = interval_s
        self.settle_s = settle_s  # at the end: how long to wait for the last controllers to go
        self.released: list[str] = []  # one line per placement group released
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dead-trainer-reaper", daemon=True)
        self._job = ""
        self._broken = False

    def __enter__(self) -> DeadTrainerReaper:
        import ray

        self._job = ray.get_runtime_context().get_job_id()
        self._thread.start()
        return self

    def __exit__(self, *exception) -> None:
        """Stop, then release what the controllers Tune killed at the end still hold."""
        self._stop.set()
        self._thread.join(timeout=30)
        deadline = time.monotonic() + self.settle_s
        while self.sweep() and time.monotonic() < deadline:
            time.sleep(0.5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sweep()

    def sweep(self) -> int:
        """Release what dead Train controllers of this job hold; returns how many of its
        controllers are still alive (0 where the state cannot be read)."""
        if self._broken or not self._job:
            return 0
        try:
            lines, alive = self._sweep()
        except Exception as error:  # private API: absent or changed in another Ray version
            self._broken = True
            print(f"note: cannot look for placement groups of ended trials ({error!r})", flush=True)
            return 0
        for line in lines:
            print(line, flush=True)
        self.released.extend(lines)
        return alive

    def _sweep(self) -> tuple[list[str], int]:
        import ray
        from ray._private.state import state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        accessor = state._connect_and_get_accessor()
        groups, actors = gcs_pb2.PlacementGroupTableData, gcs_pb2.ActorTableData
        controllers = {}  # actor id -> alive, for this job's Train controllers
        for raw in accessor.get_actor_table(ray.JobID.from_hex(self._job), None):
            actor = actors.FromString(raw)
            if actor.class_name == TRAIN_CONTROLLER_CLASS:
                controllers[actor.actor_id] = actor.state != actors.DEAD
        lines = []
        for raw in accessor.get_placement_group_table():
            group = groups.FromString(raw)
            if (
                group.state == groups.REMOVED
                or group.is_detached
                or controllers.get(group.creator_actor_id, True)  # not a dead controller's
            ):
                continue
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
            bundles = ", ".join(
                "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(b.unit_resources.items())) + "}"
                for b in group.bundles
            )
            lines.append(
                f"released placement group {group.placement_group_id.hex()[:12]} ({bundles}) "
                "of a trial's Ray Train controller that ended with the trial"
            )
        return lines, sum(controllers.values())


# ------------------------------------------------------------------------------ resuming


@dataclass(frozen=True)
class Repair:
    """What `repair_snapshot` changed: the checkpoints dropped, and the newest one left."""

    dropped: tuple[str, ...] = ()
    newest: str | None = None
    step: int | None = None


def repair_snapshot(
    filesystem, run_path: str, load: bool = True, log: Callable[[str], None] = print
) -> Repair:
    """Drop from Ray's checkpoint list (and set aside) every checkpoint that does not load;
    its latest becomes the newest that does. `load=False` only drops the empty folders the
    workers left for Ray's controller (after a run). CheckpointError (one line) when none
    loads: the folder is then left as it is."""
    snapshot_path = f"{run_path}/{SNAPSHOT_FILE}"
    if not path_exists(filesystem, snapshot_path):
        return Repair()
    try:
        snapshot = json.loads(read_text(filesystem, snapshot_path))
        entries = snapshot["checkpoint_results"]
        indices = snapshot["checkpoint_report_indices"]
        names = [entry["checkpoint_dir_name"] for entry in entries]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{snapshot_path} is not Ray Train's checkpoint list: {error}") from None
    problems: dict[str, str] = {}
    states: dict[str, TrainingState] = {}
    for name in names:
        folder = f"{run_path}/{name}"
        if load:
            problem, state = stored_problem(filesystem, folder)
        else:
            problem = None if path_exists(filesystem, f"{folder}/{CHECKPOINT_FILE}") else "left empty"
            state = None
        if problem is None:
            states[name] = state
        else:
            problems[name] = problem
    if not problems:
        return Repair()
    good = sorted((index, name) for name, index in zip(names, indices) if name not in problems)
    if not good:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in problems.items())
        raise CheckpointError(f"no checkpoint of {run_path} loads ({reasons}): nothing to resume from")
    newest = good[-1][1]
    step = states[newest].step if states.get(newest) is not None else None
    for name in sorted(problems, key=lambda name: checkpoint_key(name) or (0, 0), reverse=True):
        aside = set_aside(filesystem, f"{run_path}/{name}")
        if load:
            kept = f"kept as {aside}" if aside else "nothing to keep"
            log(
                f"skipping damaged checkpoint {run_path}/{name} ({problems[name]}; {kept}): resuming from step {step}"
            )
        elif aside:
            log(
                f"checkpoint {run_path}/{name} has no {CHECKPOINT_FILE}: kept as {aside}, out of the run's list"
            )
    keep = [index for index, name in enumerate(names) if name not in problems]
    snapshot["checkpoint_results"] = [entries[index] for index in keep]
    snapshot["checkpoint_report_indices"] = [indices[index] for index in keep]
    latest = snapshot.get("latest_checkpoint_result")
    if latest is None or latest.get("checkpoint_dir_name") in problems:
        snapshot["latest_checkpoint_result"] = entries[names.index(newest)]
    pending = list(
        zip(snapshot.get("pending_training_results", []), snapshot.get("pending_validation_specs", []))
    )
    pending = [
        (result, spec) for result, spec in pending if result.get("checkpoint_dir_name") not in problems
    ]
    snapshot["pending_training_results"] = [result for result, _ in pending]
    snapshot["pending_validation_specs"] = [spec for _, spec in pending]
    for key in (
        "validated_checkpoint_dir_names",
        "timed_out_validation_checkpoint_dir_names",
        "failed_validation_checkpoint_dir_names",
    ):
        if key in snapshot:
            snapshot[key] = [name for name in snapshot[key] if name not in problems]
    _write_atomically(filesystem, snapshot_path, json.dumps(snapshot))
    return Repair(tuple(sorted(problems)), newest, step)


def _write_atomically(filesystem, path: str, text: str) -> None:
    """A local file through a temporary name and a rename; an object store's put is whole."""
    import pyarrow.fs

    if not isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        write_text(filesystem, path, text)
        return
    temporary = f"{path}.tmp"
    Path(temporary).write_text(text)
    os.replace(temporary, path)


# ------------------------------------------------------------------------------ MLflow


def mlflow_schemes() -> set[str] | None:
    """The URI schemes the installed mlflow has both a tracking store and a model-registry
    store for (an MlflowClient needs both); None where this mlflow does not say."""
    try:
        from mlflow.tracking._tracking_service import utils as tracking_utils

        schemes = set(tracking_utils._tracking_store_registry._registry)
    except (ImportError, AttributeError):
        return None
    try:
        from mlflow.tracking._model_registry import utils as registry_utils

        schemes &= set(registry_utils._get_store_registry()._registry)
    except (ImportError, AttributeError):
        pass  # older mlflow: the tracking stores alone
    return schemes
