"""Checkpoints restore bit-for-bit, are written atomically, and reject what is not theirs."""

from __future__ import annotations

import os

import pytest
import torch

from lstm_ae import checkpoint as checkpoints
from lstm_ae.checkpoint import CheckpointError, load_checkpoint, load_model, restore, save_checkpoint
from lstm_ae.config import preset
from lstm_ae.engine import make_optimizer, make_scheduler, train_step
from lstm_ae.model import CompositeLSTMAutoencoder

CONFIG = preset("smoke", hidden_size=16)


def trained(steps: int):
    torch.manual_seed(0)
    model = CompositeLSTMAutoencoder(CONFIG.model)
    optimizer = make_optimizer(model, CONFIG.optim, torch.device("cpu"))
    scheduler = make_scheduler(optimizer, CONFIG.optim, 10)
    frames = torch.rand(2, 20, 1, 64, 64)
    for step in range(steps):
        train_step(model, optimizer, scheduler, [frames], CONFIG.model, "fp32", 0.0, step)
    return model, optimizer, scheduler, frames


def assert_same_state(left, right):
    if isinstance(left, torch.Tensor):
        assert torch.equal(left, right)
    elif isinstance(left, dict):
        assert left.keys() == right.keys()
        for key in left:
            assert_same_state(left[key], right[key])
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right)
        for a, b in zip(left, right):
            assert_same_state(a, b)
    else:
        assert left == right


@pytest.mark.slow
def test_checkpoint_restores_bit_for_bit_and_training_continues_identically(tmp_path):
    model, optimizer, scheduler, frames = trained(3)
    save_checkpoint(tmp_path, model, 3, CONFIG, optimizer, scheduler, metrics={"val_mse_frame": 1.5})

    state = load_checkpoint(tmp_path)
    assert state["step"] == 3 and state["metrics"] == {"val_mse_frame": 1.5}
    assert state["experiment_config"] == CONFIG
    fresh = CompositeLSTMAutoencoder(CONFIG.model)
    fresh_optimizer = make_optimizer(fresh, CONFIG.optim, torch.device("cpu"))
    fresh_scheduler = make_scheduler(fresh_optimizer, CONFIG.optim, 10)
    assert restore(state, fresh, fresh_optimizer, fresh_scheduler) == 3
    assert_same_state(model.state_dict(), fresh.state_dict())
    assert_same_state(optimizer.state_dict(), fresh_optimizer.state_dict())
    assert scheduler.state_dict() == fresh_scheduler.state_dict()

    train_step(model, optimizer, scheduler, [frames], CONFIG.model, "fp32", 0.0, 3)
    train_step(fresh, fresh_optimizer, fresh_scheduler, [frames], CONFIG.model, "fp32", 0.0, 3)
    assert_same_state(model.state_dict(), fresh.state_dict())


def test_load_model_rebuilds_from_the_checkpoint_alone(tmp_path):
    model, *_ = trained(1)
    save_checkpoint(tmp_path, model, 1, CONFIG)
    rebuilt, config, _ = load_model(tmp_path / checkpoints.CHECKPOINT_FILE)
    assert config == CONFIG and not rebuilt.training
    assert_same_state(model.state_dict(), rebuilt.state_dict())


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, *_ = trained(1)
    save_checkpoint(tmp_path, model, 1, CONFIG)

    def crash(state, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model, 2, CONFIG)
    assert os.listdir(tmp_path) == [checkpoints.CHECKPOINT_FILE]
    assert load_checkpoint(tmp_path)["step"] == 1


def test_corrupt_foreign_and_missing_checkpoints_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "corrupt.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as error:
        load_checkpoint(tmp_path / "corrupt.pt")
    assert "\n" not in str(error.value)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an lstm_ae checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format": checkpoints.FORMAT, "code": os.system}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as error:
        load_checkpoint(tmp_path / "pickled.pt")  # weights_only refuses arbitrary objects
    assert "weights_only=True" in str(error.value) and "\n" not in str(error.value)


def test_a_checkpoint_of_another_shape_does_not_load_silently(tmp_path):
    model, *_ = trained(0)
    save_checkpoint(tmp_path, model, 0, CONFIG)
    state = load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        restore(state, CompositeLSTMAutoencoder(CONFIG.replace(hidden_size=8).model))


def test_an_extended_schedule_continues_the_cosine_from_where_it_was():
    from lstm_ae.config import OptimConfig
    from lstm_ae.engine import learning_rate_factor

    optim = OptimConfig(warmup_steps=50, min_lr_fraction=0.1)
    # Interrupted at step 300 of 900, resumed with max_steps 1800.
    extended = [learning_rate_factor(step, optim, 900, [(300, 1800)]) for step in range(1800)]
    original = [learning_rate_factor(step, optim, 900) for step in range(900)]
    assert extended[:300] == original[:300]
    assert extended[300] == pytest.approx(original[300])  # no jump at the resume point
    decay = extended[300:]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(decay, decay[1:]))
    assert extended[-1] == pytest.approx(0.1, abs=1e-4)
    assert extended[1000] > original[899]  # the rest of the decay is stretched, not cut short
    # Extended again later: still continuous.
    twice = [learning_rate_factor(step, optim, 900, [(300, 1800), (1000, 2400)]) for step in range(2400)]
    assert twice[:1000] == extended[:1000] and twice[1000] == pytest.approx(extended[1000])
