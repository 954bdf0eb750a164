"""LSTM recurrences with hand-written backward passes: the fast path the model trains with.

Why not `nn.LSTM` stepped one frame at a time (the seed tutorial's way)? Autograd then computes a
full weight-gradient matrix at every time step and adds it into the accumulator: for small
batches that is a memory-bound pass over every weight per step. Here the time loops only
carry what truly is sequential (the hidden-to-hidden products and the gate math); every
weight gradient is computed once, after the loop, as one matmul over all T * B rows.

Three functions cover every use:

- `project(inputs, weight, bias)`: inputs times a weight for all steps at once (input
  projections of known inputs, output heads), with its own backward so that it, too, uses
  the cached low-precision weights.
- `lstm_layer(input_gates, weight_hh, h0, c0)`: one LSTM layer whose input projections are
  already known for all steps (the encoder, and decoders fed ground truth).
- `free_running_decoder(...)`: a stacked LSTM decoder whose input at each step is its own
  previous output frame (a zero frame first), with the gradient flowing through that
  feedback, as in the seed tutorial's model.

Weights are stored stacked, (S, ...) for S independent LSTMs, and each function takes a
`stacks` slice choosing which to run (the model runs its reconstruction and prediction
decoders together as S = 2). Gradients always have the full stacked shape.

Numerics: under `torch.autocast` with bfloat16, every matmul, forward and backward, runs in
bf16 (AMX on recent CPUs, tensor cores on GPUs): its operands are rounded to bf16, and its
product, accumulated in float32 inside the kernel, comes out in bf16 and is widened to
float32. Everything else is float32: gates, cell and hidden states, the gate math and its
gradients, the bias gradients (sums of float32 gate gradients), the optimizer. So after a
bf16 `lstm_ae.engine.train_step` every parameter's `.grad` is a float32 tensor, but the
weight-matrix gradients hold bf16 values (each is one bf16 matmul over all T * B rows,
widened), and the gradients carried back through time pick up bf16 rounding at each
step's matmul with the weights (tests/test_recurrence.py pins the dtypes and values).
The bf16 copy of each weight is made once per optimizer step into a persistent buffer (see
`matmul_copy`): on CPU a fresh weight-sized allocation costs more in page faults than the
cast itself. For the same reason each weight gradient is written into memory kept between
backward passes and reused only once nothing can read the previous gradient any more (see
`_gradient_tensor`). Gate order is PyTorch's (input, forget, cell, output).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

ALL = slice(None)


def matmul_dtype_for(reference: Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's lower precision when autocast is on, else the input's."""
    device_type = reference.device.type
    if reference.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return reference.dtype


_optimizer_steps = [0]  # optimizer steps taken in this process, by any optimizer


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


# Fused optimizers (the suite's AdamW) update parameters without moving their version
# counters, so a step is counted here, for every optimizer, as well.
register_optimizer_step_post_hook(_count_optimizer_step)


def matmul_copy(parameter: Tensor, dtype: torch.dtype) -> Tensor:
    """`parameter` cast to `dtype`, kept between calls until the parameter changes.

    The copy lives on the parameter object and is refreshed (in place, no new allocation)
    after any optimizer step (counted by a global optimizer hook: fused optimizers leave the
    version counter alone) and whenever the parameter's version counter has moved (a
    state-dict load, other in-place writes). Writes that bypass both (through `.data`) must
    call `parameter._matmul_copy = None`.
    """
    if parameter.dtype == dtype:
        return parameter
    key = (parameter._version, _optimizer_steps[0])
    cached = getattr(parameter, "_matmul_copy", None)
    if cached is not None and cached[1].dtype == dtype and cached[1].device == parameter.device:
        cached_key, copy = cached
        if cached_key == key:
            return copy
    else:
        copy = torch.empty_like(parameter, dtype=dtype)
    with torch.no_grad():
        copy.copy_(parameter)
    parameter._matmul_copy = (key, copy)
    return copy


_SCRATCH: dict[tuple, Tensor] = {}


class _GradientMemory:
    """The memory of one parameter's weight gradient, kept between backward passes.

    `lent` is a weak reference to the tensor last handed to autograd, `kept` one to the
    `.grad` that took over this memory (autograd steals a returned gradient into `.grad`
    when nobody else holds it, as a new tensor on the same memory). The memory is free again
    once both are gone: nobody can still read the old gradient through them or through a
    view of them (a view keeps its base alive).
    """

    __slots__ = ("memory", "lent", "kept")

    def __init__(self, memory: Tensor):
        self.memory = memory
        self.lent: weakref.ref | None = None
        self.kept: weakref.ref | None = None

    def reusable_for(self, parameter: Tensor) -> bool:
        memory = self.memory
        if (memory.shape, memory.dtype, memory.device) != (
            parameter.shape,
            parameter.dtype,
            parameter.device,
        ):
            return False
        if any(reference is not None and reference() is not None for reference in (self.lent, self.kept)):
            return False
        grad = parameter.grad  # also without the hook having run (the check below is cheap)
        return grad is None or grad.data_ptr() != memory.data_ptr()

    def shares(self, tensor: Tensor) -> bool:
        return tensor.device == self.memory.device and tensor.data_ptr() == self.memory.data_ptr()


_GRADIENT_MEMORY = WeakIdKeyDictionary()  # parameter -> _GradientMemory
_HOOKED = WeakIdKeyDictionary()  # parameter -> its post-accumulate-grad hook handle


def _after_accumulation(parameter: Tensor) -> None:
    """Post-accumulate-grad hook: note whether `.grad` now lives in the gradient memory."""
    state = _GRADIENT_MEMORY.get(parameter)
    grad = parameter.grad
    if state is not None and grad is not None and state.shares(grad):
        state.kept = weakref.ref(grad)


def _gradient_tensor(parameter: Tensor) -> Tensor:
    """A tensor shaped like `parameter` for autograd to receive as its gradient.

    On CPU a fresh weight-sized tensor per step costs page faults (and unmapping it later)
    of the order of the widening copy itself, so the memory is reused when it is provably
    free (see `_GradientMemory`): never while the previous gradient is reachable as `.grad`,
    as a pending or returned gradient (`torch.autograd.grad`, tensor hooks) or as a view of
    one. Not covered: an alias made without view tracking (`.detach()`, `.data`, `set_`)
    of a gradient that outlives the gradient itself; clone it instead. A parameter moved or
    converted (`.to`) gets new memory; a non-leaf input, and any parameter off the CPU,
    always gets a fresh tensor. The memory stays allocated between steps, as with
    `zero_grad(set_to_none=False)`.
    """
    if parameter.device.type != "cpu" or not (parameter.is_leaf and parameter.requires_grad):
        return torch.empty_like(parameter)  # CUDA's caching allocator recycles memory anyway
    state = _GRADIENT_MEMORY.get(parameter)
    if state is None or not state.reusable_for(parameter):
        state = _GRADIENT_MEMORY[parameter] = _GradientMemory(
            torch.empty(parameter.shape, dtype=parameter.dtype, device=parameter.device)
        )
        if parameter not in _HOOKED:
            _HOOKED[parameter] = parameter.register_post_accumulate_grad_hook(_after_accumulation)
    memory = state.memory
    alias = memory.new_empty(0).set_(memory.untyped_storage(), 0, memory.shape, memory.stride())
    state.lent, state.kept = weakref.ref(alias), None
    return alias


def _bmm(left: Tensor, right: Tensor, dtype: torch.dtype) -> Tensor:
    """Batched matmul in `dtype`, result in float32 (or the inputs' dtype when wider)."""
    product = torch.bmm(left.to(dtype), right.to(dtype))
    return product if dtype in (torch.float32, torch.float64) else product.float()


def _bmm_transposed(left: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """`left @ weight^T` for a few rows (P, B, in) and a stacked weight (P, out, in), like `_bmm`.

    Computed as (weight @ left^T)^T: for skinny products oneDNN's bf16 kernels run this
    orientation faster on CPU. The result is a transposed (column-major) view.
    """
    if left.device.type != "cpu":
        return _bmm(left, weight.transpose(1, 2), dtype)
    return _bmm(weight, left.transpose(1, 2), dtype).transpose(1, 2)


def _weight_gradient(
    grads: Tensor, inputs: Tensor, dtype: torch.dtype, parameter: Tensor, stacks: slice
) -> Tensor:
    """sum over rows of grads^T inputs: (P, N, out), (P, N, in) -> gradient shaped like `parameter`.

    One matmul over all N = T * B rows, written into the parameter's gradient memory (see
    `_gradient_tensor`); low-precision products go through a reused scratch buffer first.
    """
    left, right = grads.transpose(1, 2).to(dtype), inputs.to(dtype)
    gradient = _gradient_tensor(parameter)
    selected = gradient[stacks]
    if selected.shape != gradient.shape:
        gradient.zero_()
    if dtype == parameter.dtype:
        torch.bmm(left, right, out=selected)
    else:
        key = (selected.shape, dtype, left.device)
        scratch = _SCRATCH.get(key)
        if scratch is None:
            scratch = _SCRATCH[key] = torch.empty(selected.shape, dtype=dtype, device=left.device)
        selected.copy_(torch.bmm(left, right, out=scratch))
    return gradient


def _full_stacks(gradient: Tensor, parameter: Tensor, stacks: slice) -> Tensor:
    """A gradient of the selected stacks placed in a zero gradient of the whole parameter."""
    if gradient.shape == parameter.shape:
        return gradient
    full = torch.zeros_like(parameter)
    full[stacks] = gradient
    return full


def _cell_forward(pre_gates: Tensor, cell: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gate activations, new cell and new hidden state from pre-activations (P, B, 4H)."""
    hidden_size = cell.shape[-1]
    gates = torch.sigmoid(pre_gates)
    candidate = gates[..., 2 * hidden_size : 3 * hidden_size]
    torch.tanh(pre_gates[..., 2 * hidden_size : 3 * hidden_size], out=candidate)
    input_gate, forget_gate, _, output_gate = gates.chunk(4, dim=-1)
    new_cell = torch.addcmul(forget_gate * cell, input_gate, candidate)
    new_hidden = output_gate * torch.tanh(new_cell)
    return gates, new_cell, new_hidden


def _cell_backward(
    gates: Tensor, cell_prev: Tensor, cell: Tensor, grad_hidden: Tensor, grad_cell: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradient of the gate pre-activations (P, B, 4H) and of the previous cell state.

    `grad_hidden` and `grad_cell` are the total gradients reaching this step's h and c.
    """
    input_gate, forget_gate, candidate, output_gate = gates.chunk(4, dim=-1)
    tanh_cell = torch.tanh(cell)
    grad_cell = grad_cell + grad_hidden * output_gate * (1 - tanh_cell * tanh_cell)
    grad_pre = torch.empty_like(gates)
    grad_input, grad_forget, grad_candidate, grad_output = grad_pre.chunk(4, dim=-1)
    torch.mul(grad_cell * candidate, input_gate * (1 - input_gate), out=grad_input)
    torch.mul(grad_cell * cell_prev, forget_gate * (1 - forget_gate), out=grad_forget)
    torch.mul(grad_cell * input_gate, 1 - candidate * candidate, out=grad_candidate)
    torch.mul(grad_hidden * tanh_cell, output_gate * (1 - output_gate), out=grad_output)
    return grad_pre, grad_cell * forget_gate


def _rows(sequence: Tensor) -> Tensor:
    """(P, T, B, N) -> (P, T * B, N): all time steps as rows of one matmul."""
    return sequence.reshape(sequence.shape[0], -1, sequence.shape[-1])


# ------------------------------------------------------------------------------ projection


class _Projection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stacks, dtype, inputs, weight, bias):
        # inputs (P, N, in); weight (S, out, in); bias (S, out)
        weight_for_matmul = matmul_copy(weight, dtype)[stacks]
        outputs = _bmm(inputs, weight_for_matmul.transpose(1, 2), dtype)
        outputs += bias[stacks].unsqueeze(1)
        ctx.stacks, ctx.dtype = stacks, dtype
        ctx.save_for_backward(inputs, weight, weight_for_matmul, bias)
        return outputs

    @staticmethod
    def backward(ctx, grad_outputs):
        inputs, weight, weight_for_matmul, bias = ctx.saved_tensors
        stacks, dtype = ctx.stacks, ctx.dtype
        grad_inputs = None
        if ctx.needs_input_grad[2]:
            grad_inputs = _bmm(grad_outputs, weight_for_matmul, dtype).to(inputs.dtype)
        grad_weight = _weight_gradient(grad_outputs, inputs, dtype, weight, stacks)
        grad_bias = _full_stacks(grad_outputs.sum(dim=1), bias, stacks)
        return None, None, grad_inputs, grad_weight, grad_bias


def project(inputs: Tensor, weight: Tensor, bias: Tensor, stacks: slice = ALL) -> Tensor:
    """`inputs @ weight[stacks]^T + bias[stacks]` for every row, in the matmul dtype.

    Args:
        inputs: (P, N, in) rows (all time steps of a batch).
        weight: (S, out, in) stacked weights; bias: (S, out).
        stacks: which P of the S stacks to use.
    Returns:
        (P, N, out) float32.
    """
    return _Projection.apply(stacks, matmul_dtype_for(inputs.float()), inputs, weight, bias)


# ------------------------------------------------------------------------------ one layer


class _LayerRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stacks, dtype, input_gates, weight_hh, h0, c0):
        # input_gates (P, T, B, 4H); weight_hh (S, 4H, H); h0, c0 (P, B, H)
        steps = input_gates.shape[1]
        weight_for_matmul = matmul_copy(weight_hh, dtype)[stacks]  # (P, 4H, H)
        hidden = input_gates.new_empty(h0.shape[0], steps + 1, *h0.shape[1:])  # h0 at index 0
        cells = torch.empty_like(hidden)
        gates = torch.empty_like(input_gates)
        hidden[:, 0] = h0
        cells[:, 0] = c0
        for t in range(steps):
            pre_gates = input_gates[:, t] + _bmm_transposed(hidden[:, t], weight_for_matmul, dtype)
            gates[:, t], cells[:, t + 1], hidden[:, t + 1] = _cell_forward(pre_gates, cells[:, t])
        ctx.stacks, ctx.dtype = stacks, dtype
        ctx.save_for_backward(weight_hh, weight_for_matmul, hidden, cells, gates)
        return hidden[:, 1:].clone(), cells[:, steps].clone()

    @staticmethod
    def backward(ctx, grad_outputs, grad_last_cell):
        weight_hh, weight_for_matmul, hidden, cells, gates = ctx.saved_tensors
        dtype = ctx.dtype
        steps = gates.shape[1]
        grad_hidden = torch.zeros_like(hidden[:, 0])
        grad_cell = torch.zeros_like(cells[:, 0]) if grad_last_cell is None else grad_last_cell
        grad_gates = torch.empty_like(gates)
        for t in reversed(range(steps)):
            if grad_outputs is not None:
                grad_hidden = grad_hidden + grad_outputs[:, t]
            grad_gates[:, t], grad_cell = _cell_backward(
                gates[:, t], cells[:, t], cells[:, t + 1], grad_hidden, grad_cell
            )
            grad_hidden = _bmm(grad_gates[:, t], weight_for_matmul, dtype)
        # One matmul over all T * B rows: sum_t dG_t^T h_{t-1}.
        grad_weight = _weight_gradient(
            _rows(grad_gates), _rows(hidden[:, :steps]), dtype, weight_hh, ctx.stacks
        )
        return None, None, grad_gates, grad_weight, grad_hidden, grad_cell


def lstm_layer(
    input_gates: Tensor, weight_hh: Tensor, h0: Tensor, c0: Tensor, stacks: slice = ALL
) -> tuple[Tensor, Tensor]:
    """Run P LSTM layers over T steps given their input projections.

    Args:
        input_gates: (P, T, B, 4H) float, `x_t @ W_ih^T + bias` for every step.
        weight_hh: (S, 4H, H) stacked hidden-to-hidden weights; `stacks` picks P of them.
        h0, c0: (P, B, H) initial states.
    Returns:
        hidden states (P, T, B, H) of every step, and the last cell state (P, B, H).
    """
    return _LayerRecurrence.apply(stacks, matmul_dtype_for(input_gates), input_gates, weight_hh, h0, c0)


# ------------------------------------------------------------------------------ free-running decoder


@dataclass(frozen=True)
class DecoderWeights:
    """Stacked weights of S decoders with L layers each (the parameters themselves).

    weight_ih[l]: (S, 4H, input size of layer l); weight_hh[l]: (S, 4H, H); bias[l]: (S, 4H);
    output_weight: (S, D, H); output_bias: (S, D).
    """

    weight_ih: tuple[Tensor, ...]
    weight_hh: tuple[Tensor, ...]
    bias: tuple[Tensor, ...]
    output_weight: Tensor
    output_bias: Tensor

    def as_tensor_list(self) -> list[Tensor]:
        return [*self.weight_ih, *self.weight_hh, *self.bias, self.output_weight, self.output_bias]


class _FreeRunningDecoder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, steps, logistic, dropout, stacks, dtype, h0, c0, *parameters):
        # h0, c0: (L, P, B, H); parameters: DecoderWeights.as_tensor_list() (full stacks)
        num_layers = h0.shape[0]
        weight_ih = [matmul_copy(w, dtype)[stacks] for w in parameters[:num_layers]]
        weight_hh = [matmul_copy(w, dtype)[stacks] for w in parameters[num_layers : 2 * num_layers]]
        bias = [b[stacks] for b in parameters[2 * num_layers : 3 * num_layers]]
        output_weight = matmul_copy(parameters[3 * num_layers], dtype)[stacks]  # (P, D, H)
        output_bias = parameters[3 * num_layers + 1][stacks]
        P, B, H = h0.shape[1:]
        D = output_weight.shape[1]

        hidden = h0.new_empty(num_layers, P, steps + 1, B, H)  # h_{t-1} at index t
        cells = torch.empty_like(hidden)
        gates = h0.new_empty(num_layers, P, steps, B, 4 * H)
        frames = h0.new_empty(P, steps, B, D)  # fed-back outputs: sigmoid(logits) or logits
        logits = h0.new_empty(P, steps, B, D)
        masks = None
        if dropout > 0 and num_layers > 1:
            keep = h0.new_full((num_layers - 1, P, steps, B, H), 1 - dropout)
            masks = torch.bernoulli(keep).div_(1 - dropout)
        hidden[:, :, 0] = h0
        cells[:, :, 0] = c0
        for t in range(steps):
            layer_input = frames[:, t - 1] if t > 0 else None  # a zero frame at t = 0
            for layer in range(num_layers):
                pre_gates = _bmm_transposed(hidden[layer, :, t], weight_hh[layer], dtype)
                pre_gates += bias[layer].unsqueeze(1)
                if layer_input is not None:
                    pre_gates += _bmm_transposed(layer_input, weight_ih[layer], dtype)
                (
                    gates[layer, :, t],
                    cells[layer, :, t + 1],
                    hidden[layer, :, t + 1],
                ) = _cell_forward(pre_gates, cells[layer, :, t])
                layer_input = hidden[layer, :, t + 1]
                if masks is not None and layer < num_layers - 1:
                    layer_input = layer_input * masks[layer, :, t]
            logits[:, t] = _bmm_transposed(layer_input, output_weight, dtype)
            logits[:, t] += output_bias.unsqueeze(1)
            frames[:, t] = torch.sigmoid(logits[:, t]) if logistic else logits[:, t]
        ctx.steps, ctx.logistic, ctx.stacks, ctx.dtype = steps, logistic, stacks, dtype
        ctx.num_layers = num_layers
        ctx.save_for_backward(
            hidden, cells, gates, frames, masks, *weight_ih, *weight_hh, output_weight, *parameters
        )
        return logits

    @staticmethod
    def backward(ctx, grad_logits):
        steps, num_layers, dtype, stacks = ctx.steps, ctx.num_layers, ctx.dtype, ctx.stacks
        hidden, cells, gates, frames, masks, *saved = ctx.saved_tensors
        weight_ih = saved[:num_layers]  # matmul copies of the selected stacks
        weight_hh = saved[num_layers : 2 * num_layers]
        output_weight = saved[2 * num_layers]
        parameters = saved[2 * num_layers + 1 :]

        grad_hidden = [torch.zeros_like(hidden[0, :, 0]) for _ in range(num_layers)]
        grad_cell = [torch.zeros_like(cells[0, :, 0]) for _ in range(num_layers)]
        grad_gates = torch.empty_like(gates)
        grad_logits_total = torch.empty_like(grad_logits)
        grad_feedback = None  # gradient reaching the frame fed back at step t (made at t - 1)
        for t in reversed(range(steps)):
            grad_step_logits = grad_logits[:, t]
            if grad_feedback is not None:
                frame = frames[:, t]
                derivative = frame * (1 - frame) if ctx.logistic else 1.0
                grad_step_logits = grad_step_logits + grad_feedback * derivative
            grad_logits_total[:, t] = grad_step_logits
            grad_hidden[-1] = grad_hidden[-1] + _bmm(grad_step_logits, output_weight, dtype)
            grad_feedback = None
            for layer in reversed(range(num_layers)):
                grad_gates[layer, :, t], grad_cell[layer] = _cell_backward(
                    gates[layer, :, t],
                    cells[layer, :, t],
                    cells[layer, :, t + 1],
                    grad_hidden[layer],
                    grad_cell[layer],
                )
                step_grad_gates = grad_gates[layer, :, t].to(dtype)  # cast once for both products
                grad_hidden[layer] = _bmm(step_grad_gates, weight_hh[layer], dtype)
                if layer > 0:
                    grad_below = _bmm(step_grad_gates, weight_ih[layer], dtype)
                    if masks is not None:
                        grad_below = grad_below * masks[layer - 1, :, t]
                    grad_hidden[layer - 1] = grad_hidden[layer - 1] + grad_below
                elif t > 0:
                    grad_feedback = _bmm(step_grad_gates, weight_ih[0], dtype)

        # Weight gradients: one matmul per weight over all T * B rows.
        grad_weight_ih, grad_weight_hh, grad_bias = [], [], []
        for layer in range(num_layers):
            layer_grad_gates = grad_gates[layer]  # (P, T, B, 4H)
            if layer == 0:  # inputs are the fed-back frames; the zero frame at t = 0 adds nothing
                inputs, grads = frames[:, : steps - 1], layer_grad_gates[:, 1:]
            else:
                inputs = hidden[layer - 1, :, 1:]
                if masks is not None:
                    inputs = inputs * masks[layer - 1]
                grads = layer_grad_gates
            grad_weight_ih.append(
                _weight_gradient(_rows(grads), _rows(inputs), dtype, parameters[layer], stacks)
            )
            grad_weight_hh.append(
                _weight_gradient(
                    _rows(layer_grad_gates),
                    _rows(hidden[layer, :, :steps]),
                    dtype,
                    parameters[num_layers + layer],
                    stacks,
                )
            )
            grad_bias.append(
                _full_stacks(layer_grad_gates.sum(dim=(1, 2)), parameters[2 * num_layers + layer], stacks)
            )
        top_hidden = hidden[-1, :, 1:]  # the head sees the top layer without dropout
        grad_output_weight = _weight_gradient(
            _rows(grad_logits_total), _rows(top_hidden), dtype, parameters[3 * num_layers], stacks
        )
        grad_output_bias = _full_stacks(
            grad_logits_total.sum(dim=(1, 2)), parameters[3 * num_layers + 1], stacks
        )
        return (
            None,
            None,
            None,
            None,
            None,
            torch.stack(grad_hidden),
            torch.stack(grad_cell),
            *grad_weight_ih,
            *grad_weight_hh,
            *grad_bias,
            grad_output_weight,
            grad_output_bias,
        )


def free_running_decoder(
    weights: DecoderWeights,
    h0: Tensor,
    c0: Tensor,
    steps: int,
    logistic: bool,
    dropout: float = 0.0,
    stacks: slice = ALL,
) -> Tensor:
    """Run P stacked LSTM decoders that feed their own output back as the next input.

    The first input is a zero frame; each later input is the previous output frame
    (`sigmoid(logits)` for the logistic head, the logits themselves for the linear head),
    and gradients flow through that feedback.

    Args:
        weights: the decoders' stacked weights (see DecoderWeights); `stacks` picks P of S.
        h0, c0: (L, P, B, H) initial states of every layer.
        steps: frames to generate.
        logistic: the output head (sigmoid) or a linear one.
        dropout: dropout probability between stacked layers (pass 0 at evaluation).
    Returns:
        logits (P, steps, B, D) of every generated frame.
    """
    return _FreeRunningDecoder.apply(
        steps, logistic, float(dropout), stacks, matmul_dtype_for(h0), h0, c0, *weights.as_tensor_list()
    )
