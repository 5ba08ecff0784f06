"""Carbon-aware control: choose a power limit, or a pause, from a carbon-intensity forecast.

Plain Python (no Lightning, no device import): the
:class:`~lightning_sustain.callbacks.carbon_aware.CarbonAwareController` callback feeds
it measured step times and applies what it answers.

**Power mode.** For a compute-bound accelerator under DVFS, work at a power cap ``c``
(a fraction of the busy power) takes ``c ** -perf_exponent`` times as long and uses
``c ** (1 - perf_exponent)`` of the energy (``perf_exponent = 1/3``: clock ~ cube root
of power; see docs/budgets.md). Minimising ``sum(intensity x energy)`` for a fixed
amount of work under a bound on the extra time gives a cap inversely proportional to
the intensity, ``c(I) = clip(k / I, c_min, 1)`` (Lagrange condition). :func:`plan_power`
finds the smallest ``k`` (the most capping) for which the forecast says the remaining
work still fits in the remaining allowance of extra time:

- the allowance is ``max_slowdown x (uncapped time of the whole run)``, minus the time
  already lost, measured on the wall clock against the uncapped step time of the
  warm-up, times ``1 - margin``;
- the window is the remaining uncapped time plus that allowance (and never past a
  deadline); the forecast is sampled over it;
- once the allowance is spent, or with no forecast gain, the answer is "uncapped";
- the cap chosen now stays in force until the next decision (``hold_s``), which may be
  longer than a forecast chunk: the cap is never so low that holding it that long (or
  until the work is done, the last partial interval) would lose more than the
  allowance left. By induction over decisions, the time lost never exceeds the
  allowance, whatever the forecast error.

The projected slowdown of the whole run (time lost so far plus the time the plan loses
from now on) is part of each :class:`CarbonDecision`; it never exceeds
``max_slowdown`` by construction, and the benchmark checks the measured wall time.

**Pause mode.** :func:`plan_pause`: when the intensity now is above a threshold, find
the first forecast time at which it is at or below the threshold again; pause until then
only if ``resume time + remaining work x (1 + margin) + resume overhead`` is before the
deadline. Otherwise keep training (and say why). A run whose remaining work no longer
fits before the deadline is never paused or capped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sustain.energy.intensity import IntensityProvider

logger = logging.getLogger(__name__)

__all__ = [
    "CarbonDecision",
    "DecisionLog",
    "PausePlan",
    "PowerPlan",
    "plan_pause",
    "hold_floor_fraction",
    "plan_power",
    "time_scale",
]

#: most forecast samples a plan looks at (bounded time per decision)
MAX_FORECAST_POINTS = 240


def time_scale(fraction: float | np.ndarray, perf_exponent: float) -> float | np.ndarray:
    """Wall time per unit of work at a power cap of ``fraction`` of the busy power."""
    return np.power(np.clip(fraction, 1e-6, 1.0), -perf_exponent)


@dataclass
class CarbonDecision:
    """One decision of the carbon-aware controller (one line of the JSONL log).

    Attributes:
        time_unix_s: when it was taken (Unix seconds).
        elapsed_s: wall seconds since the first fit started (across resumes).
        step: global step.
        intensity_g_per_kwh: grid intensity now, gCO2e/kWh.
        intensity_status: ``"series"``, ``"constant"`` or ``"fallback"``.
        action: ``"limit"`` (power mode), ``"run"``, ``"pause_stop"``, ``"pause_wait"``,
            ``"budget_stop"``.
        limit_fraction: the power cap as a fraction of the reference busy power (None
            in pause mode).
        limit_w: the limit or software target applied, watts (None when none).
        reason: why, in words.
        projected_slowdown: projected extra wall time of the whole run over the
            uncapped run, as a fraction.
        resume_at_unix_s: for a pause, when to resume.
        co2e_g: time-resolved grams CO2e spent so far (this run and earlier ones).
    """

    time_unix_s: float
    elapsed_s: float
    step: int
    intensity_g_per_kwh: float
    intensity_status: str
    action: str
    limit_fraction: float | None
    limit_w: float | None
    reason: str
    projected_slowdown: float
    resume_at_unix_s: float | None = None
    co2e_g: float = 0.0

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps(asdict(self), sort_keys=True)


class DecisionLog:
    """Appends decisions to a JSONL file (one object per line; flushed per line).

    Args:
        path: the file; parent directories are created. None: keep in memory only.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self.decisions: list[CarbonDecision] = []
        self._handle: Any = None

    def append(self, decision: CarbonDecision) -> None:
        """Record one decision (file errors are logged, never raised)."""
        self.decisions.append(decision)
        if self.path is None:
            return
        try:
            if self._handle is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._handle.write(decision.to_json() + "\n")
            self._handle.flush()
        except OSError as exc:
            logger.warning("Could not write the carbon decision log %s: %s", self.path, exc)
            self.path = None

    def close(self) -> None:
        """Close the file."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _forecast(
    provider: IntensityProvider, start_unix_s: float, end_unix_s: float, points: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean intensity over ``points`` equal chunks of ``[start, end]``: (starts, values, dt)."""
    points = max(1, min(points, MAX_FORECAST_POINTS))
    dt = (end_unix_s - start_unix_s) / points
    starts = start_unix_s + dt * np.arange(points)
    many = getattr(provider, "mean_intensities", None)
    if callable(many):  # vectorised (TimeSeriesIntensity)
        values = np.asarray(many(starts, starts + dt)[0], dtype=float)
    else:
        values = np.asarray(
            [provider.mean_intensity(float(s), float(s + dt))[0] for s in starts], dtype=float
        )
    return starts, values, dt


def _held_loss_s(
    fraction: float, remaining_work_s: float, hold_s: float | None, perf_exponent: float
) -> float:
    """Wall time lost holding ``fraction`` for ``hold_s`` or until the work is done."""
    scale = float(time_scale(fraction, perf_exponent))
    lost_to_end = remaining_work_s * (scale - 1.0)
    if hold_s is None:
        return lost_to_end
    return min(hold_s * (1.0 - 1.0 / scale), lost_to_end)


def hold_floor_fraction(
    remaining_work_s: float, allowed_lost_s: float, hold_s: float | None, perf_exponent: float
) -> float:
    """The lowest cap whose time lost while held stays within the allowance.

    Holding cap ``c`` (time scale ``s = c ** -perf_exponent``) for ``hold_s`` seconds, or
    until ``remaining_work_s`` of uncapped work is done if that comes first, loses
    ``min(hold_s x (1 - 1/s), remaining_work_s x (s - 1))`` seconds; the answer is the
    lowest ``c`` for which that is at most ``allowed_lost_s``.

    Args:
        remaining_work_s: uncapped wall time the remaining work needs, seconds.
        allowed_lost_s: extra wall time still allowed, seconds.
        hold_s: how long the cap stays in force; ``None``: until the work is done.
        perf_exponent: the DVFS model's exponent (time ~ cap ** -exponent).

    Returns:
        A fraction of busy power in ``(0, 1]``; 1.0 when no capping is affordable.
    """
    if allowed_lost_s <= 0 or remaining_work_s <= 0:
        return 1.0
    # the largest time scale affordable: either way of ending the hold within the allowance
    scale = 1.0 + allowed_lost_s / remaining_work_s
    if hold_s is not None:
        scale = max(
            scale, math.inf if allowed_lost_s >= hold_s else hold_s / (hold_s - allowed_lost_s)
        )
    if math.isinf(scale):
        return 0.0
    # one part in 1e12 above the exact root, so rounding never lands on the wrong side
    return min(1.0, scale ** (-1.0 / perf_exponent) * (1.0 + 1e-12))


@dataclass
class PowerPlan:
    """Answer of :func:`plan_power`.

    Attributes:
        fraction: the cap now, as a fraction of the busy power (1.0: uncapped).
        k_g_per_kwh: the intensity at and below which the run is uncapped.
        projected_lost_s: extra wall time the plan adds from now on, seconds.
        reason: why, in words.
    """

    fraction: float
    k_g_per_kwh: float | None
    projected_lost_s: float
    reason: str


def plan_power(
    provider: IntensityProvider,
    now_unix_s: float,
    *,
    remaining_work_s: float,
    allowed_lost_s: float,
    min_fraction: float,
    perf_exponent: float = 1.0 / 3.0,
    deadline_unix_s: float | None = None,
    points: int = 120,
    hold_s: float | None = None,
) -> PowerPlan:
    """Choose the power cap now from the forecast over the rest of the run.

    Args:
        provider: the intensity source (its values over the window are the forecast).
        now_unix_s: now.
        remaining_work_s: uncapped wall time the remaining steps need, seconds.
        allowed_lost_s: extra wall time still allowed (>= 0 caps; <= 0 runs uncapped).
        min_fraction: the lowest cap allowed, as a fraction of busy power (0 < f <= 1).
        perf_exponent: the DVFS model's exponent (time ~ cap ** -exponent).
        deadline_unix_s: never plan past this time.
        points: forecast samples over the window.
        hold_s: how long the answer stays in force (the time to the next decision);
            ``None``: until the work is done (the safe, most conservative assumption).
            The cap is never lower than what keeps the time lost while it is held, or
            until the remaining work is done if sooner, within ``allowed_lost_s``.

    Returns:
        The plan.
    """
    if remaining_work_s <= 0:
        return PowerPlan(1.0, None, 0.0, "no work left")
    if allowed_lost_s <= 0:
        return PowerPlan(1.0, None, 0.0, "the slowdown allowance is spent; uncapped")
    window_s = remaining_work_s + allowed_lost_s
    if deadline_unix_s is not None:
        window_s = min(window_s, deadline_unix_s - now_unix_s)
        if window_s <= remaining_work_s:
            return PowerPlan(1.0, None, 0.0, "the deadline leaves no room to slow down; uncapped")
    _, values, dt = _forecast(provider, now_unix_s, now_unix_s + window_s, points)
    now_value = provider.intensity_at(now_unix_s).g_co2e_per_kwh

    def caps(k: float) -> np.ndarray:
        return np.clip(k / np.maximum(values, 1e-9), min_fraction, 1.0)

    def work(k: float) -> float:
        return float(np.sum(dt / time_scale(caps(k), perf_exponent)))

    hi = float(values.max()) if values.size else now_value
    if hi <= 0 or work(0.0) >= remaining_work_s:
        k = 0.0  # even the lowest cap everywhere fits
    else:
        lo = 0.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if work(mid) >= remaining_work_s:
                hi = mid
            else:
                lo = mid
        k = hi
    fraction = float(np.clip(k / max(now_value, 1e-9), min_fraction, 1.0))
    floor = hold_floor_fraction(remaining_work_s, allowed_lost_s, hold_s, perf_exponent)
    held = fraction < floor
    fraction = max(fraction, floor)
    # time the plan needs for the remaining work: walk the window until the work is done
    rates = 1.0 / time_scale(caps(k), perf_exponent)
    done = np.cumsum(rates * dt)
    idx = int(np.searchsorted(done, remaining_work_s))
    if idx >= done.size:
        needed_s = window_s
    else:
        before = done[idx - 1] if idx > 0 else 0.0
        needed_s = idx * dt + (remaining_work_s - before) / rates[idx]
    lost_s = max(0.0, needed_s - remaining_work_s)
    if held:
        held_loss_s = _held_loss_s(fraction, remaining_work_s, hold_s, perf_exponent)
        lost_s = min(allowed_lost_s, max(lost_s, held_loss_s))
    if fraction >= 1.0:
        reason = f"intensity {now_value:.0f} <= {k:.0f} gCO2e/kWh: full power"
    elif held:
        reason = (
            f"intensity {now_value:.0f} > {k:.0f} gCO2e/kWh: cap {fraction:.2f} of busy power, "
            f"the lowest whose time lost until the next decision stays within the "
            f"{allowed_lost_s:.1f} s still allowed"
        )
    else:
        reason = (
            f"intensity {now_value:.0f} > {k:.0f} gCO2e/kWh: cap {fraction:.2f} of busy power "
            f"(forecast fits the remaining work in {needed_s:.0f} s, {lost_s:.0f} s of "
            f"{allowed_lost_s:.0f} s allowed extra)"
        )
    return PowerPlan(fraction, k, lost_s, reason)


@dataclass
class PausePlan:
    """Answer of :func:`plan_pause`.

    Attributes:
        pause: whether to pause now.
        resume_at_unix_s: when the intensity is forecast at or below the threshold again.
        reason: why, in words.
    """

    pause: bool
    resume_at_unix_s: float | None
    reason: str


def plan_pause(
    provider: IntensityProvider,
    now_unix_s: float,
    *,
    threshold_g_per_kwh: float,
    remaining_s: float,
    deadline_unix_s: float | None,
    resume_overhead_s: float = 0.0,
    margin: float = 0.2,
    max_pause_s: float = 86_400.0,
    resolution_s: float = 60.0,
) -> PausePlan:
    """Decide whether to pause training until the grid is cleaner.

    Args:
        provider: the intensity source.
        now_unix_s: now.
        threshold_g_per_kwh: pause while the intensity is above this.
        remaining_s: estimated wall time the remaining work needs, seconds.
        deadline_unix_s: the run must end by then (None: no deadline).
        resume_overhead_s: time to restart and restore a checkpoint after a pause.
        margin: extra fraction of ``remaining_s`` kept in reserve.
        max_pause_s: the longest pause looked for.
        resolution_s: forecast scan step, seconds.

    Returns:
        The plan.
    """
    now_value = provider.intensity_at(now_unix_s).g_co2e_per_kwh
    if now_value <= threshold_g_per_kwh:
        return PausePlan(False, None, f"intensity {now_value:.0f} <= {threshold_g_per_kwh:g}")
    reserve_s = remaining_s * (1.0 + margin) + resume_overhead_s
    horizon_s = max_pause_s
    if deadline_unix_s is not None:
        horizon_s = min(horizon_s, deadline_unix_s - now_unix_s - reserve_s)
        if horizon_s <= 0:
            return PausePlan(
                False,
                None,
                f"intensity {now_value:.0f} > {threshold_g_per_kwh:g} but the deadline leaves "
                f"no time to pause (remaining work ~{remaining_s:.0f} s)",
            )
    steps = max(1, min(int(math.ceil(horizon_s / resolution_s)), 4 * MAX_FORECAST_POINTS))
    dt = horizon_s / steps
    for i in range(1, steps + 1):
        t = now_unix_s + i * dt
        if provider.intensity_at(t).g_co2e_per_kwh <= threshold_g_per_kwh:
            return PausePlan(
                True,
                t,
                f"intensity {now_value:.0f} > {threshold_g_per_kwh:g} gCO2e/kWh; forecast at or "
                f"below it in {t - now_unix_s:.0f} s, and the remaining work (~{remaining_s:.0f} "
                "s) still fits before the deadline",
            )
    return PausePlan(
        False,
        None,
        f"intensity {now_value:.0f} > {threshold_g_per_kwh:g} but no cleaner period is "
        "forecast early enough to meet the deadline",
    )
