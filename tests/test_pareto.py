"""The Pareto front and the rule that picks one result from it (lstm_ae/pareto.py)."""

import itertools
import math
import random

from lstm_ae.pareto import dominates, front_choice, pareto_front, rule_text

MSE_SSIM = ("min", "max")


def test_dominance_follows_each_objectives_mode():
    assert dominates((110.0, 0.45), (112.0, 0.40), MSE_SSIM)
    assert dominates((110.0, 0.45), (110.0, 0.40), MSE_SSIM)  # equal on one, better on the other
    assert not dominates((110.0, 0.40), (110.0, 0.40), MSE_SSIM)  # equal points: neither
    assert not dominates((110.0, 0.40), (112.0, 0.45), MSE_SSIM)  # a trade: neither
    assert not dominates((112.0, 0.45), (110.0, 0.40), MSE_SSIM)
    assert dominates((1.0, 2.0), (2.0, 3.0), ("min", "min"))
    assert not dominates((float("nan"), 0.9), (200.0, 0.1), MSE_SSIM)


def test_front_of_a_trade_off_and_its_dominated_points():
    points = [
        (114.7, 0.41),  # lowest error
        (124.8, 0.48),  # sharpest
        (118.0, 0.44),  # between: on the front
        (119.0, 0.43),  # dominated by (118.0, 0.44)
        (130.0, 0.40),  # dominated by all of the front
        (float("nan"), 0.99),  # no error measured: never on the front
        (114.7, 0.41),  # a tie with the first: both on the front
    ]
    assert pareto_front(points, MSE_SSIM) == [True, True, True, False, False, False, True]


def test_front_agrees_with_a_brute_force_check_on_random_points():
    generator = random.Random(3)
    for _ in range(50):
        points = [(generator.choice(range(100, 110)), generator.random()) for _ in range(12)]
        front = pareto_front(points, MSE_SSIM)
        for (i, a), (_, b) in itertools.permutations(enumerate(points), 2):
            # a point on the front is beaten by nobody on both counts
            if front[i]:
                assert not (b[0] <= a[0] and b[1] >= a[1] and (b[0] < a[0] or b[1] > a[1]))
        for i, a in enumerate(points):
            if not front[i]:  # every point off the front has a dominator on it
                assert any(front[j] and dominates(points[j], a, MSE_SSIM) for j in range(len(points)))


def test_choice_is_the_sharpest_within_two_percent_of_the_lowest_error():
    points = [(114.7, 0.41), (124.8, 0.48), (116.9, 0.44), (117.1, 0.47), (116.0, 0.42)]
    # best MSE 114.7; 2% -> up to 116.994: 116.9 (0.44) qualifies, 117.1 (0.47) does not
    assert front_choice(points, MSE_SSIM) == 2
    assert front_choice(points, MSE_SSIM, tolerance=0.025) == 3
    assert front_choice(points, MSE_SSIM, tolerance=0.0) == 0
    chosen = front_choice(points, MSE_SSIM)
    assert pareto_front(points, MSE_SSIM)[chosen]


def test_choice_when_the_first_objective_is_maximised_and_with_missing_values():
    points = [(0.50, 30.0), (0.495, 10.0), (0.40, 5.0), (math.nan, 1.0)]
    assert front_choice(points, ("max", "min")) == 1  # 0.495 >= 0.50 - 2%: lower second wins
    assert front_choice([(math.nan, 1.0)], MSE_SSIM) is None
    assert front_choice([], MSE_SSIM) is None


def test_rule_text_names_both_metrics():
    assert rule_text(("val_mse_frame", "val_ssim")) == "the best val_ssim within 2% of the best val_mse_frame"
