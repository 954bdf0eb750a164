"""Every private API of Ray and MLflow the suite uses, in one place.

Each is a workaround for something the public API does not offer. `PRIVATE_APIS` lists them
with the version each was checked against; `missing_private_apis()` says which the installed
versions no longer have (tests/test_ray_internals.py fails with those lines, so an upgrade
shows at once what to look at). Every caller in the suite degrades on its own where one is
missing: a note, never a crash. The offline checks of the cluster files (tests) use the two
rows on cluster files and RayClusters, and fail.

| what | private API | checked against |
| --- | --- | --- |
| repair a resume's checkpoint list | Ray Train V2's `checkpoint_manager_snapshot.json` (`_CheckpointManagerState`) | Ray 2.60.0 |
| repair a resumed search's trial checkpoints | Tune's `experiment_state-<time>.json` (`TuneController.CKPT_FILE_TMPL`): each trial's `run_metadata.checkpoint_manager`, a cloudpickled `ray.train._internal.checkpoint_manager._CheckpointManager` of `_TrainingResult`s | Ray 2.60.0 |
| where a worker stores a checkpoint | the Train context's `get_storage()` (a DeveloperAPI `StorageContext`): `storage_filesystem`, `build_checkpoint_path_from_name` | Ray 2.60.0 |
| quiet report logging | the loggers of `ray.train.v2._internal.execution.storage` and `.context`; `ray.train.v2._internal.util`'s, which logs a worker's traceback | Ray 2.60.0 |
| an autoscaler's node types | `ray._private.state.state.get_cluster_config()` | Ray 2.60.0 |
| placement groups of dead trainers | `ray._private.state.state` GCS tables, `ray.core.generated.gcs_pb2`, the `TrainController` actor | Ray 2.60.0 |
| MLflow URI schemes | `mlflow.tracking._tracking_service.utils._tracking_store_registry`, `_model_registry.utils._get_store_registry` | mlflow-skinny 3.18.0 |
| Ray's checks of a cluster file | `ray.autoscaler._private.util.prepare_config`, `validate_config` | Ray 2.60.0 |
| a RayCluster's node types | `ray.autoscaler._private.kuberay.autoscaling_config._derive_autoscaling_config_from_ray_cr` | Ray 2.60.0 |
| the Optuna trial of a Tune trial | `OptunaSearch._ot_trials` (set in its `__init__`) | Ray 2.60.0 |

An attribute path may call an attribute with no arguments (`OptunaSearch()._ot_trials`): an
instance attribute is checked on a fresh instance.
"""

from __future__ import annotations

import contextlib
import copy
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
from records.checkpoints import (
    STORAGE_FULL,
    StorageFullError,
    TrainingState,
    checkpoint_key,
    set_aside,
    stored_problem,
)
from records.layout import RESULT_FILE, SNAPSHOT_FILE, TRIAL_PREFIX
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
    (
        "the trial checkpoints a resumed search repairs",
        "ray.tune.execution.tune_controller",
        "TuneController.CKPT_FILE_TMPL",
        f"Ray {RAY_CHECKED}",
    ),
    (
        "the trial checkpoints a resumed search repairs",
        "ray.train._internal.checkpoint_manager",
        "_CheckpointManager.latest_checkpoint_result",
        f"Ray {RAY_CHECKED}",
    ),
    (
        "the trial checkpoints a resumed search repairs",
        "ray.train._internal.session",
        "_TrainingResult",
        f"Ray {RAY_CHECKED}",
    ),
    ("quiet report logging", "ray.train.v2._internal.execution.storage", "", f"Ray {RAY_CHECKED}"),
    ("quiet report logging", "ray.train.v2._internal.execution.context", "", f"Ray {RAY_CHECKED}"),
    (
        "quiet report logging",
        "ray.train.v2._internal.util",
        "construct_user_exception_with_traceback",
        f"Ray {RAY_CHECKED}",
    ),
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
    (
        "Ray's checks of a cluster file",
        "ray.autoscaler._private.util",
        "prepare_config",
        f"Ray {RAY_CHECKED}",
    ),
    (
        "Ray's checks of a cluster file",
        "ray.autoscaler._private.util",
        "validate_config",
        f"Ray {RAY_CHECKED}",
    ),
    (
        "a RayCluster's node types",
        "ray.autoscaler._private.kuberay.autoscaling_config",
        "_derive_autoscaling_config_from_ray_cr",
        f"Ray {RAY_CHECKED}",
    ),
    (
        "the Optuna trial of a Tune trial",
        "ray.tune.search.optuna.optuna_search",
        "OptunaSearch()._ot_trials",
        f"Ray {RAY_CHECKED}",
    ),
)


def missing_private_apis() -> list[str]:
    """One line per private API the installed Ray or MLflow no longer has."""
    missing = []
    for purpose, module_name, attributes, checked in PRIVATE_APIS:
        try:
            value = importlib.import_module(module_name)
            for attribute in filter(None, attributes.split(".")):
                called = attribute.endswith("()")
                value = getattr(value, attribute.removesuffix("()"))
                if called:
                    value = value()
        except (ImportError, AttributeError) as error:
            where = f"{module_name}.{attributes}" if attributes else module_name
            missing.append(f"{purpose}: {where} is gone ({error}); checked against {checked}")
    return missing


# ------------------------------------------------------------------------------ Tune's Optuna searcher


def optuna_trial_of(searcher, trial_id: str):
    """The Optuna trial Ray's OptunaSearch asked its study for on behalf of Tune trial `trial_id`,
    or None (not asked yet, or Ray no longer keeps them in `_ot_trials`)."""
    return getattr(searcher, "_ot_trials", {}).get(trial_id)


# ------------------------------------------------------------------------------ logging


TRAIN_FUNCTION_ERRORS_LOGGER = (
    "ray.train.v2._internal.util"  # "Error in training function:" and its traceback
)


# A rank waiting at a report when another rank failed: Ray tears the group down, killing the
# actor the ranks meet at, and the waiting rank fails with this in its error (Ray 2.60).
TORN_DOWN_BARRIER = "class_name: SynchronizationActor"


class _WithoutStorageFullTraceback(logging.Filter):
    """Drops a worker's traceback of a full disk: the driver reports it in one line that
    says more (`train.cli`), and every restart of the workers would repeat it. Also drops the
    traceback of a rank that was waiting at a report when the group was torn down (the
    failure that caused it is the one the driver reports)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        if error is not None and TORN_DOWN_BARRIER in str(error) or TORN_DOWN_BARRIER in message:
            return False
        return not isinstance(error, StorageFullError) and (
            f"{StorageFullError.__name__}: {STORAGE_FULL}" not in message
        )


def quiet_report_logging() -> None:
    """Ray logs every report's full metrics and every checkpoint's path at INFO (from the
    worker or trial process); our own progress line and results table say the same. A full
    disk's traceback is left out too (`_WithoutStorageFullTraceback`)."""
    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)
    loggers = [logging.getLogger(TRAIN_FUNCTION_ERRORS_LOGGER)]
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        context = None
    if context is not None:
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
        loggers.append(logging.getLogger(context.__file__))  # a failed upload, with its traceback
    for logger in loggers:
        if not any(isinstance(existing, _WithoutStorageFullTraceback) for existing in logger.filters):
            logger.addFilter(_WithoutStorageFullTraceback())


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


def validated_autoscaling_config(config: dict) -> dict:
    """Ray's own checks of an autoscaling config, the ones `ray up` runs on a cluster file:
    the config with Ray's defaults filled in; raises what Ray raises on a config it refuses."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def kuberay_autoscaling_config(ray_cluster: dict) -> dict:
    """The autoscaling config (node types with their Ray resources) that Ray's KubeRay
    autoscaler derives from a RayCluster resource, the code it runs inside the cluster each
    round, here on a manifest instead of the API server's copy. A manifest without a
    namespace gets `default`, as `kubectl apply` gives it. Raises what Ray raises on a
    RayCluster it cannot read."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    resource = copy.deepcopy(ray_cluster)
    resource.setdefault("metadata", {}).setdefault("namespace", "default")
    return _derive_autoscaling_config_from_ray_cr(resource)


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


EXPERIMENT_STATE_PATTERN = "experiment_state-*.json"  # Tune's TuneController.CKPT_FILE_TMPL
CLOUDPICKLED = "CLOUDPICKLE_FALLBACK"  # how Tune's JSON encoder marks a pickled value


def repair_experiment_state(
    filesystem, experiment_path: str, log: Callable[[str], None] = print
) -> list[str]:
    """Point every unfinished trial of a Tune experiment at its newest checkpoint that loads,
    before `Tuner.restore` reads the experiment's saved state; returns the ids changed.

    Tune saves the experiment's state every few seconds, but a trial's own pruning
    (`CheckpointConfig.num_to_keep`, by score) deletes a checkpoint at once: when the
    driver dies between the two, the saved state names a checkpoint that is gone (the
    trial's latest when saved, then dropped for a better older and a newer one), and the
    trial fails to restore from it at every retry. So the saved state is brought in line
    with the trial's folder: the checkpoints still there are kept in the trial's list, the
    newest that loads (which may be newer than the saved state knows) becomes its latest,
    with the metrics Tune recorded for it; a trial with none left starts again from step 0,
    with one line saying so."""
    from ray import cloudpickle
    from ray.train import Checkpoint
    from ray.train._internal.session import _TrainingResult

    found = _experiment_state(filesystem, experiment_path)
    if found is None:
        return []
    state_path, state, names = found
    changed = []
    for entry in state["trial_data"]:
        trial, metadata = json.loads(entry[0]), json.loads(entry[1])
        packed = metadata.get("checkpoint_manager")
        if (
            trial.get("status") == "TERMINATED"
            or not isinstance(packed, dict)
            or packed.get("_type") != CLOUDPICKLED
        ):
            continue
        trial_id = trial["trial_id"]
        folder = _trial_folder(names, experiment_path, trial_id)
        manager = cloudpickle.loads(bytes.fromhex(packed["value"]))
        latest = manager.latest_checkpoint_result
        saved_name = Path(latest.checkpoint.path).name if latest is not None else None
        newest, gone = _newest_loadable_checkpoint(filesystem, folder) if folder else (None, [])
        kept = [
            result for result in manager._checkpoint_results
            if folder and path_exists(filesystem, f"{folder}/{Path(result.checkpoint.path).name}/{CHECKPOINT_FILE}")
        ]  # fmt: skip
        if newest == saved_name and len(kept) == len(manager._checkpoint_results):
            continue
        if newest is None:
            manager._checkpoint_results, manager._latest_checkpoint_result = [], None
            why = f"Tune's saved state named {saved_name}, which is gone" if saved_name else "none was stored"
            damaged = f"; {', '.join(gone)} do not load" if gone else ""
            log(
                f"trial {trial_id}: no complete checkpoint left ({why}{damaged}): it starts again from step 0"
            )
        else:
            result = next((r for r in kept if Path(r.checkpoint.path).name == newest), None)
            if result is None:
                checkpoint = Checkpoint(path=f"{folder}/{newest}", filesystem=filesystem)
                result = _TrainingResult(checkpoint, _reported_with(filesystem, folder, newest))
                kept.append(result)
            manager._checkpoint_results, manager._latest_checkpoint_result = kept, result
            if newest != saved_name:
                named = (
                    f"Tune's saved state named {saved_name}, which is gone"
                    if saved_name
                    else "Tune's saved state named none"
                )
                log(f"trial {trial_id}: resuming from {newest}, its newest complete checkpoint ({named})")
        metadata["checkpoint_manager"] = {"_type": CLOUDPICKLED, "value": cloudpickle.dumps(manager).hex()}
        entry[1] = json.dumps(metadata)
        changed.append(trial_id)
    if changed:
        _write_atomically(filesystem, state_path, json.dumps(state))
    return changed


def saved_trials(filesystem, experiment_path: str) -> dict[str, tuple[str, str | None]]:
    """What Tune's newest saved state says of each trial: (status, the name of the checkpoint
    it would restore from, or None)."""
    from ray import cloudpickle

    found = _experiment_state(filesystem, experiment_path)
    trials = {}
    for entry in found[1]["trial_data"] if found else ():
        trial, metadata = json.loads(entry[0]), json.loads(entry[1])
        packed = metadata.get("checkpoint_manager")
        latest = None
        if isinstance(packed, dict) and packed.get("_type") == CLOUDPICKLED:
            latest = cloudpickle.loads(bytes.fromhex(packed["value"])).latest_checkpoint_result
        trials[trial["trial_id"]] = (
            trial.get("status"),
            Path(latest.checkpoint.path).name if latest else None,
        )
    return trials


def _experiment_state(filesystem, experiment_path: str) -> tuple[str, dict, list[str]] | None:
    """(path, contents, the experiment folder's names) of Tune's newest saved state, the one
    `Tuner.restore` reads; None where there is none. Pickled values stay encoded."""
    import fnmatch

    import pyarrow.fs

    names = [info.base_name for info in filesystem.get_file_info(pyarrow.fs.FileSelector(experiment_path))]
    states = sorted(fnmatch.filter(names, EXPERIMENT_STATE_PATTERN))
    if not states:
        return None
    path = f"{experiment_path}/{states[-1]}"
    return path, json.loads(read_text(filesystem, path)), names


def _trial_folder(names: list[str], experiment_path: str, trial_id: str) -> str | None:
    """The trial's folder (`trial_<id>_...`, `records.layout.TRIAL_PREFIX`), or None."""
    found = sorted(name for name in names if name.startswith(f"{TRIAL_PREFIX}{trial_id}_"))
    return f"{experiment_path}/{found[-1]}" if found else None


def _newest_loadable_checkpoint(filesystem, folder: str) -> tuple[str | None, list[str]]:
    """(the newest of the trial folder's checkpoints that loads, the newer ones that do not)."""
    import pyarrow.fs

    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    named = sorted(
        ((checkpoint_key(info.base_name), info.base_name) for info in infos
         if info.type == pyarrow.fs.FileType.Directory and checkpoint_key(info.base_name) is not None),
        reverse=True,
    )  # fmt: skip
    damaged = []
    for _, name in named:
        if stored_problem(filesystem, f"{folder}/{name}")[0] is None:
            return name, damaged
        damaged.append(name)
    return None, damaged


def _reported_with(filesystem, folder: str, name: str) -> dict:
    """The metrics Tune recorded with checkpoint `name` (its line in the trial's result.json
    names it); Tune restores its iteration count and clocks from them."""
    try:
        lines = read_text(filesystem, f"{folder}/{RESULT_FILE}").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if row.get("checkpoint_dir_name") == name:
                return row
    return {}


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
