"""Config validation, presets, round trips and the derived command-line flags."""

from __future__ import annotations

import argparse

import pytest

from lstm_ae.config import (
    FIELD_HELP,
    FIELD_SECTIONS,
    PRESETS,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    TrainingConfig,
    add_config_arguments,
    config_from_arguments,
    preset,
)


@pytest.mark.parametrize(
    "section, values, field",
    [
        (ModelConfig, dict(hidden_size=0), "hidden_size"),
        (ModelConfig, dict(num_layers=-1), "num_layers"),
        (ModelConfig, dict(reconstruction_weight=1.5), "reconstruction_weight"),
        (ModelConfig, dict(reconstruction_weight=-0.1), "reconstruction_weight"),
        (ModelConfig, dict(past_length=-3), "past_length"),
        (ModelConfig, dict(future_length=0), "future_length"),
        (ModelConfig, dict(decoder_mode="teacher"), "decoder_mode"),
        (ModelConfig, dict(head="softmax"), "head"),
        (ModelConfig, dict(dropout=1.0), "dropout"),
        (ModelConfig, dict(reconstruction_order="sideways"), "reconstruction_order"),
        (DataConfig, dict(digit_source="emnist"), "digit_source"),
        (DataConfig, dict(test_sequences=0), "test_sequences"),
        (OptimConfig, dict(learning_rate=0.0), "learning_rate"),
        (OptimConfig, dict(learning_rate=float("nan")), "learning_rate"),
        (OptimConfig, dict(lr_schedule="step"), "lr_schedule"),
        (TrainingConfig, dict(batch_size=10, grad_accumulation_steps=3), "grad_accumulation_steps"),
        (TrainingConfig, dict(precision="fp16"), "precision"),
        (TrainingConfig, dict(metric="val_accuracy"), "metric"),
        (TrainingConfig, dict(max_steps=True), "max_steps"),
    ],
)
def test_invalid_values_are_rejected_naming_the_field(section, values, field):
    with pytest.raises(ConfigError, match=rf"^{field} "):
        section(**values)


def test_experiment_rejects_frames_smaller_than_a_digit():
    with pytest.raises(ConfigError, match="height"):
        ExperimentConfig(model=ModelConfig(height=16))


def test_round_trip_through_dict():
    config = preset("paper", learning_rate=1e-4)
    assert ExperimentConfig.from_dict(config.to_dict()) == config
    assert config.model.hidden_size == 2048 and config.optim.learning_rate == 1e-4


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="unknown model field"):
        ExperimentConfig.from_dict({"model": {"hidden": 3}})


def test_presets_are_valid_and_distinct():
    configs = {name: preset(name) for name in PRESETS}
    assert configs["smoke"].training.max_steps < configs["cpu"].training.max_steps
    assert configs["paper"].model.hidden_size == 2048
    with pytest.raises(ConfigError, match="preset"):
        preset("huge")


def test_every_field_has_a_flag_with_help_and_flags_override_the_preset():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert set(FIELD_HELP) == set(FIELD_SECTIONS)
    arguments = parser.parse_args(["--hidden-size", "64", "--download", "true", "--lr-schedule", "constant"])
    config = config_from_arguments(arguments, "smoke")
    assert config.model.hidden_size == 64
    assert config.data.download is True
    assert config.optim.lr_schedule == "constant"
    assert config.training.max_steps == PRESETS["smoke"]["max_steps"]
