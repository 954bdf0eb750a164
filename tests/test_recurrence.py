"""The hand-written backward passes against autograd, and the fast model against the naive one."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.autograd import gradcheck

from benchmarks.reference_model import NaiveCompositeLSTM, gradients_like_model
from lstm_ae.config import ModelConfig, OptimConfig
from lstm_ae.engine import make_optimizer, make_scheduler, train_step
from lstm_ae.model import CompositeLSTMAutoencoder
from lstm_ae.recurrence import DecoderWeights, free_running_decoder, lstm_layer

DOUBLE = dict(dtype=torch.float64, requires_grad=True)


def test_layer_recurrence_backward_matches_autograd():
    stacks, steps, batch, hidden = 2, 3, 2, 3
    inputs = (
        torch.randn(stacks, steps, batch, 4 * hidden, **DOUBLE),
        (0.5 * torch.randn(stacks, 4 * hidden, hidden, dtype=torch.float64)).requires_grad_(),
        torch.randn(stacks, batch, hidden, **DOUBLE),
        torch.randn(stacks, batch, hidden, **DOUBLE),
    )
    assert gradcheck(lstm_layer, inputs)


def decoder_inputs(layers: int, stacks: int = 2, batch: int = 2, hidden: int = 3, frame: int = 4):
    sizes = [frame] + [hidden] * (layers - 1)

    def weight(*shape):
        return (0.5 * torch.randn(*shape, dtype=torch.float64)).requires_grad_()

    parameters = [
        *(weight(stacks, 4 * hidden, size) for size in sizes),
        *(weight(stacks, 4 * hidden, hidden) for _ in range(layers)),
        *(weight(stacks, 4 * hidden) for _ in range(layers)),
        weight(stacks, frame, hidden),
        weight(stacks, frame),
    ]
    h0 = torch.randn(layers, stacks, batch, hidden, **DOUBLE)
    c0 = torch.randn(layers, stacks, batch, hidden, **DOUBLE)
    return (h0, c0, *parameters)


def run_decoder(layers: int, logistic: bool, dropout: float):
    def decode(h0, c0, *parameters):
        weights = DecoderWeights(
            weight_ih=tuple(parameters[:layers]),
            weight_hh=tuple(parameters[layers : 2 * layers]),
            bias=tuple(parameters[2 * layers : 3 * layers]),
            output_weight=parameters[3 * layers],
            output_bias=parameters[3 * layers + 1],
        )
        torch.manual_seed(7)  # the same dropout masks on every call
        return free_running_decoder(weights, h0, c0, steps=4, logistic=logistic, dropout=dropout)

    return decode


@pytest.mark.slow
@pytest.mark.parametrize(
    "layers, logistic, dropout",
    [(1, True, 0.0), (1, False, 0.0), (2, True, 0.0), (3, False, 0.0), (2, True, 0.3), (3, False, 0.5)],
)
def test_free_running_decoder_backward_matches_autograd(layers, logistic, dropout):
    assert gradcheck(run_decoder(layers, logistic, dropout), decoder_inputs(layers))


CASES = list(itertools.product(("free", "conditioned"), ("logistic", "linear"), (1, 2), (0.5, 0.0, 1.0)))


@pytest.mark.parametrize("decoder_mode, head, layers, weight", CASES)
def test_fast_model_matches_naive_reference(decoder_mode, head, layers, weight):
    config = ModelConfig(
        hidden_size=16,
        num_layers=layers,
        decoder_mode=decoder_mode,
        head=head,
        reconstruction_weight=weight,
        height=8,
        width=8,
        past_length=4,
        future_length=3,
    )
    model = CompositeLSTMAutoencoder(config)
    reference = NaiveCompositeLSTM(config)
    reference.copy_weights_from(model)
    frames = torch.rand(3, 7, 1, 8, 8)
    past, future = frames[:, :4], frames[:, 4:]

    output = model(past, future)
    output.loss.backward()
    loss, reconstruction_loss, prediction_loss = reference(past, future)
    loss.backward()

    assert output.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert output.reconstruction_loss.item() == pytest.approx(reconstruction_loss.item(), rel=1e-5)
    assert output.prediction_loss.item() == pytest.approx(prediction_loss.item(), rel=1e-5)
    expected = gradients_like_model(reference, model)
    for name, parameter in model.named_parameters():
        scale = expected[name].abs().max().clamp_min(1e-12)
        error = (parameter.grad - expected[name]).abs().max() / scale
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


def test_reconstruction_order_forward_matches_reference():
    config = ModelConfig(
        hidden_size=8, height=8, width=8, past_length=3, future_length=2, reconstruction_order="forward"
    )
    model = CompositeLSTMAutoencoder(config)
    reference = NaiveCompositeLSTM(config)
    reference.copy_weights_from(model)
    frames = torch.rand(2, 5, 1, 8, 8)
    assert model(frames[:, :3], frames[:, 3:]).loss.item() == pytest.approx(
        reference(frames[:, :3], frames[:, 3:])[0].item(), rel=1e-5
    )


def test_dropout_changes_training_outputs_only():
    config = ModelConfig(
        hidden_size=16, num_layers=2, dropout=0.5, height=8, width=8, past_length=3, future_length=3
    )
    model = CompositeLSTMAutoencoder(config)
    frames = torch.rand(2, 6, 1, 8, 8)
    first, second = model(frames[:, :3], frames[:, 3:]), model(frames[:, :3], frames[:, 3:])
    assert not torch.equal(first.prediction, second.prediction)
    first.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    assert torch.equal(model.predict(frames[:, :3]), model.predict(frames[:, :3]))


def test_bf16_autocast_stays_close_to_fp32():
    config = ModelConfig(hidden_size=32, height=8, width=8, past_length=4, future_length=4)
    model = CompositeLSTMAutoencoder(config)
    frames = torch.rand(4, 8, 1, 8, 8)
    reference = model(frames[:, :4], frames[:, 4:])
    reference.loss.backward()
    reference_grad = model.encoder.weight_ih_l0.grad.clone()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(frames[:, :4], frames[:, 4:])
    assert output.loss.dtype == torch.float32
    output.loss.backward()
    assert output.loss.item() == pytest.approx(reference.loss.item(), rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(
        model.encoder.weight_ih_l0.grad.flatten(), reference_grad.flatten(), dim=0
    )
    assert cosine > 0.98


def tiny_model() -> CompositeLSTMAutoencoder:
    return CompositeLSTMAutoencoder(
        ModelConfig(hidden_size=16, height=8, width=8, past_length=3, future_length=3)
    )


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_weight_copies_follow_optimizer_steps_and_loads(fused):
    """After every step the bf16 outputs are those of a fresh model holding the same weights.

    Fused AdamW (the suite's optimizer) updates weights without moving their version counters."""
    model = tiny_model()
    frames = torch.rand(2, 6, 1, 8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(frames[:, :3], frames[:, 3:])
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        fresh = tiny_model()
        fresh.load_state_dict(model.state_dict())  # its own workspace, nothing kept yet
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model.predict(frames[:, :3]), fresh.predict(frames[:, :3]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.load_state_dict(tiny_model().state_dict())  # in-place copy: the copies must follow
        assert not torch.equal(model.predict(frames[:, :3]), fresh.predict(frames[:, :3]))


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_weight_copies_are_the_current_weights_in_memory_kept_between_steps(fused):
    model = tiny_model()
    copies = model.kernels.workspace.copies
    frames = torch.rand(2, 6, 1, 8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    addresses = None
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(frames[:, :3], frames[:, 3:])
        copied = {name: copies[p] for name, p in model.named_parameters() if p in copies}
        assert {"encoder.weight_ih_l0", "decoders.weight_hh_l0", "output_weight"} <= set(copied)
        for name, parameter in model.named_parameters():
            if name in copied:
                memory = copied[name].memory
                assert memory.dtype == torch.bfloat16, name
                assert torch.equal(memory, parameter.detach().bfloat16()), name
        now = {name: state.memory.data_ptr() for name, state in copied.items()}
        assert addresses is None or now == addresses  # the same memory: no weight-sized allocation
        addresses = now
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_bf16_copy_still_read_by_a_pending_backward_is_never_overwritten():
    """Two forward passes, the weights changed in between, one backward: each pass's own weights."""
    model = tiny_model()
    frames = torch.rand(2, 6, 1, 8, 8)
    before, after = tiny_model(), tiny_model()
    before.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(frames[:, :3], frames[:, 3:]).loss
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.data.mul_(0.5)  # through .data: no version counter moves
        after.load_state_dict(model.state_dict())
        second = model(frames[:, :3], frames[:, 3:]).loss
        (first + second).backward()
        before(frames[:, :3], frames[:, 3:]).loss.backward()
        after(frames[:, :3], frames[:, 3:]).loss.backward()
    for (name, parameter), old, new in zip(model.named_parameters(), before.parameters(), after.parameters()):
        torch.testing.assert_close(parameter.grad, old.grad + new.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_bf16_training_with_the_suites_optimizer_follows_fp32_training():
    config = ModelConfig(hidden_size=16, height=16, width=16, past_length=4, future_length=4)
    frames = torch.rand(8, 8, 1, 16, 16).round()
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = CompositeLSTMAutoencoder(config)
        optimizer = make_optimizer(model, OptimConfig(learning_rate=1e-2), torch.device("cpu"))
        scheduler = make_scheduler(optimizer, OptimConfig(learning_rate=1e-2, warmup_steps=0), 60)
        for step in range(60):
            result = train_step(model, optimizer, scheduler, [frames], config, precision, 1000.0, step)
        losses[precision] = result.loss
    assert losses["fp32"] < 0.8 * first_loss(config, frames)  # it learned
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def first_loss(config: ModelConfig, frames: torch.Tensor) -> float:
    torch.manual_seed(0)
    with torch.no_grad():
        return CompositeLSTMAutoencoder(config)(frames[:, :4], frames[:, 4:]).loss.item()


def test_weight_gradients_never_alias_live_gradients():
    model = tiny_model()
    frames = torch.rand(2, 6, 1, 8, 8)
    weight = model.decoders.weight_ih_l0

    def backward(scale: float = 1.0) -> None:
        (scale * model(frames[:, :3], frames[:, 3:]).loss).backward()

    backward()
    single = weight.grad.clone()
    backward()  # accumulation into a live .grad
    assert torch.allclose(weight.grad, 2 * single)
    model.zero_grad()
    (model(frames[:, :3], frames[:, 3:]).loss + model(frames[:, :3], frames[:, 3:]).loss).backward()
    assert torch.allclose(weight.grad, 2 * single, rtol=1e-5, atol=1e-7)  # two pending gradients
    held = weight.grad
    model.zero_grad()
    backward(scale=3.0)
    assert torch.allclose(held, 2 * single, rtol=1e-5, atol=1e-7)  # a gradient a user kept is untouched
    assert torch.allclose(weight.grad, 3 * single, rtol=1e-5, atol=1e-7)


def test_bf16_train_step_leaves_float32_gradients_with_bf16_weight_products():
    """What the module docstring's "Numerics" paragraph claims, after `engine.train_step`."""
    config = ModelConfig(hidden_size=16, num_layers=2, height=8, width=8, past_length=3, future_length=3)
    model = CompositeLSTMAutoencoder(config)
    optimizer = make_optimizer(model, OptimConfig(), torch.device("cpu"))
    scheduler = make_scheduler(optimizer, OptimConfig(), 10)
    gradients = {}

    def keep(parameter: torch.Tensor, name: str) -> None:
        gradients[name] = parameter.grad.clone()

    for name, parameter in model.named_parameters():
        parameter.register_post_accumulate_grad_hook(lambda parameter, name=name: keep(parameter, name))
    train_step(model, optimizer, scheduler, [torch.rand(2, 6, 1, 8, 8)], config, "bf16", 0.0, 0)
    assert set(gradients) == {name for name, _ in model.named_parameters()}
    for name, gradient in gradients.items():
        assert gradient.dtype == torch.float32, name
        bf16_values = torch.equal(gradient, gradient.bfloat16().float())
        # Weight matrices: one bf16 matmul over all rows, widened; biases: float32 sums.
        assert bf16_values == ("weight" in name), name


def gradients_of(model: CompositeLSTMAutoencoder, frames: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fresh-model gradients on a copy of `model`'s weights: what reused gradient memory must match."""
    fresh = CompositeLSTMAutoencoder(model.config).to(next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict())
    fresh(frames[:, :3], frames[:, 3:]).loss.backward()
    return {name: parameter.grad.clone() for name, parameter in fresh.named_parameters()}


def test_weight_gradient_memory_is_reused_once_the_previous_gradient_is_gone():
    model = tiny_model()
    frames = torch.rand(2, 6, 1, 8, 8)
    weight = model.decoders.weight_ih_l0
    model(frames[:, :3], frames[:, 3:]).loss.backward()
    address = weight.grad.data_ptr()
    model.zero_grad(set_to_none=True)
    model(frames[:, :3], frames[:, 3:]).loss.backward()
    assert weight.grad.data_ptr() == address  # the same memory, no new weight-sized allocation
    expected = gradients_of(model, frames)
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, expected[name], rtol=1e-5, atol=1e-7), name


def test_weight_gradient_memory_is_not_reused_while_anything_still_reads_it():
    model = tiny_model()
    frames = torch.rand(2, 6, 1, 8, 8)
    weight = model.decoders.weight_ih_l0

    def loss(scale: float = 1.0) -> torch.Tensor:
        return scale * model(frames[:, :3], frames[:, 3:]).loss

    loss().backward()
    single = weight.grad.clone()
    view = weight.grad.view(-1)  # a view keeps the gradient it views alive
    model.zero_grad(set_to_none=True)
    loss(2.0).backward()
    assert torch.equal(view, single.view(-1))
    del view
    (returned,) = torch.autograd.grad(loss(3.0), weight)  # handed to the caller, not to .grad
    loss(4.0).backward()
    assert torch.allclose(returned, 3 * single, rtol=1e-5, atol=1e-7)
    seen = []
    handle = weight.register_hook(lambda grad: seen.append(grad))  # a hook that keeps the gradient
    model.zero_grad(set_to_none=True)
    loss(5.0).backward()
    model.zero_grad(set_to_none=True)
    loss(6.0).backward()
    handle.remove()
    assert torch.allclose(seen[0], 5 * single, rtol=1e-5, atol=1e-7)
    assert torch.allclose(weight.grad, 6 * single, rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=False)  # accumulation into a kept .grad
    loss().backward()
    loss().backward()
    assert torch.allclose(weight.grad, 2 * single, rtol=1e-5, atol=1e-7)


def test_weight_gradient_memory_follows_conversions_and_state_dict_loads():
    model = tiny_model()
    frames = torch.rand(2, 6, 1, 8, 8)
    model(frames[:, :3], frames[:, 3:]).loss.backward()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(tiny_model().state_dict())  # new weights, same parameters
    model(frames[:, :3], frames[:, 3:]).loss.backward()
    expected = gradients_of(model, frames)
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, expected[name], rtol=1e-5, atol=1e-7), name
    model.zero_grad(set_to_none=True)
    model.to(torch.float64)  # same parameter objects, new dtype: new gradient memory
    frames = frames.double()
    model(frames[:, :3], frames[:, 3:]).loss.backward()
    expected = gradients_of(model, frames)
    for name, parameter in model.named_parameters():
        assert parameter.grad.dtype == torch.float64, name
        assert torch.allclose(parameter.grad, expected[name], rtol=1e-10, atol=1e-12), name
