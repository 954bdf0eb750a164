"""The composite model's API: shapes, gradients, training, and its errors."""

from __future__ import annotations

import pytest
import torch

from lstm_ae.config import ConfigError, ModelConfig
from lstm_ae.model import CompositeLSTMAutoencoder


def small(**overrides) -> ModelConfig:
    values = dict(hidden_size=24, height=8, width=8, past_length=4, future_length=4)
    return ModelConfig(**{**values, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [
        dict(channels=3, height=6, width=10, past_length=5, future_length=3),
        dict(height=16, width=12, past_length=2, future_length=7, num_layers=2),
        dict(past_length=6, future_length=6, decoder_mode="conditioned", head="linear"),
    ],
)
def test_shapes_for_other_frame_sizes_and_lengths(overrides):
    config = small(**overrides)
    model = CompositeLSTMAutoencoder(config)
    frame = (config.channels, config.height, config.width)
    past = torch.rand(3, config.past_length, *frame)
    future = torch.rand(3, config.future_length, *frame)
    output = model(past, future)
    assert output.reconstruction.shape == past.shape
    assert output.prediction.shape == future.shape
    assert output.loss.shape == ()
    assert (
        model.encode(past).shape == (3, 2 * config.num_layers * config.hidden_size) == (3, model.feature_size)
    )
    assert model.reconstruct(past).shape == past.shape
    assert model.predict(past).shape == future.shape
    assert model.predict(past, steps=11).shape == (3, 11, *frame)


def test_encode_is_the_final_encoder_state_and_decoders_start_from_it():
    model = CompositeLSTMAutoencoder(small(num_layers=2)).eval()
    past = torch.rand(2, 4, 1, 8, 8)
    features = model.encode(past)
    hidden, cell = model._encode_states(past)
    assert torch.equal(features[:, :24], hidden[0, 0]) and torch.equal(features[:, 48:72], cell[0, 0])
    # Changing only the first past frame changes the representation and the predictions.
    changed = past.clone()
    changed[:, 0] = 1 - changed[:, 0]
    assert not torch.allclose(model.encode(changed), features)
    assert not torch.allclose(model.predict(changed), model.predict(past))


def test_reconstruct_returns_chronological_order():
    model = CompositeLSTMAutoencoder(small())
    model.eval()
    past = torch.rand(2, 4, 1, 8, 8)
    output = model(past, torch.rand(2, 4, 1, 8, 8))  # decoder order: the past reversed
    assert torch.allclose(model.reconstruct(past), output.reconstruction.flip(1))
    forward_model = CompositeLSTMAutoencoder(small(reconstruction_order="forward")).eval()
    forward_model.load_state_dict(model.state_dict())
    assert torch.allclose(forward_model(past, past).reconstruction_target, past)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(past_length=3, future_length=6, num_layers=2, head="linear"),
        dict(reconstruction_order="forward"),
    ],
)
def test_reconstruct_and_predict_from_one_encoding_equal_the_separate_calls(overrides):
    torch.manual_seed(0)
    config = small(**overrides)
    model = CompositeLSTMAutoencoder(config).eval()
    past = torch.rand(3, config.past_length, 1, 8, 8)
    reconstruction, prediction = model.reconstruct_and_predict(past)
    assert reconstruction.shape == past.shape and prediction.shape == (3, config.future_length, 1, 8, 8)
    torch.testing.assert_close(reconstruction, model.reconstruct(past), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prediction, model.predict(past), rtol=1e-5, atol=1e-6)


def test_forget_gate_bias_shifts_only_the_forget_gates_initial_biases():
    torch.manual_seed(0)
    plain = CompositeLSTMAutoencoder(small(num_layers=2))
    torch.manual_seed(0)
    shifted = CompositeLSTMAutoencoder(small(num_layers=2, forget_gate_bias=1.0))
    hidden = 24
    for name, value in plain.state_dict().items():
        difference = shifted.state_dict()[name] - value
        if "bias_l" in name:
            gates = difference.view(difference.shape[0], 4, hidden)
            assert torch.allclose(gates[:, 1], torch.ones(())) and gates[:, [0, 2, 3]].abs().max() == 0
        else:
            assert difference.abs().max() == 0, name


@pytest.mark.parametrize("weight", [0.5, 0.0, 1.0])
def test_gradients_reach_the_modules_the_loss_uses(weight):
    model = CompositeLSTMAutoencoder(small(reconstruction_weight=weight))
    model(torch.rand(2, 4, 1, 8, 8), torch.rand(2, 4, 1, 8, 8)).loss.backward()
    encoder_grad = model.encoder.weight_ih_l0.grad
    reconstruction_grad, prediction_grad = model.decoders.weight_hh_l0.grad
    assert encoder_grad.abs().sum() > 0
    assert (reconstruction_grad.abs().sum() > 0) == (weight > 0)
    assert (prediction_grad.abs().sum() > 0) == (weight < 1)
    assert (model.output_weight.grad[1].abs().sum() > 0) == (weight < 1)


def test_single_task_weights_skip_the_other_decoder():
    past, future = torch.rand(2, 4, 1, 8, 8), torch.rand(2, 4, 1, 8, 8)
    prediction_only = CompositeLSTMAutoencoder(small(reconstruction_weight=0.0))(past, future)
    assert prediction_only.reconstruction is None and prediction_only.reconstruction_loss.item() == 0
    assert prediction_only.loss.item() == pytest.approx(prediction_only.prediction_loss.item())
    reconstruction_only = CompositeLSTMAutoencoder(small(reconstruction_weight=1.0))(past, future)
    assert reconstruction_only.prediction is None
    assert reconstruction_only.loss.item() == pytest.approx(reconstruction_only.reconstruction_loss.item())


def test_composite_loss_is_the_weighted_sum():
    model = CompositeLSTMAutoencoder(small(reconstruction_weight=0.3))
    output = model(torch.rand(2, 4, 1, 8, 8), torch.rand(2, 4, 1, 8, 8))
    expected = 0.3 * output.reconstruction_loss + 0.7 * output.prediction_loss
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def moving_bar_batch(batch: int = 4, steps: int = 8) -> torch.Tensor:
    """(B, T, 1, 8, 8): a vertical bar moving right, wrapping, from a per-sequence start."""
    frames = torch.zeros(batch, steps, 1, 8, 8)
    for sequence in range(batch):
        for t in range(steps):
            frames[sequence, t, 0, :, (sequence + t) % 8] = 1.0
    return frames


def overfit(config: ModelConfig, steps: int, learning_rate: float = 1e-2) -> tuple[float, float]:
    model = CompositeLSTMAutoencoder(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    frames = moving_bar_batch()
    losses = []
    for _ in range(steps):
        output = model(frames[:, :4], frames[:, 4:])
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    return losses[0], min(losses[-5:])


@pytest.mark.slow
def test_small_model_overfits_one_batch_by_an_order_of_magnitude():
    first, last = overfit(small(hidden_size=32), steps=150)
    assert last < first / 10


@pytest.mark.slow
@pytest.mark.parametrize(
    "decoder_mode, head",
    [("free", "logistic"), ("free", "linear"), ("conditioned", "logistic"), ("conditioned", "linear")],
)
def test_each_decoder_mode_and_head_trains(decoder_mode, head):
    first, last = overfit(small(decoder_mode=decoder_mode, head=head), steps=40)
    assert last < first / 2


def test_wrong_input_shapes_name_the_problem():
    model = CompositeLSTMAutoencoder(small())
    with pytest.raises(ValueError, match=r"past must have shape \(B, 4, 1, 8, 8\)"):
        model(torch.rand(2, 5, 1, 8, 8), torch.rand(2, 4, 1, 8, 8))
    with pytest.raises(ValueError, match="future must have shape"):
        model(torch.rand(2, 4, 1, 8, 8), torch.rand(2, 4, 1, 9, 8))
    with pytest.raises(ValueError, match="past must have shape"):
        model.encode(torch.rand(2, 4, 8, 8))


@pytest.mark.slow
def test_lstm_ae_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, lstm_ae.model, lstm_ae.data, lstm_ae.engine, lstm_ae.checkpoint, lstm_ae.viz; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    "head, loss",
    [
        ("logistic", "auto"),
        ("linear", "auto"),
        ("logistic", "mse"),
        ("linear", "l1_l2"),
        ("logistic", "l1_l2"),
    ],
)
def test_each_loss_is_its_formula_on_the_heads_outputs(head, loss):
    """Per frame: cross-entropy from the logits, squared error, or absolute plus squared error of
    the outputs (after the sigmoid for the logistic head), summed over pixels."""
    torch.manual_seed(0)
    model = CompositeLSTMAutoencoder(small(head=head, loss=loss, reconstruction_weight=0.0))
    past, future = torch.rand(3, 4, 1, 8, 8), torch.rand(3, 4, 1, 8, 8)
    output = model(past, future)
    prediction, frames = output.prediction.double(), 3 * 4  # the head's outputs, (B, T, 1, 8, 8)
    error = prediction - future.double()
    expected = {
        "bce": -(future * prediction.log() + (1 - future) * (1 - prediction).log()).sum(),
        "mse": error.pow(2).sum(),
        "l1_l2": error.pow(2).sum() + error.abs().sum(),
    }[model.config.resolved_loss] / frames
    assert model.config.resolved_loss == {"auto": {"logistic": "bce", "linear": "mse"}[head]}.get(loss, loss)
    assert output.prediction_loss.item() == pytest.approx(expected.item(), rel=1e-4)
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cross_entropy_needs_the_logistic_head():
    with pytest.raises(ConfigError, match="loss 'bce' needs head 'logistic'"):
        small(head="linear", loss="bce")
    with pytest.raises(ConfigError, match="loss must be one of auto, bce, mse, l1_l2, got 'l1'"):
        small(loss="l1")
