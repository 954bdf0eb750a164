"""The linear probe: ~1 on features that hold the digits, chance on features or labels that
do not, better than chance on a trained encoder; the scores training and the command report."""

from __future__ import annotations

import json

import pytest
import torch

import lstm_ae.linear_probe as probe_module
from lstm_ae.checkpoint import load_model
from lstm_ae.config import preset
from lstm_ae.linear_probe import (
    CLASSES,
    digit_presence,
    fit_linear_probe,
    probe,
    probe_with_baseline,
    set_accuracy,
)
from lstm_ae.model import CompositeLSTMAutoencoder
from train.probe import main as probe_main
from train.worker import LocalSession, train_function

SEQUENCES = 600
NOISE_FEATURES = 32


def synthetic_features(signal: float):
    """An `encoder_features` stand-in: (N, 32) Gaussian features whose first 10 carry
    `signal` times the digits' presence, and (N, 2) labels: two different digits, uniformly
    drawn (so that finding both is possible and scores 1)."""

    def features(model, config, split, sequences, seed):
        generator = torch.Generator().manual_seed(seed)
        labels = torch.rand(sequences, CLASSES, generator=generator).argsort(1)[:, :2]
        values = torch.randn(sequences, NOISE_FEATURES, generator=generator)
        values[:, :CLASSES] += signal * digit_presence(labels)
        return values, labels

    return features


def test_set_accuracy_counts_the_digits_found_among_the_top_k():
    labels = torch.tensor([[3, 7], [2, 2], [0, 1]])
    logits = torch.zeros(3, 10)
    logits[0, 3], logits[0, 5] = 2.0, 1.0  # finds 3 of {3, 7}
    logits[1, 2], logits[1, 4] = 2.0, 1.0  # finds one 2 of {2, 2}
    logits[2, 1], logits[2, 0] = 2.0, 1.0  # finds both
    assert set_accuracy(logits, labels) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert set_accuracy(logits.numpy(), labels) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert digit_presence(labels)[1].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]


def test_fit_linear_probe_scores_10_classes_and_chooses_a_strength_from_the_grid():
    features, labels = synthetic_features(signal=6.0)(None, None, "train", 300, seed=0)
    classifier, strength = fit_linear_probe(features, labels)
    assert classifier.decision_function(features[:5].numpy()).shape == (5, CLASSES)
    assert strength in probe_module.INVERSE_REGULARISATION_STRENGTHS


@pytest.mark.slow
def test_probe_finds_digits_the_features_hold_and_only_those(monkeypatch):
    monkeypatch.setattr(probe_module, "encoder_features", synthetic_features(signal=6.0))
    perfect = probe(None, None, SEQUENCES)
    assert perfect.accuracy > 0.98 and perfect.train_accuracy > 0.98
    assert perfect.chance == pytest.approx(0.2, abs=0.05)
    assert probe(None, None, SEQUENCES) == perfect  # fixed seeds: the same probe every time
    shuffled = probe(None, None, SEQUENCES, shuffle_labels=True)
    assert abs(shuffled.accuracy - shuffled.chance) < 0.05

    monkeypatch.setattr(probe_module, "encoder_features", synthetic_features(signal=0.0))
    noise = probe(None, None, SEQUENCES)
    assert abs(noise.accuracy - noise.chance) < 0.05


@pytest.mark.slow
def test_probe_with_baseline_reports_the_trained_untrained_and_chance_scores(monkeypatch):
    monkeypatch.setattr(probe_module, "encoder_features", synthetic_features(signal=6.0))
    config = preset("smoke", hidden_size=8)
    scores = probe_with_baseline(CompositeLSTMAutoencoder(config.model), config, 200)
    assert set(scores) == {"probe_accuracy", "probe_accuracy_untrained", "probe_chance"}
    assert scores["probe_accuracy"] > 0.9 and scores["probe_chance"] < 0.3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = preset("smoke", cache_dir=str(tmp_path_factory.mktemp("data")))
    session = LocalSession(checkpoint_root=str(tmp_path_factory.mktemp("checkpoints")))
    train_function({"config": config.to_dict()}, session)
    return session, config


@pytest.mark.slow
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


@pytest.mark.slow
def test_probe_command_prints_scores_and_rejects_bad_input(trained, capsys):
    session, config = trained
    arguments = [session.checkpoints[-1], "--sequences", "100", "--cache-dir", config.data.cache_dir]
    assert probe_main(arguments) == 0
    scores = json.loads(capsys.readouterr().out)
    assert 0 <= scores["probe_accuracy"] <= 1 and "probe_accuracy_untrained" in scores
    assert probe_main([*arguments, "--shuffle-labels"]) == 0
    control = json.loads(capsys.readouterr().out)
    assert set(control) == {"probe_accuracy_shuffled_labels", "probe_chance"}
    with pytest.raises(SystemExit) as exit_info:
        probe_main(["/nonexistent/checkpoint"])
    assert exit_info.value.code == 2 and "checkpoint not found" in capsys.readouterr().err
