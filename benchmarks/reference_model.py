"""The naive reference: the seed tutorial's composite model, written the obvious way.

An `nn.LSTM` encoder and two `nn.LSTM` + `nn.Linear` decoders unrolled one step at a time,
each fed its own previous output (or, in `conditioned` training, the ground-truth previous
frame), plain autograd, plain Adam. It is the yardstick the benchmark and the equivalence
tests measure the project's model against; the suite never trains with it.

It reads the same `ModelConfig` and computes the same per-frame losses as
`lstm_ae.model.CompositeLSTMAutoencoder`, and `copy_weights_from` loads that model's weights,
so both can be run on identical parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_ae.config import ModelConfig
from lstm_ae.model import PREDICTION, RECONSTRUCTION, CompositeLSTMAutoencoder


class NaiveCompositeLSTM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        frame, hidden, layers = config.frame_size, config.hidden_size, config.num_layers
        dropout = config.dropout if layers > 1 else 0.0

        def lstm() -> nn.LSTM:
            return nn.LSTM(frame, hidden, layers, dropout=dropout, batch_first=True)

        self.encoder = lstm()
        self.reconstruction_decoder = lstm()
        self.reconstruction_output = nn.Linear(hidden, frame)
        self.prediction_decoder = lstm()
        self.prediction_output = nn.Linear(hidden, frame)

    def _decode(self, lstm: nn.LSTM, output: nn.Linear, state, target: Tensor) -> Tensor:
        """Logits (B, T, D), one step at a time. target: (B, T, D)."""
        batch, steps, frame_size = target.shape
        frame = target.new_zeros(batch, 1, frame_size)
        logits = []
        for t in range(steps):
            hidden, state = lstm(frame, state)
            step_logits = output(hidden)  # (B, 1, D)
            logits.append(step_logits)
            if self.training and self.config.decoder_mode == "conditioned":
                frame = target[:, t : t + 1]
            elif self.config.head == "logistic":
                frame = torch.sigmoid(step_logits)
            else:
                frame = step_logits
        return torch.cat(logits, dim=1)

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        frames = target.shape[0] * target.shape[1]
        if self.config.head == "logistic":
            return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / frames
        return F.mse_loss(logits, target, reduction="sum") / frames

    def forward(self, past: Tensor, future: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, reconstruction_loss, prediction_loss) for (B, T, C, H, W) inputs."""
        past_rows, future_rows = past.flatten(2).float(), future.flatten(2).float()
        reconstruction_target = (
            past_rows.flip(1) if self.config.reconstruction_order == "reverse" else past_rows
        )
        _, state = self.encoder(past_rows)
        weight = self.config.reconstruction_weight
        reconstruction_loss = prediction_loss = past.new_zeros(())
        if weight > 0:
            logits = self._decode(
                self.reconstruction_decoder, self.reconstruction_output, state, reconstruction_target
            )
            reconstruction_loss = self._loss(logits.float(), reconstruction_target)
        if weight < 1:
            logits = self._decode(self.prediction_decoder, self.prediction_output, state, future_rows)
            prediction_loss = self._loss(logits.float(), future_rows)
        loss = weight * reconstruction_loss + (1 - weight) * prediction_loss
        return loss, reconstruction_loss, prediction_loss

    @torch.no_grad()
    def copy_weights_from(self, model: CompositeLSTMAutoencoder) -> None:
        """Load the project's model's weights (its single bias goes to bias_ih; bias_hh = 0)."""
        decoders = {
            RECONSTRUCTION: (self.reconstruction_decoder, self.reconstruction_output),
            PREDICTION: (self.prediction_decoder, self.prediction_output),
        }
        for layer in range(self.config.num_layers):
            weight_ih, weight_hh, bias = model.encoder.layer(layer)
            _copy_layer(self.encoder, layer, weight_ih[0], weight_hh[0], bias[0])
            weight_ih, weight_hh, bias = model.decoders.layer(layer)
            for index, (lstm, _) in decoders.items():
                _copy_layer(lstm, layer, weight_ih[index], weight_hh[index], bias[index])
        for index, (_, output) in decoders.items():
            output.weight.copy_(model.output_weight[index])
            output.bias.copy_(model.output_bias[index])


def _copy_layer(lstm: nn.LSTM, layer: int, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor) -> None:
    getattr(lstm, f"weight_ih_l{layer}").copy_(weight_ih)
    getattr(lstm, f"weight_hh_l{layer}").copy_(weight_hh)
    getattr(lstm, f"bias_ih_l{layer}").copy_(bias)
    getattr(lstm, f"bias_hh_l{layer}").zero_()


def gradients_like_model(reference: NaiveCompositeLSTM, model: CompositeLSTMAutoencoder) -> dict[str, Tensor]:
    """The reference's gradients arranged like `model.named_parameters()` (stacked decoders)."""
    config = reference.config
    decoders = (reference.reconstruction_decoder, reference.prediction_decoder)
    outputs = (reference.reconstruction_output, reference.prediction_output)
    gradients = {}
    for layer in range(config.num_layers):
        gradients[f"encoder.weight_ih_l{layer}"] = getattr(reference.encoder, f"weight_ih_l{layer}").grad[
            None
        ]
        gradients[f"encoder.weight_hh_l{layer}"] = getattr(reference.encoder, f"weight_hh_l{layer}").grad[
            None
        ]
        gradients[f"encoder.bias_l{layer}"] = getattr(reference.encoder, f"bias_ih_l{layer}").grad[None]
        for kind in ("weight_ih", "weight_hh"):
            gradients[f"decoders.{kind}_l{layer}"] = torch.stack(
                [_grad_or_zero(getattr(lstm, f"{kind}_l{layer}")) for lstm in decoders]
            )
        gradients[f"decoders.bias_l{layer}"] = torch.stack(
            [_grad_or_zero(getattr(lstm, f"bias_ih_l{layer}")) for lstm in decoders]
        )
    gradients["output_weight"] = torch.stack([_grad_or_zero(output.weight) for output in outputs])
    gradients["output_bias"] = torch.stack([_grad_or_zero(output.bias) for output in outputs])
    return gradients


def _grad_or_zero(parameter: Tensor) -> Tensor:
    return parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
