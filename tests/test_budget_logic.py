"""Pure budget logic: the software throttle, forecasts and shares (no Trainer)."""

from __future__ import annotations

import logging
import random

import pytest

from lightning_sustain.budget.forecast import (
    StepEnergyTracker,
    forecast_energy,
    planned_steps,
    steps_that_fit,
)
from lightning_sustain.budget.shares import device_share_w, equal_shares_w
from lightning_sustain.budget.throttle import SoftwareThrottle
from lightning_sustain.energy.carbon import CarbonIntensity


class Plant:
    """A device drawing busy_w while working and idle_w while idling; energy is exact.

    Its energy is only visible through a counter that ticks every period_s, as NVML's.
    """

    def __init__(self, busy_w=350.0, idle_w=70.0, period_s=0.1):
        self.busy_w, self.idle_w, self.period_s = busy_w, idle_w, period_s
        self.t = 0.0
        self.measured = 0.0  # end of the time already reported to the throttle
        self.segments: list[tuple[float, float, float]] = []

    def run(self, duration_s, power_w):
        self.segments.append((self.t, self.t + duration_s, power_w))
        self.t += duration_s

    def energy(self, upto):
        return sum(p * (min(b, upto) - a) for a, b, p in self.segments if a < upto)

    def mean_power(self, t0, t1):
        return (self.energy(t1) - self.energy(t0)) / (t1 - t0)


def drive(throttle, plant, seconds, step_s=0.02, seed=0):
    rnd = random.Random(seed)
    while plant.t < seconds:
        plant.run(step_s * rnd.uniform(0.8, 1.2), plant.busy_w)
        covered = max(plant.measured, (plant.t // plant.period_s) * plant.period_s)
        sleep_s = throttle.update(
            plant.energy(covered) - plant.energy(plant.measured),
            covered - plant.measured,
            pending_s=plant.t - covered,
            now_s=plant.t,
        )
        plant.measured = covered
        if sleep_s:
            plant.run(sleep_s, plant.idle_w)


@pytest.mark.parametrize("target_w", [150.0, 200.0, 300.0])
def test_throttle_holds_rolling_mean_at_target(target_w):
    plant = Plant()
    throttle = SoftwareThrottle(target_w)
    drive(throttle, plant, 40.0)
    worst = max(plant.mean_power(t - 10.0, t) for t in [12.0 + 0.5 * k for k in range(50)])
    assert worst <= target_w * 1.02
    assert plant.mean_power(20.0, 40.0) >= target_w * 0.95, "throttles far more than needed"
    assert throttle.idle_power_w == pytest.approx(70.0, rel=0.05)
    assert throttle.busy_power_w == pytest.approx(350.0, rel=0.05)
    assert throttle.throttled_s > 0
    assert throttle.mean_power_w == pytest.approx(target_w, rel=0.03)


def test_throttle_follows_a_new_target():
    plant = Plant()
    throttle = SoftwareThrottle(300.0)
    drive(throttle, plant, 15.0)
    throttle.set_target_w(180.0)
    assert throttle.target_power_w == 180.0
    drive(throttle, plant, 40.0)
    assert plant.mean_power(28.0, 40.0) <= 180.0 * 1.02
    assert plant.mean_power(28.0, 40.0) >= 180.0 * 0.95


def test_throttle_does_not_idle_under_budget():
    plant = Plant()
    throttle = SoftwareThrottle(500.0)
    drive(throttle, plant, 5.0)
    assert throttle.throttled_s == 0.0
    assert throttle.stats().debt_j <= 0.0


def test_throttle_warns_when_target_is_below_idle(caplog):
    plant = Plant(busy_w=350.0, idle_w=70.0)
    throttle = SoftwareThrottle(60.0, idle_power_w=70.0, max_sleep_s=0.5)
    with caplog.at_level(logging.WARNING):
        drive(throttle, plant, 5.0)
    warnings = [r for r in caplog.records if "Idling does not lower the power" in r.message]
    assert len(warnings) == 1
    assert throttle.debt_j <= 60.0 * throttle.window_s  # debt stays bounded
    # the idle power is known, so it stops at once instead of idling after every step
    assert throttle.throttled_s == 0.0 and not throttle.effective


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"target_power_w": 0}, "target_power_w"),
        ({"target_power_w": -5}, "target_power_w"),
        ({"target_power_w": float("nan")}, "target_power_w"),
        ({"target_power_w": 100, "window_s": 0}, "window_s"),
        ({"target_power_w": 100, "forgetting": 1.5}, "forgetting"),
        ({"target_power_w": 100, "idle_power_w": -1}, "idle_power_w"),
    ],
)
def test_throttle_rejects_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SoftwareThrottle(**kwargs)


def test_throttle_rejects_bad_measurements():
    throttle = SoftwareThrottle(100.0)
    with pytest.raises(ValueError, match="energy_j"):
        throttle.update(-1.0, 1.0)
    with pytest.raises(ValueError, match="duration_s"):
        throttle.update(1.0, float("inf"))
    with pytest.raises(ValueError, match="target_power_w"):
        throttle.set_target_w(0)


def test_planned_steps_mirrors_lightning():
    assert planned_steps(max_steps=-1, max_epochs=3, batches_per_epoch=10) == 30
    assert planned_steps(max_steps=25, max_epochs=3, batches_per_epoch=10) == 25
    assert planned_steps(max_epochs=2, batches_per_epoch=10, accumulate_grad_batches=4) == 6
    assert planned_steps(max_steps=-1, max_epochs=-1, batches_per_epoch=10) is None
    assert planned_steps(max_steps=-1, max_epochs=2, batches_per_epoch=float("inf")) is None
    assert planned_steps(max_steps=7, max_epochs=None, batches_per_epoch=None) == 7


def test_forecast_and_steps_that_fit():
    carbon = CarbonIntensity(400.0, "test")
    fc = forecast_energy(
        spent_j=100.0, steps_done=10, energy_per_step_j=10.0, planned_steps=100,
        budget_j=500.0, carbon=carbon,
    )
    assert fc.total_j == pytest.approx(1000.0)
    assert fc.total_kwh == pytest.approx(1000.0 / 3.6e6)
    assert fc.total_co2e_g == pytest.approx(1000.0 / 3.6e6 * 400.0)
    assert fc.exceeds_budget
    assert fc.steps_fit == 50
    unbounded = forecast_energy(100.0, 10, 10.0, None, budget_j=500.0)
    assert unbounded.total_j is None and not unbounded.exceeds_budget
    assert steps_that_fit(25.0, 10.0) == 2
    assert steps_that_fit(-5.0, 10.0) == 0
    with pytest.raises(ValueError, match="energy_per_step_j"):
        steps_that_fit(10.0, 0.0)
    with pytest.raises(ValueError, match="spent_j"):
        forecast_energy(-1.0, 0, 1.0, 10)


def test_step_tracker_excludes_warmup():
    tracker = StepEnergyTracker(warmup_steps=1, window=3)
    tracker.start(0.0)
    assert tracker.step(50.0) == 50.0  # a slow first step
    assert tracker.mean_step_j is None
    for k in range(1, 6):
        tracker.step(50.0 + 10.0 * k)
    assert tracker.mean_step_j == pytest.approx(10.0)
    assert tracker.next_step_j == pytest.approx(10.0)
    with pytest.raises(ValueError, match="window"):
        StepEnergyTracker(window=0)


def test_shares():
    assert equal_shares_w(600.0, 3) == [200.0, 200.0, 200.0]
    assert device_share_w(600.0, "job", world_size=2, devices_in_rank=2) == 150.0
    assert device_share_w(250.0, "device", world_size=8, devices_in_rank=2) == 250.0
    with pytest.raises(ValueError, match="per"):
        device_share_w(250.0, "node", 1, 1)
    with pytest.raises(ValueError, match="ranks"):
        equal_shares_w(100.0, 0)
