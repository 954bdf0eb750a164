"""A linear probe of the learned representation: which digits does the encoder state hold?

The encoder is frozen; `encode(past)` features of generated sequences whose digit labels
are known train a linear classifier, which is scored on sequences made from held-out
digits. The classifier is scikit-learn's: standardised features, then one L2-regularised
logistic regression per digit class (one-vs-rest on the 10 multi-hot targets "is digit d in
the sequence?"), with one regularisation strength for all ten chosen by 3-fold
cross-validation of the probe's own score on the training sequences.

A sequence's score is the fraction of its digits among the classifier's top `num_digits`
classes; the probe accuracy averages that over the held-out sequences. Predicting without
looking (the most frequent digits) scores about num_digits / 10 = 0.2; features from an
untrained encoder of the same shape give the baseline that a learned representation has
to beat, and labels shuffled across the training sequences give a control that must stay
at chance.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import Tensor

from lstm_ae.config import ExperimentConfig
from lstm_ae.data import BouncingDigits, GeneratedSequences, split_sequence
from lstm_ae.engine import autocast
from lstm_ae.model import CompositeLSTMAutoencoder

CLASSES = 10
PROBE_SEED = 777  # fixed: every model is probed on the same sequences
SHUFFLE_SEED = 1  # the shuffled-label control's permutation
PROBE_BATCH = 64
# Candidate inverse L2 strengths (scikit-learn's C). The objective per class is
# C * (sum of log-losses) + |w|^2 / 2, i.e. mean log-loss + |w|^2 / (2 C N) for N sequences.
# Cross-validation picked 1e-3 to 1e-1 for 256- and 2048-wide features at N = 2000
# (benchmarks/linear_probe_timing.py); the grid reaches two decades below and one above.
INVERSE_REGULARISATION_STRENGTHS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
VALIDATION_FOLDS = 3
MAX_ITERATIONS = 1000
# scikit-learn's fits are many small matrix-vector products; on a shared 2-core machine
# OpenBLAS's worker threads made them 20x slower than one thread (60 s against 3 s).
BLAS_THREADS = 1


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float  # on the held-out-digit sequences
    train_accuracy: float
    chance: float  # guessing the digits most frequent in the training labels
    inverse_regularisation_strength: float  # the C that cross-validation chose


def digit_presence(labels: Tensor) -> Tensor:
    """(N, num_digits) labels -> (N, 10) multi-hot targets (a repeated digit counts once)."""
    targets = torch.zeros(labels.shape[0], CLASSES)
    targets.scatter_(1, labels.long(), 1.0)
    return targets


def presence_accuracy(scores: Tensor | np.ndarray, presence: Tensor | np.ndarray, count: int) -> float:
    """Mean fraction of each sequence's `count` digits found among its top `count` scores.

    Args:
        scores: (N, 10) class scores (logits, decision values or counts).
        presence: (N, 10) multi-hot digit presence, as `digit_presence` makes it.
        count: digits per sequence; a digit that appears twice can be found only once.
    """
    scores, presence = torch.as_tensor(scores), torch.as_tensor(presence)
    top = scores.topk(count, dim=1).indices  # (N, count)
    hits = presence.gather(1, top).double().sum(1)  # (N,)
    return float((hits / count).mean())


def set_accuracy(scores: Tensor | np.ndarray, labels: Tensor) -> float:
    """Mean fraction of each sequence's digits found among its top num_digits scores.

    Args:
        scores: (N, 10) class scores.
        labels: (N, num_digits) digit classes of each sequence.
    """
    return presence_accuracy(scores, digit_presence(labels), labels.shape[1])


@torch.no_grad()
def encoder_features(
    model: CompositeLSTMAutoencoder, config: ExperimentConfig, split: str, sequences: int, seed: int
) -> tuple[Tensor, Tensor]:
    """(features (N, F) float32, labels (N, num_digits)) of generated sequences of one digit
    split, N = `sequences` and F = 2 * num_layers * hidden_size (`model.encode`)."""
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


def fit_linear_probe(features: Tensor, labels: Tensor) -> tuple[Pipeline, float]:
    """Fit the probe: standardise, then one logistic regression per digit class.

    Args:
        features: (N, F) encoder features.
        labels: (N, num_digits) digit classes of each sequence.
    Returns:
        The fitted classifier (its `decision_function` maps (N, F) features to (N, 10)
        scores) and the inverse regularisation strength C that 3-fold cross-validation of
        the probe's score chose. Deterministic: the folds are consecutive blocks.
    """
    count = labels.shape[1]

    def score(classifier: Pipeline, inputs: np.ndarray, presence: np.ndarray) -> float:
        return presence_accuracy(classifier.decision_function(inputs), presence, count)

    classifier = make_pipeline(
        StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=MAX_ITERATIONS))
    )
    search = GridSearchCV(
        classifier,
        {"onevsrestclassifier__estimator__C": list(INVERSE_REGULARISATION_STRENGTHS)},
        scoring=score,
        cv=VALIDATION_FOLDS,
        error_score="raise",
    )
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"), warnings.catch_warnings():
        # With a few dozen sequences a digit can be missing from a fold; its classifier then
        # scores every sequence the same (never present), which is the right answer.
        warnings.filterwarnings("ignore", "Label not .* is present in all training examples", UserWarning)
        search.fit(features.numpy(), digit_presence(labels).numpy())
    return search.best_estimator_, float(search.best_params_["onevsrestclassifier__estimator__C"])


def probe(
    model: CompositeLSTMAutoencoder,
    config: ExperimentConfig,
    sequences: int,
    shuffle_labels: bool = False,
) -> ProbeResult:
    """Fit on `sequences` train-digit sequences, score on sequences // 2 held-out-digit ones.

    With `shuffle_labels`, the training labels are permuted across sequences (the control:
    labels that carry no information must not be learnable).
    """
    train_features, train_labels = encoder_features(model, config, "train", sequences, PROBE_SEED)
    test_features, test_labels = encoder_features(
        model, config, "test", max(1, sequences // 2), PROBE_SEED + 1
    )
    if shuffle_labels:
        permutation = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(SHUFFLE_SEED))
        train_labels = train_labels[permutation]
    classifier, inverse_regularisation_strength = fit_linear_probe(train_features, train_labels)
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        test_scores = classifier.decision_function(test_features.numpy())  # (N_test, 10)
        train_scores = classifier.decision_function(train_features.numpy())  # (N, 10)
    frequency = digit_presence(train_labels).sum(0)  # (10,)
    return ProbeResult(
        accuracy=set_accuracy(test_scores, test_labels),
        train_accuracy=set_accuracy(train_scores, train_labels),
        chance=set_accuracy(frequency.expand(len(test_labels), -1), test_labels),
        inverse_regularisation_strength=inverse_regularisation_strength,
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
