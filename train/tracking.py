"""Watching runs: TensorBoard event files for every run, MLflow runs when asked.

**TensorBoard.** Rank 0 of every training run writes event files into the run's folder
(`python -m train`: `<storage>/<name>/`; a Tune trial: its trial folder, beside the events
Tune's own logger writes there), so `tensorboard --logdir runs/` shows train runs and search
trials side by side, on the same tags and the same x-axis (the training step):

    train/...        every number of a report row: losses, learning rate, throughput, ...
    validation/...   every validation metric and the trivial baselines measured beside it
    probe/...        the linear digit probe, at the end
    frames           at each validation, the frame grid of `lstm_ae.viz.frames_png`
                     (input, true future, prediction, reconstruction of a few validation
                     sequences)

The worker passes `loop_config[TRACKING_KEY]` (`{"tensorboard": folder or URI}`); without it
nothing is written. A local folder is written in place; remote storage (`s3://...`) is
written to a local temporary folder and copied up after every report.

**MLflow** (`--mlflow-tracking-uri`; the optional `mlflow-skinny` package), one MLflow run
per train run or per trial, logged from the driver's side so that only the head node needs
mlflow: the config as parameters, every report's numbers as metrics at the training step,
and at the end the run folder's pictures and result.json as artefacts.

- `python -m train`: `MLflowTrainRun` opens the run on the driver (a resumed run continues
  its MLflow run), `MLflowReportCallback` (a Ray Train callback, run by Train's controller)
  logs each report, and the driver adds the artefacts and closes the run.
- `python -m tune`: `tune.mlflow_trials.TrialMLflowCallback`, Ray Tune's logger callback, built on
  the settings and helpers here.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lstm_ae.config import ConfigError, ExperimentConfig
from lstm_ae.metrics import (
    BASELINE_COPY_LAST_INK_SSIM,
    BASELINE_COPY_LAST_MSE_FRAME,
    BASELINE_ZEROS_INK_SSIM,
    BASELINE_ZEROS_MSE_FRAME,
    VAL_INK_SSIM,
    VAL_MSE_FRAME,
)
from lstm_ae.viz import RUN_PICTURES, frames_png, model_outputs
from records.layout import CONFIG_FILE, METRICS_FILE, RESULT_FILE
from records.storage import path_exists, storage_filesystem
from train.ray_internals import mlflow_schemes

TRACKING_KEY = "tracking"  # the loop_config entry that asks for TensorBoard events
FRAMES_TAG = "frames"
IMAGE_SEQUENCES = 2  # validation sequences in the TensorBoard frame grid
MLFLOW_PACKAGE = "mlflow-skinny"
MLFLOW_RUN_TAG = "lstm_ae.run"  # the train run an MLflow run records
RUN_ARTEFACTS = (RESULT_FILE, CONFIG_FILE, METRICS_FILE)  # beside viz.RUN_PICTURES


# ----------------------------------------------------------------------------- TensorBoard


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a row's key: validation metrics and baselines share a section."""
    if key.startswith(("val_", "baseline_")):
        return f"validation/{key}"
    if key.startswith("probe_"):
        return f"probe/{key}"
    return f"train/{key}"


class TensorBoardLog:
    """Rank 0's event files: every number of each report row, and the frame grid at each
    validation. A restarted or resumed run hides the events its earlier attempt wrote after
    the step it restarts from (TensorBoard's `purge_step`)."""

    def __init__(self, destination: str, config: ExperimentConfig, start_step: int = 0):
        import pyarrow.fs
        from torch.utils.tensorboard import SummaryWriter

        filesystem, path = storage_filesystem(destination)
        local = isinstance(filesystem, pyarrow.fs.LocalFileSystem)
        self.remote = None if local else (filesystem, path)  # written here, copied up after every report
        self.folder = Path(path) if local else Path(tempfile.mkdtemp(prefix="lstm_ae_tensorboard_"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.writer = SummaryWriter(str(self.folder), purge_step=start_step + 1 if start_step else None)
        self._sequences: torch.Tensor | None = None
        if not start_step:
            self.writer.add_text("config", f"```\n{json.dumps(config.to_dict(), indent=2)}\n```", 0)
            charts = {
                "MSE per frame against the baselines": (
                    VAL_MSE_FRAME,
                    BASELINE_ZEROS_MSE_FRAME,
                    BASELINE_COPY_LAST_MSE_FRAME,
                ),
                "ink SSIM against the baselines (a blank frame scores about 0)": (
                    VAL_INK_SSIM,
                    BASELINE_ZEROS_INK_SSIM,
                    BASELINE_COPY_LAST_INK_SSIM,
                ),
            }
            self.writer.add_custom_scalars(
                {
                    "validation": {
                        title: ["Multiline", [tensorboard_tag(key) for key in keys]]
                        for title, keys in charts.items()
                    }
                }
            )

    def log(self, row: dict[str, Any], model: torch.nn.Module, validation_set) -> None:
        """One report row; a validation row adds the frame grid of `model` on the first
        sequences of `validation_set` (a `lstm_ae.data.TestSet`)."""
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tensorboard_tag(key), value, step)
        if VAL_MSE_FRAME in row:
            if self._sequences is None:
                self._sequences = next(validation_set.batches(IMAGE_SEQUENCES))
            self.writer.add_image(
                FRAMES_TAG, frame_grid(model, self._sequences, self.config), step, dataformats="HWC"
            )
        self.writer.flush()
        self._copy_up()

    def close(self) -> None:
        self.writer.close()
        self._copy_up()
        if self.remote is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _copy_up(self) -> None:
        if self.remote is None:
            return
        filesystem, path = self.remote
        filesystem.create_dir(path, recursive=True)
        for file in self.folder.iterdir():
            with filesystem.open_output_stream(f"{path}/{file.name}") as stream:
                stream.write(file.read_bytes())


class _NoLog:
    def log(self, row, model, validation_set) -> None:
        pass

    def close(self) -> None:
        pass


def open_tracker(loop_config: dict[str, Any], config: ExperimentConfig, rank: int, start_step: int):
    """What the training function calls `log(row, model, validation_set)` and `close()` on:
    rank 0's `TensorBoardLog` where `loop_config` asks for one, else something that does nothing."""
    destination = (loop_config.get(TRACKING_KEY) or {}).get("tensorboard")
    if rank != 0 or not destination:
        return _NoLog()
    return TensorBoardLog(destination, config, start_step)


@torch.no_grad()
def frame_grid(model: torch.nn.Module, sequences: torch.Tensor, config: ExperimentConfig) -> np.ndarray:
    """`lstm_ae.viz.frames_png` of `model` on `sequences` (B, T, 1, H, W), as an (H, W, 3)
    uint8 image: input, true future, predicted future and reconstruction per sequence."""
    past, future, prediction, reconstruction = model_outputs(model, sequences, config)
    with tempfile.TemporaryDirectory(prefix="lstm_ae_frames_") as folder:
        path = Path(folder) / "frames.png"
        frames_png(path, past, future, prediction, reconstruction)
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------- MLflow


@dataclass(frozen=True)
class MLflowSettings:
    tracking_uri: str  # absolute: Ray's processes do not share the driver's working folder
    experiment: str


def add_mlflow_arguments(parser: argparse.ArgumentParser, default_experiment: str) -> None:
    parser.add_argument(
        "--mlflow-tracking-uri",
        default=None,
        metavar="URI",
        help=f"also log to MLflow: a tracking server or file:FOLDER (needs `pip install {MLFLOW_PACKAGE}`)",
    )
    parser.add_argument(
        "--mlflow-experiment",
        default=None,
        metavar="NAME",
        help=f"MLflow experiment (default {default_experiment})",
    )


def mlflow_settings(arguments: argparse.Namespace, default_experiment: str) -> MLflowSettings | None:
    """The MLflow flags, checked (ConfigError): None where MLflow was not asked for."""
    uri, experiment = arguments.mlflow_tracking_uri, arguments.mlflow_experiment
    if uri is None:
        if experiment is not None:
            raise ConfigError("--mlflow-experiment needs --mlflow-tracking-uri")
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"--mlflow-tracking-uri needs the mlflow package: pip install {MLFLOW_PACKAGE}"
        ) from None
    tracking_uri = absolute_tracking_uri(uri)
    check_tracking_uri(tracking_uri, uri)
    return MLflowSettings(tracking_uri, experiment or default_experiment)


NAMED_URIS = ("databricks", "databricks-uc", "uc")  # MLflow URIs that are names, not folders


def absolute_tracking_uri(uri: str) -> str:
    """A folder or a relative `file:` URI made absolute; other URIs as given."""
    if uri.startswith("file:") and not uri.startswith("file://"):
        uri = uri[len("file:") :]
    elif (":" in uri and not Path(uri).exists()) or uri in NAMED_URIS:
        return uri  # http://..., databricks, sqlite:///...
    return Path(uri).expanduser().resolve().as_uri()


def check_tracking_uri(tracking_uri: str, given: str | None = None) -> None:
    """ConfigError (one line) where the installed mlflow could not log to `tracking_uri`: a
    scheme it has no store for, or a `file:` folder that cannot be created. Nothing is
    created or contacted (a server's address is first tried when the run starts)."""
    import urllib.parse

    import mlflow
    from mlflow.utils.uri import get_uri_scheme

    given = given or tracking_uri
    try:
        scheme = get_uri_scheme(tracking_uri)
    except Exception as error:  # noqa: BLE001 (mlflow's own parse errors vary by version)
        raise ConfigError(f"--mlflow-tracking-uri {given}: not a URI mlflow reads ({error})") from None
    schemes = mlflow_schemes()
    if schemes is not None and scheme not in schemes:
        named = sorted(scheme for scheme in schemes if scheme not in ("", "file"))
        raise ConfigError(
            f"--mlflow-tracking-uri {given}: mlflow {mlflow.__version__} cannot track to {scheme or 'this'}: URIs "
            f"(it takes a folder or file:FOLDER, or {', '.join(named)})"
        )
    parsed = urllib.parse.urlparse(tracking_uri)
    if scheme in ("", "file"):
        folder = Path(urllib.parse.unquote(parsed.path if scheme else tracking_uri)).expanduser()
        problem = _uncreatable(folder)
        if problem:
            raise ConfigError(f"--mlflow-tracking-uri {given}: cannot create the folder {folder} ({problem})")


def _uncreatable(folder: Path) -> str | None:
    """Why `folder` cannot be used or made as a folder, or None."""
    if folder.exists():
        return None if folder.is_dir() else "a file is in the way"
    ancestor = folder.parent
    while not ancestor.exists():
        if ancestor == ancestor.parent:
            return "no existing folder above it"
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def allow_file_store(tracking_uri: str) -> None:
    """mlflow 3.x refuses its `file:` store (in maintenance mode) unless this process opts in."""
    if tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    allow_file_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a report row (not its flags, lists or text), as MLflow logs them."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class MLflowTrainRun:
    """The MLflow run of one `python -m train` run, held by the driver."""

    def __init__(self, settings: MLflowSettings, name: str, params: dict[str, Any], resume: bool = False):
        from mlflow.entities import Param

        self.settings = settings
        client = _mlflow_client(settings.tracking_uri)
        experiment_id = _experiment_id(client, settings.experiment)
        earlier = (
            client.search_runs([experiment_id], filter_string=f"tags.`{MLFLOW_RUN_TAG}` = '{name}'")
            if resume
            else []
        )
        if earlier:  # a resumed run continues its MLflow run (its parameters are logged)
            self.run_id = earlier[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = client.create_run(experiment_id, run_name=name, tags={MLFLOW_RUN_TAG: name}).info.run_id
        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 per batch
            client.log_batch(self.run_id, params=items[start : start + 100])

    def callback(self):
        """The Ray Train callback that logs every report to this run."""
        return _report_callback_class()(self.settings.tracking_uri, self.run_id)

    def finish(self, filesystem=None, run_path: str | None = None, failed: bool = False) -> None:
        """Add the run folder's pictures and records as artefacts, and close the run."""
        client = _mlflow_client(self.settings.tracking_uri)
        if filesystem is not None:
            with tempfile.TemporaryDirectory(prefix="lstm_ae_mlflow_") as folder:
                for name in (*RUN_PICTURES, *RUN_ARTEFACTS):
                    if path_exists(filesystem, f"{run_path}/{name}"):
                        with filesystem.open_input_stream(f"{run_path}/{name}") as stream:
                            (Path(folder) / name).write_bytes(stream.read())
                client.log_artifacts(self.run_id, folder)
        client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


@functools.cache
def _report_callback_class():
    """`MLflowReportCallback`, made on first use (Ray Train is imported only where it runs)."""
    from ray.train import UserCallback

    class MLflowReportCallback(UserCallback):
        """Logs rank 0's report to an MLflow run at the training step. Ray Train runs its
        callbacks in its controller (on the driver's node), so the workers need no mlflow."""

        def __init__(self, tracking_uri: str, run_id: str):
            self.tracking_uri, self.run_id = tracking_uri, run_id

        def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
            from mlflow.entities import Metric

            row, now = metrics[0], int(time.time() * 1000)
            values = [
                Metric(key, value, now, int(row["step"])) for key, value in numeric_metrics(row).items()
            ]
            client = _mlflow_client(self.tracking_uri)
            for start in range(0, len(values), 1000):  # MLflow takes at most 1000 per batch
                client.log_batch(self.run_id, metrics=values[start : start + 1000])

    return MLflowReportCallback
