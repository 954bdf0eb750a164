"""DDP without Ray, on gloo process groups: the bf16 all-reduce hook, and two processes against one."""

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


def _data_parallel_step(rank: int, world_size: int, store: str, precision: str, output: str) -> None:
    """One training step of rank `rank`'s half of the global batch under DDP (gloo)."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model, optimizer, scheduler, config, frames = _one_step_setup()
        share = frames.shape[0] // world_size
        ddp_model = DistributedDataParallel(model)
        own = frames[rank * share : (rank + 1) * share]
        train_step(ddp_model, optimizer, scheduler, [own], config.model, precision, 1.0, 0)
        if rank == 0:
            torch.save({name: value.detach() for name, value in model.state_dict().items()}, output)
    finally:
        dist.destroy_process_group()


def _one_step_setup():
    config = preset("smoke", hidden_size=24, num_layers=2)
    torch.manual_seed(0)
    model = CompositeLSTMAutoencoder(config.model)
    # SGD with lr 1: the update is minus the (all-reduced) gradient itself. (AdamW's first
    # step moves every weight by +-lr whatever the gradient's size, which would hide it.)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    frames = torch.rand(4, 20, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, optimizer, scheduler, config, frames


# The same sums in another order: fp32 agrees to rounding, bf16 matmuls to bf16's precision.
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 1e-2)])
def test_two_data_parallel_processes_update_the_weights_as_one_process_on_the_global_batch(
    tmp_path, precision, tolerance
):
    import torch.multiprocessing as multiprocessing

    output = tmp_path / "rank0.pt"
    multiprocessing.spawn(
        _data_parallel_step, args=(2, str(tmp_path / "store"), precision, str(output)), nprocs=2, join=True
    )
    model, optimizer, scheduler, config, frames = _one_step_setup()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    train_step(model, optimizer, scheduler, [frames], config.model, precision, 1.0, 0)
    parallel = torch.load(output)
    for name, single in model.state_dict().items():
        update, parallel_update = single - before[name], parallel[name] - before[name]
        scale = float(update.abs().max())
        assert scale > 0, f"{name} did not change"
        error = float((parallel_update - update).abs().max())
        assert error <= tolerance * scale, (
            f"{name}: data-parallel update differs by {error / scale:.2e} of its size"
        )
