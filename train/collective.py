"""What the workers of a run compute together (torch.distributed; every rank calls these
the same number of times). Without a process group, or alone, a value is its own result.
Collectives run on the workers' device: NCCL (GPU workers) has no CPU tensors."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_mean(values: list[float], world_size: int, device: torch.device) -> list[float]:
    return [total / world_size for total in all_reduce(values, world_size, device)]


def all_reduce(values: list[float], world_size: int, device: torch.device, op=None) -> list[float]:
    """`values` combined over the workers (summed by default; `op` a dist.ReduceOp)."""
    if world_size == 1 or not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor.tolist()


def replica_checksums(model: torch.nn.Module, world_size: int) -> list[list[float]]:
    """Every rank's (sum, sum of squares) of all parameters: equal iff the replicas agree."""
    parameters = [parameter.detach().double() for parameter in model.parameters()]
    local = torch.tensor(
        [sum(float(p.sum()) for p in parameters), sum(float((p * p).sum()) for p in parameters)],
        dtype=torch.float64,
        device=parameters[0].device,
    )
    gathered = [torch.zeros_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    return [values.tolist() for values in gathered]
