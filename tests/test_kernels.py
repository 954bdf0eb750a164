"""The two kernel sets agree, and the model's kernels own their memory: nothing process-wide.

`kernel="fused"` (hand-written backward passes) and `kernel="autograd"` (plain PyTorch ops
stepped per frame) must give the same outputs and gradients from the same parameters. The
fused kernels keep memory between calls in a workspace owned by one model: two models in one
process, each with its own optimizer, train exactly as each does alone, and importing the
library registers nothing that reaches other code's optimizers.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import pickle
import subprocess
import sys
import weakref

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lstm_ae.config import ConfigError, ModelConfig, OptimConfig, add_config_arguments, config_from_arguments
from lstm_ae.engine import make_optimizer, make_scheduler, train_step, unwrap
from lstm_ae.model import CompositeLSTMAutoencoder
from lstm_ae.recurrence import (
    AutogradKernels,
    DecoderWeights,
    FusedKernels,
    Workspace,
    autograd_free_running_decoder,
    autograd_lstm_layer,
    autograd_project,
    free_running_decoder,
    lstm_layer,
    project,
)

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def small(**overrides) -> ModelConfig:
    values = dict(hidden_size=16, height=8, width=8, past_length=4, future_length=3)
    return ModelConfig(**{**values, **overrides})


def outputs_and_gradients(config: ModelConfig, frames: torch.Tensor, bf16: bool = False):
    """Loss, frames and parameter gradients of one forward and backward, from seed-0 weights."""
    torch.manual_seed(0)
    model = CompositeLSTMAutoencoder(config)
    torch.manual_seed(1)  # the same dropout masks for either kernel
    with torch.autocast(**BF16, enabled=bf16):
        output = model(frames[:, : config.past_length], frames[:, config.past_length :])
    output.loss.backward()
    gradients = {name: parameter.grad for name, parameter in model.named_parameters()}
    return output, gradients


def assert_gradients_close(fused: dict, autograd: dict, relative: float) -> None:
    assert fused.keys() == autograd.keys()
    for name in fused:
        scale = fused[name].abs().max().clamp_min(1e-12)
        error = ((fused[name] - autograd[name]).abs().max() / scale).item()
        assert error < relative, f"{name}: relative error {error:.2e}"


KERNEL_CASES = [
    dict(decoder_mode=mode, num_layers=layers, reconstruction_order=order)
    for mode, layers, order in itertools.product(("free", "conditioned"), (1, 2), ("reverse", "forward"))
] + [
    dict(num_layers=2, dropout=0.3),
    dict(num_layers=2, dropout=0.3, decoder_mode="conditioned"),
    dict(head="linear", reconstruction_weight=0.0),
    dict(num_layers=3, reconstruction_weight=1.0, decoder_mode="conditioned"),
]


@pytest.mark.parametrize("overrides", KERNEL_CASES)
def test_fused_and_autograd_kernels_agree_in_fp32(overrides):
    frames = torch.rand(3, 7, 1, 8, 8)
    fused, fused_gradients = outputs_and_gradients(small(**overrides), frames)
    autograd, autograd_gradients = outputs_and_gradients(small(kernel="autograd", **overrides), frames)
    assert fused.loss.item() == pytest.approx(autograd.loss.item(), rel=1e-6)
    for field in ("reconstruction", "prediction"):
        if getattr(fused, field) is not None:
            torch.testing.assert_close(getattr(fused, field), getattr(autograd, field), rtol=1e-6, atol=1e-7)
    assert_gradients_close(fused_gradients, autograd_gradients, relative=2e-6)


@pytest.mark.parametrize("overrides", [dict(), dict(num_layers=2, decoder_mode="conditioned")])
def test_fused_and_autograd_kernels_agree_under_bf16_autocast(overrides):
    """Same roundings in the forward; autograd sums each weight's per-step gradients in bf16
    where the fused kernels make one matmul over all steps, hence the looser gradient tolerance."""
    frames = torch.rand(3, 7, 1, 8, 8)
    fused, fused_gradients = outputs_and_gradients(small(**overrides), frames, bf16=True)
    autograd, autograd_gradients = outputs_and_gradients(
        small(kernel="autograd", **overrides), frames, bf16=True
    )
    assert fused.loss.item() == pytest.approx(autograd.loss.item(), rel=1e-4)
    torch.testing.assert_close(fused.prediction, autograd.prediction, rtol=1e-3, atol=1e-4)
    assert_gradients_close(fused_gradients, autograd_gradients, relative=3e-2)


def test_each_kernel_function_equals_its_autograd_twin_in_float64():
    torch.manual_seed(0)
    P, S, T, B, H, D, L = 1, 2, 4, 3, 5, 6, 2
    stacks = slice(1, 2)  # one of two stacks: the gradient of the other stays zero

    def weight(*shape):
        return (0.5 * torch.randn(*shape, dtype=torch.float64)).requires_grad_()

    inputs = torch.randn(P, T * B, D, dtype=torch.float64, requires_grad=True)
    w, b = weight(S, 4 * H, D), weight(S, 4 * H)
    input_gates = torch.randn(P, T, B, 4 * H, dtype=torch.float64, requires_grad=True)
    weight_hh = weight(S, 4 * H, H)
    h0, c0 = (torch.randn(P, B, H, dtype=torch.float64, requires_grad=True) for _ in range(2))
    decoder = DecoderWeights(
        weight_ih=(weight(S, 4 * H, D), weight(S, 4 * H, H)),
        weight_hh=(weight(S, 4 * H, H), weight(S, 4 * H, H)),
        bias=(weight(S, 4 * H), weight(S, 4 * H)),
        output_weight=weight(S, D, H),
        output_bias=weight(S, D),
    )
    states = [torch.randn(L, P, B, H, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    decode = dict(steps=T, logistic=True, dropout=0.4, stacks=stacks)
    pairs = [  # (fused, autograd, what to differentiate, (rtol, atol))
        (
            lambda: project(inputs, w, b, stacks),
            lambda: autograd_project(inputs, w, b, stacks),
            [inputs, w, b],
            (1e-5, 1e-6),  # project's matmuls run in float32 whatever the inputs
        ),
        (
            lambda: lstm_layer(input_gates, weight_hh, h0, c0, stacks),
            lambda: autograd_lstm_layer(input_gates, weight_hh, h0, c0, stacks),
            [input_gates, weight_hh, h0, c0],
            (1e-10, 1e-12),
        ),
        (
            lambda: free_running_decoder(decoder, *states, **decode),
            lambda: autograd_free_running_decoder(decoder, *states, **decode),
            [*states, *decoder.as_tensor_list()],
            (1e-10, 1e-12),
        ),
    ]
    for fused, autograd, differentiated, (rtol, atol) in pairs:
        results = []
        for function in (fused, autograd):
            torch.manual_seed(3)  # the same dropout masks
            outputs = function()
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            torch.manual_seed(4)
            total = sum((output * torch.randn_like(output)).sum() for output in outputs)
            results.append([*outputs, *torch.autograd.grad(total, differentiated)])
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def test_a_state_dict_trained_with_one_kernel_runs_identically_in_the_other():
    frames = torch.rand(2, 7, 1, 8, 8)
    trained = CompositeLSTMAutoencoder(small(kernel="autograd"))
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    for _ in range(2):
        trained(frames[:, :4], frames[:, 4:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    fused = CompositeLSTMAutoencoder(small())
    fused.load_state_dict(trained.state_dict())  # same names and shapes, strict
    with torch.no_grad():
        torch.testing.assert_close(
            fused.predict(frames[:, :4]), trained.predict(frames[:, :4]), rtol=1e-6, atol=1e-7
        )


def test_the_kernel_is_a_validated_config_field_with_its_own_flag():
    assert ModelConfig().kernel == "fused"
    with pytest.raises(ConfigError, match="^kernel must be one of fused, autograd, got 'cuda'"):
        ModelConfig(kernel="cuda")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    arguments = parser.parse_args(["--kernel", "autograd"])
    assert config_from_arguments(arguments, "smoke").model.kernel == "autograd"
    assert isinstance(CompositeLSTMAutoencoder(small(kernel="autograd")).kernels, AutogradKernels)
    assert isinstance(CompositeLSTMAutoencoder(small()).kernels, FusedKernels)


# ------------------------------------------------------------------------------ ownership


def train_interleaved(runs: list[tuple], steps: int, bf16: bool, unrelated: torch.optim.Optimizer | None):
    """Train each (model, optimizer, frames) run for `steps`, their phases interleaved.

    Every phase runs for all runs before the next begins: forward passes, then backward
    passes, then optimizer steps (with the unrelated optimizer stepping between them).
    """
    for _ in range(steps):
        losses = []
        for model, _, frames in runs:
            with torch.autocast(**BF16, enabled=bf16):
                losses.append(model(frames[:, :3], frames[:, 3:]).loss)
        for loss in losses:
            loss.backward()
        for _, optimizer, _ in runs:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if unrelated is not None:
                unrelated.param_groups[0]["params"][0].grad = torch.randn(5, 5)
                unrelated.step()


def fresh_run(seed: int) -> tuple:
    torch.manual_seed(seed)
    model = CompositeLSTMAutoencoder(small(past_length=3, future_length=3))
    optimizer = make_optimizer(model, OptimConfig(learning_rate=0.05), torch.device("cpu"))  # fused AdamW
    return model, optimizer, torch.rand(2, 6, 1, 8, 8)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_two_models_in_one_process_train_exactly_as_each_does_alone(bf16):
    """Same shapes on purpose: memory shared by shape, or copies refreshed on another model's
    step, would show here as a difference in the last bit."""
    steps = 4
    alone = []
    for seed in (1, 2):
        run = fresh_run(seed)
        train_interleaved([run], steps, bf16, unrelated=None)
        alone.append(run[0])
    together = [fresh_run(1), fresh_run(2)]
    other = torch.nn.Parameter(torch.randn(5, 5))
    unrelated = torch.optim.AdamW([other], lr=0.1, fused=True)
    train_interleaved(together, steps, bf16, unrelated)
    for reference, (model, _, _) in zip(alone, together):
        for (name, expected), actual in zip(reference.named_parameters(), model.parameters()):
            assert torch.equal(expected, actual), name
    first, second = (run[0] for run in together)
    assert first.kernels.workspace is not second.kernels.workspace


# Checked against torch 2.14.1: where torch keeps process-wide optimizer and module hooks.
TORCH_GLOBAL_HOOKS = """
import torch, torch.optim.optimizer as optim, torch.nn.modules.module as module
def hooks():
    return {
        "optimizer pre": len(optim._global_optimizer_pre_hooks),
        "optimizer post": len(optim._global_optimizer_post_hooks),
        **{name: len(getattr(module, name)) for name in (
            "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
            "_global_backward_hooks", "_global_module_registration_hooks",
            "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")},
    }
"""


@pytest.mark.slow
def test_importing_and_training_the_model_registers_nothing_process_wide():
    code = (
        TORCH_GLOBAL_HOOKS
        + """
before = hooks()
import lstm_ae.recurrence, lstm_ae.model, lstm_ae.engine
from lstm_ae.config import ModelConfig, OptimConfig
imported = hooks()
model = lstm_ae.model.CompositeLSTMAutoencoder(ModelConfig(hidden_size=8, height=4, width=4, past_length=2, future_length=2))
optimizer = lstm_ae.engine.make_optimizer(model, OptimConfig(), torch.device("cpu"))
frames = torch.rand(2, 4, 1, 4, 4)
for _ in range(2):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(frames[:, :2], frames[:, 2:]).loss.backward()
    optimizer.step()
print(before == imported == hooks(), sum(before.values()), sorted({k for p in model.parameters() for k in vars(p)}))
"""
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "0", "[]"], (
        result.stdout
    )  # and no attribute patched on parameters


@pytest.mark.parametrize("keep_parameters", [False, True])
def test_deleting_a_model_frees_its_workspace(keep_parameters):
    model = CompositeLSTMAutoencoder(small(past_length=3, future_length=3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    frames = torch.rand(2, 6, 1, 8, 8)
    with torch.autocast(**BF16):
        model(frames[:, :3], frames[:, 3:]).loss.backward()
    optimizer.step()
    workspace = weakref.ref(model.kernels.workspace)
    assert len(workspace().copies) > 0 and len(workspace().gradients) > 0
    parameters = list(model.parameters()) if keep_parameters else []  # the optimizer holds them too
    del model
    if not keep_parameters:
        del optimizer
    gc.collect()
    assert workspace() is None
    for parameter in parameters:  # parameters that outlive the model keep none of its hooks
        assert not parameter._post_accumulate_grad_hooks  # torch 2.14.1's attribute


def test_copies_and_pickles_of_a_model_get_their_own_empty_workspace():
    model = CompositeLSTMAutoencoder(small(past_length=3, future_length=3))
    frames = torch.rand(2, 6, 1, 8, 8)
    with torch.autocast(**BF16):
        model(frames[:, :3], frames[:, 3:]).loss.backward()
    for duplicate in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        workspace = duplicate.kernels.workspace
        assert isinstance(workspace, Workspace) and workspace is not model.kernels.workspace
        assert len(workspace.copies) == len(workspace.gradients) == 0
        with torch.autocast(**BF16):
            duplicate(frames[:, :3], frames[:, 3:]).loss.backward()
        for name, parameter in duplicate.named_parameters():
            torch.testing.assert_close(parameter.grad, dict(model.named_parameters())[name].grad, msg=name)


def test_a_model_wrapped_in_distributed_data_parallel_trains_as_the_bare_model():
    """One process, gloo, world size 1: DDP's hooks and reducer around the model's own memory."""
    config = small(past_length=3, future_length=3)
    optim_config = OptimConfig(learning_rate=0.05, warmup_steps=0)
    frames = torch.rand(2, 6, 1, 8, 8)
    results = {}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for wrapped in (False, True):
            torch.manual_seed(0)
            bare = CompositeLSTMAutoencoder(config)
            model = DistributedDataParallel(bare) if wrapped else bare
            assert unwrap(model) is bare
            optimizer = make_optimizer(model, optim_config, torch.device("cpu"))
            scheduler = make_scheduler(optimizer, optim_config, 3)
            for step in range(3):
                train_step(model, optimizer, scheduler, [frames, frames], config, "bf16", 1000.0, step)
            assert len(bare.kernels.workspace.copies) > 0
            results[wrapped] = [parameter.detach().clone() for parameter in bare.parameters()]
    finally:
        dist.destroy_process_group()
    for bare_parameter, wrapped_parameter in zip(results[False], results[True]):
        assert torch.equal(bare_parameter, wrapped_parameter)
