"""The software throttle measures whether idling lowers power, and stops where it does not."""

from __future__ import annotations

import logging
import random

import pytest

from lightning_sustain.budget.throttle import SoftwareThrottle


def run_plant(
    throttle: SoftwareThrottle | None,
    busy_w: float,
    idle_w: float,
    steps: int,
    step_s: float = 0.1,
    seed: int = 0,
) -> tuple[float, float, int]:
    """Simulated time: each step works step_s at busy_w, then idles as ordered at idle_w.

    Returns (energy J, duration s, updates that ordered idle time)."""
    rng = random.Random(seed)
    now = energy = 0.0
    slept_updates = 0
    pending_e = pending_d = 0.0
    for _ in range(steps):
        work_s = step_s * rng.uniform(0.8, 1.2)
        pending_e += busy_w * work_s
        pending_d += work_s
        now += work_s
        energy += busy_w * work_s
        if throttle is None:
            continue
        sleep_s = throttle.update(pending_e, pending_d, now_s=now)
        pending_e = pending_d = 0.0
        if sleep_s > 0:
            slept_updates += 1
            now += sleep_s
            energy += idle_w * sleep_s
            pending_e += idle_w * sleep_s
            pending_d += sleep_s
    return energy, now, slept_updates


@pytest.mark.parametrize("seed", range(5))
def test_stops_with_one_warning_where_idling_does_not_lower_power(seed, caplog):
    rng = random.Random(seed)
    busy_w = rng.uniform(150, 400)
    idle_w = busy_w * rng.uniform(0.96, 1.0)  # idling saves (almost) nothing
    target_w = busy_w * rng.uniform(0.4, 0.9)
    throttle = SoftwareThrottle(target_w, max_sleep_s=0.5)
    baseline_j, baseline_s, _ = run_plant(None, busy_w, idle_w, 400, seed=seed)
    with caplog.at_level(logging.WARNING):
        energy_j, duration_s, slept = run_plant(throttle, busy_w, idle_w, 400, seed=seed)
    warnings = [r for r in caplog.records if "Idling does not lower the power" in r.message]
    assert len(warnings) == 1
    assert not throttle.effective
    # it measured, then stopped: a bounded probe, not idle time after every step
    assert slept <= 10
    assert throttle.throttled_s <= 10 * 0.5
    assert duration_s < baseline_s * 1.2
    assert energy_j <= baseline_j + idle_w * throttle.throttled_s + 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_keeps_throttling_where_idling_helps(seed):
    rng = random.Random(seed)
    busy_w = rng.uniform(250, 400)
    idle_w = rng.uniform(20, 80)
    target_w = rng.uniform(idle_w + 60, busy_w - 40)
    throttle = SoftwareThrottle(target_w, max_sleep_s=0.5)
    energy_j, duration_s, slept = run_plant(throttle, busy_w, idle_w, 600, seed=seed)
    assert throttle.effective
    assert slept > 100
    assert energy_j / duration_s == pytest.approx(target_w, rel=0.1)


def test_a_higher_target_is_tried_again():
    throttle = SoftwareThrottle(100.0, max_sleep_s=0.5)
    run_plant(throttle, 300.0, 299.0, 200)
    assert not throttle.effective
    throttle.set_target_w(150.0)
    assert throttle.effective
