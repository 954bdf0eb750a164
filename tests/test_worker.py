"""The training function without Ray (LocalSession): stopping, resuming, accumulation."""

from __future__ import annotations

import pytest
import torch
from faults import FailOnceSession, InjectedFailure

import train.worker
from lstm_ae.checkpoint import load_checkpoint
from lstm_ae.config import preset
from lstm_ae.data import load_test_set
from lstm_ae.engine import NonFiniteLossError, evaluate, step_seed, train_step
from lstm_ae.metrics import BASELINE_METRICS, MetricAccumulator, add_baselines
from lstm_ae.model import CompositeLSTMAutoencoder
from records.checkpoints import TrainingState
from train.progress import ProgressClock
from train.worker import LocalSession, TimeBudget, WorkerSettings, loop_config, train_function


@pytest.fixture
def smoke(tmp_path):
    return preset("smoke", hidden_size=16, cache_dir=str(tmp_path / "data"))


def run(config, session=None):
    session = session or LocalSession()
    state = train_function(loop_config(config, WorkerSettings()), session)
    return state, getattr(session, "session", session)


def final_weights(session) -> dict:
    return load_checkpoint(session.checkpoints[-1])["model"]


@pytest.mark.slow
def test_smoke_run_reports_losses_validation_and_checkpoints(smoke):
    state, session = run(smoke)
    steps = [report["step"] for report in session.reports]
    assert steps == [2, 3, 4, 6] and state.step == 6 and state.sequences_seen == 24
    assert "val_mse_frame" in session.reports[1] and "val_mse_frame" not in session.reports[0]
    assert session.reports[-1]["final"] is True
    assert [folder.rsplit("_", 1)[-1] for folder in session.checkpoints] == ["00000003", "00000006"]
    validations = [
        report["val_bce_nats_frame"] for report in session.reports if "val_bce_nats_frame" in report
    ]
    assert validations[-1] < validations[0]  # on the fixed validation set


@pytest.mark.slow
def test_every_validation_reports_the_trivial_predictions_measured_once_on_the_set(smoke):
    """The baselines depend on the validation set alone: the first validation measures them,
    the later ones carry the same values (and evaluate can leave them out)."""
    _, session = run(smoke)
    validated = [report for report in session.reports if "val_mse_frame" in report]
    assert len(validated) >= 2
    test_set = load_test_set(smoke.model, smoke.data)
    expected = MetricAccumulator()
    for frames in test_set.batches(7):
        add_baselines(expected, frames[:, : smoke.model.past_length], frames[:, smoke.model.past_length :])
    for report in validated:
        for name in BASELINE_METRICS:
            assert report[name] == pytest.approx(expected.means()[name], rel=1e-6), name
    model = CompositeLSTMAutoencoder(smoke.model)
    left_out = evaluate(model, test_set.batches(4), smoke.model, "fp32", baselines=False).means()
    assert "val_mse_frame" in left_out and not set(BASELINE_METRICS) & set(left_out)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(smoke):
    # Weights of 1e36 after the first step: the next loss overflows float32.
    config = smoke.replace(
        learning_rate=1e36, warmup_steps=0, grad_clip_norm=0.0, checkpoint_every=1, eval_every=1
    )
    session = LocalSession()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1"):
        run(config, session)
    assert session.checkpoints, "the checkpoints before the failure are kept"
    for folder in session.checkpoints:
        assert all(torch.isfinite(tensor).all() for tensor in load_checkpoint(folder)["model"].values())


@pytest.mark.slow
def test_early_stopping_after_patience_validations_without_improvement(smoke):
    config = smoke.replace(
        learning_rate=1e-30, warmup_steps=0, patience=1, eval_every=2, checkpoint_every=2, max_steps=20
    )
    state, session = run(config)
    assert state.stopped_early and state.step == 4  # best at step 2, no better at step 4
    assert session.reports[-1]["stopped_early"] is True and session.reports[-1]["final"] is True


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(smoke, tmp_path, dropout):
    # Checkpoints at steps 4 and 6; the crash comes at step 5, between them.
    config = smoke.replace(checkpoint_every=4, eval_every=2, log_every=1, num_layers=2, dropout=dropout)
    _, uninterrupted = run(config)
    session = LocalSession()
    with pytest.raises(InjectedFailure, match="step 5"):
        run(config, FailOnceSession(session, 5, tmp_path / "failed"))
    state, session = run(config, session)
    assert state.step == 6 and state.resumed_from == [4]
    resumed, expected = final_weights(session), final_weights(uninterrupted)
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)


def test_workers_draw_different_dropout_masks_and_a_replayed_step_the_same():
    seeds = {step_seed(0, rank, step) for rank in range(4) for step in range(100)}
    assert len(seeds) == 400 and step_seed(0, 1, 7) == step_seed(0, 1, 7) != step_seed(1, 1, 7)


@pytest.mark.slow
def test_a_finished_run_resumed_again_reports_its_end_without_training(smoke):
    state, session = run(smoke)
    checkpoints = list(session.checkpoints)
    again, session = run(smoke, session)
    assert again.step == state.step == 6 and again.resumed_from == [6]
    assert session.checkpoints == checkpoints  # no second checkpoint under the same name
    assert session.reports[-1]["final"] is True and session.reports[-1]["step"] == 6


@pytest.mark.slow
def test_a_resumed_run_with_more_steps_continues_its_learning_rate_without_a_jump(smoke):
    config = smoke.replace(log_every=1, warmup_steps=2, learning_rate=1e-2)
    _, session = run(config)
    longer, session = run(config.replace(max_steps=12), session)
    assert longer.step == 12 and longer.schedule == [[0, 6], [6, 12]]
    rates = [report["learning_rate"] for report in session.reports]
    assert len(rates) == 12
    steps = [later - earlier for earlier, later in zip(rates, rates[1:])]
    assert all(step <= 1e-12 for step in steps[2:])  # after warm-up: never rises
    jump_at_resume = rates[6] - rates[5]
    assert abs(jump_at_resume) <= max(abs(step) for step in steps[2:5]) + 1e-12
    assert rates[-1] == pytest.approx(config.optim.min_lr_fraction * 1e-2, rel=0.05)


def budget_and_state(max_minutes=1.0, log_every=1000, eval_every=1000):
    training = preset(
        "smoke", max_steps=10_000, max_minutes=max_minutes, log_every=log_every, eval_every=eval_every
    ).training
    state = TrainingState(schedule=[[0, 10_000]])
    return TimeBudget(training, warmup_steps=3, state=state), state


def test_time_budget_plans_as_soon_as_ten_steps_are_measured_not_at_a_report():
    budget, state = budget_and_state(log_every=1000, eval_every=1000)
    for step in range(1, 16):  # a fake clock: 0.2 s per step, 0.5 s from step 5 (the reference)
        state.step, state.training_seconds = step, 0.2 * min(step, 5) + 0.5 * max(0, step - 5)
        assert budget.replan(state, world_size=1, device="cpu") == (step == 15)
    # 60 s budget, 6 s spent, 0.5 s per step: 108 more steps.
    assert state.schedule == [[0, 10_000], [15, 123]] and state.planned_minutes == 1.0
    state.step, state.training_seconds = 16, 6.5  # not due: no report, under 30 s since the plan
    assert not budget.replan(state, 1, "cpu")
    state.step, state.training_seconds = 40, 36.0  # 30 s after the plan: due, and slower now
    # (36 - 1) s over 35 steps = 1 s per step, 24 s left: 24 more steps.
    assert budget.replan(state, 1, "cpu") and state.schedule[-1] == [40, 64]


def test_time_budget_measures_from_the_first_step_when_the_first_steps_take_long():
    budget, state = budget_and_state()
    state.step, state.training_seconds = 1, 2.0  # over 2% of the budget: the reference is here
    assert not budget.replan(state, 1, "cpu")
    state.step, state.training_seconds = 2, 19.0  # 17 s measured over one step: enough to plan
    assert budget.replan(state, 1, "cpu") and state.schedule[-1] == [2, 4]


def test_time_budget_ends_the_run_before_a_step_would_overshoot_by_more_than_five_percent():
    budget, state = budget_and_state()
    for step in range(1, 200):  # 2 s per step, then from step 20 on 5 s: the plan overshoots
        state.step, state.training_seconds = step, 2.0 * min(step, 20) + 5.0 * max(0, step - 20)
        budget.replan(state, 1, "cpu")
        if state.finished:
            break
    assert state.schedule[1] == [9, 30]  # planned from the fast steps
    assert state.step < 30 and state.training_seconds <= 60.0 * 1.05
    assert state.training_seconds + 5.0 > 60.0  # and not far below it either
    assert (
        budget.stop_line == "time budget: 1.0 minutes of training used (--max-minutes 1); ending at step 24"
    )


def test_time_budget_on_a_machine_too_slow_for_it_stops_after_the_first_step_with_one_line():
    budget, state = budget_and_state(max_minutes=1.0)
    state.step, state.training_seconds = 1, 40.0  # one step takes 40 s of a 60-s budget
    assert budget.replan(state, 1, "cpu") and state.finished and state.schedule[-1] == [1, 1]
    assert budget.stop_line == (
        "time budget: the first 1 step(s) alone took 0.7 minutes of --max-minutes 1; ending with a "
        "checkpoint at step 1 (a smaller model, --precision fp32 or more minutes would train further)"
    )


def test_progress_clock_is_due_every_thirty_seconds_after_the_last_line():
    now = [100.0]
    progress = ProgressClock(now=lambda: now[0])
    now[0] = 129.9
    assert not progress.due()
    now[0] = 130.0
    assert progress.due()
    progress.mark()
    now[0] = 159.0
    assert not progress.due()


class FakeClock:
    """Every reading advances the time by `tick` seconds."""

    def __init__(self, tick: float):
        self.time, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.time += self.tick
        return self.time


@pytest.mark.slow
def test_a_budgeted_run_under_a_fake_clock_keeps_its_budget_and_prints_progress_every_30_s(
    smoke, monkeypatch, capsys
):
    fake = FakeClock(tick=1.0)  # a step reads the clock twice: 1 s of training per step
    monkeypatch.setattr(train.worker, "now", fake)
    config = smoke.replace(
        max_steps=100_000,
        max_minutes=1.0,
        log_every=1000,
        eval_every=1000,
        checkpoint_every=1000,
        precision="fp32",
    )
    state, session = run(config)
    assert state.finished and 50 <= state.training_seconds <= 60.0 * 1.05
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    # Between reports rank 0 prints a line every 30 s of the clock: one per <= 30 s, never more.
    assert len(lines) >= fake.time / 30.0 - 1 and all("ETA" in line for line in lines)
    assert len(lines) <= fake.time / 30.0 + 2
    assert session.reports[-1]["final"] is True and session.checkpoints


@pytest.mark.slow
def test_a_run_with_a_time_budget_stops_annealed_before_max_steps(smoke):
    config = smoke.replace(
        max_steps=100_000,
        max_minutes=0.05,
        log_every=5,
        eval_every=1000,
        checkpoint_every=1000,
        warmup_steps=10,
        learning_rate=1e-2,
    )
    state, session = run(config)
    assert 10 < state.step < 100_000 and state.finished and state.planned_minutes == 0.05
    assert state.schedule[0] == [0, 100_000] and state.schedule[-1][1] == state.step
    last = session.reports[-1]
    assert last["final"] is True and "val_mse_frame" in last and session.checkpoints
    # The schedule ended where the run did: the last step ran near the cosine's floor.
    assert last["learning_rate"] < 0.25 * 1e-2


@pytest.mark.slow
def test_a_time_limited_run_resumed_with_more_minutes_trains_on_and_with_the_same_is_done(smoke):
    config = smoke.replace(
        max_steps=100_000,
        max_minutes=0.02,
        log_every=5,
        eval_every=1000,
        checkpoint_every=1000,
        warmup_steps=5,
    )
    first, session = run(config)
    again, session = run(config, session)  # the same budget: nothing more to do
    assert again.step == first.step and again.resumed_from == [first.step]
    longer, session = run(config.replace(max_minutes=0.04), session)
    assert longer.step > first.step and longer.planned_minutes == 0.04 and longer.finished
    assert longer.training_seconds > first.training_seconds


def test_gradient_accumulation_matches_the_full_batch():
    config = preset("smoke", hidden_size=16)

    def one_step(micro_batches):
        torch.manual_seed(0)
        model = CompositeLSTMAutoencoder(config.model)
        before = [parameter.detach().clone() for parameter in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the gradient
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        result = train_step(model, optimizer, scheduler, micro_batches, config.model, "fp32", 0.0, 0)
        return result, [old - new.detach() for old, new in zip(before, model.parameters())]

    frames = torch.rand(4, 20, 1, 64, 64)
    full, full_gradients = one_step([frames])
    split, split_gradients = one_step(list(frames.chunk(2)))
    assert split.loss == pytest.approx(full.loss, rel=1e-5)
    assert split.grad_norm == pytest.approx(full.grad_norm, rel=1e-4)
    for full_gradient, split_gradient in zip(full_gradients, split_gradients):
        assert torch.allclose(full_gradient, split_gradient, rtol=1e-3, atol=1e-6)
