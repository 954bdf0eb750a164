"""Operators dispatched per time step: the budget that keeps the recurrence from creeping.

Each operator is at least one kernel launch on a GPU, and a time step's operators run in
series, so their count bounds how fast a small-batch step can go there. Counted with a
`TorchDispatchMode` over one forward and backward of a one-layer model at 3 and at 2 frames
on each side: the difference is what one more time step of the encoder and both decoders
costs (everything outside the time loops cancels out, such as the fused kernels' bf16 weight
copies and the memory a new model's workspace allocates). Views (select, transpose) count too.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lstm_ae.config import ModelConfig
from lstm_ae.model import CompositeLSTMAutoencoder

# fp32, one layer, free-running decoders, the fused kernels (`kernel="fused"`): per-step views
# taken once, results written into their buffers, one fused multiply-add per product, the
# backward's gate factors for all steps at once. Lower it when the count falls, never raise it.
OPERATORS_PER_TIME_STEP = 30
# The same under bf16 autocast: the states' and gradients' bf16 copies for the matmuls and the
# widening of each product add operators the fused fp32 path has not.
OPERATORS_PER_TIME_STEP_BF16 = 44


class OperatorCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.operators: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def operators(frames_each_side: int, bf16: bool = False, **overrides) -> collections.Counter:
    """Operators of one forward and backward on (B=2) sequences of 4x4 frames (bf16: under autocast)."""
    config = ModelConfig(
        hidden_size=8,
        height=4,
        width=4,
        past_length=frames_each_side,
        future_length=frames_each_side,
        **overrides,
    )
    model = CompositeLSTMAutoencoder(config)
    frames = torch.rand(2, 2 * frames_each_side, 1, 4, 4)
    with OperatorCount() as count, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        output = model(frames[:, :frames_each_side], frames[:, frames_each_side:])
        output.loss.backward()
    return count.operators


def per_time_step(**overrides) -> tuple[int, dict[str, int]]:
    longer, shorter = operators(3, **overrides), operators(2, **overrides)
    difference = {name: longer[name] - shorter[name] for name in longer | shorter}
    return sum(difference.values()), {name: count for name, count in difference.items() if count}


def test_operators_per_time_step_stay_within_the_budget():
    count, by_operator = per_time_step()
    assert count <= OPERATORS_PER_TIME_STEP, f"{count} operators per time step: {by_operator}"


def test_bf16_operators_per_time_step_stay_within_the_budget():
    count, by_operator = per_time_step(bf16=True)
    assert count <= OPERATORS_PER_TIME_STEP_BF16, f"{count} operators per time step: {by_operator}"


def test_the_count_is_per_time_step_whatever_the_length():
    """The difference is the same from 3 to 4 frames as from 2 to 3 (nothing grows faster)."""
    assert sum(operators(4).values()) - sum(operators(3).values()) == per_time_step()[0]
