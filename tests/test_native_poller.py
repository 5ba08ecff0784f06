"""The native NVML counter poller, through the real pynvml and the simulated device."""

from __future__ import annotations

import logging
import math
import time
import types
import warnings

import numpy as np
import pynvml
import pytest

from lightning_sustain.energy import native
from lightning_sustain.energy.meter import EnergyMeter
from lightning_sustain.energy.native import NativeCounterPoller, NativePollerUnavailable
from lightning_sustain.energy.nvml import NvmlGpu
from lightning_sustain.testing import PowerProfile


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:  # pure Python: the GIL is held throughout
        for i in range(500):
            x += i


def test_records_bracket_every_counter_update_while_python_is_busy(simulated_nvml) -> None:
    sim = simulated_nvml(1, counter_period_s=0.05)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    poller = NativeCounterPoller(pynvml, handle, interval_s=0.001)
    try:
        _busy(0.6)  # the training thread holds the GIL; the native thread does not need it
        records = poller.drain()
        polls, cpu_s = poller.polls, poller.cpu_s
    finally:
        poller.stop()
    origin, period = sim.counter_origin_s, sim.counter_period_s
    assert records[0].t_prev_s is None  # the first reading is a baseline
    changes = records[1:]
    assert len(changes) >= 8
    for record in changes:
        # the counter changes only at ticks: a tick lies between the two polls
        first_tick = origin + math.ceil((record.t_prev_s - origin) / period) * period
        assert record.t_prev_s <= first_tick <= record.t_s + 1e-9
    values = [r.energy_mj for r in records]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert polls > len(records) and cpu_s > 0
    assert poller.drain() == []  # stopped: nothing more, no crash


def test_nvml_gpu_uses_the_native_poller_and_measures_a_profile(simulated_nvml) -> None:
    sim = simulated_nvml(1, counter_period_s=0.05)
    sim.set_power_profile(0, PowerProfile.square(0.4, low_w=80.0, high_w=400.0))
    gpu = NvmlGpu(0)
    assert gpu.native
    with EnergyMeter([gpu]) as meter:
        t0 = time.monotonic()
        _busy(0.8)
        t1 = time.monotonic()
        meter.wait_until_covered(t1 + 0.06, timeout_s=1.0)
        measured = meter.energy_between(t0, t1)[gpu.info.device_id]
    assert measured == pytest.approx(sim.profile_energy_j(0, t0, t1), rel=0.05)


def test_env_var_turns_the_native_poller_off(simulated_nvml, monkeypatch) -> None:
    simulated_nvml(1)
    monkeypatch.setenv(native.NATIVE_ENV_VAR, "0")
    gpu = NvmlGpu(0)
    try:
        assert not gpu.native
    finally:
        gpu.close()


def test_a_different_library_is_refused(simulated_nvml) -> None:
    simulated_nvml(1)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    # the function pointer is pynvml's, but the library name says another library
    fake = types.SimpleNamespace(nvmlLib=types.SimpleNamespace(
        nvmlDeviceGetTotalEnergyConsumption=pynvml.nvmlLib.nvmlDeviceGetTotalEnergyConsumption,
        _name="libc.so.6",
    ))  # fmt: skip
    with pytest.raises(NativePollerUnavailable, match="could not start"):
        NativeCounterPoller(fake, handle)


def test_no_compiler_falls_back_to_python_with_a_warning(
    simulated_nvml, monkeypatch, tmp_path
) -> None:
    simulated_nvml(1, counter_period_s=0.05)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_load_failed", None)
    monkeypatch.setenv("LIGHTNING_SUSTAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gpu = NvmlGpu(0)
    assert not gpu.native
    assert any("Install a C compiler" in str(w.message) for w in caught)
    with EnergyMeter([gpu]) as meter:  # training goes on: measured from Python
        time.sleep(0.2)
        assert meter.latest_time_s() is not None


def test_gpu_lost_stops_the_native_thread_and_the_meter_says_so(sim, caplog) -> None:
    gpu = NvmlGpu(1)
    assert gpu.native
    with caplog.at_level(logging.WARNING), EnergyMeter([gpu]) as meter:
        sim.set_fault(1, "gpu_lost")
        deadline = time.monotonic() + 2.0
        while not meter.failures() and time.monotonic() < deadline:
            time.sleep(0.01)
        failures = meter.failures()
    sim.set_fault(1, None)
    assert "lost" in next(iter(failures.values()))


def test_meter_curve_points_sit_at_counter_updates(simulated_nvml) -> None:
    """Each point of the curve is an update, stamped nearer its tick than to any other."""
    sim = simulated_nvml(1, counter_period_s=0.05)
    gpu = NvmlGpu(0)
    with EnergyMeter([gpu]) as meter:
        _busy(0.5)
        times = np.array(meter.streams[0].points_between(0.0, time.monotonic())[0])
    origin, period = sim.counter_origin_s, sim.counter_period_s
    ticks = origin + np.round((times - origin) / period) * period
    # midpoint stamps of bracketing polls: never further than half a period from the tick
    assert np.all(np.abs(times - ticks) < period / 2)


def test_a_forked_child_neither_joins_nor_reads_the_parents_thread(simulated_nvml) -> None:
    import os

    simulated_nvml(1, counter_period_s=0.05)
    gpu = NvmlGpu(0)
    assert gpu.native
    try:
        pid = os.fork()
        if pid == 0:  # child: the native thread does not exist here
            try:
                ok = gpu._poller.drain() == []
                gpu._poller.stop()  # must return at once, not join a missing thread
                os._exit(0 if ok else 3)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.12)
        assert gpu.read_many()  # the parent's thread still runs
    finally:
        gpu.close()
