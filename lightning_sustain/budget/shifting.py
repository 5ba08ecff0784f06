"""Power shifting between data-parallel ranks (pure policy, no Lightning, no devices).

In synchronous data parallelism every rank waits for the slowest one at each gradient
all-reduce. A rank that spends a fraction ``w`` of its step waiting can run slower at no
cost to the step time, and a GPU that runs slower under a lower power limit uses less
energy for the same work. :class:`PowerShiftingPolicy` turns per-rank wait fractions into
new per-rank power limits:

- the rank with the least waiting is on the critical path: it gets as much power as its
  device accepts and the job budget leaves;
- every other rank gives up power in proportion to its *slack* (its wait fraction minus
  the critical rank's, less a safety margin ``target_slack``);
- a rank whose slack fell below half the margin (it got too slow) gets some power back;
- the limits always stay inside each device's range and their sum never exceeds the job
  budget.

The model behind the step size is deliberately conservative: it assumes a step's compute
time grows in inverse proportion to the power limit (``t ~ 1/P``). Real GPUs lose less
than that (clock ~ power^(1/3) for compute-bound work, less for memory-bound work), so a
single round never pushes a rank past the critical path; rounds repeat every N steps and
the feedback closes the remaining slack.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_sustain.energy.estimate import as_number

logger = logging.getLogger(__name__)

__all__ = ["PowerShiftingPolicy", "RankPowerState", "ShiftDecision", "split_budget"]


def _finite(name: str, value: float, low: float | None = None, high: float | None = None) -> float:
    value = as_number(name, value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class RankPowerState:
    """What the policy knows about one rank over the last window.

    Attributes:
        rank: global rank.
        wait_fraction: fraction of the window's step time spent waiting in gradient
            synchronisation, in [0, 1].
        limit_w: the power limit in force (hardware or software), in watts.
        min_limit_w: the lowest limit the device accepts, in watts.
        max_limit_w: the highest limit the device accepts, in watts.
        power_w: measured mean power over the window, in watts (None when unknown).
        adjustable: False when this rank's limit cannot be changed at all; its limit then
            counts against the budget as it is.
    """

    rank: int
    wait_fraction: float
    limit_w: float
    min_limit_w: float
    max_limit_w: float
    power_w: float | None = None
    adjustable: bool = True

    def validate(self) -> None:
        """Check the values.

        Raises:
            ValueError: a value is out of range; the message names the rank and the field.
        """
        prefix = f"rank {self.rank}: "
        try:
            _finite("wait_fraction", self.wait_fraction, 0.0, 1.0)
            _finite("min_limit_w", self.min_limit_w, 0.0)
            _finite("max_limit_w", self.max_limit_w, self.min_limit_w)
            _finite("limit_w", self.limit_w, 0.0)
            if self.power_w is not None:
                _finite("power_w", self.power_w, 0.0)
        except ValueError as exc:
            raise ValueError(prefix + str(exc)) from None


@dataclass(frozen=True)
class ShiftDecision:
    """New per-rank limits.

    Attributes:
        limits_w: the new limit of each rank, in the order of the states given, in watts.
        critical_rank: the rank found on the critical path (least waiting).
        budget_w: the job budget the limits respect, in watts.
        changed: whether any limit differs from the one in force (by more than 0.5 W).
    """

    limits_w: tuple[float, ...]
    critical_rank: int
    budget_w: float
    changed: bool

    @property
    def total_w(self) -> float:
        """Sum of the new limits, in watts."""
        return float(sum(self.limits_w))


def split_budget(
    budget_w: float, ranges_w: Sequence[tuple[float, float]], fixed_w: Sequence[float | None]
) -> list[float]:
    """Initial limits: share a job budget in proportion to each device's maximum limit.

    Args:
        budget_w: the job budget, in watts.
        ranges_w: (min, max) limit of each rank's device, in watts.
        fixed_w: a limit that cannot change (None where it can), in watts.

    Returns:
        One limit per rank, inside its range, summing to at most ``budget_w``.

    Raises:
        ValueError: the budget is below the sum of the minimum (and fixed) limits.
    """
    _check_feasible(budget_w, ranges_w, fixed_w)
    free = [i for i, f in enumerate(fixed_w) if f is None]
    available = budget_w - sum(f for f in fixed_w if f is not None)
    limits = [f if f is not None else ranges_w[i][1] for i, f in enumerate(fixed_w)]
    if sum(limits[i] for i in free) <= available:
        return [float(v) for v in limits]
    weights = {i: ranges_w[i][1] for i in free}
    return [float(v) for v in _fit_to(available, limits, free, ranges_w, weights)]


def _check_feasible(
    budget_w: float, ranges_w: Sequence[tuple[float, float]], fixed_w: Sequence[float | None]
) -> None:
    floor_w = sum(f if f is not None else r[0] for r, f in zip(ranges_w, fixed_w, strict=True))
    if budget_w + 1e-9 < floor_w:
        raise ValueError(
            f"The job power budget of {budget_w:.0f} W is below the {floor_w:.0f} W that the "
            "ranks need at their lowest power limits (and at the limits that cannot be "
            "changed). Raise the budget or train on fewer devices."
        )


def _fit_to(
    available_w: float,
    limits_w: list[float],
    free: list[int],
    ranges_w: Sequence[tuple[float, float]],
    weights: dict[int, float],
) -> list[float]:
    """Lower the free limits so that they sum to ``available_w`` (weighted, never below min)."""
    out = list(limits_w)
    active = [i for i in free if out[i] > ranges_w[i][0]]
    for _ in range(len(free) + 1):
        excess = sum(out[i] for i in free) - available_w
        if excess <= 1e-9 or not active:
            break
        total_weight = sum(weights[i] for i in active) or float(len(active))
        next_active = []
        for i in active:
            share = excess * (weights[i] / total_weight if total_weight else 1 / len(active))
            low = ranges_w[i][0]
            if out[i] - share <= low:
                out[i] = low
            else:
                out[i] -= share
                next_active.append(i)
        active = next_active
    return out


class PowerShiftingPolicy:
    """Move power from ranks that wait to the rank on the critical path.

    Args:
        target_slack: wait fraction (beyond the critical rank's) left to every rank as a
            safety margin against noise, in [0, 0.5]. Below half of it a rank gets power
            back.
        max_decrease: largest relative decrease of one rank's limit in one round, in
            (0, 1].
        raise_fraction: how much of its range a rank that became too slow gets back in
            one round, in (0, 1].

    Raises:
        ValueError: a setting is out of range; the message names it.
    """

    def __init__(
        self, target_slack: float = 0.05, max_decrease: float = 0.5, raise_fraction: float = 0.1
    ) -> None:
        self.target_slack = _finite("target_slack", target_slack, 0.0, 0.5)
        self.max_decrease = _finite("max_decrease", max_decrease, 1e-6, 1.0)
        self.raise_fraction = _finite("raise_fraction", raise_fraction, 1e-6, 1.0)

    def initial_limits(self, states: Sequence[RankPowerState], budget_w: float) -> list[float]:
        """Limits to apply before the first window: the current ones, fitted into the budget.

        Raises:
            ValueError: invalid states, or a budget below the sum of the minimum limits.
        """
        for state in states:
            state.validate()
        ranges = [(s.min_limit_w, s.max_limit_w) for s in states]
        fixed = [None if s.adjustable else s.limit_w for s in states]
        _check_feasible(budget_w, ranges, fixed)
        current = [min(max(s.limit_w, s.min_limit_w), s.max_limit_w) for s in states]
        if sum(current) <= budget_w + 1e-9:
            return current
        return split_budget(budget_w, ranges, fixed)

    def rebalance(self, states: Sequence[RankPowerState], budget_w: float) -> ShiftDecision:
        """New limits from one window of measurements.

        Args:
            states: one entry per rank (any order; the decision keeps it).
            budget_w: the job budget: the new limits sum to at most this, in watts.

        Returns:
            The decision; every rank computes the same one from the same inputs.

        Raises:
            ValueError: no states, invalid states, or an infeasible budget.
        """
        if not states:
            raise ValueError("rebalance needs at least one rank's state.")
        for state in states:
            state.validate()
        _finite("budget_w", budget_w, 0.0)
        ranges = [(s.min_limit_w, s.max_limit_w) for s in states]
        fixed = [None if s.adjustable else s.limit_w for s in states]
        _check_feasible(budget_w, ranges, fixed)

        critical = min(range(len(states)), key=lambda i: (states[i].wait_fraction, states[i].rank))
        base_wait = states[critical].wait_fraction
        wanted: list[float] = []
        for i, s in enumerate(states):
            low, high = ranges[i]
            if not s.adjustable:
                wanted.append(s.limit_w)
                continue
            if i == critical:
                wanted.append(high)
                continue
            slack = s.wait_fraction - base_wait
            if slack > self.target_slack:
                wanted.append(max(low, self._lower(s, slack)))
            elif slack < 0.5 * self.target_slack:
                wanted.append(min(high, s.limit_w + self.raise_fraction * (high - low)))
            else:
                wanted.append(min(max(s.limit_w, low), high))

        free = [i for i, s in enumerate(states) if s.adjustable]
        available = budget_w - sum(f for f in fixed if f is not None)
        if sum(wanted[i] for i in free) > available + 1e-9:
            # take the excess from the ranks with slack first, then from the critical rank
            others = [i for i in free if i != critical]
            weights = {i: max(wanted[i] - ranges[i][0], 1e-9) for i in free}
            limits = _fit_to(
                available - (wanted[critical] if critical in free else 0.0),
                wanted,
                others,
                ranges,
                weights,
            )
            if sum(limits[i] for i in free) > available + 1e-9:
                limits = _fit_to(available, limits, free, ranges, weights)
        else:
            limits = wanted
        limits = [float(v) for v in limits]
        changed = any(abs(v - s.limit_w) > 0.5 for v, s in zip(limits, states, strict=True))
        return ShiftDecision(
            limits_w=tuple(limits),
            critical_rank=states[critical].rank,
            budget_w=float(budget_w),
            changed=changed,
        )

    def _lower(self, state: RankPowerState, slack: float) -> float:
        """The limit that would use up ``slack - target_slack`` if time ~ 1 / power."""
        compute = max(1.0 - state.wait_fraction, 1e-6)
        slowdown = (compute + slack - self.target_slack) / compute
        base_w = state.limit_w
        if state.power_w is not None and state.power_w > 0:
            # mean power / compute fraction bounds the busy power from above (idle time
            # counted as busy): the limit may be above what the device draws anyway
            base_w = min(base_w, state.power_w / compute)
        proposed = base_w / slowdown
        return max(proposed, state.limit_w * (1.0 - self.max_decrease))
