"""Forecasting a run's energy and CO2e from measured energy per step (plain Python).

The forecast is deliberately simple and honest: the energy of the steps still planned is
the measured energy per step (over the steps after a warm-up window) times their number,
added to what was already spent. It is exact for a steady workload and says nothing about
a workload that changes later; the callback re-forecasts as it goes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from lightning_sustain.energy.carbon import CarbonIntensity, co2e_g, joules_to_kwh
from lightning_sustain.energy.estimate import as_number

__all__ = [
    "EnergyForecast",
    "StepEnergyTracker",
    "forecast_energy",
    "planned_steps",
    "steps_that_fit",
]


def _non_negative(name: str, value: float) -> float:
    value = as_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")
    return value


def planned_steps(
    max_steps: int = -1,
    max_epochs: int | None = None,
    batches_per_epoch: float | None = None,
    accumulate_grad_batches: int = 1,
) -> int | None:
    """Optimizer steps a Lightning run plans, from the Trainer's settings.

    Mirrors ``Trainer.estimated_stepping_batches``: ``ceil(batches / accumulate)`` per
    epoch times ``max_epochs``, capped by ``max_steps``.

    Args:
        max_steps: the Trainer's ``max_steps`` (-1: no limit).
        max_epochs: the Trainer's ``max_epochs`` (None or -1: no limit).
        batches_per_epoch: training batches per epoch (None or inf: unknown, e.g. an
            iterable dataset).
        accumulate_grad_batches: batches per optimizer step.

    Returns:
        The planned number of steps, or None when the run has no known end.
    """
    by_steps = max_steps if max_steps is not None and max_steps >= 0 else None
    by_epochs = None
    if (
        max_epochs is not None
        and max_epochs >= 0
        and batches_per_epoch is not None
        and math.isfinite(batches_per_epoch)
    ):
        per_epoch = math.ceil(batches_per_epoch / max(1, accumulate_grad_batches))
        by_epochs = per_epoch * max(max_epochs, 1)
    known = [n for n in (by_steps, by_epochs) if n is not None]
    return int(min(known)) if known else None


def steps_that_fit(remaining_j: float, energy_per_step_j: float) -> int:
    """How many more steps of a given energy fit into the remaining budget.

    Args:
        remaining_j: budget left, in joules (negative counts as zero).
        energy_per_step_j: energy of one step, in joules (> 0).

    Raises:
        ValueError: a non-positive or non-finite step energy.
    """
    energy_per_step_j = _non_negative("energy_per_step_j", energy_per_step_j)
    if energy_per_step_j == 0:
        raise ValueError("energy_per_step_j must be > 0 to count the steps that fit.")
    if remaining_j <= 0:
        return 0
    return int(math.floor(remaining_j / energy_per_step_j + 1e-9))


@dataclass
class EnergyForecast:
    """A forecast of a whole run's energy and CO2e.

    Attributes:
        steps_done: steps finished so far (all runs, resumes included).
        planned_steps: steps the run plans in total, or None when unbounded.
        energy_per_step_j: measured energy of one step after the warm-up, in joules.
        spent_j: energy spent so far (resumes included), in joules.
        total_j: forecast energy of the whole run, in joules (None when unbounded).
        total_kwh: the same in kWh (None when unbounded).
        total_co2e_g: forecast grams of CO2e (None when unbounded or no intensity).
        budget_j: the energy budget in joules, or None.
        steps_fit: total steps (done plus future) that fit in the budget, or None.
        exceeds_budget: True when the forecast is above the budget.
    """

    steps_done: int
    planned_steps: int | None
    energy_per_step_j: float
    spent_j: float
    total_j: float | None
    total_kwh: float | None
    total_co2e_g: float | None
    budget_j: float | None
    steps_fit: int | None
    exceeds_budget: bool


def forecast_energy(
    spent_j: float,
    steps_done: int,
    energy_per_step_j: float,
    planned_steps: int | None,
    budget_j: float | None = None,
    carbon: CarbonIntensity | None = None,
    pue: float = 1.0,
) -> EnergyForecast:
    """Forecast a run's total energy from what was spent and the energy per step.

    Args:
        spent_j: joules spent so far.
        steps_done: steps finished so far.
        energy_per_step_j: measured joules per step (> 0).
        planned_steps: total planned steps, or None when the run has no known end.
        budget_j: the energy budget, if any, in joules.
        carbon: grid carbon intensity for the CO2e figure.
        pue: the facility's power usage effectiveness.

    Returns:
        The forecast; ``exceeds_budget`` is False when there is no budget or no end.

    Raises:
        ValueError: negative or non-finite inputs; a non-positive step energy.
    """
    spent_j = _non_negative("spent_j", spent_j)
    energy_per_step_j = _non_negative("energy_per_step_j", energy_per_step_j)
    if energy_per_step_j == 0:
        raise ValueError("energy_per_step_j must be > 0 to forecast a run.")
    if isinstance(steps_done, bool) or not isinstance(steps_done, int) or steps_done < 0:
        raise ValueError(f"steps_done must be an integer >= 0, got {steps_done!r}.")
    total_j: float | None = None
    if planned_steps is not None:
        remaining_steps = max(0, int(planned_steps) - steps_done)
        total_j = spent_j + remaining_steps * energy_per_step_j
    steps_fit = None
    if budget_j is not None:
        steps_fit = steps_done + steps_that_fit(budget_j - spent_j, energy_per_step_j)
    exceeds = bool(budget_j is not None and total_j is not None and total_j > budget_j)
    return EnergyForecast(
        steps_done=steps_done,
        planned_steps=planned_steps,
        energy_per_step_j=energy_per_step_j,
        spent_j=spent_j,
        total_j=total_j,
        total_kwh=None if total_j is None else joules_to_kwh(total_j),
        total_co2e_g=None if total_j is None or carbon is None else co2e_g(total_j, carbon, pue),
        budget_j=budget_j,
        steps_fit=steps_fit,
        exceeds_budget=exceeds,
    )


class StepEnergyTracker:
    """Energy per step from a cumulative-energy reading at each step end.

    Feed it the cumulative energy at each step end; it answers the mean energy per step
    over the steps after ``warmup_steps`` and a cautious estimate of the next step (the
    largest of the last ``window`` steps after the warm-up), used to stop *before* a step
    crosses a budget.

    Args:
        warmup_steps: steps ignored by the mean (compilation, caches, first allocation).
        window: number of recent steps kept for the cautious estimate.

    Raises:
        ValueError: a negative ``warmup_steps`` or a ``window`` below 1.
    """

    def __init__(self, warmup_steps: int = 1, window: int = 8) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}.")
        self.warmup_steps = warmup_steps
        self.window = window
        self.steps = 0
        self._last_j: float | None = None
        self._warm_start_j: float | None = None
        self._warm_steps = 0
        self._recent: deque[float] = deque(maxlen=window)
        self._last_step_j: float | None = None

    def start(self, energy_j: float) -> None:
        """The cumulative energy when the first step starts."""
        self._last_j = float(energy_j)

    def step(self, energy_j: float) -> float:
        """Record the cumulative energy at a step's end; return that step's energy."""
        energy_j = float(energy_j)
        previous = self._last_j if self._last_j is not None else energy_j
        step_j = max(0.0, energy_j - previous)
        self._last_j = energy_j
        self.steps += 1
        self._last_step_j = step_j
        if self.steps > self.warmup_steps:
            self._recent.append(step_j)
        if self.steps == self.warmup_steps:
            self._warm_start_j = energy_j
        elif self.steps > self.warmup_steps:
            if self._warm_start_j is None:
                self._warm_start_j = previous
            self._warm_steps += 1
        return step_j

    @property
    def warmed_up(self) -> bool:
        """True once at least one step after the warm-up was recorded."""
        return self._warm_steps > 0

    @property
    def mean_step_j(self) -> float | None:
        """Mean energy per step after the warm-up (None before), in joules."""
        if not self.warmed_up or self._last_j is None or self._warm_start_j is None:
            return None
        return (self._last_j - self._warm_start_j) / self._warm_steps

    @property
    def next_step_j(self) -> float | None:
        """A cautious estimate of the next step's energy, in joules.

        The largest of the recent steps after the warm-up; during the warm-up, the last
        step (the first steps are often slow, and would stop a run far too early).
        """
        return max(self._recent) if self._recent else self._last_step_j
