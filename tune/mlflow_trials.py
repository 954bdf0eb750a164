"""MLflow for Tune's trials: `TrialMLflowCallback`, Ray's own `MLflowLoggerCallback` (one
MLflow run per trial, the trial folder uploaded at the end) with the full config (not only
the sampled values), the training step as MLflow's step, and the final checkpoint's pictures
beside the trial folder that Ray uploads. Logged from the driver's side, like a train run's
MLflow run (`train/tracking.py`, whose settings and helpers it shares).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from lstm_ae.config import ExperimentConfig
from lstm_ae.viz import RUN_PICTURES
from records.storage import path_exists, storage_filesystem
from train.tracking import MLflowSettings, allow_file_store, numeric_metrics
from tune.variants import expand_variant

MLFLOW_SEARCH_TAG = "lstm_ae.search"  # the Tune experiment an MLflow run (a trial) belongs to


def trial_mlflow_callback(
    settings: MLflowSettings, base: ExperimentConfig, experiment_name: str, storage: str
):
    """Ray Tune's MLflow logger for a search or the ablations (see `TrialMLflowCallback`)."""
    return _trial_callback_class()(settings, base.to_dict(), experiment_name, storage)


@functools.cache
def _trial_callback_class():
    """`TrialMLflowCallback`, made on first use (it imports Ray Tune and mlflow)."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.result import AUTO_RESULT_KEYS

    class TrialMLflowCallback(MLflowLoggerCallback):
        """Ray's `MLflowLoggerCallback` (one MLflow run per trial, the trial folder uploaded at
        the end), with the trial's full config as parameters, the training step as MLflow's
        step, and the final checkpoint's pictures as artefacts."""

        def __init__(self, settings: MLflowSettings, base: dict, experiment_name: str, storage: str):
            super().__init__(
                tracking_uri=settings.tracking_uri,
                experiment_name=settings.experiment,
                tags={MLFLOW_SEARCH_TAG: experiment_name},
                save_artifact=True,
            )
            self.base, self.storage = base, storage

        def setup(self, *args, **kwargs) -> None:
            allow_file_store(self.tracking_uri)  # in the process Tune runs its callbacks in
            super().setup(*args, **kwargs)

        def log_trial_start(self, trial) -> None:
            super().log_trial_start(trial)  # creates the run, logs the sampled values
            config = ExperimentConfig.from_dict(self.base).replace(**expand_variant(trial.config))
            rest = {key: value for key, value in config.values_by_field().items() if key not in trial.config}
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=rest)

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            # The row's numbers, as a train run logs them; not Tune's bookkeeping (pid, time, ...).
            metrics = {
                key: value for key, value in numeric_metrics(result).items() if key not in AUTO_RESULT_KEYS
            }
            step = result.get("step", iteration)
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=metrics, step=step)

        def log_trial_end(self, trial, failed: bool = False) -> None:
            if trial in self._trial_runs:
                with tempfile.TemporaryDirectory(prefix="lstm_ae_mlflow_") as folder:
                    if _copy_pictures(trial, self.storage, folder):
                        self.mlflow_util.save_artifacts(run_id=self._trial_runs[trial], dir=folder)
            super().log_trial_end(trial, failed)

    return TrialMLflowCallback


def _copy_pictures(trial, storage: str, folder: str) -> bool:
    """The pictures of the trial's final checkpoint (its own, or its TorchTrainer's) into
    `folder`; False where it has none."""
    path = (trial.last_result or {}).get("checkpoint_path")  # multi-worker trials (TuneReportCallback)
    filesystem = storage_filesystem(storage)[0]
    if path is None and trial.checkpoint is not None:
        filesystem, path = trial.checkpoint.filesystem, trial.checkpoint.path
    copied = False
    for name in RUN_PICTURES if path else ():
        if path_exists(filesystem, f"{path}/{name}"):
            with filesystem.open_input_stream(f"{path}/{name}") as stream:
                (Path(folder) / name).write_bytes(stream.read())
            copied = True
    return copied
