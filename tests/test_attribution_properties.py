"""Per-step attribution against ground truth on SIMULATED power profiles (no Lightning).

The profiles are those of the simulated NVML device (:class:`PowerProfile`): power over
wall time, independent of the steps. A counter is simulated from a profile's exact
integral, as the simulated library does (updates every ``period_s``, truncated to mJ),
stamped with a timestamp error like the sampler's; steps of about 20 ms are attributed
from it, and each step's figure is compared with the profile's exact energy.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_sustain.energy.attribution import (
    METHODS,
    attribute_steps,
    choose_method,
    reconstruct,
)
from lightning_sustain.testing.profiles import PowerProfile, benchmark_profiles


def simulate(
    profile: PowerProfile,
    seed: int,
    jitter_s: float = 0.001,
    duration_s: float = 12.0,
    period_s: float = 0.1,
    step_s: float = 0.02,
):
    """Counter points (stamped with error), step bounds and the steps' true energy."""
    rng = np.random.default_rng(seed)
    phase = float(rng.uniform(0, profile.period_s))
    ticks = np.arange(0.0, duration_s, period_s)
    stamps = ticks + rng.uniform(-jitter_s, jitter_s, ticks.size)
    energy = np.floor(profile.cumulative_j(ticks + phase) * 1000.0) / 1000.0
    durations = step_s * rng.uniform(0.8, 1.2, int((duration_s - 1.0) / step_s))
    starts = 0.5 + np.concatenate(([0.0], np.cumsum(durations)[:-1]))
    ends = starts + durations
    keep = ends < duration_s - 0.5
    starts, ends = starts[keep], ends[keep]
    # the run starts and ends on counter updates, so its total is exactly the counter's
    starts[0] = stamps[np.searchsorted(stamps, starts[0])]
    last_stamp = stamps[np.searchsorted(stamps, ends[-1]) - 1]
    starts, ends = starts[starts < last_stamp], ends[starts < last_stamp]
    ends[-1] = last_stamp
    truth = profile.energy_j(starts + phase, ends + phase)
    return stamps, energy, starts, ends, truth


def errors(stamps, energy, starts, ends, truth):
    plain = np.interp(ends, stamps, energy) - np.interp(starts, stamps, energy)
    ours, choice = attribute_steps(stamps, energy, starts, ends)
    return np.abs(ours - truth), np.abs(plain - truth), ours, plain, choice


profiles = st.one_of(
    st.builds(PowerProfile.constant, st.floats(20.0, 700.0)),
    st.builds(
        PowerProfile.square,
        st.floats(0.01, 3.0),
        st.floats(0.0, 200.0),
        st.floats(250.0, 700.0),
        st.floats(0.2, 0.8),
    ),
    st.builds(
        PowerProfile.sawtooth, st.floats(0.05, 3.0), st.floats(0.0, 200.0), st.floats(250.0, 700.0)
    ),  # fmt: skip
    st.builds(PowerProfile.random_steps, st.integers(0, 10_000), st.floats(0.05, 1.0)),
    st.builds(
        PowerProfile.noise,
        st.integers(0, 10_000),
        st.floats(100.0, 400.0),
        st.floats(5.0, 100.0),
        st.floats(0.002, 0.05),
    ),  # fmt: skip
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profile=profiles, seed=st.integers(0, 2**31 - 1), jitter_s=st.floats(0.0, 0.003))
def test_never_worse_than_plain_interpolation_and_totals_kept(profile, seed, jitter_s) -> None:
    stamps, energy, starts, ends, truth = simulate(profile, seed, jitter_s)
    ours_err, plain_err, ours, plain, choice = errors(stamps, energy, starts, ends, truth)
    # per-step error, summed over the run: ours <= plain within 10 % (+ a 1 mJ-per-step floor
    # for the counter's own quantisation). The choice is made on held-out counter points at
    # twice the update period, so it is not a proof at the steps' scale: on 1500 random
    # cases the worst ratio was 1.04 (a slow sawtooth under timestamp noise), median 0.87.
    assert ours_err.sum() <= 1.10 * plain_err.sum() + 1e-3 * ours.size, choice
    # energy never leaves its update interval: a run from one counter update to another
    # sums to exactly the counter's difference, whatever the method
    counter_total = np.interp(ends[-1], stamps, energy) - np.interp(starts[0], stamps, energy)
    assert ours.sum() == pytest.approx(counter_total, rel=1e-9, abs=1e-6)
    assert ours.sum() == pytest.approx(plain.sum(), rel=1e-9, abs=1e-6)


@pytest.mark.parametrize("profile", benchmark_profiles(0), ids=lambda p: p.name)
def test_every_benchmark_profile_never_worse_than_plain(profile) -> None:
    for seed in range(3):
        stamps, energy, starts, ends, truth = simulate(profile, seed)
        ours_err, plain_err, ours, _plain, choice = errors(stamps, energy, starts, ends, truth)
        assert ours_err.sum() <= 1.02 * plain_err.sum() + 1e-3 * ours.size, choice
        assert abs(ours.sum() - truth.sum()) <= 1e-3 * truth.sum()  # totals within 0.1 %


def test_square_wave_targets_with_exact_enough_timestamps() -> None:
    """1 s square wave (60 W / 450 W): median <= 2 %, p90 <= 10 % with 1 ms stamps."""
    stamps, energy, starts, ends, truth = simulate(PowerProfile.square(1.0), seed=1)
    ours_err, plain_err, *_rest, choice = errors(stamps, energy, starts, ends, truth)
    rel = ours_err / truth
    assert choice.method == "edge"
    assert np.median(rel) <= 0.02 and np.percentile(rel, 90) <= 0.10
    assert np.percentile(plain_err / truth, 90) > 0.10  # plain interpolation misses it


def test_constant_power_stays_plain_and_accurate() -> None:
    stamps, energy, starts, ends, truth = simulate(PowerProfile.constant(300.0), seed=2)
    ours_err, *_rest, choice = errors(stamps, energy, starts, ends, truth)
    rel = ours_err / truth
    assert np.median(rel) <= 0.01 and np.percentile(rel, 90) <= 0.05


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(METHODS),
    powers=st.lists(st.floats(0.0, 800.0), min_size=3, max_size=40),
    seed=st.integers(0, 2**31 - 1),
)
def test_reconstruction_passes_through_every_counter_point_and_is_monotone(
    method, powers, seed
) -> None:
    rng = np.random.default_rng(seed)
    widths = rng.uniform(0.05, 0.15, len(powers))
    times = np.concatenate(([0.0], np.cumsum(widths)))
    energy = np.concatenate(([0.0], np.cumsum(np.asarray(powers) * widths)))
    steps = (np.arange(0.0, times[-1], 0.02), np.arange(0.0, times[-1], 0.02) + 0.02)
    at_points = reconstruct(method, times, energy, times, steps, (1.0, 50.0))
    assert at_points == pytest.approx(energy, abs=1e-9)
    query = np.sort(rng.uniform(-0.1, times[-1] + 0.1, 200))
    curve = reconstruct(method, times, energy, query, steps, (1.0, 50.0))
    assert np.all(np.diff(curve) >= -1e-9)  # power never negative


def test_choice_needs_evidence() -> None:
    times = np.array([0.0, 0.1, 0.2])
    assert choose_method(times, times * 100).method == "plain"
    with pytest.raises(ValueError, match="method must be"):
        attribute_steps(times, times * 100, [0.0], [0.1], method="magic")
