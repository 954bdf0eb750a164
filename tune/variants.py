"""The paper's model variants that the ablation grid compares (`tune/ablations.py`).

A variant is a named set of config overrides; an ablation trial samples a variant's name and
`tune.experiment.trial` applies its overrides. Kept apart so that neither module imports
the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: dict[str, Any]
    claim: str
    trains_prediction: bool = True
    trains_reconstruction: bool = True


VARIANTS: dict[str, Variant] = {
    "reconstruction_only": Variant(
        "reconstruction only (w = 1)",
        {"reconstruction_weight": 1.0, "decoder_mode": "free", "reconstruction_order": "reverse"},
        "an autoencoder alone learns a representation, but a weaker one than the composite model's",
        trains_prediction=False,
    ),
    "prediction_only": Variant(
        "prediction only (w = 0)",
        {"reconstruction_weight": 0.0, "decoder_mode": "free", "reconstruction_order": "reverse"},
        "a future predictor alone predicts worse than the composite model",
        trains_reconstruction=False,
    ),
    "composite": Variant(
        "composite (w = 0.5)",
        {"reconstruction_weight": 0.5, "decoder_mode": "free", "reconstruction_order": "reverse"},
        "reconstructing and predicting together beats either task alone",
    ),
    "composite_conditioned": Variant(
        "composite, conditioned decoders",
        {"reconstruction_weight": 0.5, "decoder_mode": "conditioned", "reconstruction_order": "reverse"},
        "conditioning the decoders on the previous frame helps (the paper's best model, 341.2 nats/frame)",
    ),
    "composite_forward_order": Variant(
        "composite, reconstruction in forward order",
        {"reconstruction_weight": 0.5, "decoder_mode": "free", "reconstruction_order": "forward"},
        "reconstructing in reverse order is easier: the first targets are the frames just seen",
    ),
}


def expand_variant(sampled: dict[str, Any]) -> dict[str, Any]:
    """Config overrides of a sample: an ablation grid samples a variant name, a search fields."""
    sampled = dict(sampled)
    if "variant" in sampled:
        sampled.update(VARIANTS[sampled.pop("variant")].overrides)
    return sampled
