"""The ablation table's arithmetic: which trials count, and what the verdicts may claim."""

from __future__ import annotations

from tune.ablations import CLAIMS, VARIANTS, summarize, verdicts


def record(variant, seed, mse, probe=0.3, finished=True, error=None):
    return {
        "variant": variant,
        "seed": seed,
        "finished": finished,
        "error": error,
        "val_mse_frame": mse,
        "val_bce_nats_frame": 700.0,
        "val_reconstruction_mse_frame": 150.0,
        "probe_accuracy": probe,
        "probe_accuracy_untrained": 0.2,
    }


def verdict_of(summary, statement_start):
    return next(text for claim, text in verdicts(summary) if claim.statement.startswith(statement_start))


def test_unfinished_and_errored_trials_are_left_out_of_the_means():
    records = [
        record("composite", 0, 100.0),
        record("composite", 1, 102.0),
        record("composite", 2, 30.0, finished=False),  # cut short by the time budget
        record("composite", 3, 10.0, error="boom"),
    ]
    mean, spread, count = summarize(records)["composite"]["val_mse_frame"]
    assert (mean, count) == (101.0, 2) and abs(spread - 1.41421356) < 1e-6


def test_verdicts_need_a_spread_to_call_a_claim_held():
    predicts = "the composite predicts the future better than prediction alone"
    assert any(claim.statement == predicts for claim in CLAIMS)
    one_seed = summarize([record("composite", 0, 100.0), record("prediction_only", 0, 110.0)])
    assert verdict_of(one_seed, predicts).startswith("one seed: no spread to judge by")
    two_seeds = summarize(
        [record("composite", s, 100.0 + s) for s in (0, 1)]
        + [record("prediction_only", s, 110.0 + s) for s in (0, 1)]
    )
    assert verdict_of(two_seeds, predicts).startswith("held (100.5 vs 110.5)")
    reversed_ = summarize(
        [record("composite", s, 110.0 + s) for s in (0, 1)]
        + [record("prediction_only", s, 100.0 + s) for s in (0, 1)]
    )
    assert verdict_of(reversed_, predicts).startswith("not held")
    noisy = summarize(
        [record("composite", 0, 90.0), record("composite", 1, 120.0)]
        + [record("prediction_only", s, 110.0 + s) for s in (0, 1)]
    )
    assert verdict_of(noisy, predicts).startswith("within noise")
    same = summarize([record(name, s, 100.0) for name in VARIANTS for s in (0, 1)])
    assert verdict_of(same, predicts).startswith("no difference at this scale")
