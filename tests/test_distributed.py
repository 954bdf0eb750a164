"""DDP without Ray, on gloo process groups: the bf16 all-reduce hook, and two processes against one."""

from __future__ import annotations

import contextlib
from datetime import timedelta

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


@contextlib.contextmanager
def rank_group(backend: str, store: str, rank: int, world_size: int):
    """This spawned process's rank in a process group, torn down in step with the others.

    The ranks meet at a barrier before they destroy the group, and at a file rendezvous after
    it, before any of them may exit: a process that exits closes its sockets, and a peer still
    inside a collective or inside its own teardown then reads "connection reset" on gloo's I/O
    thread, where the exception is uncaught and the peer aborts (SIGABRT). Where the body
    raises, the group is destroyed and the error goes up without waiting for the others.
    """
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exits = dist.FileStore(f"{store}.exits", world_size)
    exits.set(f"rank{rank}", "done")
    exits.wait([f"rank{other}" for other in range(world_size)], timedelta(seconds=120))


def _data_parallel_step(rank: int, world_size: int, store: str, precision: str, output: str) -> None:
    """One training step of rank `rank`'s half of the global batch under DDP (gloo)."""
    torch.set_num_threads(1)
    with rank_group("gloo", store, rank, world_size):
        model, optimizer, scheduler, config, frames = _one_step_setup()
        share = frames.shape[0] // world_size
        ddp_model = DistributedDataParallel(model)
        own = frames[rank * share : (rank + 1) * share]
        train_step(ddp_model, optimizer, scheduler, [own], config.model, precision, 1.0, 0)
        if rank == 0:
            torch.save({name: value.detach() for name, value in model.state_dict().items()}, output)


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
@pytest.mark.slow
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels, split the same way
    try:
        train_step(model, optimizer, scheduler, [frames], config.model, precision, 1.0, 0)
    finally:
        torch.set_num_threads(threads)
    parallel = torch.load(output)
    for name, single in model.state_dict().items():
        update, parallel_update = single - before[name], parallel[name] - before[name]
        scale = float(update.abs().max())
        assert scale > 0, f"{name} did not change"
        error = float((parallel_update - update).abs().max())
        assert error <= tolerance * scale, (
            f"{name}: data-parallel update differs by {error / scale:.2e} of its size"
        )


class GlooSession:
    """One rank of a run on a gloo process group, without Ray: DDP, checkpoints in a folder
    (rank 0 writes them), and a loss made infinite on `poisoned_rank` at `poisoned_step`
    (plus inf: the gradients stay finite, so only this rank's loss shows it)."""

    def __init__(
        self, rank: int, world_size: int, checkpoint_root: str, poisoned_rank: int, poisoned_step: int
    ):
        self.world_rank, self.world_size = rank, world_size
        self.device = torch.device("cpu")
        self.checkpoint_root = checkpoint_root
        self.poisoned_rank, self.poisoned_step = poisoned_rank, poisoned_step
        self.checkpoints: list[int] = []

    def prepare_model(self, model):
        forward_calls = [0]

        def poison(module, inputs, output):
            forward_calls[0] += 1  # one training forward per step (no accumulation)
            if self.world_rank == self.poisoned_rank and forward_calls[0] - 1 == self.poisoned_step:
                output.loss = output.loss + float("inf")
            return output

        model.register_forward_hook(poison)
        return DistributedDataParallel(model)

    def latest_checkpoint(self):
        import contextlib

        return contextlib.nullcontext(None)

    def report(self, metrics, checkpoint_dir, step):
        import shutil

        if checkpoint_dir:  # the session owns it: moved into place
            shutil.move(checkpoint_dir, f"{self.checkpoint_root}/checkpoint_{step:08d}")
            self.checkpoints.append(step)


def _poisoned_run(rank: int, world_size: int, store: str, folder: str, poisoned_step: int) -> None:
    """`train_function` on one rank of a gloo group; writes the error it stopped with."""
    from pathlib import Path

    from lstm_ae.engine import NonFiniteLossError
    from train.worker import WorkerSettings, loop_config, train_function

    torch.set_num_threads(1)
    outcome = Path(folder) / f"rank{rank}.txt"
    with rank_group("gloo", store, rank, world_size):
        config = preset(
            "smoke",
            hidden_size=16,
            checkpoint_every=2,
            eval_every=2,
            log_every=1,
            probe_sequences=0,
            cache_dir=f"{folder}/data",
        )
        session = GlooSession(rank, world_size, folder, poisoned_rank=1, poisoned_step=poisoned_step)
        try:
            train_function(loop_config(config, WorkerSettings(threads=1, quiet=True)), session)
            outcome.write_text("finished")
        except NonFiniteLossError as error:
            outcome.write_text(f"NonFiniteLossError: {error}")


@pytest.mark.slow
def test_a_loss_gone_bad_on_one_rank_stops_every_rank_with_the_same_error(tmp_path):
    """Rank 1's loss is infinite at step 3 while every gradient is finite: both ranks stop at
    that step with the same one-line error (no rank steps on into a collective that hangs),
    and no checkpoint is written after the bad step."""
    import torch.multiprocessing as multiprocessing

    from lstm_ae.data import build_test_set

    config = preset("smoke", hidden_size=16, cache_dir=str(tmp_path / "data"))
    build_test_set(config.model, config.data)  # once, not by both ranks at the same time
    multiprocessing.spawn(
        _poisoned_run, args=(2, str(tmp_path / "store"), str(tmp_path), 3), nprocs=2, join=True
    )
    errors = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert errors[0] == errors[1], errors
    assert errors[0].startswith("NonFiniteLossError: non-finite loss at step 3: loss on rank 1 of 2")
    assert "\n" not in errors[0]
    checkpoints = sorted(path.name for path in tmp_path.glob("checkpoint_*"))
    assert checkpoints == ["checkpoint_00000002"]  # step 2's, before the bad step; none after
