"""A linear probe of the learned representation: which digits does the encoder state hold?

The encoder is frozen; `encode(past)` features of generated sequences whose digit labels
are known train a linear classifier (plain torch, 10 logistic outputs: is digit d in the
sequence?), which is scored on sequences made from held-out digits. A sequence's score is
the fraction of its digits among the classifier's top `num_digits` classes; the probe
accuracy averages that over the held-out sequences. Predicting without looking (the most
frequent digits) scores about num_digits / 10 = 0.2; features from an untrained encoder of
the same shape give the baseline that a learned representation has to beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lstm_ae.config import ExperimentConfig
from lstm_ae.data import BouncingDigits, GeneratedSequences, split_sequence
from lstm_ae.engine import autocast
from lstm_ae.model import CompositeLSTMAutoencoder

CLASSES = 10
PROBE_SEED = 777  # fixed: every model is probed on the same sequences
PROBE_BATCH = 64


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float
    train_accuracy: float
    chance: float


def digit_presence(labels: Tensor) -> Tensor:
    """(N, num_digits) labels -> (N, 10) multi-hot targets."""
    targets = torch.zeros(labels.shape[0], CLASSES)
    targets.scatter_(1, labels.long(), 1.0)
    return targets


def set_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Mean fraction of each sequence's digits found among its top num_digits logits."""
    count = labels.shape[1]
    predicted = logits.topk(count, dim=1).indices  # (N, k)
    hits = 0.0
    for guesses, truth in zip(predicted.tolist(), labels.tolist()):
        remaining = list(truth)
        for guess in guesses:
            if guess in remaining:
                remaining.remove(guess)
        hits += (count - len(remaining)) / count
    return hits / len(labels)


@torch.no_grad()
def encoder_features(
    model: CompositeLSTMAutoencoder, config: ExperimentConfig, split: str, sequences: int, seed: int
):
    """(features (N, F), labels (N, num_digits)) of generated sequences from one digit split."""
    generator = BouncingDigits.from_config(config.model, config.data, split)
    stream = GeneratedSequences(generator, PROBE_BATCH, seed=seed, rank=0, with_labels=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features, labels = [], []
    step = 0
    while sum(len(batch) for batch in labels) < sequences:
        frames, batch_labels = stream.batch(step)
        step += 1
        past, _ = split_sequence(frames, config.model.past_length, config.model.future_length)
        with autocast(config.training.precision, device):
            features.append(model.encode(past.to(device)).float().cpu())
        labels.append(batch_labels)
    model.train(was_training)
    return torch.cat(features)[:sequences], torch.cat(labels)[:sequences]


def fit_linear_probe(
    features: Tensor,
    labels: Tensor,
    epochs: int = 300,
    learning_rate: float = 0.05,
    weight_decay: float = 1e-3,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standardise the features and fit 10 logistic outputs (full-batch Adam, seeded)."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    inputs = (features - mean) / std
    targets = digit_presence(labels)
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(inputs.shape[1], CLASSES, generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(CLASSES, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=learning_rate, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(inputs @ weight + bias, targets)
        loss.backward()
        optimizer.step()
    return weight.detach(), bias.detach(), mean, std


WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0)


def choose_weight_decay(features: Tensor, labels: Tensor) -> float:
    """The L2 strength that scores best on a validation fifth of the training sequences."""
    cut = len(features) * 4 // 5
    scores = []
    for weight_decay in WEIGHT_DECAYS:
        weight, bias, mean, std = fit_linear_probe(features[:cut], labels[:cut], weight_decay=weight_decay)
        scores.append(set_accuracy(((features[cut:] - mean) / std) @ weight + bias, labels[cut:]))
    return WEIGHT_DECAYS[max(range(len(scores)), key=scores.__getitem__)]


def probe(
    model: CompositeLSTMAutoencoder,
    config: ExperimentConfig,
    sequences: int,
    shuffle_labels: bool = False,
) -> ProbeResult:
    """Fit on `sequences` train-digit sequences, score on sequences / 2 held-out-digit ones."""
    train_features, train_labels = encoder_features(model, config, "train", sequences, PROBE_SEED)
    test_features, test_labels = encoder_features(
        model, config, "test", max(1, sequences // 2), PROBE_SEED + 1
    )
    if shuffle_labels:  # the control: labels that carry no information must not be learnable
        train_labels = train_labels[
            torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(1))
        ]
    weight_decay = choose_weight_decay(train_features, train_labels)
    weight, bias, mean, std = fit_linear_probe(train_features, train_labels, weight_decay=weight_decay)

    def logits(features: Tensor) -> Tensor:
        return ((features - mean) / std) @ weight + bias

    chance = set_accuracy(digit_presence(train_labels).sum(0).expand(len(test_labels), -1), test_labels)
    return ProbeResult(
        accuracy=set_accuracy(logits(test_features), test_labels),
        train_accuracy=set_accuracy(logits(train_features), train_labels),
        chance=chance,
    )


def probe_with_baseline(
    model: CompositeLSTMAutoencoder, config: ExperimentConfig, sequences: int
) -> dict[str, float]:
    """The probe of `model` and of an untrained encoder of the same shape (the baseline)."""
    torch.manual_seed(config.training.seed + 1)
    untrained = CompositeLSTMAutoencoder(config.model).to(next(model.parameters()).device)
    trained_result = probe(model, config, sequences)
    baseline = probe(untrained, config, sequences)
    return {
        "probe_accuracy": trained_result.accuracy,
        "probe_accuracy_untrained": baseline.accuracy,
        "probe_chance": trained_result.chance,
    }
