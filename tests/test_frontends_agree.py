"""Trainer, Fabric and a plain loop give the same figures for the same workload.

"The same workload" is the same work per step and the same wall time per step: every
loop here runs deadline-paced steps (step k ends at t0 + (k + 1) x step), so the loops'
own overheads do not change how long the device runs. Then the energy of the training
steps (the sum of per-step energy) must match the simulated device's ground truth over
the same step boundaries, and the loops must match each other, within what the energy
counter can resolve at the two ends of the window (interpolation inside one update
interval), and energy per sample follows.
"""

from __future__ import annotations

import pytest

from lightning_sustain.testing import PowerProfile, SimulatedDeviceSpec
from tests.frontends import PACED_LOOPS, run_paced

pytestmark = pytest.mark.slow

STEPS, STEP_S, BUSY_S, PERIOD_S = 50, 0.02, 0.012, 0.02


def _check(results: dict, boundary_j: float, power_w: float) -> None:
    steps_j = {}
    for loop, got in results.items():
        totals = got.summary["totals"]
        assert totals["batches"] == STEPS and totals["samples"] == STEPS * 64
        measured = totals["train_energy_j"]
        truth = got.pace.steps_truth_j
        # two ends of the window, each inside one counter update interval
        assert measured == pytest.approx(truth, abs=2 * boundary_j + 0.002), loop
        steps_j[loop] = (measured, got.summary["phases"]["train"]["duration_s"])
        # the whole run against the truth over its own window: two more boundaries each
        assert totals["energy_j"] == pytest.approx(got.run_truth_j, abs=2 * boundary_j + 0.002)
    for a in PACED_LOOPS:
        for b in PACED_LOOPS:
            (ea, da), (eb, db) = steps_j[a], steps_j[b]
            # paced steps last as long in every loop: what is left is the boundary error
            # of each and the loops' start/end jitter (at most power x duration difference)
            assert abs(ea - eb) <= 4 * boundary_j + power_w * abs(da - db) + 0.004, (a, b)
            per_sample_a = ea / (STEPS * 64)
            per_sample_b = eb / (STEPS * 64)
            assert abs(per_sample_a - per_sample_b) * STEPS * 64 <= (
                4 * boundary_j + power_w * abs(da - db) + 0.004
            )


def test_load_driven_workload_same_in_every_loop(simulated_nvml, tmp_path) -> None:
    """Power follows the simulated work: busy 12 ms of each 20 ms step, idle between."""
    spec = SimulatedDeviceSpec()
    sim = simulated_nvml([spec], counter_period_s=PERIOD_S)
    results = {
        loop: run_paced(loop, sim, STEPS, STEP_S, BUSY_S, str(tmp_path / loop))
        for loop in PACED_LOOPS
    }
    # interpolating inside one update interval misplaces at most the interval's swing
    boundary_j = (spec.busy_power_w - spec.idle_power_w) * PERIOD_S
    _check(results, boundary_j, spec.busy_power_w)


def test_constant_power_profile_same_in_every_loop(simulated_nvml, tmp_path) -> None:
    """Power follows wall time only (300 W): the loops differ in nothing the device sees."""
    sim = simulated_nvml(1, counter_period_s=PERIOD_S)
    sim.set_power_profile(0, PowerProfile.constant(300.0))
    results = {
        loop: run_paced(loop, sim, STEPS, STEP_S, 0.0, str(tmp_path / loop)) for loop in PACED_LOOPS
    }
    # constant power: interpolation is exact but for the update stamps, which lie within
    # half an update period of their tick
    _check(results, 300.0 * PERIOD_S / 2, 300.0)
