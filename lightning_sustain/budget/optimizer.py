"""Choosing a GPU power limit from a short profile of energy and time per step (plain Python).

The idea of Zeus' ``GlobalPowerLimitOptimizer``: run a few steps at each of several power
limits, measure the energy and the time per step at each, and keep the limit that best
serves the objective within an allowed slowdown. Capping below the busy power lowers
the clock; work slows down less than power drops, so energy per step usually falls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LimitProfile", "OBJECTIVES", "candidate_limits_w", "choose_limit"]

OBJECTIVES = ("energy", "time", "balanced")


@dataclass(frozen=True)
class LimitProfile:
    """What was measured at one power limit.

    Attributes:
        limit_w: the power limit, in watts.
        energy_per_step_j: mean energy of one step, in joules.
        time_per_step_s: mean duration of one step, in seconds.
        steps: the number of steps measured.
    """

    limit_w: float
    energy_per_step_j: float
    time_per_step_s: float
    steps: int


def candidate_limits_w(
    default_w: float,
    low_w: float,
    high_w: float,
    fractions: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6),
) -> list[float]:
    """Limits to profile: fractions of the default limit, clamped to the range, highest first.

    Raises:
        ValueError: an empty or non-positive fraction list, or an invalid range.
    """
    if not fractions or any(not (0 < f <= 1.5) for f in fractions):
        raise ValueError(f"fractions must be numbers in (0, 1.5], got {list(fractions)!r}.")
    if not 0 < low_w <= high_w:
        raise ValueError(f"the limit range [{low_w}, {high_w}] W is not valid.")
    limits = {round(min(max(default_w * f, low_w), high_w), 1) for f in fractions}
    return sorted(limits, reverse=True)


def choose_limit(
    profiles: Sequence[LimitProfile], objective: str = "energy", max_slowdown: float = 0.1
) -> LimitProfile:
    """Pick the best profiled limit.

    The reference is the fastest profile. Profiles slower than it by more than
    ``max_slowdown`` are out. Among the rest, ``energy`` minimises energy per step,
    ``time`` minimises time per step (ties within 1% go to the lower energy), and
    ``balanced`` minimises energy x time.

    Args:
        profiles: the measurements, one per limit.
        objective: ``"energy"``, ``"time"`` or ``"balanced"``.
        max_slowdown: the allowed extra time per step, as a fraction (0.1 = 10%).

    Raises:
        ValueError: no profiles, an unknown objective or a negative slowdown.
    """
    if not profiles:
        raise ValueError("choose_limit needs at least one profiled limit.")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {', '.join(OBJECTIVES)}.")
    if not math.isfinite(max_slowdown) or max_slowdown < 0:
        raise ValueError(f"max_slowdown must be a number >= 0, got {max_slowdown!r}.")
    fastest = min(p.time_per_step_s for p in profiles)
    allowed = [p for p in profiles if p.time_per_step_s <= fastest * (1.0 + max_slowdown)]
    if objective == "energy":
        return min(allowed, key=lambda p: (p.energy_per_step_j, -p.limit_w))
    if objective == "time":
        quick = [p for p in allowed if p.time_per_step_s <= fastest * 1.01]
        return min(quick, key=lambda p: (p.energy_per_step_j, -p.limit_w))
    return min(allowed, key=lambda p: (p.energy_per_step_j * p.time_per_step_s, -p.limit_w))
