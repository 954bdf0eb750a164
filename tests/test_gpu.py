"""CUDA paths: skipped cleanly where there is no GPU (CI never has one)."""

from __future__ import annotations

import pytest
import torch

from lstm_ae.config import ModelConfig, preset
from lstm_ae.model import CompositeLSTMAutoencoder
from train.session import LocalSession
from train.worker import train_function

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bf16_training_on_one_gpu_lowers_the_validation_loss(tmp_path):
    config = preset("smoke", precision="bf16", cache_dir=str(tmp_path / "data"))
    session = LocalSession(device="cuda")
    state = train_function({"config": config.to_dict()}, session)
    validations = [
        report["val_bce_nats_frame"] for report in session.reports if "val_bce_nats_frame" in report
    ]
    assert state.step == config.training.max_steps and validations[-1] < validations[0]


@pytest.fixture
def ieee_fp32_matmuls():
    """CUDA matmuls in true fp32 (no TF32) during one test; the process-wide setting is restored.

    Torch versions with `fp32_precision` refuse to read the legacy `allow_tf32` once the two
    APIs have been mixed, so the new API is used (and restored) where it exists.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        name, true_fp32 = "fp32_precision", "ieee"
    else:
        name, true_fp32 = "allow_tf32", False
    saved = getattr(matmul, name)
    setattr(matmul, name, true_fp32)
    try:
        yield
    finally:
        setattr(matmul, name, saved)


@pytest.mark.usefixtures("ieee_fp32_matmuls")
def test_cuda_model_matches_the_cpu_model_in_fp32():
    config = ModelConfig(hidden_size=64, num_layers=2, height=16, width=16, past_length=5, future_length=5)
    cpu_model = CompositeLSTMAutoencoder(config)
    gpu_model = CompositeLSTMAutoencoder(config).cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    frames = torch.rand(4, 10, 1, 16, 16)
    cpu_output = cpu_model(frames[:, :5], frames[:, 5:])
    cpu_output.loss.backward()
    gpu_output = gpu_model(frames[:, :5].cuda(), frames[:, 5:].cuda())
    gpu_output.loss.backward()
    assert gpu_output.loss.item() == pytest.approx(cpu_output.loss.item(), rel=1e-4)
    for cpu_parameter, gpu_parameter in zip(cpu_model.parameters(), gpu_model.parameters()):
        assert torch.allclose(cpu_parameter.grad, gpu_parameter.grad.cpu(), rtol=1e-3, atol=1e-5)


def test_a_model_that_trained_on_the_cpu_trains_on_the_gpu():
    """`.cuda()` keeps the parameter objects: nothing cached on them may stay on the CPU."""
    config = ModelConfig(hidden_size=32, height=8, width=8, past_length=3, future_length=3)
    model = CompositeLSTMAutoencoder(config)
    frames = torch.rand(2, 6, 1, 8, 8)
    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = model(frames[:, :3], frames[:, 3:])
        output.loss.backward()
        model.zero_grad(set_to_none=True)
    model.cuda()
    frames = frames.cuda()
    for precision in ("fp32", "bf16"):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = model(frames[:, :3], frames[:, 3:])
        output.loss.backward()
        assert all(parameter.grad.is_cuda for parameter in model.parameters()), precision
        assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters()), precision
        model.zero_grad(set_to_none=True)
