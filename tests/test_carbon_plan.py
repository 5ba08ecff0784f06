"""The carbon controller's pure planning: slowdown bound, deadlines, and an offline closed loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sustain.budget.carbon import (
    CarbonDecision,
    DecisionLog,
    hold_floor_fraction,
    plan_pause,
    plan_power,
    time_scale,
)
from lightning_sustain.energy.intensity import (
    ConstantIntensity,
    IntensitySeries,
    TimeSeriesIntensity,
)
from lightning_sustain.testing.grid import diurnal_intensity

T0 = 1_700_000_000.0


def _trace(period_s, swing, phase, seed=0, duration_s=None):
    series = diurnal_intensity(
        T0,
        duration_s or 20 * period_s,
        period_s=period_s,
        swing=swing,
        phase=phase,
        noise=0.05,
        resolution_s=period_s / 48,
        seed=seed,
    )
    return TimeSeriesIntensity(series)


@settings(max_examples=60, deadline=None)
@given(
    phase=st.floats(0, 6.28),
    swing=st.floats(1.2, 5.0),
    remaining=st.floats(1.0, 500.0),
    allowed=st.floats(-10.0, 100.0),
    low=st.floats(0.3, 1.0),
    offset=st.floats(0, 100),
)
def test_power_plan_respects_the_allowance_and_range(phase, swing, remaining, allowed, low, offset):
    source = _trace(100.0, swing, phase)
    plan = plan_power(
        source, T0 + offset, remaining_work_s=remaining, allowed_lost_s=allowed, min_fraction=low
    )
    assert low - 1e-9 <= plan.fraction <= 1.0
    assert plan.projected_lost_s <= max(0.0, allowed) + 1e-6
    if allowed <= 0:
        assert plan.fraction == 1.0 and "spent" in plan.reason


def test_power_plan_caps_dirty_hours_and_not_clean_ones():
    series = IntensitySeries(T0 + np.array([0.0, 50.0, 100.0]), np.array([100.0, 500.0, 100.0]))
    source = TimeSeriesIntensity(series)
    clean = plan_power(source, T0 + 10, remaining_work_s=80, allowed_lost_s=8, min_fraction=0.5)
    dirty = plan_power(source, T0 + 60, remaining_work_s=80, allowed_lost_s=8, min_fraction=0.5)
    assert clean.fraction == 1.0
    assert dirty.fraction < 1.0
    deadline = plan_power(
        source,
        T0 + 60,
        remaining_work_s=80,
        allowed_lost_s=8,
        min_fraction=0.5,
        deadline_unix_s=T0 + 60 + 80,
    )
    assert deadline.fraction == 1.0 and "deadline" in deadline.reason


def _closed_loop(source, work_s, bound, low, dt=1.0):
    """Offline run: re-plan each dt, integrate work, CO2e (at busy power) and lost time."""
    t, done, lost, co2, co2_base = T0, 0.0, 0.0, 0.0, 0.0
    elapsed = 0.0  # summed apart from t: a unix time near 1.7e9 only resolves 2.4e-7 s
    fractions = []
    while done < work_s - 1e-9:
        plan = plan_power(
            source,
            t,
            remaining_work_s=work_s - done,
            allowed_lost_s=bound * work_s - lost,
            min_fraction=low,
            hold_s=dt,
        )
        scale = float(time_scale(plan.fraction, 1 / 3))
        step = min(dt, (work_s - done) * scale)
        intensity = source.mean_intensity(t, t + step)[0]
        co2 += intensity * plan.fraction * step
        done += step / scale
        lost += step * (1 - 1 / scale)
        t += step
        elapsed += step
        fractions.append(plan.fraction)
    tb = T0
    while tb < T0 + work_s:
        co2_base += source.mean_intensity(tb, min(tb + dt, T0 + work_s))[0] * (
            min(tb + dt, T0 + work_s) - tb
        )
        tb += dt
    return elapsed / work_s - 1, 1 - co2 / co2_base, fractions


@settings(max_examples=30, deadline=None)
@given(phase=st.floats(0, 6.28), swing=st.floats(2.0, 5.0), bound=st.floats(0.02, 0.2))
def test_closed_loop_never_exceeds_the_bound_and_saves(phase, swing, bound):
    source = _trace(100.0, swing, phase, duration_s=2000)
    slowdown, saving, fractions = _closed_loop(source, 300.0, bound, 0.3)
    # exact up to float rounding of the loop's sums (hypothesis once found +0.15 % over
    # when a cap planned on short forecast chunks was held for a whole re-plan interval)
    assert slowdown <= bound + 1e-9
    assert saving > 0.0
    assert min(fractions) < 1.0


@settings(max_examples=40, deadline=None)
@given(
    phase=st.floats(0, 6.28),
    swing=st.floats(1.2, 5.0),
    bound=st.floats(0.001, 0.3),
    work=st.floats(1.0, 60.0),
    dt=st.floats(0.2, 30.0),
    low=st.floats(0.2, 1.0),
)
def test_held_caps_never_exceed_the_bound_at_any_replan_interval(
    phase, swing, bound, work, dt, low
):
    source = _trace(100.0, swing, phase, duration_s=2000)
    slowdown, _, _ = _closed_loop(source, work, bound, low, dt=dt)
    assert slowdown <= bound + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    remaining=st.floats(0.01, 1000.0),
    allowed=st.floats(1e-6, 100.0),
    hold=st.one_of(st.none(), st.floats(0.01, 1000.0)),
    exponent=st.floats(0.1, 1.0),
)
def test_hold_floor_is_the_lowest_cap_within_the_allowance(remaining, allowed, hold, exponent):
    floor = hold_floor_fraction(remaining, allowed, hold, exponent)

    def loss(fraction):
        scale = float(time_scale(fraction, exponent))
        to_end = remaining * (scale - 1)
        return to_end if hold is None else min(hold * (1 - 1 / scale), to_end)

    assert 0.0 <= floor <= 1.0
    if floor > 0.0:
        assert loss(floor) <= allowed * (1 + 1e-9)
        lower = floor * (1 - 1e-6)
        assert lower < 1e-6 or loss(lower) > allowed  # the lowest such cap


@settings(max_examples=80, deadline=None)
@given(
    phase=st.floats(0, 6.28),
    threshold=st.floats(100, 500),
    remaining=st.floats(0, 300),
    slack=st.floats(-50, 400),
    overhead=st.floats(0, 30),
    offset=st.floats(0, 100),
)
def test_pause_is_only_planned_when_the_deadline_still_holds(
    phase, threshold, remaining, slack, overhead, offset
):
    source = _trace(100.0, 3.0, phase)
    now = T0 + offset
    deadline = now + remaining + slack
    plan = plan_pause(
        source,
        now,
        threshold_g_per_kwh=threshold,
        remaining_s=remaining,
        deadline_unix_s=deadline,
        resume_overhead_s=overhead,
        margin=0.2,
        resolution_s=1.0,
    )
    if plan.pause:
        assert source.intensity_at(now).g_co2e_per_kwh > threshold
        assert plan.resume_at_unix_s is not None
        assert source.intensity_at(plan.resume_at_unix_s).g_co2e_per_kwh <= threshold
        assert plan.resume_at_unix_s + remaining * 1.2 + overhead <= deadline + 1e-6
    elif source.intensity_at(now).g_co2e_per_kwh <= threshold:
        assert "<=" in plan.reason


def test_pause_not_needed_under_a_constant_clean_grid():
    plan = plan_pause(
        ConstantIntensity(50.0), T0, threshold_g_per_kwh=100, remaining_s=10, deadline_unix_s=None
    )
    assert not plan.pause


def test_decision_log_writes_one_json_object_per_line(tmp_path):
    log = DecisionLog(tmp_path / "sub" / "d.jsonl")
    for i in range(3):
        log.append(
            CarbonDecision(T0 + i, float(i), i, 300.0, "series", "limit", 0.8, 280.0, "r", 0.01)
        )
    log.close()
    import json

    lines = (tmp_path / "sub" / "d.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2]
    assert set(json.loads(lines[0])) >= {"time_unix_s", "intensity_g_per_kwh", "limit_w", "reason"}


def test_time_scale_matches_the_simulated_model():
    assert float(time_scale(0.7, 1 / 3)) == pytest.approx(1.126, abs=1e-3)
    assert float(time_scale(1.0, 1 / 3)) == 1.0
