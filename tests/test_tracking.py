"""Watching runs: TensorBoard events of every run (read back with TensorBoard's own reader),
and MLflow runs of `train` and `tune` against a local file store."""

from __future__ import annotations

import io
import sys

import numpy as np
import pyarrow.fs
import pytest
from faults import FailOnceSession, InjectedFailure
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lstm_ae.config import preset
from lstm_ae.metrics import BASELINE_COPY_LAST_MSE_FRAME, BASELINE_ZEROS_MSE_FRAME, VAL_MSE_FRAME
from lstm_ae.viz import RUN_PICTURES
from train.tracking import (
    FRAMES_TAG,
    TRACKING_KEY,
    MLflowSettings,
    MLflowTrainRun,
    absolute_tracking_uri,
    tensorboard_tag,
)
from train.worker import LocalSession, WorkerSettings, loop_config, train_function


@pytest.fixture
def smoke(tmp_path):
    return preset("smoke", hidden_size=16, cache_dir=str(tmp_path / "data"))


def train_with_events(config, tensorboard, session=None):
    worker_config = loop_config(config, WorkerSettings(quiet=True))
    worker_config[TRACKING_KEY] = {"tensorboard": str(tensorboard)}
    session = session or LocalSession()
    train_function(worker_config, session)
    return session


def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def numeric_keys(reports) -> set[str]:
    return {
        key
        for report in reports
        for key, value in report.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"
    }


def assert_frames_image(log: EventAccumulator, steps: list[int]) -> None:
    images = log.Images(FRAMES_TAG)
    assert [image.step for image in images] == steps
    picture = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)))
    assert picture.shape[0] > 200 and picture.shape[1] > 200 and picture.std() > 0


# ----------------------------------------------------------------------------- TensorBoard


@pytest.mark.slow
def test_a_run_logs_every_number_it_reports_and_the_frame_grid_at_each_validation(smoke, tmp_path):
    session = train_with_events(smoke, tmp_path / "run")
    log = events(tmp_path / "run")
    scalars = set(log.Tags()["scalars"])
    assert {tensorboard_tag(key) for key in numeric_keys(session.reports)} <= scalars
    baselines = {BASELINE_ZEROS_MSE_FRAME, BASELINE_COPY_LAST_MSE_FRAME, VAL_MSE_FRAME}
    assert {f"validation/{key}" for key in baselines} <= scalars
    assert {
        "train/loss",
        "train/learning_rate",
        "train/sequences_per_second",
        "probe/probe_accuracy",
    } <= scalars
    loss = log.Scalars("train/loss")
    assert [event.step for event in loss] == [report["step"] for report in session.reports]
    assert [event.value for event in loss] == pytest.approx([report["loss"] for report in session.reports])
    assert_frames_image(log, [report["step"] for report in session.reports if VAL_MSE_FRAME in report])


@pytest.mark.slow
def test_a_restarted_run_shows_each_step_once(smoke, tmp_path):
    # Events for steps 1-5, a crash reporting step 5, a restart from the step-4 checkpoint.
    config = smoke.replace(checkpoint_every=4, eval_every=2, log_every=1)
    session = LocalSession()
    with pytest.raises(InjectedFailure):
        train_with_events(config, tmp_path / "run", FailOnceSession(session, 5, tmp_path / "failed"))
    train_with_events(config, tmp_path / "run", session)
    assert [event.step for event in events(tmp_path / "run").Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_remote_storage_gets_the_events_copied_up(smoke, tmp_path, monkeypatch):
    import train.tracking

    bucket = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())  # not local to pyarrow
    monkeypatch.setattr(train.tracking, "storage_filesystem", lambda storage: (bucket, "bucket/runs/remote"))
    session = train_with_events(smoke, "s3://bucket/runs/remote")
    log = events(tmp_path / "bucket" / "runs" / "remote")
    assert {tensorboard_tag(key) for key in numeric_keys(session.reports)} <= set(log.Tags()["scalars"])
    assert_frames_image(log, [3, 6])


# ----------------------------------------------------------------------------- MLflow


def test_the_mlflow_flags_without_mlflow_exit_2_naming_the_package(monkeypatch, capsys):
    from train.cli import main as train_main
    from tune.cli import main as tune_main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    for main in (train_main, tune_main):
        with pytest.raises(SystemExit) as exit:
            main(["--preset", "smoke", "--mlflow-tracking-uri", "file:mlruns"])
        assert exit.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error == "error: --mlflow-tracking-uri needs the mlflow package: pip install mlflow-skinny"
        with pytest.raises(SystemExit) as exit:
            main(["--preset", "smoke", "--mlflow-experiment", "x"])
        assert (
            exit.value.code == 2
            and "--mlflow-experiment needs --mlflow-tracking-uri" in capsys.readouterr().err
        )


def test_a_tracking_uri_mlflow_cannot_use_exits_2_in_one_line_before_ray_starts(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from train.cli import main as train_main
    from tune.cli import main as tune_main

    (tmp_path / "a-file").write_text("not a folder")
    for uri, message in (
        ("ftp://nowhere/x", "cannot track to ftp: URIs"),
        (f"file:{tmp_path / 'a-file' / 'mlruns'}", "a-file is a file"),
    ):
        for main in (train_main, tune_main):
            with pytest.raises(SystemExit) as exit:
                main(["--preset", "smoke", "--output-dir", str(tmp_path), "--mlflow-tracking-uri", uri])
            error = capsys.readouterr().err
            assert exit.value.code == 2 and error.count("\n") == 1 and message in error, error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]  # nothing written


def test_a_relative_tracking_folder_becomes_an_absolute_file_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("file:mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_tracking_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"


def test_an_mlflow_train_run_holds_config_reports_and_run_folder_and_a_resume_continues_it(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    settings = MLflowSettings(absolute_tracking_uri(str(tmp_path / "mlruns")), "lstm-ae")
    run = MLflowTrainRun(settings, "run-1", {"hidden_size": 16, "num_workers": 1})
    from ray import cloudpickle

    callback = cloudpickle.loads(cloudpickle.dumps(run.callback()))  # as Ray sends it to Train's controller
    for step in (2, 3):
        callback.after_report(
            None, [{"step": step, "loss": 1 / step, "final": False, "replica_checksums": [[1.0]]}], None
        )
    folder = tmp_path / "run-1"
    folder.mkdir()
    for name in ("result.json", "frames.png"):
        (folder / name).write_text(name)
    run.finish(pyarrow.fs.LocalFileSystem(), str(folder))

    client = MlflowClient(settings.tracking_uri)
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.info.run_name == "run-1"
    assert stored.data.params == {"hidden_size": "16", "num_workers": "1"}
    assert [(metric.step, metric.value) for metric in client.get_metric_history(run.run_id, "loss")] == [
        (2, 0.5),
        (3, pytest.approx(1 / 3)),
    ]
    assert "final" not in stored.data.metrics
    assert {artifact.path for artifact in client.list_artifacts(run.run_id)} == {"result.json", "frames.png"}
    assert MLflowTrainRun(settings, "run-1", {"hidden_size": 16}, resume=True).run_id == run.run_id


# ----------------------------------------------------------------------------- through Ray


@pytest.mark.ray
def test_train_and_tune_runs_sit_side_by_side_in_tensorboard_and_in_mlflow(ray_cluster, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from train.driver import RunSettings, Scaling, run_training
    from tune.cli import search_and_tabulate
    from tune.experiment import SearchSettings
    from tune.mlflow_trials import trial_mlflow_callback
    from tune.space import parse_space

    config = preset("smoke", hidden_size=16, cache_dir=str(tmp_path / "data"))
    mlflow = MLflowSettings(absolute_tracking_uri(str(tmp_path / "mlruns")), "lstm-ae")
    runs = tmp_path / "runs"
    run_training(config, Scaling(cpus_per_worker=1), RunSettings("one", str(runs), mlflow=mlflow))
    search = SearchSettings(name="search", storage=str(runs), num_samples=1, cpus_per_worker=1)
    space = parse_space({"learning_rate": {"loguniform": [1e-3, 1e-2]}})
    callback = trial_mlflow_callback(mlflow, config, "search", str(runs))
    search_and_tabulate(config, space, search, callbacks=[callback])

    (trial_folder,) = [path.parent for path in (runs / "search").glob("*/params.json")]
    for folder in (runs / "one", trial_folder):
        log = events(folder)
        assert {"train/loss", "validation/val_mse_frame", "validation/baseline_zeros_mse_frame"} <= set(
            log.Tags()["scalars"]
        )
        assert [event.step for event in log.Scalars("train/loss")][-1] == 6
        assert_frames_image(log, [3, 6])

    client = MlflowClient(mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("lstm-ae")
    train_run, trial_run = sorted(
        client.search_runs([experiment.experiment_id]), key=lambda run: run.info.start_time
    )
    for stored in (train_run, trial_run):
        assert stored.info.status == "FINISHED"
        assert stored.data.params["hidden_size"] == "16"
        steps = [metric.step for metric in client.get_metric_history(stored.info.run_id, VAL_MSE_FRAME)]
        assert steps == [3, 6]
        artefacts = {artifact.path for artifact in client.list_artifacts(stored.info.run_id)}
        assert {"result.json", *RUN_PICTURES} <= artefacts
    assert set(trial_run.data.metrics) == set(train_run.data.metrics)  # not Tune's pid, timestamp, ...
    assert "learning_rate" in trial_run.data.params and trial_run.data.tags["lstm_ae.search"] == "search"
