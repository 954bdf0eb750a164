"""Placement groups that ended trials leave behind, released while a search runs.

When Tune stops a multi-worker trial (ASHA's stop at the last report or at a rung), it kills
the trial while its TorchTrainer runs; the trainer's controller dies without removing the
workers' placement group, and Ray keeps that group reserved until the search's driver ends
(see `DeadTrainerReaper`). On an autoscaling cluster at its largest, the next trials'
worker groups then wait forever.
"""

from __future__ import annotations

import threading
import time

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
