"""`python -m train` and `python -m train.predict`: bad input is one line and exit status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from command_line import run_main

from lstm_ae.checkpoint import CheckpointError
from lstm_ae.config import preset
from train.commandline import resolve_checkpoint
from train.predict import main as predict_main
from train.worker import LocalSession, train_function


@pytest.fixture
def run_train(capsys):
    """`python -m train ARGUMENTS` run in this process (tests/command_line.py says why)."""
    from train.cli import main

    return lambda *arguments: run_main(main, arguments, capsys)


@pytest.mark.slow
def test_python_m_train_refuses_bad_input_in_one_line_without_a_traceback():
    """The real entry point, in its own interpreter (the other command-line tests call main)."""
    command = [sys.executable, "-m", "train", "--preset", "smoke", "--hidden-size", "0"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr == "error: hidden_size must be a positive integer, got 0\n"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--hidden-size", "0"], "hidden_size must be a positive integer, got 0"),
        (["--reconstruction-weight", "1.5"], "reconstruction_weight must be in [0, 1], got 1.5"),
        (["--decoder-mode", "teacher"], "decoder_mode must be one of free, conditioned"),
        (["--hidden-size", "many"], "argument --hidden-size: invalid int value: 'many'"),
        (["--preset", "smoke", "--num-workers", "3"], "batch_size 4 must split evenly over 3 workers"),
        (["--resume"], "--resume needs the --name"),
        (["--cpus-per-worker", "0"], "--cpus-per-worker must be positive, got 0.0"),
        (["--max-failures", "-2"], "--max-failures must be 0 or more"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_it(run_train, arguments, message):
    completed = run_train(*arguments)
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and message in completed.stderr
    assert "Traceback" not in completed.stderr


def test_run_folder_conflicts_are_refused_before_ray_starts(run_train, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "checkpoint_manager_snapshot.json").write_text("{}")
    completed = run_train("--preset", "smoke", "--output-dir", str(tmp_path), "--name", "taken")
    assert completed.returncode == 2 and "already exists: pass --resume" in completed.stderr
    completed = run_train("--preset", "smoke", "--output-dir", str(tmp_path), "--name", "new", "--resume")
    assert completed.returncode == 2 and "nothing to resume" in completed.stderr
    completed = run_train(
        "--preset", "smoke", "--test-file", str(tmp_path / "missing.npy"), "--output-dir", str(tmp_path)
    )
    assert completed.returncode == 2 and "sequence file not found" in completed.stderr
    assert "Ray" not in completed.stdout + completed.stderr


def test_resume_keeps_the_model_of_the_saved_run(run_train, tmp_path):
    config = preset("smoke")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"config": config.to_dict()}))
    common = ("--output-dir", str(tmp_path), "--name", "run", "--resume")
    completed = run_train(*common, "--hidden-size", "64", "--learning-rate", "0.5", "--eval-every", "3")
    assert completed.returncode == 2 and completed.stderr.count("\n") == 1
    assert (  # each differing flag with both values; --eval-every may change on a resume
        "continues the run with its saved config, and these flags differ from it: "
        f"--hidden-size 64 (saved: 32), --learning-rate 0.5 (saved: {config.optim.learning_rate})"
    ) in completed.stderr
    assert "--eval-every" not in completed.stderr
    (tmp_path / "run" / "config.json").write_text("{not json")
    completed = run_train(*common)
    assert completed.returncode == 2 and "config.json is not a readable run config" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_time_limited_run_is_complete_until_given_more_minutes(run_train, tmp_path):
    from records.run_folder import saved_run

    config = preset("smoke", max_minutes=2.0, max_steps=100_000)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"config": config.to_dict()}))
    (tmp_path / "run" / "result.json").write_text(
        json.dumps({"status": "completed", "steps": 340, "planned_minutes": 2.0})
    )
    saved = saved_run(str(tmp_path), "run")
    assert saved.is_complete(config) and not saved.is_complete(config.replace(max_minutes=3.0))
    common = ("--preset", "smoke", "--output-dir", str(tmp_path), "--name", "run", "--resume")
    completed = run_train(*common, "--max-minutes", "1")
    assert (
        completed.returncode == 2
        and "--max-minutes 1.0 is below the resumed run's max_minutes 2.0" in completed.stderr
    )


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    config = preset("smoke", hidden_size=16, cache_dir=str(root / "data"))
    session = LocalSession(checkpoint_root=str(root / "checkpoints"))
    train_function({"config": config.to_dict()}, session)
    return session.checkpoints[-1], root


@pytest.mark.slow
def test_predict_writes_predictions_in_the_input_layout_and_a_gif(trained_checkpoint, tmp_path, capsys):
    checkpoint, _ = trained_checkpoint
    sequences = np.random.default_rng(0).integers(0, 256, size=(12, 3, 64, 64), dtype=np.uint8)
    np.save(tmp_path / "mine.npy", sequences)
    assert (
        predict_main(
            [checkpoint, str(tmp_path / "mine.npy"), "--output", str(tmp_path / "out"), "--steps", "5"]
        )
        == 0
    )
    predictions = np.load(tmp_path / "out" / "predictions.npy")
    assert predictions.shape == (5, 3, 64, 64) and predictions.dtype == np.uint8
    assert (tmp_path / "out" / "prediction.gif").stat().st_size > 0
    assert "predictions.npy" in capsys.readouterr().out


def test_predict_rejects_bad_files_with_one_line(trained_checkpoint, tmp_path, capsys):
    checkpoint, _ = trained_checkpoint
    np.save(tmp_path / "short.npy", np.zeros((4, 2, 64, 64), np.uint8))
    np.save(tmp_path / "small.npy", np.zeros((20, 2, 32, 32), np.uint8))
    np.save(tmp_path / "empty.npy", np.zeros((20, 0, 64, 64), np.uint8))
    for arguments, message in (
        ([checkpoint, str(tmp_path / "short.npy")], "fewer than past_length = 10"),
        ([checkpoint, str(tmp_path / "small.npy")], "32x32 frames"),
        ([str(tmp_path / "nowhere"), str(tmp_path / "short.npy")], "checkpoint not found"),
        ([checkpoint, str(tmp_path / "empty.npy")], "holds no sequences"),
        ([checkpoint, str(tmp_path / "short.npy"), "--batch-size", "0"], "--batch-size must be at least 1"),
        ([checkpoint, str(tmp_path / "short.npy"), "--device", "tpu"], "--device must be cpu or cuda"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            predict_main([*arguments, "--output", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_a_copied_run_folder_predicts_from_its_own_checkpoint(trained_checkpoint, tmp_path, capsys):
    """result.json records the original path; a copy (say from `aws s3 sync`) finds its own."""
    checkpoint, _ = trained_checkpoint
    copy = tmp_path / "copied-run"
    shutil.copytree(checkpoint, copy / Path(checkpoint).name)
    gone = f"/gone/elsewhere/{Path(checkpoint).name}"
    (copy / "result.json").write_text(json.dumps({"best_checkpoint": gone, "final_checkpoint": gone}))
    assert resolve_checkpoint(copy) == copy / Path(checkpoint).name
    np.save(tmp_path / "mine.npy", np.zeros((10, 1, 64, 64), np.uint8))
    assert predict_main([str(copy), str(tmp_path / "mine.npy"), "--output", str(tmp_path / "out")]) == 0
    shutil.rmtree(copy / Path(checkpoint).name)
    with pytest.raises(CheckpointError, match="neither at that path nor inside"):
        resolve_checkpoint(copy)
    (copy / "result.json").write_text("[]")
    with pytest.raises(CheckpointError, match="names no checkpoint"):
        resolve_checkpoint(copy)
