"""Two (or more) objectives at once: which results are on the Pareto front, and one rule that
picks a single result from it.

A result dominates another when it is at least as good on every objective and better on one;
the front is the results no other result dominates. Objectives are (metric, mode) pairs with
mode "min" or "max" (`lstm_ae.metrics.METRIC_MODES`). A result missing a finite value of any
objective is never on the front and never dominates.

The rule (`front_choice`): among the results within `tolerance` (2%) of the best value of the
first objective, the best value of the second. With MSE/frame first and SSIM second: the
sharpest model whose error is within 2% of the lowest error.
"""

from __future__ import annotations

from collections.abc import Sequence

from lstm_ae.metrics import is_finite_number

FRONT_TOLERANCE = 0.02


def _oriented(point: Sequence[float], modes: Sequence[str]) -> tuple[float, ...]:
    """The point with every objective turned into one to minimise."""
    return tuple(value if mode == "min" else -value for value, mode in zip(point, modes))


def _complete(point: Sequence[object]) -> bool:
    return all(is_finite_number(value) for value in point)


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """Whether `a` is at least as good as `b` on every objective and better on one."""
    if not (_complete(a) and _complete(b)):
        return False
    a, b = _oriented(a, modes), _oriented(b, modes)
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[bool]:
    """For each point, whether it is on the front (complete and dominated by no other point).

    Equal points are all on the front (neither dominates the other)."""
    return [
        _complete(point) and not any(dominates(other, point, modes) for other in points) for point in points
    ]


def rule_text(metrics: Sequence[str], tolerance: float = FRONT_TOLERANCE) -> str:
    """The rule of `front_choice`, in words."""
    return f"the best {metrics[1]} within {tolerance:.0%} of the best {metrics[0]}"


def front_choice(
    points: Sequence[Sequence[float]], modes: Sequence[str], tolerance: float = FRONT_TOLERANCE
) -> int | None:
    """Index of the point `rule_text` describes, or None when no point is complete.

    "Within 2%" of the best first value b: at most b + 2% |b| when minimising, at least
    b - 2% |b| when maximising. The chosen point is on the front (ties on the second objective
    go to the better first value, then to the earlier point)."""
    complete = [index for index, point in enumerate(points) if _complete(point)]
    if not complete:
        return None
    first_mode, second_mode = modes[0], modes[1]
    firsts = [points[index][0] for index in complete]
    best_first = min(firsts) if first_mode == "min" else max(firsts)
    slack = tolerance * abs(best_first)
    if first_mode == "min":
        near = [index for index in complete if points[index][0] <= best_first + slack]
    else:
        near = [index for index in complete if points[index][0] >= best_first - slack]

    def key(index: int) -> tuple[float, float, int]:
        first, second = _oriented(points[index][:2], (first_mode, second_mode))
        return (second, first, index)

    return min(near, key=key)
