"""PowerCapController in a plain loop (no Lightning), on the simulated NVML device."""

from __future__ import annotations

import time

import pytest

from lightning_sustain.budget.limits import journal_entries
from lightning_sustain.budget.power_cap import (
    PowerCapController,
    PowerCapError,
    close_limit_guard,
    open_limit_guard,
)
from lightning_sustain.energy.errors import PowerLimitPermissionError


@pytest.fixture(autouse=True)
def _journal(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SUSTAIN_LIMIT_JOURNAL", str(tmp_path / "journal.json"))


@pytest.mark.parametrize(("per", "world", "expected_w"), [("device", 4, 250.0), ("job", 2, 250.0)])
def test_hardware_cap_in_a_plain_loop_is_restored_on_close(sim, per, world, expected_w):
    cap = PowerCapController(watts=250 if per == "device" else 500, per=per)
    cap.start([0], world_size=world)
    try:
        assert cap.report.mode == "hardware"
        assert sim.power_limit_w(0) == expected_w and sim.power_limit_w(1) == 400.0
        assert set(journal_entries()) == {sim.uuid(0)}
        for _ in range(3):
            sim.busy(0, 0.01)
            assert cap.after_step() == 0.0  # hardware mode never sleeps
        cap.set_rank_budget_w(300)  # a new share (power shifting)
        assert sim.power_limit_w(0) == 300.0 and cap.limit_w() == 300.0
    finally:
        cap.close()
    assert sim.power_limit_w(0) == 400.0 and journal_entries() == {}
    assert cap.report.steps == 3
    with pytest.raises(RuntimeError, match="running fit"):
        cap.set_rank_budget_w(200)


def test_software_cap_in_a_plain_loop_holds_the_mean_power(sim):
    sim.set_limit_permitted(0, False)
    cap = PowerCapController(watts=200, window_s=2.0)
    cap.start([0])
    assert cap.report.mode == "software" and "NO_PERMISSION" in cap.report.reason
    samples = []
    try:
        t_end = time.monotonic() + 3.0
        while time.monotonic() < t_end:
            sim.set_load(0, 1.0)
            time.sleep(0.02)  # a busy step at ~350 W
            sim.set_load(0, 0.0)
            cap.after_step()  # the idle time it decides is spent at idle power
            samples.append(sim.ground_truth_sample(0))
    finally:
        cap.close()
    (t0, e0), (t1, e1) = samples[len(samples) // 3], samples[-1]
    mean_w = (e1 - e0) / (t1 - t0)
    assert mean_w <= 200 * 1.08, mean_w
    assert cap.report.throttled_s > 0.2 * (t1 - t0)
    assert sim.limit_set_count(0) == 0 and sim.power_limit_w(0) == 400.0


def test_hardware_mode_refused_is_a_clear_error_and_changes_nothing(sim):
    sim.set_limit_permitted(0, False)
    cap = PowerCapController(watts=200, mode="hardware", name="MyLoop")
    with pytest.raises(PowerCapError, match=r"MyLoop\(mode='hardware'.*NO_PERMISSION"):
        cap.start([0])
    cap.close()
    assert sim.power_limit_w(0) == 400.0 and journal_entries() == {}


def test_open_limit_guard_probes_without_changing_and_closes_on_refusal(sim):
    guard = open_limit_guard([0, 1])
    try:
        assert [g.uuid for g in guard.devices] == [sim.uuid(0), sim.uuid(1)]
        assert sim.power_limit_w(0) == sim.power_limit_w(1) == 400.0
        guard.set_limit_w(guard.devices[1], 150.0)
        assert sim.power_limit_w(1) == 150.0
    finally:
        close_limit_guard(guard)
    assert sim.power_limit_w(1) == 400.0 and journal_entries() == {}
    sim.set_limit_permitted(1, False)
    with pytest.raises(PowerLimitPermissionError):
        open_limit_guard([0, 1])
    assert journal_entries() == {} and sim.power_limit_w(0) == 400.0
