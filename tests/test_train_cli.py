"""`python -m train` and `python -m train.predict`: bad input is one line and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lstm_ae.config import preset
from train.predict import main as predict_main
from train.session import LocalSession
from train.worker import train_function


def run_train(*arguments: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", *arguments], capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--hidden-size", "0"], "hidden_size must be a positive integer, got 0"),
        (["--reconstruction-weight", "1.5"], "reconstruction_weight must be in [0, 1], got 1.5"),
        (["--decoder-mode", "teacher"], "decoder_mode must be one of free, conditioned"),
        (["--hidden-size", "many"], "argument --hidden-size: invalid int value: 'many'"),
        (["--preset", "smoke", "--num-workers", "3"], "batch_size 4 must split evenly over 3 workers"),
        (["--resume"], "--resume needs the --name"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_it(arguments, message):
    completed = run_train(*arguments)
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and message in completed.stderr
    assert "Traceback" not in completed.stderr


def test_run_folder_conflicts_are_refused_before_ray_starts(tmp_path):
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


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    config = preset("smoke", hidden_size=16, cache_dir=str(root / "data"))
    session = LocalSession(checkpoint_root=str(root / "checkpoints"))
    train_function({"config": config.to_dict()}, session)
    return session.checkpoints[-1], root


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
    for arguments, message in (
        ([checkpoint, str(tmp_path / "short.npy")], "fewer than past_length = 10"),
        ([checkpoint, str(tmp_path / "small.npy")], "32x32 frames"),
        ([str(tmp_path / "nowhere"), str(tmp_path / "short.npy")], "checkpoint not found"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            predict_main([*arguments, "--output", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
