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


def test_cuda_model_matches_the_cpu_model_in_fp32():
    config = ModelConfig(hidden_size=64, num_layers=2, height=16, width=16, past_length=5, future_length=5)
    cpu_model = CompositeLSTMAutoencoder(config)
    gpu_model = CompositeLSTMAutoencoder(config).cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    frames = torch.rand(4, 10, 1, 16, 16)
    cpu_output = cpu_model(frames[:, :5], frames[:, 5:])
    cpu_output.loss.backward()
    torch.backends.cuda.matmul.allow_tf32 = False  # compare true fp32
    gpu_output = gpu_model(frames[:, :5].cuda(), frames[:, 5:].cuda())
    gpu_output.loss.backward()
    assert gpu_output.loss.item() == pytest.approx(cpu_output.loss.item(), rel=1e-4)
    for cpu_parameter, gpu_parameter in zip(cpu_model.parameters(), gpu_model.parameters()):
        assert torch.allclose(cpu_parameter.grad, gpu_parameter.grad.cpu(), rtol=1e-3, atol=1e-5)
