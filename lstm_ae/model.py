"""The composite LSTM autoencoder of Srivastava, Mansimov and Salakhutdinov (ICML 2015).

An encoder LSTM reads the past frames. Two decoders start from the encoder's final (h, c)
of every layer: one reconstructs the past (in reverse order by default, as in the paper),
the other predicts the future. The encoder's final states are the learned representation.

Tensors at this module's boundary are (B, T, C, H, W) floats in [0, 1]; inside, frames are
flattened to D = C * H * W values and sequences are time-major. Both decoders run at once as
a stack of two (their weights are stored stacked: index 0 reconstructs, index 1 predicts).

The recurrences run on `lstm_ae.recurrence`'s kernels, chosen by `config.kernel`: `fused`
(hand-written forward and backward passes, the fast path) or `autograd` (the same maths in
plain PyTorch ops, a step at a time). Both read the same parameters, so a state dict trained
with one loads into the other. The fused kernels keep memory between calls (bf16 weight
copies, weight gradients) in a workspace the model owns: it is freed with the model and never
shared with another one (a `copy.deepcopy` gets a new, empty one).

Decoder inputs (`decoder_mode`):
- `free`: each decoder feeds its own previous output back (a zero frame first), in training
  and evaluation alike, with gradients through the feedback (the seed tutorial's model).
- `conditioned`: in training each decoder is fed the ground-truth previous target frame (a
  zero frame first), the paper's conditional decoder; at evaluation (`model.eval()`) there is
  no ground truth to feed, so it feeds its own outputs exactly like `free`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_ae.config import ModelConfig
from lstm_ae.recurrence import AutogradKernels, DecoderWeights, FusedKernels

RECONSTRUCTION, PREDICTION = 0, 1  # decoder indices in the stacked weights
MEAN_PIXEL = 0.047  # mean intensity of generated 64x64 two-digit Moving MNIST frames


@dataclass
class CompositeOutput:
    """What one forward pass returns. Frames are (B, T, C, H, W) in the targets' order.

    A decoder whose loss weight is zero is not run: its frames are None and its loss is 0.
    """

    reconstruction: Tensor | None
    prediction: Tensor | None
    reconstruction_target: Tensor
    prediction_target: Tensor
    loss: Tensor
    reconstruction_loss: Tensor
    prediction_loss: Tensor


class StackedLSTMWeights(nn.Module):
    """Weights of `stacks` independent LSTMs with `num_layers` layers each, stored stacked.

    `weight_ih_l{k}`: (stacks, 4H, input size), `weight_hh_l{k}`: (stacks, 4H, H),
    `bias_l{k}`: (stacks, 4H). One bias per gate (nn.LSTM's two biases summed). Initialised
    like nn.LSTM: uniform in +-1/sqrt(H), plus `forget_gate_bias` on the forget gates.
    """

    def __init__(
        self, stacks: int, input_size: int, hidden_size: int, num_layers: int, forget_gate_bias: float = 0.0
    ):
        super().__init__()
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.forget_gate_bias = forget_gate_bias
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size
            self.register_parameter(
                f"weight_ih_l{layer}",
                nn.Parameter(torch.empty(stacks, 4 * hidden_size, layer_input)),
            )
            self.register_parameter(
                f"weight_hh_l{layer}",
                nn.Parameter(torch.empty(stacks, 4 * hidden_size, hidden_size)),
            )
            self.register_parameter(f"bias_l{layer}", nn.Parameter(torch.empty(stacks, 4 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)
        with torch.no_grad():
            for layer in range(self.num_layers):  # gate order: input, forget, cell, output
                getattr(self, f"bias_l{layer}")[:, self.hidden_size : 2 * self.hidden_size] += (
                    self.forget_gate_bias
                )

    def layer(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """(weight_ih, weight_hh, bias) of one layer, all stacks."""
        return (
            getattr(self, f"weight_ih_l{layer}"),
            getattr(self, f"weight_hh_l{layer}"),
            getattr(self, f"bias_l{layer}"),
        )


class CompositeLSTMAutoencoder(nn.Module):
    """Encoder LSTM + reconstruction decoder + prediction decoder (Srivastava et al. 2015)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.kernels = FusedKernels() if config.kernel == "fused" else AutogradKernels()
        frame_size, hidden_size = config.frame_size, config.hidden_size
        forget = config.forget_gate_bias
        self.encoder = StackedLSTMWeights(1, frame_size, hidden_size, config.num_layers, forget)
        self.decoders = StackedLSTMWeights(2, frame_size, hidden_size, config.num_layers, forget)
        bound = 1.0 / math.sqrt(hidden_size)
        self.output_weight = nn.Parameter(torch.empty(2, frame_size, hidden_size).uniform_(-bound, bound))
        # Outputs start at the mean pixel of Moving MNIST, not at sigmoid(0) = 0.5: otherwise
        # Adam (steps of about lr per parameter) spends thousands of steps darkening the
        # background before anything about digits is learned.
        initial = math.log(MEAN_PIXEL / (1 - MEAN_PIXEL)) if config.head == "logistic" else MEAN_PIXEL
        self.output_bias = nn.Parameter(torch.full((2, frame_size), initial))

    # ------------------------------------------------------------------ public API

    @property
    def feature_size(self) -> int:
        """Length of `encode`'s feature vector: 2 * num_layers * hidden_size."""
        return 2 * self.config.num_layers * self.config.hidden_size

    def encode(self, past: Tensor) -> Tensor:
        """The representation: the encoder's final states.

        Args:
            past: (B, T, C, H, W) frames.
        Returns:
            (B, 2 * num_layers * hidden_size): [h of layers 1..L, c of layers 1..L].
        """
        hidden, cell = self._encode_states(past)  # (L, 1, B, H) each
        return torch.cat([*hidden[:, 0], *cell[:, 0]], dim=-1)

    def reconstruct(self, past: Tensor) -> Tensor:
        """Reconstructed past frames (B, T, C, H, W), in chronological order like `past`."""
        hidden, cell = self._encode_states(past)
        logits = self._decode_free(hidden, cell, past.shape[1], slice(RECONSTRUCTION, RECONSTRUCTION + 1))
        frames = self._to_frames(self._activate(logits[0]), past.shape)
        return frames.flip(1) if self.config.reconstruction_order == "reverse" else frames

    def predict(self, past: Tensor, steps: int | None = None) -> Tensor:
        """Predicted future frames (B, steps, C, H, W); `steps` defaults to future_length."""
        steps = self.config.future_length if steps is None else steps
        hidden, cell = self._encode_states(past)
        logits = self._decode_free(hidden, cell, steps, slice(PREDICTION, PREDICTION + 1))
        return self._to_frames(self._activate(logits[0]), (past.shape[0], steps, *past.shape[2:]))

    def reconstruct_and_predict(self, past: Tensor) -> tuple[Tensor, Tensor]:
        """`reconstruct(past)` and `predict(past)` from one encoding, both decoders run as one stack."""
        config = self.config
        hidden, cell = self._encode_states(past)
        steps = max(config.past_length, config.future_length)
        logits = self._decode_free(hidden, cell, steps, slice(None))
        reconstruction = self._to_frames(self._activate(logits[RECONSTRUCTION, : past.shape[1]]), past.shape)
        if config.reconstruction_order == "reverse":
            reconstruction = reconstruction.flip(1)
        future_shape = (past.shape[0], config.future_length, *past.shape[2:])
        prediction = self._to_frames(self._activate(logits[PREDICTION, : config.future_length]), future_shape)
        return reconstruction, prediction

    def targets(self, past: Tensor, future: Tensor) -> tuple[Tensor, Tensor]:
        """The (reconstruction, prediction) targets: the past reversed (or not), and the future."""
        reconstruction = past.flip(1) if self.config.reconstruction_order == "reverse" else past
        return reconstruction, future

    def forward(self, past: Tensor, future: Tensor) -> CompositeOutput:
        """Both decoders' outputs and the composite loss.

        Args:
            past: (B, past_length, C, H, W) encoder input, values in [0, 1].
            future: (B, future_length, C, H, W) prediction target.
        Returns:
            CompositeOutput; losses are per frame (summed over pixels, averaged over frames
            and sequences): `config.resolved_loss` (binary cross-entropy in nats, squared error,
            or absolute plus squared error). loss = w * reconstruction_loss + (1 - w) * prediction_loss.
        """
        config = self.config
        self._check_input(past, config.past_length, "past")
        self._check_input(future, config.future_length, "future")
        targets = dict(zip((RECONSTRUCTION, PREDICTION), self.targets(past, future)))
        task_weights = {
            RECONSTRUCTION: config.reconstruction_weight,
            PREDICTION: 1.0 - config.reconstruction_weight,
        }
        # A decoder whose loss has zero weight is not run (w = 1 or w = 0 trains one task).
        active = [task for task in (RECONSTRUCTION, PREDICTION) if task_weights[task] > 0]
        stacks = slice(None) if len(active) == 2 else slice(active[0], active[0] + 1)
        steps = max(targets[task].shape[1] for task in active)

        hidden, cell = self._encode_states(past)
        if self.training and config.decoder_mode == "conditioned":
            logits = self._decode_conditioned(hidden, cell, [targets[task] for task in active], steps, stacks)
        else:
            logits = self._decode_free(hidden, cell, steps, stacks)

        losses = {task: past.new_zeros(()) for task in targets}
        frames: dict[int, Tensor | None] = {task: None for task in targets}
        for index, task in enumerate(active):
            target = targets[task]
            task_logits = logits[index, : target.shape[1]]  # (T, B, D)
            losses[task] = self._frame_loss(task_logits, self._flatten(target))
            frames[task] = self._to_frames(self._activate(task_logits), target.shape)
        loss = sum(task_weights[task] * losses[task] for task in active)
        return CompositeOutput(
            reconstruction=frames[RECONSTRUCTION],
            prediction=frames[PREDICTION],
            reconstruction_target=targets[RECONSTRUCTION],
            prediction_target=targets[PREDICTION],
            loss=loss,
            reconstruction_loss=losses[RECONSTRUCTION],
            prediction_loss=losses[PREDICTION],
        )

    # ------------------------------------------------------------------ internals

    def _check_input(self, frames: Tensor, length: int, name: str) -> None:
        config = self.config
        expected = (length, config.channels, config.height, config.width)
        if frames.dim() != 5 or tuple(frames.shape[1:]) != expected:
            raise ValueError(
                f"{name} must have shape (B, {', '.join(map(str, expected))}), got {tuple(frames.shape)}"
            )

    @staticmethod
    def _flatten(frames: Tensor) -> Tensor:
        """(B, T, C, H, W) -> (T, B, D), float32."""
        return frames.flatten(2).transpose(0, 1).float()

    @staticmethod
    def _to_frames(rows: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """(T, B, D) -> (B, T, C, H, W)."""
        return rows.transpose(0, 1).reshape(shape)

    def _activate(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits) if self.config.head == "logistic" else logits

    def _frame_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss summed over pixels, averaged over frames and sequences. logits, target: (T, B, D).

        Cross-entropy from the logits (stable); squared and absolute errors of the head's outputs."""
        frames = logits.shape[0] * logits.shape[1]
        loss = self.config.resolved_loss
        if loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / frames
        outputs = self._activate(logits)
        squared = F.mse_loss(outputs, target, reduction="sum")
        if loss == "mse":
            return squared / frames
        return (squared + F.l1_loss(outputs, target, reduction="sum")) / frames

    def _dropout(self, hidden: Tensor) -> Tensor:
        return F.dropout(hidden, self.config.dropout, self.training)

    def _stacked_layers(
        self, weights: StackedLSTMWeights, inputs: Tensor, hidden0: Tensor, cell0: Tensor, stacks: slice
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run stacked LSTM layers over known inputs, layer by layer.

        inputs: (P, T, B, D); hidden0, cell0: (L, P, B, H).
        Returns the top layer's hidden states (P, T, B, H) and final (h, c), each (L, P, B, H).
        """
        final_hidden, final_cell = [], []
        layer_input = inputs
        for layer in range(self.config.num_layers):
            weight_ih, weight_hh, bias = weights.layer(layer)
            if layer > 0:
                layer_input = self._dropout(layer_input)
            P, T, B, _ = layer_input.shape
            # One input projection for all steps: (P, T*B, in) @ (P, in, 4H).
            input_gates = self.kernels.project(layer_input.reshape(P, T * B, -1), weight_ih, bias, stacks)
            input_gates = input_gates.view(P, T, B, -1)
            outputs, last_cell = self.kernels.lstm_layer(
                input_gates, weight_hh, hidden0[layer], cell0[layer], stacks
            )
            final_hidden.append(outputs[:, -1])
            final_cell.append(last_cell)
            layer_input = outputs
        return layer_input, torch.stack(final_hidden), torch.stack(final_cell)

    def _encode_states(self, past: Tensor) -> tuple[Tensor, Tensor]:
        """Final encoder states (h, c), each (L, 1, B, H)."""
        config = self.config
        if past.dim() != 5 or tuple(past.shape[2:]) != (config.channels, config.height, config.width):
            raise ValueError(
                f"past must have shape (B, T, {config.channels}, {config.height}, {config.width}), "
                f"got {tuple(past.shape)}"
            )
        inputs = self._flatten(past).unsqueeze(0)  # (1, T, B, D)
        zeros = inputs.new_zeros(config.num_layers, 1, past.shape[0], config.hidden_size)
        _, hidden, cell = self._stacked_layers(self.encoder, inputs, zeros, zeros, slice(None))
        return hidden, cell

    def _decoder_weights(self) -> DecoderWeights:
        layers = [self.decoders.layer(layer) for layer in range(self.config.num_layers)]
        return DecoderWeights(
            weight_ih=tuple(layer[0] for layer in layers),
            weight_hh=tuple(layer[1] for layer in layers),
            bias=tuple(layer[2] for layer in layers),
            output_weight=self.output_weight,
            output_bias=self.output_bias,
        )

    def _decode_free(self, hidden: Tensor, cell: Tensor, steps: int, stacks: slice) -> Tensor:
        """Logits (P, steps, B, D) of decoders that feed back their own outputs."""
        stack_count = len(range(2)[stacks])
        shape = (hidden.shape[0], stack_count, *hidden.shape[2:])
        return self.kernels.free_running_decoder(
            self._decoder_weights(),
            hidden.expand(shape),
            cell.expand(shape),
            steps,
            logistic=self.config.head == "logistic",
            dropout=self.config.dropout if self.training else 0.0,
            stacks=stacks,
        )

    def _decode_conditioned(
        self, hidden: Tensor, cell: Tensor, targets: list[Tensor], steps: int, stacks: slice
    ) -> Tensor:
        """Logits (P, steps, B, D) of decoders fed the ground-truth previous frame (teacher forcing)."""
        rows = []
        for target in targets:
            target_rows = self._flatten(target)  # (T, B, D)
            padding = steps - target_rows.shape[0]
            if padding:
                target_rows = F.pad(target_rows, (0, 0, 0, 0, 0, padding))
            # Input at step t is the target at t - 1; a zero frame first.
            rows.append(F.pad(target_rows[:-1], (0, 0, 0, 0, 1, 0)))
        inputs = torch.stack(rows)  # (P, T, B, D)
        shape = (hidden.shape[0], inputs.shape[0], *hidden.shape[2:])
        top, _, _ = self._stacked_layers(
            self.decoders, inputs, hidden.expand(shape), cell.expand(shape), stacks
        )
        P, T, B, H = top.shape
        logits = self.kernels.project(top.reshape(P, T * B, H), self.output_weight, self.output_bias, stacks)
        return logits.view(P, T, B, -1)


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
