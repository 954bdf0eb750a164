"""The private Ray and MLflow APIs the suite leans on (train/ray_internals.py) are all still
there in the installed versions; an upgrade that moves one fails here, naming it."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from train import ray_internals


def test_every_private_api_the_suite_uses_is_still_there():
    missing = ray_internals.missing_private_apis()
    assert not missing, "private APIs moved; see train/ray_internals.py:\n" + "\n".join(missing)


def test_a_moved_private_api_is_named_with_the_version_it_was_checked_against(monkeypatch):
    moved = (("a test", "ray._private.state", "state.no_such_method", "Ray 2.60.0"),
             ("a test", "ray.no_such_module", "", "Ray 2.60.0"))  # fmt: skip
    monkeypatch.setattr(ray_internals, "PRIVATE_APIS", moved)
    missing = ray_internals.missing_private_apis()
    assert len(missing) == 2
    assert missing[0].startswith("a test: ray._private.state.state.no_such_method is gone")
    assert missing[0].endswith("checked against Ray 2.60.0")
    assert missing[1].startswith("a test: ray.no_such_module is gone")


def test_the_pinned_ray_is_the_version_the_private_apis_were_checked_against():
    """requirements.txt pins Ray; a new pin asks that somebody check each private API against
    it (the test above says only whether they import) and update the table and the constant."""
    installed = importlib.metadata.version("ray")
    assert installed == ray_internals.RAY_CHECKED, (
        f"ray {installed} is installed; train/ray_internals.py was checked against {ray_internals.RAY_CHECKED}"
    )


def test_tunes_saved_trial_state_is_still_read_and_written_as_repair_experiment_state_does(tmp_path):
    """repair_experiment_state edits Tune's experiment_state-*.json: the file name, the marker
    of a pickled value, and the checkpoint manager's list and latest entry must stay as they
    were in Ray 2.60."""
    from ray import cloudpickle
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.utils.serialization import _CLOUDPICKLE_FALLBACK_TYPE

    assert TuneController.CKPT_FILE_TMPL.format("*") == ray_internals.EXPERIMENT_STATE_PATTERN
    assert _CLOUDPICKLE_FALLBACK_TYPE == ray_internals.CLOUDPICKLED
    config = CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="loss", checkpoint_score_order="min")
    manager = _CheckpointManager(config)
    for index, loss in enumerate([1.0, 2.0, 0.5]):
        folder = tmp_path / f"checkpoint_00000{index}"
        folder.mkdir()
        manager.register_checkpoint(_TrainingResult(Checkpoint(str(folder)), {"loss": loss}))
    # The trial's pruning deletes at once the checkpoint that was its latest a report ago
    # (worse than an older and a newer one): what a saved state written before names.
    assert not (tmp_path / "checkpoint_000001").exists()
    names = [Path(result.checkpoint.path).name for result in manager._checkpoint_results]
    assert names == ["checkpoint_000000", "checkpoint_000002"]
    restored = cloudpickle.loads(cloudpickle.dumps(manager))
    assert Path(restored._latest_checkpoint_result.checkpoint.path).name == "checkpoint_000002"
    assert restored.latest_checkpoint_result is restored._latest_checkpoint_result


def test_a_workers_traceback_of_a_full_disk_is_left_out_and_other_errors_stay(caplog):
    """Ray Train logs every worker error with its traceback from this logger; a full disk is
    the driver's one line instead."""
    import logging

    from records.checkpoints import StorageFullError

    ray_internals.quiet_report_logging()
    logger = logging.getLogger(ray_internals.TRAIN_FUNCTION_ERRORS_LOGGER)
    with caplog.at_level(logging.ERROR, logger=ray_internals.TRAIN_FUNCTION_ERRORS_LOGGER):
        full = StorageFullError("no room for checkpoint_00000004 on the disk mounted at /d: it needs 2 MB")
        logger.error(
            f"Error in training function:\nTraceback ...\nrecords.checkpoints.StorageFullError: {full}"
        )
        logger.error("Error in training function:\nTraceback ...\nValueError: a bug")
        logger.error(  # a rank waiting at a report while the group was torn down
            "Error in training function:\nTraceback ...\nray.exceptions.ActorDiedError: The actor died"
            f" unexpectedly before finishing this task.\n\t{ray_internals.TORN_DOWN_BARRIER}\n"
        )
        from ray.train.v2._internal.execution import context

        upload = logging.getLogger(context.__file__)  # a failed upload: the error travels as exc_info
        try:
            raise full
        except StorageFullError:
            upload.exception("checkpoint upload failed in the background thread")
    assert [record.getMessage().splitlines()[-1] for record in caplog.records] == ["ValueError: a bug"]
