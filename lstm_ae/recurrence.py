"""LSTM recurrences, twice: hand-written kernels the model trains with, and the same maths in autograd.

Why not `nn.LSTM` stepped one frame at a time (the seed tutorial's way)? Autograd then computes a
full weight-gradient matrix at every time step and adds it into the accumulator: for small
batches that is a memory-bound pass over every weight per step. Here the time loops only
carry what truly is sequential (the hidden-to-hidden products and the gate math); every
weight gradient is computed once, after the loop, as one matmul over all T * B rows.

Three functions cover every use:

- `project(inputs, weight, bias)`: inputs times a weight for all steps at once (input
  projections of known inputs, output heads), with its own backward so that it, too, uses
  the low-precision weight copies.
- `lstm_layer(input_gates, weight_hh, h0, c0)`: one LSTM layer whose input projections are
  already known for all steps (the encoder, and decoders fed ground truth).
- `free_running_decoder(...)`: a stacked LSTM decoder whose input at each step is its own
  previous output frame (a zero frame first), with the gradient flowing through that
  feedback, as in the seed tutorial's model.

`autograd_project`, `autograd_lstm_layer` and `autograd_free_running_decoder` (at the end) are
the same three in plain PyTorch ops, a time step at a time, differentiated by autograd: the
readable definition of what the kernels compute (tests/test_kernels.py holds them equal), and
the model's `kernel="autograd"`. `FusedKernels` and `AutogradKernels` offer each set under the
same method names.

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
Gate order is PyTorch's (input, forget, cell, output).

Memory: on CPU a fresh weight-sized allocation costs more in page faults than the work done
in it, so the kernels keep the memory of each weight's bf16 copy and of each weight gradient
between calls, in a `Workspace` that belongs to one model (`FusedKernels` makes one; the
model holds it, so it is freed with the model and never shared with another). The bf16 copy
is written afresh from the parameter at every call, so it is the current weight whatever
changed it (any optimizer, fused ones included, which leave the version counter alone; a
state-dict load; writes through `.data`); memory is reused only once nothing can read what it
held before (see `_Memory`). Called without a workspace, the kernels allocate everything anew.
Nothing here registers anything process-wide: the only hooks are post-accumulate-grad hooks
on the parameters whose gradient memory a workspace keeps, removed when the workspace goes.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

ALL = slice(None)


def matmul_dtype_for(reference: Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's lower precision when autocast is on, else the input's."""
    device_type = reference.device.type
    if reference.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return reference.dtype


# ------------------------------------------------------------------------------ memory


class _Memory:
    """One tensor's memory, lent out again and again as fresh aliases of it.

    `lent` is a weak reference to the alias last handed out, `kept` one to the `.grad` that
    took that alias's memory over (autograd steals a returned gradient into `.grad` when
    nobody else holds it, as a new tensor on the same memory). The memory is free again once
    both are gone: nobody can still read what it held through them or through a view of them
    (a view keeps its base alive; a tensor saved for a backward pass keeps it alive until
    that backward has run).
    """

    __slots__ = ("memory", "lent", "kept")

    def __init__(self, memory: Tensor):
        self.memory = memory
        self.lent: weakref.ref | None = None
        self.kept: weakref.ref | None = None

    def fits(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> bool:
        memory = self.memory
        return (memory.shape, memory.dtype, memory.device) == (shape, dtype, device)

    def free(self) -> bool:
        return all(reference is None or reference() is None for reference in (self.lent, self.kept))

    def shares(self, tensor: Tensor) -> bool:
        return tensor.device == self.memory.device and tensor.data_ptr() == self.memory.data_ptr()

    def lend(self) -> Tensor:
        memory = self.memory
        alias = memory.new_empty(0).set_(memory.untyped_storage(), 0, memory.shape, memory.stride())
        self.lent, self.kept = weakref.ref(alias), None
        return alias


class _FreshMemory:
    """What the kernels use without a workspace: every buffer newly allocated, nothing kept."""

    def matmul_copy(self, parameter: Tensor, dtype: torch.dtype) -> Tensor:
        """`parameter` as the matmuls read it: cast to `dtype` (the parameter itself if it is in `dtype`)."""
        return parameter if parameter.dtype == dtype else parameter.detach().to(dtype)

    def gradient_tensor(self, parameter: Tensor) -> Tensor:
        """A tensor shaped like `parameter` for autograd to receive as its gradient."""
        return torch.empty_like(parameter)

    def scratch(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A buffer the caller reads back before it returns."""
        return torch.empty(shape, dtype=dtype, device=device)


_FRESH = _FreshMemory()  # stateless


class Workspace(_FreshMemory):
    """The memory one model's kernels keep between calls: bf16 weight copies, weight gradients, scratch.

    Memory is kept for CPU tensors only (CUDA's caching allocator recycles memory anyway).
    Keyed by the parameter objects, weakly: a parameter that goes away takes its memory along.
    A copy or pickle of a workspace is a new, empty one, so two models never share one.
    """

    def __init__(self) -> None:
        self.copies = WeakIdKeyDictionary()  # parameter -> _Memory of its bf16 copy
        self.gradients = WeakIdKeyDictionary()  # parameter -> _Memory of its weight gradient
        self._hooks = WeakIdKeyDictionary()  # parameter -> its post-accumulate-grad hook handle
        self._scratch: dict[tuple, Tensor] = {}

    def __reduce__(self):
        return (Workspace, ())

    def __del__(self) -> None:
        for handle in list(self._hooks.values()):
            handle.remove()

    def matmul_copy(self, parameter: Tensor, dtype: torch.dtype) -> Tensor:
        """`parameter` cast to `dtype`, written at every call into memory kept between calls.

        One cast per weight per forward pass (a training step makes one forward pass); in
        exchange no rule has to decide when a kept copy went stale, which the model could not
        observe after a fused optimizer step: the copy is the parameter's current value after
        any update. The memory is reused once nothing can read the previous copy (a graph not
        yet backpropagated keeps it), else new.
        """
        if parameter.dtype == dtype or parameter.device.type != "cpu":
            return super().matmul_copy(parameter, dtype)
        state = self.copies.get(parameter)
        if state is None or not (state.fits(parameter.shape, dtype, parameter.device) and state.free()):
            state = self.copies[parameter] = _Memory(
                torch.empty(parameter.shape, dtype=dtype, device=parameter.device)
            )
        copy = state.lend()
        with torch.no_grad():
            copy.copy_(parameter)
        return copy

    def gradient_tensor(self, parameter: Tensor) -> Tensor:
        """A tensor shaped like `parameter` for autograd to receive as its gradient, in kept memory.

        The memory is reused only when it is provably free (see `_Memory`): never while the
        previous gradient is reachable as `.grad`, as a pending or returned gradient
        (`torch.autograd.grad`, tensor hooks) or as a view of one. Not covered: an alias made
        without view tracking (`.detach()`, `.data`, `set_`) of a gradient that outlives the
        gradient itself; clone it instead. A parameter moved or converted (`.to`) gets new
        memory; a non-leaf input, and any parameter off the CPU, always gets a fresh tensor.
        The memory stays allocated between steps, as with `zero_grad(set_to_none=False)`.
        """
        if parameter.device.type != "cpu" or not (parameter.is_leaf and parameter.requires_grad):
            return super().gradient_tensor(parameter)
        state = self.gradients.get(parameter)
        grad = parameter.grad  # also without the hook having run (the check is cheap)
        if (
            state is None
            or not (state.fits(parameter.shape, parameter.dtype, parameter.device) and state.free())
            or (grad is not None and state.shares(grad))
        ):
            state = self.gradients[parameter] = _Memory(
                torch.empty(parameter.shape, dtype=parameter.dtype, device=parameter.device)
            )
            if parameter not in self._hooks:
                self._hooks[parameter] = parameter.register_post_accumulate_grad_hook(
                    functools.partial(_note_kept_gradient, weakref.ref(self))
                )
        return state.lend()

    def scratch(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A buffer the caller reads back before it returns, kept for the next call of that shape."""
        key = (shape, dtype, device)
        buffer = self._scratch.get(key)
        if buffer is None:
            buffer = self._scratch[key] = torch.empty(shape, dtype=dtype, device=device)
        return buffer


def _note_kept_gradient(workspace: weakref.ref, parameter: Tensor) -> None:
    """Post-accumulate-grad hook: note whether `.grad` now lives in the workspace's gradient memory."""
    owner = workspace()
    state = owner.gradients.get(parameter) if owner is not None else None
    grad = parameter.grad
    if state is not None and grad is not None and state.shares(grad):
        state.kept = weakref.ref(grad)


def _bmm(left: Tensor, right: Tensor, dtype: torch.dtype) -> Tensor:
    """Batched matmul in `dtype`, result in float32 (or the inputs' dtype when wider)."""
    product = torch.bmm(left.to(dtype), right.to(dtype))
    return product if dtype in (torch.float32, torch.float64) else product.float()


def _weight_gradient(
    grads: Tensor, inputs: Tensor, dtype: torch.dtype, parameter: Tensor, stacks: slice, memory: _FreshMemory
) -> Tensor:
    """sum over rows of grads^T inputs: (P, N, out), (P, N, in) -> gradient shaped like `parameter`.

    One matmul over all N = T * B rows, written into the parameter's gradient memory (see
    `Workspace.gradient_tensor`); low-precision products go through a scratch buffer first.
    """
    left, right = grads.transpose(1, 2).to(dtype), inputs.to(dtype)
    gradient = memory.gradient_tensor(parameter)
    selected = gradient[stacks]
    if selected.shape != gradient.shape:
        gradient.zero_()
    if dtype == parameter.dtype:
        torch.bmm(left, right, out=selected)
    else:
        selected.copy_(torch.bmm(left, right, out=memory.scratch(selected.shape, dtype, left.device)))
    return gradient


def _full_stacks(gradient: Tensor, parameter: Tensor, stacks: slice) -> Tensor:
    """A gradient of the selected stacks placed in a zero gradient of the whole parameter."""
    if gradient.shape == parameter.shape:
        return gradient
    full = torch.zeros_like(parameter)
    full[stacks] = gradient
    return full


def _steps(sequence: Tensor) -> tuple[Tensor, ...]:
    """(P, T, ...) -> T views (P, ...), taken once before a time loop: one operator, not T."""
    return sequence.unbind(1)


def _quarters(gates: Tensor) -> tuple[Tensor, ...]:
    """(..., 4H) -> views (..., H) of the input, forget, cell and output gates."""
    return gates.unflatten(-1, (4, -1)).unbind(-2)


class _Matmul:
    """Products with one stacked weight (P, out, in) inside a time loop, into reused buffers.

    In the states' own precision each product and its addend are one fused operator
    (`baddbmm`). In a lower one (bf16 autocast) the product runs in that dtype into a reused
    buffer, and one operator widens it into the float32 result while adding the addend: the
    same values as `_bmm` followed by an add. On CPU the forward product is computed as
    (weight @ left^T)^T, the orientation oneDNN's bf16 kernels run faster,
    so its left operands are the transposed views `operands` returns.
    """

    def __init__(self, weight: Tensor, low: bool, rows: int):
        self.weight, self.low = weight, low  # weight: the matmul copy, (P, out, in)
        self.weight_t = weight.transpose(1, 2)
        P, out_size, in_size = weight.shape
        self.transposed = low and weight.device.type == "cpu"
        if low:
            shape = (P, out_size, rows) if self.transposed else (P, rows, out_size)
            self.product = weight.new_empty(shape)
            self.product_rows = self.product.transpose(1, 2) if self.transposed else self.product
            self.gradient_product = weight.new_empty(P, rows, in_size)

    def operands(self, sequence: Tensor) -> tuple[Tensor, ...]:
        """Per-step left operands of `forward` from a (P, T, B, in) sequence in the matmul dtype."""
        return _steps(sequence.transpose(-1, -2) if self.transposed else sequence)

    def forward(self, operand: Tensor, addend: Tensor, out: Tensor) -> None:
        """out = addend + left @ weight^T, (P, B, out); `addend` may be `out` itself."""
        if not self.low:
            if addend is out:
                out.baddbmm_(operand, self.weight_t)
            else:
                torch.baddbmm(addend, operand, self.weight_t, out=out)
            return
        if self.transposed:
            torch.bmm(self.weight, operand, out=self.product)
        else:
            torch.bmm(operand, self.weight_t, out=self.product)
        if addend is out:
            out.add_(self.product_rows)
        else:
            torch.add(addend, self.product_rows, out=out)

    def backward(self, grads: Tensor, addend: Tensor | None, out: Tensor) -> None:
        """out = addend + grads @ weight, (P, B, in); grads (P, B, out) in the matmul dtype."""
        if not self.low:
            if addend is None:
                torch.bmm(grads, self.weight, out=out)
            elif addend is out:
                out.baddbmm_(grads, self.weight)
            else:
                torch.baddbmm(addend, grads, self.weight, out=out)
            return
        torch.bmm(grads, self.weight, out=self.gradient_product)
        if addend is None:
            out.copy_(self.gradient_product)
        elif addend is out:
            out.add_(self.gradient_product)
        else:
            torch.add(addend, self.gradient_product, out=out)

    def gradient(self, grads: Tensor) -> Tensor:
        """grads @ weight into a reused buffer (in the matmul dtype), for the caller to combine."""
        if not self.low:
            return torch.bmm(grads, self.weight)
        return torch.bmm(grads, self.weight, out=self.gradient_product)


class _Cells:
    """One layer's states over T steps and per-step views of them, taken once before the loop.

    hidden, cells: (P, T + 1, B, H), the initial state at index 0; gates: (P, T, B, 4H), the
    activations; tanh_cells: (P, T, B, H), tanh(cells[:, 1:]), kept for the backward.
    """

    def __init__(self, hidden: Tensor, cells: Tensor, gates: Tensor, tanh_cells: Tensor):
        self.hidden, self.cells, self.gates, self.tanh_cells = hidden, cells, gates, tanh_cells
        self.hidden_steps, self.cell_steps = _steps(hidden), _steps(cells)
        self.gate_steps, self.tanh_steps = _steps(gates), _steps(tanh_cells)
        self.input_steps, self.forget_steps, self.candidate_steps, self.output_steps = (
            _steps(gate) for gate in _quarters(gates)
        )

    def step(self, t: int, pre_gates: Tensor, pre_candidate: Tensor) -> None:
        """Gates t, cell t + 1 and hidden t + 1 from pre-activations (P, B, 4H) and their cell slice."""
        torch.sigmoid(pre_gates, out=self.gate_steps[t])
        torch.tanh(pre_candidate, out=self.candidate_steps[t])
        cell = torch.mul(self.forget_steps[t], self.cell_steps[t], out=self.cell_steps[t + 1])
        cell.addcmul_(self.input_steps[t], self.candidate_steps[t])
        torch.tanh(cell, out=self.tanh_steps[t])
        torch.mul(self.output_steps[t], self.tanh_steps[t], out=self.hidden_steps[t + 1])


class _CellGradients:
    """The backward of `_Cells`: ~4 operators a step, the rest computed for all steps at once.

    Before the loop `grad_gates` (P, T, B, 4H) is filled with each gate's derivative times what
    multiplies it: [c~ i(1-i), c_prev f(1-f), i(1-c~^2), tanh(c) o(1-o)], and `cell_factor`
    with o (1 - tanh(c)^2); a step then scales them by the gradients reaching c and h.
    """

    def __init__(self, cells: _Cells, grad_gates: Tensor):
        steps = cells.gates.shape[1]
        input_gate, forget_gate, candidate, output_gate = _quarters(cells.gates)
        tanh_cells = cells.tanh_cells
        torch.neg(cells.gates, out=grad_gates).add_(1).mul_(cells.gates)  # s (1 - s)
        grad_input, grad_forget, grad_candidate, grad_output = _quarters(grad_gates)
        grad_input.mul_(candidate)
        grad_forget.mul_(cells.cells[:, :steps])
        torch.mul(candidate, candidate, out=grad_candidate).neg_().add_(1).mul_(input_gate)
        grad_output.mul_(tanh_cells)
        cell_factor = torch.mul(tanh_cells, tanh_cells).neg_().add_(1).mul_(output_gate)
        self.grad_gate_steps = _steps(grad_gates)
        self.cell_gate_steps = _steps(grad_gates.unflatten(-1, (4, -1))[..., :3, :])  # (P, B, 3, H)
        self.output_steps = _steps(grad_output)
        self.cell_factor_steps = _steps(cell_factor)
        self.forget_steps = cells.forget_steps

    def step(self, t: int, grad_hidden: Tensor, grad_cell: Tensor, grad_cell_gates: Tensor) -> None:
        """Gradients of step t's pre-activations (into grad_gates) and of cell t - 1 (in place).

        grad_hidden, grad_cell: (P, B, H), the total gradients reaching h_t and c_t;
        grad_cell_gates: `grad_cell.unsqueeze(-2)`, made once.
        """
        grad_cell.addcmul_(grad_hidden, self.cell_factor_steps[t])
        self.cell_gate_steps[t].mul_(grad_cell_gates)
        self.output_steps[t].mul_(grad_hidden)
        grad_cell.mul_(self.forget_steps[t])


def _low_copy(sequence: Tensor, dtype: torch.dtype, low: bool) -> Tensor:
    """A buffer like `sequence` in the matmul dtype (`sequence` itself when no cast is needed)."""
    return torch.empty_like(sequence, dtype=dtype) if low else sequence


def _rows(sequence: Tensor) -> Tensor:
    """(P, T, B, N) -> (P, T * B, N): all time steps as rows of one matmul."""
    return sequence.reshape(sequence.shape[0], -1, sequence.shape[-1])


# ------------------------------------------------------------------------------ projection


class _Projection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stacks, dtype, memory, inputs, weight, bias):
        # inputs (P, N, in); weight (S, out, in); bias (S, out)
        weight_for_matmul = memory.matmul_copy(weight, dtype)[stacks]
        outputs = _bmm(inputs, weight_for_matmul.transpose(1, 2), dtype)
        outputs += bias[stacks].unsqueeze(1)
        ctx.stacks, ctx.dtype, ctx.memory = stacks, dtype, memory
        ctx.save_for_backward(inputs, weight, weight_for_matmul, bias)
        return outputs

    @staticmethod
    def backward(ctx, grad_outputs):
        inputs, weight, weight_for_matmul, bias = ctx.saved_tensors
        stacks, dtype = ctx.stacks, ctx.dtype
        grad_inputs = None
        if ctx.needs_input_grad[3]:  # inputs
            grad_inputs = _bmm(grad_outputs, weight_for_matmul, dtype).to(inputs.dtype)
        grad_weight = _weight_gradient(grad_outputs, inputs, dtype, weight, stacks, ctx.memory)
        grad_bias = _full_stacks(grad_outputs.sum(dim=1), bias, stacks)
        return None, None, None, grad_inputs, grad_weight, grad_bias


def project(
    inputs: Tensor, weight: Tensor, bias: Tensor, stacks: slice = ALL, workspace: Workspace | None = None
) -> Tensor:
    """`inputs @ weight[stacks]^T + bias[stacks]` for every row, in the matmul dtype.

    Args:
        inputs: (P, N, in) rows (all time steps of a batch).
        weight: (S, out, in) stacked weights; bias: (S, out).
        stacks: which P of the S stacks to use.
        workspace: the memory to keep between calls (None: allocate anew).
    Returns:
        (P, N, out) float32.
    """
    memory = _FRESH if workspace is None else workspace
    return _Projection.apply(stacks, matmul_dtype_for(inputs.float()), memory, inputs, weight, bias)


# ------------------------------------------------------------------------------ one layer


class _LayerRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stacks, dtype, memory, input_gates, weight_hh, h0, c0):
        # input_gates (P, T, B, 4H); weight_hh (S, 4H, H); h0, c0 (P, B, H)
        P, steps, B, _ = input_gates.shape
        low = dtype != input_gates.dtype
        weight_for_matmul = memory.matmul_copy(weight_hh, dtype)[stacks]  # (P, 4H, H)
        hidden = input_gates.new_empty(P, steps + 1, B, h0.shape[-1])  # h0 at index 0
        cells = torch.empty_like(hidden)
        gates = torch.empty_like(input_gates)
        tanh_cells = torch.empty_like(hidden[:, 1:])
        hidden[:, 0] = h0
        cells[:, 0] = c0
        hidden_low = _low_copy(hidden, dtype, low)  # the hidden states as the matmuls read them
        if low:
            hidden_low[:, 0] = h0
        state = _Cells(hidden, cells, gates, tanh_cells)
        matmul = _Matmul(weight_for_matmul, low, B)
        operands, hidden_low_steps = matmul.operands(hidden_low), _steps(hidden_low)
        input_steps = _steps(input_gates)
        pre_gates = torch.empty_like(gates[:, 0])  # (P, B, 4H), reused every step
        pre_candidate = _quarters(pre_gates)[2]
        for t in range(steps):
            matmul.forward(operands[t], input_steps[t], pre_gates)
            state.step(t, pre_gates, pre_candidate)
            if low and t < steps - 1:
                hidden_low_steps[t + 1].copy_(state.hidden_steps[t + 1])
        ctx.stacks, ctx.dtype, ctx.memory = stacks, dtype, memory
        ctx.save_for_backward(
            weight_hh, weight_for_matmul, hidden, cells, gates, tanh_cells, hidden_low if low else None
        )
        return hidden[:, 1:].clone(), cells[:, steps].clone()

    @staticmethod
    def backward(ctx, grad_outputs, grad_last_cell):
        weight_hh, weight_for_matmul, hidden, cells, gates, tanh_cells, hidden_low = ctx.saved_tensors
        dtype = ctx.dtype
        low = hidden_low is not None
        hidden_low = hidden if hidden_low is None else hidden_low
        _, steps, B, _ = gates.shape
        grad_gates = torch.empty_like(gates)
        gradients = _CellGradients(_Cells(hidden, cells, gates, tanh_cells), grad_gates)
        grad_gates_low = _low_copy(grad_gates, dtype, low)
        grad_low_steps = _steps(grad_gates_low)
        matmul = _Matmul(weight_for_matmul, low, B)
        if grad_outputs is None:
            grad_hidden, grad_output_steps = torch.zeros_like(hidden[:, 0]), None
        else:
            grad_hidden, grad_output_steps = grad_outputs[:, steps - 1].clone(), _steps(grad_outputs)
        grad_cell = torch.zeros_like(cells[:, 0]) if grad_last_cell is None else grad_last_cell.clone()
        grad_cell_gates = grad_cell.unsqueeze(-2)
        for t in reversed(range(steps)):
            gradients.step(t, grad_hidden, grad_cell, grad_cell_gates)
            if low:
                grad_low_steps[t].copy_(gradients.grad_gate_steps[t])
            # The gradient reaching h_{t-1}: through the recurrence, plus the output's own.
            addend = grad_output_steps[t - 1] if grad_output_steps is not None and t > 0 else None
            matmul.backward(grad_low_steps[t], addend, grad_hidden)
        # One matmul over all T * B rows: sum_t dG_t^T h_{t-1}.
        grad_weight = _weight_gradient(
            _rows(grad_gates_low), _rows(hidden_low[:, :steps]), dtype, weight_hh, ctx.stacks, ctx.memory
        )
        return None, None, None, grad_gates, grad_weight, grad_hidden, grad_cell


def lstm_layer(
    input_gates: Tensor,
    weight_hh: Tensor,
    h0: Tensor,
    c0: Tensor,
    stacks: slice = ALL,
    workspace: Workspace | None = None,
) -> tuple[Tensor, Tensor]:
    """Run P LSTM layers over T steps given their input projections.

    Args:
        input_gates: (P, T, B, 4H) float, `x_t @ W_ih^T + bias` for every step.
        weight_hh: (S, 4H, H) stacked hidden-to-hidden weights; `stacks` picks P of them.
        h0, c0: (P, B, H) initial states.
        workspace: the memory to keep between calls (None: allocate anew).
    Returns:
        hidden states (P, T, B, H) of every step, and the last cell state (P, B, H).
    """
    memory = _FRESH if workspace is None else workspace
    return _LayerRecurrence.apply(
        stacks, matmul_dtype_for(input_gates), memory, input_gates, weight_hh, h0, c0
    )


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


def _dropout_masks(h0: Tensor, steps: int, dropout: float) -> Tensor | None:
    """Inverted-dropout masks (L - 1, P, steps, B, H) of the inputs of layers 2..L, drawn at once.

    h0: (L, P, B, H). None without dropout or without a second layer.
    """
    num_layers, P, B, H = h0.shape
    if dropout == 0 or num_layers == 1:
        return None
    keep = h0.new_full((num_layers - 1, P, steps, B, H), 1 - dropout)
    return torch.bernoulli(keep).div_(1 - dropout)


class _FreeRunningDecoder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, steps, logistic, dropout, stacks, dtype, memory, h0, c0, *parameters):
        # h0, c0: (L, P, B, H); parameters: DecoderWeights.as_tensor_list() (full stacks)
        num_layers = h0.shape[0]
        low = dtype != h0.dtype
        weight_ih = [memory.matmul_copy(w, dtype)[stacks] for w in parameters[:num_layers]]
        weight_hh = [memory.matmul_copy(w, dtype)[stacks] for w in parameters[num_layers : 2 * num_layers]]
        # Biases in the states' dtype, (P, 1, 4H) and (P, 1, D), to be added as fused addends.
        bias = [b[stacks].to(h0.dtype).unsqueeze(1) for b in parameters[2 * num_layers : 3 * num_layers]]
        output_weight = memory.matmul_copy(parameters[3 * num_layers], dtype)[stacks]  # (P, D, H)
        output_bias = parameters[3 * num_layers + 1][stacks].to(h0.dtype).unsqueeze(1)
        P, B, H = h0.shape[1:]
        D = output_weight.shape[1]

        hidden = h0.new_empty(num_layers, P, steps + 1, B, H)  # h_{t-1} at index t
        cells = torch.empty_like(hidden)
        gates = h0.new_empty(num_layers, P, steps, B, 4 * H)
        tanh_cells = h0.new_empty(num_layers, P, steps, B, H)
        logits = h0.new_empty(P, steps, B, D)
        frames = h0.new_empty(P, steps, B, D) if logistic else logits  # the fed-back outputs
        masks = _dropout_masks(h0, steps, dropout)
        dropped = None if masks is None else torch.empty_like(masks, dtype=dtype)  # masked layer inputs
        hidden[:, :, 0] = h0
        cells[:, :, 0] = c0
        hidden_low = _low_copy(hidden, dtype, low)  # states and frames as the matmuls read them
        frames_low = _low_copy(frames, dtype, low)
        if low:
            hidden_low[:, :, 0] = h0

        layers = range(num_layers)
        states = [_Cells(hidden[layer], cells[layer], gates[layer], tanh_cells[layer]) for layer in layers]
        recurrent = [_Matmul(weight_hh[layer], low, B) for layer in layers]
        inward = [_Matmul(weight_ih[layer], low, B) for layer in layers]
        head = _Matmul(output_weight, low, B)
        hidden_operands = [recurrent[layer].operands(hidden_low[layer]) for layer in layers]
        layer_inputs = [frames_low] + [
            dropped[layer - 1] if masks is not None else hidden_low[layer - 1, :, 1:] for layer in layers[1:]
        ]  # layer 0 at step t reads the frame of step t - 1
        input_operands = [inward[layer].operands(layer_inputs[layer]) for layer in layers]
        top_operands = head.operands(hidden_low[-1, :, 1:])
        hidden_low_steps = [_steps(hidden_low[layer]) for layer in layers]
        mask_steps = [_steps(mask) for mask in masks] if masks is not None else None
        dropped_steps = [_steps(inputs) for inputs in dropped] if masks is not None else None
        logit_steps, frame_steps, frame_low_steps = _steps(logits), _steps(frames), _steps(frames_low)
        pre_gates = h0.new_empty(P, B, 4 * H)  # reused every step
        pre_candidate = _quarters(pre_gates)[2]
        for t in range(steps):
            for layer in layers:
                recurrent[layer].forward(hidden_operands[layer][t], bias[layer], pre_gates)
                if layer > 0:
                    inward[layer].forward(input_operands[layer][t], pre_gates, pre_gates)
                elif t > 0:  # a zero frame at t = 0 adds nothing
                    inward[0].forward(input_operands[0][t - 1], pre_gates, pre_gates)
                states[layer].step(t, pre_gates, pre_candidate)
                if low:
                    hidden_low_steps[layer][t + 1].copy_(states[layer].hidden_steps[t + 1])
                if masks is not None and layer < num_layers - 1:
                    torch.mul(
                        states[layer].hidden_steps[t + 1], mask_steps[layer][t], out=dropped_steps[layer][t]
                    )
            head.forward(top_operands[t], output_bias, logit_steps[t])
            if logistic:
                torch.sigmoid(logit_steps[t], out=frame_steps[t])
            if low and t < steps - 1:
                frame_low_steps[t].copy_(frame_steps[t])
        ctx.steps, ctx.logistic, ctx.stacks, ctx.dtype, ctx.memory = steps, logistic, stacks, dtype, memory
        ctx.num_layers, ctx.low = num_layers, low
        ctx.save_for_backward(
            hidden,
            cells,
            gates,
            tanh_cells,
            frames if logistic else None,
            masks,
            dropped,
            hidden_low if low else None,
            frames_low,
            *weight_ih,
            *weight_hh,
            output_weight,
            *parameters,
        )
        return logits

    @staticmethod
    def backward(ctx, grad_logits):
        steps, num_layers, dtype, stacks, low = ctx.steps, ctx.num_layers, ctx.dtype, ctx.stacks, ctx.low
        memory = ctx.memory
        hidden, cells, gates, tanh_cells, frames, masks, dropped, hidden_low, frames_low, *saved = (
            ctx.saved_tensors
        )
        weight_ih = saved[:num_layers]  # matmul copies of the selected stacks
        weight_hh = saved[num_layers : 2 * num_layers]
        output_weight = saved[2 * num_layers]
        parameters = saved[2 * num_layers + 1 :]
        hidden_low = hidden if hidden_low is None else hidden_low
        B = gates.shape[3]
        layers = range(num_layers)

        grad_hidden = [torch.zeros_like(hidden[0, :, 0]) for _ in layers]
        grad_cell = [torch.zeros_like(cells[0, :, 0]) for _ in layers]
        grad_cell_gates = [grad.unsqueeze(-2) for grad in grad_cell]
        grad_gates = torch.empty_like(gates)
        gradients = [
            _CellGradients(
                _Cells(hidden[layer], cells[layer], gates[layer], tanh_cells[layer]), grad_gates[layer]
            )
            for layer in layers
        ]
        grad_gates_low = _low_copy(grad_gates, dtype, low)
        grad_low_steps = [_steps(grad_gates_low[layer]) for layer in layers]
        recurrent = [_Matmul(weight_hh[layer], low, B) for layer in layers]
        inward = [_Matmul(weight_ih[layer], low, B) for layer in layers]
        head = _Matmul(output_weight, low, B)
        mask_steps = [_steps(mask) for mask in masks] if masks is not None else None
        grad_logits_total = grad_logits.clone()  # plus what comes back through the fed-back frames
        grad_total_low = _low_copy(grad_logits_total, dtype, low)
        total_steps, total_low_steps = _steps(grad_logits_total), _steps(grad_total_low)
        if ctx.logistic:  # d frame / d logits for every step at once
            derivative_steps = _steps(torch.neg(frames).add_(1).mul_(frames))
        grad_feedback = torch.empty_like(grad_logits[:, 0])  # reaching the frame fed back at t + 1
        for t in reversed(range(steps)):
            if t < steps - 1:
                if ctx.logistic:
                    total_steps[t].addcmul_(grad_feedback, derivative_steps[t])
                else:
                    total_steps[t].add_(grad_feedback)
            if low:
                total_low_steps[t].copy_(total_steps[t])
            head.backward(total_low_steps[t], grad_hidden[-1], grad_hidden[-1])
            for layer in reversed(layers):
                gradients[layer].step(t, grad_hidden[layer], grad_cell[layer], grad_cell_gates[layer])
                if low:
                    grad_low_steps[layer][t].copy_(gradients[layer].grad_gate_steps[t])
                step_grads = grad_low_steps[layer][t]
                recurrent[layer].backward(step_grads, None, grad_hidden[layer])
                if layer > 0:
                    if masks is not None:
                        grad_hidden[layer - 1].addcmul_(
                            inward[layer].gradient(step_grads), mask_steps[layer - 1][t]
                        )
                    else:
                        inward[layer].backward(step_grads, grad_hidden[layer - 1], grad_hidden[layer - 1])
                elif t > 0:
                    inward[0].backward(step_grads, None, grad_feedback)

        # Weight gradients: one matmul per weight over all T * B rows.
        grad_weight_ih, grad_weight_hh, grad_bias = [], [], []
        for layer in layers:
            layer_grads = grad_gates_low[layer]  # (P, T, B, 4H)
            if layer == 0:  # inputs are the fed-back frames; the zero frame at t = 0 adds nothing
                inputs, grads = frames_low[:, : steps - 1], layer_grads[:, 1:]
            else:
                inputs = dropped[layer - 1] if masks is not None else hidden_low[layer - 1, :, 1:]
                grads = layer_grads
            grad_weight_ih.append(
                _weight_gradient(_rows(grads), _rows(inputs), dtype, parameters[layer], stacks, memory)
            )
            grad_weight_hh.append(
                _weight_gradient(
                    _rows(layer_grads),
                    _rows(hidden_low[layer, :, :steps]),
                    dtype,
                    parameters[num_layers + layer],
                    stacks,
                    memory,
                )
            )
            grad_bias.append(
                _full_stacks(grad_gates[layer].sum(dim=(1, 2)), parameters[2 * num_layers + layer], stacks)
            )
        top_hidden = hidden_low[-1, :, 1:]  # the head sees the top layer without dropout
        grad_output_weight = _weight_gradient(
            _rows(grad_total_low), _rows(top_hidden), dtype, parameters[3 * num_layers], stacks, memory
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
    workspace: Workspace | None = None,
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
        workspace: the memory to keep between calls (None: allocate anew).
    Returns:
        logits (P, steps, B, D) of every generated frame.
    """
    memory = _FRESH if workspace is None else workspace
    return _FreeRunningDecoder.apply(
        steps,
        logistic,
        float(dropout),
        stacks,
        matmul_dtype_for(h0),
        memory,
        h0,
        c0,
        *weights.as_tensor_list(),
    )


# ------------------------------------------------------------------------------ the same in autograd


def _cell_step(pre_gates: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM step from pre-activations (P, B, 4H) and the previous cell (P, B, H): (h, c)."""
    input_gate, forget_gate, candidate, output_gate = _quarters(pre_gates)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
    return torch.sigmoid(output_gate) * torch.tanh(cell), cell


def autograd_project(inputs: Tensor, weight: Tensor, bias: Tensor, stacks: slice = ALL) -> Tensor:
    """`project` in plain PyTorch ops (same arguments, same result)."""
    product = _bmm(inputs, weight[stacks].transpose(1, 2), matmul_dtype_for(inputs.float()))
    return product + bias[stacks].unsqueeze(1).to(product.dtype)


def autograd_lstm_layer(
    input_gates: Tensor, weight_hh: Tensor, h0: Tensor, c0: Tensor, stacks: slice = ALL
) -> tuple[Tensor, Tensor]:
    """`lstm_layer` in plain PyTorch ops, one time step after the other (same arguments, same result)."""
    dtype = matmul_dtype_for(input_gates)
    weight = weight_hh[stacks].to(dtype).transpose(1, 2)  # (P, H, 4H), cast once for all steps
    hidden, cell, outputs = h0, c0, []
    for step_gates in input_gates.unbind(1):  # (P, B, 4H)
        hidden, cell = _cell_step(step_gates + _bmm(hidden, weight, dtype), cell)
        outputs.append(hidden)
    return torch.stack(outputs, dim=1), cell


def autograd_free_running_decoder(
    weights: DecoderWeights,
    h0: Tensor,
    c0: Tensor,
    steps: int,
    logistic: bool,
    dropout: float = 0.0,
    stacks: slice = ALL,
) -> Tensor:
    """`free_running_decoder` in plain PyTorch ops, one time step after the other.

    Same arguments and result; with dropout it draws the same masks from torch's generator.
    """
    num_layers = h0.shape[0]
    dtype = matmul_dtype_for(h0)
    weight_ih = [weight[stacks].to(dtype).transpose(1, 2) for weight in weights.weight_ih]  # (P, in, 4H)
    weight_hh = [weight[stacks].to(dtype).transpose(1, 2) for weight in weights.weight_hh]  # (P, H, 4H)
    bias = [layer_bias[stacks].unsqueeze(1) for layer_bias in weights.bias]  # (P, 1, 4H)
    output_weight = weights.output_weight[stacks].to(dtype).transpose(1, 2)  # (P, H, D)
    output_bias = weights.output_bias[stacks].unsqueeze(1)  # (P, 1, D)
    masks = _dropout_masks(h0, steps, float(dropout))
    hidden, cell = list(h0.unbind(0)), list(c0.unbind(0))  # each (P, B, H)
    frame, logits = None, []  # the frame fed back; a zero frame first, which adds nothing
    for t in range(steps):
        layer_input = frame
        for layer in range(num_layers):
            pre_gates = bias[layer] + _bmm(hidden[layer], weight_hh[layer], dtype)
            if layer_input is not None:
                pre_gates = pre_gates + _bmm(layer_input, weight_ih[layer], dtype)
            hidden[layer], cell[layer] = _cell_step(pre_gates, cell[layer])
            layer_input = hidden[layer]
            if masks is not None and layer < num_layers - 1:
                layer_input = layer_input * masks[layer, :, t]
        step_logits = output_bias + _bmm(hidden[-1], output_weight, dtype)  # the top layer, no dropout
        logits.append(step_logits)
        frame = torch.sigmoid(step_logits) if logistic else step_logits
    return torch.stack(logits, dim=1)


# ------------------------------------------------------------------------------ kernel sets


class FusedKernels:
    """The hand-written kernels, with the `Workspace` they keep between calls: one per model."""

    def __init__(self) -> None:
        self.workspace = Workspace()

    def project(self, inputs: Tensor, weight: Tensor, bias: Tensor, stacks: slice = ALL) -> Tensor:
        return project(inputs, weight, bias, stacks, self.workspace)

    def lstm_layer(
        self, input_gates: Tensor, weight_hh: Tensor, h0: Tensor, c0: Tensor, stacks: slice = ALL
    ) -> tuple[Tensor, Tensor]:
        return lstm_layer(input_gates, weight_hh, h0, c0, stacks, self.workspace)

    def free_running_decoder(
        self,
        weights: DecoderWeights,
        h0: Tensor,
        c0: Tensor,
        steps: int,
        logistic: bool,
        dropout: float = 0.0,
        stacks: slice = ALL,
    ) -> Tensor:
        return free_running_decoder(weights, h0, c0, steps, logistic, dropout, stacks, self.workspace)


class AutogradKernels:
    """The same three functions in plain PyTorch ops; nothing kept between calls."""

    project = staticmethod(autograd_project)
    lstm_layer = staticmethod(autograd_lstm_layer)
    free_running_decoder = staticmethod(autograd_free_running_decoder)
