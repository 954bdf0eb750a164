"""The linear probe: better than chance on a trained encoder, at chance on shuffled labels."""

from __future__ import annotations

import json

import pytest
import torch

from lstm_ae.checkpoint import load_model
from lstm_ae.config import preset
from lstm_ae.probe import digit_presence, probe, set_accuracy
from train.probe import main as probe_main
from train.session import LocalSession
from train.worker import train_function

SEQUENCES = 600


def test_set_accuracy_counts_the_digits_found_among_the_top_k():
    labels = torch.tensor([[3, 7], [2, 2], [0, 1]])
    logits = torch.zeros(3, 10)
    logits[0, 3], logits[0, 5] = 2.0, 1.0  # finds 3 of {3, 7}
    logits[1, 2], logits[1, 4] = 2.0, 1.0  # finds one 2 of {2, 2}
    logits[2, 1], logits[2, 0] = 2.0, 1.0  # finds both
    assert set_accuracy(logits, labels) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert digit_presence(labels)[1].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = preset("smoke", cache_dir=str(tmp_path_factory.mktemp("data")))
    session = LocalSession(checkpoint_root=str(tmp_path_factory.mktemp("checkpoints")))
    train_function({"config": config.to_dict()}, session)
    return session, config


def test_probe_beats_chance_and_the_shuffled_label_control_does_not(trained):
    session, config = trained
    model, _, _ = load_model(session.checkpoints[-1])
    real = probe(model, config, SEQUENCES)
    control = probe(model, config, SEQUENCES, shuffle_labels=True)
    assert real.accuracy > real.chance + 0.04
    assert control.accuracy < real.accuracy - 0.04
    assert abs(control.accuracy - control.chance) < 0.04


def test_training_reports_the_probe_at_the_end(trained):
    session, _ = trained
    final = session.reports[-1]
    assert {"probe_accuracy", "probe_accuracy_untrained", "probe_chance"} <= set(final)
    assert "probe_accuracy" not in session.reports[0]


def test_probe_command_prints_scores_and_rejects_bad_input(trained, capsys):
    session, config = trained
    assert (
        probe_main([session.checkpoints[-1], "--sequences", "100", "--cache-dir", config.data.cache_dir]) == 0
    )
    scores = json.loads(capsys.readouterr().out)
    assert 0 <= scores["probe_accuracy"] <= 1 and "probe_accuracy_untrained" in scores
    with pytest.raises(SystemExit) as exit_info:
        probe_main(["/nonexistent/checkpoint"])
    assert exit_info.value.code == 2 and "checkpoint not found" in capsys.readouterr().err
