"""DDP without Ray: the bf16 all-reduce communication hook on a gloo process group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from lstm_ae.config import preset
from lstm_ae.engine import make_optimizer, make_scheduler, train_step
from lstm_ae.model import CompositeLSTMAutoencoder


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_bf16_allreduce_hook_trains_like_fp32_allreduce(gloo_group):
    config = preset("smoke", hidden_size=16)
    frames = torch.rand(2, 20, 1, 64, 64)

    def one_step(bf16_allreduce: bool):
        torch.manual_seed(0)
        model = DistributedDataParallel(CompositeLSTMAutoencoder(config.model))
        if bf16_allreduce:
            model.register_comm_hook(dist.group.WORLD, default_hooks.bf16_compress_hook)
        optimizer = make_optimizer(model, config.optim, torch.device("cpu"))
        scheduler = make_scheduler(optimizer, config.optim, 10)
        result = train_step(model, optimizer, scheduler, [frames], config.model, "fp32", 0.0, 0)
        return result.grad_norm

    exact, compressed = one_step(False), one_step(True)
    assert compressed == pytest.approx(exact, rel=1e-2) and compressed != exact
