"""Tests of the SIMULATED NVML device, through the real pynvml bindings."""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pynvml
import pytest

import lightning_sustain
from lightning_sustain.testing import (
    PowerProfile,
    SimulatedDeviceSpec,
    SimulatedNVML,
    SimulatedNVMLError,
    benchmark_profiles,
    build_library,
)
from lightning_sustain.testing.simulated_nvml import STATE_ENV_VAR

REPO_ROOT = Path(lightning_sustain.__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------
# Reusable fixtures (candidates for tests/conftest.py): `simulated_nvml` is a factory that
# installs a SimulatedNVML, calls pynvml.nvmlInit() and undoes both at teardown.
# ---------------------------------------------------------------------------------------


def _counter_mj(index: int) -> int:
    return pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(index))


# ---- identity ----------------------------------------------------------------------------


def test_identity_through_pynvml(simulated_nvml):
    specs = [
        SimulatedDeviceSpec(name="Simulated NVIDIA A100-SXM4-40GB", architecture="ampere"),
        SimulatedDeviceSpec(),
        SimulatedDeviceSpec(name="Simulated Tesla P100", architecture="pascal"),
    ]
    sim = simulated_nvml(specs)
    assert pynvml.nvmlDeviceGetCount() == 3
    assert pynvml.nvmlSystemGetDriverVersion().startswith("simulated-")
    assert pynvml.nvmlLib.lsim_simulated_marker() == 1
    uuids = []
    for index, spec in enumerate(specs):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        assert pynvml.nvmlDeviceGetName(handle) == spec.name
        assert pynvml.nvmlDeviceGetIndex(handle) == index
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        assert uuid == sim.uuid(index)
        assert uuid.startswith("GPU-")
        uuids.append(uuid)
        by_uuid = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        assert pynvml.nvmlDeviceGetIndex(by_uuid) == index
    assert len(set(uuids)) == 3
    assert pynvml.nvmlDeviceGetArchitecture(pynvml.nvmlDeviceGetHandleByIndex(0)) == (
        pynvml.NVML_DEVICE_ARCH_AMPERE
    )
    assert pynvml.nvmlDeviceGetArchitecture(pynvml.nvmlDeviceGetHandleByIndex(2)) == (
        pynvml.NVML_DEVICE_ARCH_PASCAL
    )
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetHandleByUUID("GPU-does-not-exist")
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetHandleByIndex(3)


def test_utilisation_memory_temperature_follow_load(sim):
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    cold = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    sim.set_load(0, 0.5)
    assert pynvml.nvmlDeviceGetUtilizationRates(handle).gpu == 50
    assert pynvml.nvmlDeviceGetUtilizationRates(pynvml.nvmlDeviceGetHandleByIndex(1)).gpu == 0
    assert pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU) > cold
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    assert memory.total == memory.free + memory.used > 0
    assert pynvml.nvmlDeviceGetPowerManagementMode(handle) == pynvml.NVML_FEATURE_ENABLED
    assert sim.load(0) == 0.5


# ---- energy counter ----------------------------------------------------------------------


def test_energy_counter_monotonic_quantised_and_close_to_ground_truth(simulated_nvml):
    period_s = 0.05
    sim = simulated_nvml(1, counter_period_s=period_s)
    busy_w = 350.0
    previous = -1
    for step in range(12):
        sim.set_load(0, 1.0 if step % 3 else 0.0)
        time.sleep(0.02)
        before_j = sim.ground_truth_energy_j(0)
        counter = _counter_mj(0)
        after_j = sim.ground_truth_energy_j(0)
        assert counter >= previous  # never goes backwards
        previous = counter
        # The counter lags the truth by at most one update period, and never leads it.
        assert counter <= after_j * 1000.0 + 1e-6
        assert counter >= (before_j - busy_w * period_s) * 1000.0 - 1
    sim.set_load(0, 0.0)


def test_energy_counter_only_moves_in_period_steps(simulated_nvml):
    # Idle at 70 W with a 0.1 s period: every counter value is a whole number of 7 J ticks.
    sim = simulated_nvml(1, counter_period_s=0.1)
    values = set()
    deadline = time.monotonic() + 0.45
    while time.monotonic() < deadline:
        values.add(_counter_mj(0))
        time.sleep(0.005)
    for value in values:
        remainder = value % 7000
        assert min(remainder, 7000 - remainder) <= 1, value
    assert len(values) >= 3  # it does advance: 0.45 s is four ticks
    assert sim.counter_energy_mj(0) >= max(values)


def test_pre_volta_has_no_energy_counter(simulated_nvml):
    sim = simulated_nvml([SimulatedDeviceSpec(architecture="pascal"), SimulatedDeviceSpec()])
    pascal = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetTotalEnergyConsumption(pascal)
    assert pynvml.nvmlDeviceGetPowerUsage(pascal) == 70000  # power still readable
    assert _counter_mj(1) >= 0
    sim.set_architecture(1, "maxwell")
    with pytest.raises(pynvml.NVMLError_NotSupported):
        _counter_mj(1)
    sim.set_architecture(0, "volta")
    assert pynvml.nvmlDeviceGetTotalEnergyConsumption(pascal) >= 0


def test_ground_truth_is_the_exact_integral_of_power(simulated_nvml):
    sim = simulated_nvml(1)
    sim.set_load(0, 0.25)
    t1, e1 = sim.ground_truth_sample(0)
    time.sleep(0.03)
    t2, e2 = sim.ground_truth_sample(0)
    assert t2 > t1
    assert e2 - e1 == pytest.approx((70.0 + 0.25 * 280.0) * (t2 - t1), rel=1e-9)
    sim.set_load(0, 0.0)


def test_ground_truth_energy_of_busy_idle_pattern(simulated_nvml):
    sim = simulated_nvml(1, counter_period_s=0.1)
    t_a, e_a = sim.ground_truth_sample(0)
    busy_s = sim.busy(0, 0.3)
    time.sleep(0.2)
    t_b, e_b = sim.ground_truth_sample(0)
    assert busy_s >= 0.3  # nominal 0.3 s on an uncapped speed-1 device
    # Nominally 0.3 s at 350 W = 105 J; busy_s bounds the real busy interval from above.
    busy_part_j = e_b - e_a - 70.0 * (t_b - t_a - busy_s)
    assert busy_part_j <= 350.0 * busy_s + 1e-6
    assert busy_part_j == pytest.approx(350.0 * busy_s, rel=0.03)
    # After the next tick the counter has caught up with the truth at that tick.
    time.sleep(0.15)
    counter_j = _counter_mj(0) / 1000.0
    assert e_b <= counter_j <= sim.ground_truth_energy_j(0)


def test_counter_starts_at_initial_energy(simulated_nvml):
    simulated_nvml([SimulatedDeviceSpec(initial_energy_j=1.0e6)])
    assert _counter_mj(0) >= 1.0e9


# ---- power readings ----------------------------------------------------------------------


def test_power_readings_sample_and_hold(sim):
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    time.sleep(0.12)
    assert pynvml.nvmlDeviceGetPowerUsage(handle) == 70000
    sim.set_load(0, 1.0)
    assert sim.power_w(0) == 350.0  # exact readout changes at once
    time.sleep(0.12)  # at least two 50 ms ticks
    values = pynvml.nvmlDeviceGetFieldValues(
        handle,
        [
            pynvml.NVML_FI_DEV_POWER_INSTANT,
            pynvml.NVML_FI_DEV_POWER_CURRENT_LIMIT,
            pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
            pynvml.NVML_FI_DEV_ENERGY,
        ],
    )
    assert values[0].nvmlReturn == pynvml.NVML_SUCCESS
    assert values[0].value.uiVal == 350000
    assert values[1].value.uiVal == 400000
    assert values[2].valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
    assert values[2].value.ullVal > 0
    assert values[3].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert pynvml.nvmlDeviceGetPowerUsage(handle) == 350000
    time.sleep(0.06)
    average = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_POWER_AVERAGE])[0]
    assert average.value.uiVal == pytest.approx(350000, abs=2)
    sim.set_load(0, 0.0)


def test_field_values_unsupported_per_field(sim):
    sim.set_field_values_supported(1, False)
    values = pynvml.nvmlDeviceGetFieldValues(
        pynvml.nvmlDeviceGetHandleByIndex(1),
        [pynvml.NVML_FI_DEV_POWER_INSTANT, pynvml.NVML_FI_DEV_POWER_AVERAGE],
    )
    assert [v.nvmlReturn for v in values] == [pynvml.NVML_ERROR_NOT_SUPPORTED] * 2


# ---- limits and capping ------------------------------------------------------------------


def test_power_limits_get_set_and_constraints(sim):
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle) == [100000, 400000]
    assert pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) == 400000
    assert pynvml.nvmlDeviceGetPowerManagementLimit(handle) == 400000
    before = time.monotonic()
    pynvml.nvmlDeviceSetPowerManagementLimit(handle, 250000)
    assert pynvml.nvmlDeviceGetPowerManagementLimit(handle) == 250000
    assert pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) == 250000
    assert sim.power_limit_w(0) == 250.0
    assert sim.default_limit_w(0) == 400.0
    assert sim.limit_set_count(0) == 1
    assert sim.limit_set_time_s(0) >= before
    assert sim.limit_set_count(1) == 0 and sim.limit_set_time_s(1) is None
    assert sim.power_limit_w(1) == 400.0  # the other device is untouched


def test_set_limit_without_permission(simulated_nvml):
    sim = simulated_nvml([SimulatedDeviceSpec(set_limit_permitted=False)])
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        pynvml.nvmlDeviceSetPowerManagementLimit(handle, 200000)
    assert sim.power_limit_w(0) == 400.0
    assert sim.limit_set_count(0) == 0
    sim.set_power_limit_w(0, 300.0)  # the test backdoor ignores permission
    assert pynvml.nvmlDeviceGetPowerManagementLimit(handle) == 300000
    sim.set_limit_permitted(0, True)
    pynvml.nvmlDeviceSetPowerManagementLimit(handle, 200000)
    assert sim.power_limit_w(0) == 200.0


@pytest.mark.parametrize("limit_mw", [99999, 400001, 0])
def test_set_limit_out_of_range(sim, limit_mw):
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceSetPowerManagementLimit(handle, limit_mw)
    assert sim.power_limit_w(0) == 400.0


def test_capped_busy_draws_the_cap_and_stretches_time(simulated_nvml):
    sim = simulated_nvml([SimulatedDeviceSpec(), SimulatedDeviceSpec(speed=0.6)])
    assert sim.time_scale(0) == 1.0
    assert sim.time_scale(1) == pytest.approx(1 / 0.6)
    pynvml.nvmlDeviceSetPowerManagementLimit(pynvml.nvmlDeviceGetHandleByIndex(0), 245000)
    expected = (350.0 / 245.0) ** (1.0 / 3.0)
    assert sim.time_scale(0) == pytest.approx(expected)
    assert 1.10 < expected < 1.15  # ~11% slower at a 70% cap
    assert sim.power_w(0) == 70.0  # idle draw is below the cap
    sim.set_load(0, 1.0)
    assert sim.power_w(0) == 245.0
    sim.set_load(0, 0.5)
    assert sim.power_w(0) == pytest.approx(70.0 + 0.5 * (245.0 - 70.0))
    sim.set_load(0, 0.0)
    took_s = sim.busy(0, 0.1)
    assert took_s >= 0.1 * expected
    # A cap below idle power clamps the draw to the cap.
    spec = SimulatedDeviceSpec(idle_power_w=120.0, busy_power_w=300.0, default_limit_w=300.0)
    low = simulated_nvml([spec])
    low.set_power_limit_w(0, 100.0)
    assert low.power_w(0) == 100.0
    low.set_load(0, 1.0)
    assert low.power_w(0) == 100.0
    assert low.time_scale(0) == pytest.approx(3.0 ** (1.0 / 3.0))


def test_busy_picks_up_a_limit_changed_midway(sim):
    import threading

    timer = threading.Timer(0.05, sim.set_power_limit_w, args=(0, 100.0))
    timer.start()
    took_s = sim.busy(0, 0.2)
    timer.join()
    # 0.05 s at full speed, then 0.15 s of work at 3.5 ** (1/3) = 1.52x longer.
    assert took_s >= 0.05 + 0.15 * 3.5 ** (1 / 3) - 0.01
    assert sim.load(0) == 0.0


# ---- shared state across processes -------------------------------------------------------


def test_child_process_sees_and_changes_the_same_devices(sim):
    child = textwrap.dedent(
        """
        import pynvml
        from lightning_sustain.testing import SimulatedNVML
        pynvml.nvmlInit()
        assert pynvml.nvmlLib.lsim_simulated_marker() == 1
        handle = pynvml.nvmlDeviceGetHandleByIndex(1)
        pynvml.nvmlDeviceSetPowerManagementLimit(handle, 200000)
        print(pynvml.nvmlDeviceGetCount(), pynvml.nvmlDeviceGetUUID(handle))
        pynvml.nvmlShutdown()
        SimulatedNVML.attach().set_load(0, 1.0)
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", sim.uuid(1)]
    assert sim.power_limit_w(1) == 200.0
    assert sim.limit_set_count(1) == 1
    assert pynvml.nvmlDeviceGetPowerManagementLimit(pynvml.nvmlDeviceGetHandleByIndex(1)) == 200000
    assert sim.power_w(0) == 350.0
    sim.set_load(0, 0.0)


def test_attach_in_same_process_shares_state(sim):
    other = SimulatedNVML.attach()
    try:
        assert other.num_devices == 2
        assert other.uuid(1) == sim.uuid(1)
        other.set_load(1, 1.0)
        assert sim.power_w(1) == 350.0
        assert other.counter_period_s == pytest.approx(0.05)
    finally:
        other.close()
    assert os.path.exists(sim.state_path)  # an attached controller never deletes the state


# ---- faults and MIG ----------------------------------------------------------------------


def test_gpu_lost_and_unknown_error_faults(sim):
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    sim.set_fault(0, "gpu_lost")
    assert sim.fault(0) == "gpu_lost"
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetPowerUsage(handle)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetPowerUsage(pynvml.nvmlDeviceGetHandleByIndex(1)) >= 0
    sim.set_fault(0, "unknown_error")
    with pytest.raises(pynvml.NVMLError_Unknown):
        pynvml.nvmlDeviceGetName(handle)
    sim.set_fault(0, None)
    assert pynvml.nvmlDeviceGetPowerUsage(handle) >= 0


def test_counter_backwards_fault(sim):
    sim.set_load(0, 1.0)
    time.sleep(0.12)
    before = _counter_mj(0)
    assert before > 0
    sim.set_fault(0, "counter_backwards")
    after = _counter_mj(0)
    assert after < before
    time.sleep(0.12)
    assert _counter_mj(0) > after  # counts up again from the reset
    assert sim.ground_truth_energy_j(0) * 1000.0 > before  # the truth is unaffected
    sim.set_load(0, 0.0)


def test_mig_mode(sim):
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetMigMode(handle) == [0, 0]
    sim.set_mig(0, True)
    assert pynvml.nvmlDeviceGetMigMode(handle) == [1, 1]
    assert pynvml.nvmlDeviceIsMigDeviceHandle(handle).value == 0
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetPowerUsage(handle)
    field = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_POWER_INSTANT])[0]
    assert field.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    sim.set_mig(0, False)
    assert pynvml.nvmlDeviceGetPowerUsage(handle) >= 0


# ---- lifecycle ---------------------------------------------------------------------------


def test_missing_or_invalid_state_is_an_nvml_error_not_a_crash(monkeypatch, tmp_path):
    ctypes.CDLL(str(build_library()), mode=ctypes.RTLD_GLOBAL)
    monkeypatch.delenv(STATE_ENV_VAR, raising=False)
    with pytest.raises(pynvml.NVMLError) as excinfo:
        pynvml.nvmlInit()
    assert excinfo.value.value in (
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
    )
    garbage = tmp_path / "state.bin"
    garbage.write_bytes(b"not a state file" * 100)
    monkeypatch.setenv(STATE_ENV_VAR, str(garbage))
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        pynvml.nvmlInit()
    monkeypatch.setenv(STATE_ENV_VAR, str(tmp_path / "absent.bin"))
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        pynvml.nvmlInit()
    with pytest.raises(SimulatedNVMLError, match="not a valid simulated NVML state"):
        SimulatedNVML.attach(garbage)


def test_calls_after_shutdown_are_uninitialized():
    with SimulatedNVML(1):
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        pynvml.nvmlShutdown()
        with pytest.raises(pynvml.NVMLError_Uninitialized):
            pynvml.nvmlDeviceGetPowerUsage(handle)
        with pytest.raises(pynvml.NVMLError_Uninitialized):
            pynvml.nvmlDeviceGetCount()


def test_two_instances_in_sequence_and_env_restored(monkeypatch):
    monkeypatch.delenv(STATE_ENV_VAR, raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/example/lib")
    first = SimulatedNVML([SimulatedDeviceSpec(name="Simulated First")])
    with first:
        assert os.environ["LD_LIBRARY_PATH"].endswith(os.pathsep + "/opt/example/lib")
        assert os.environ["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(first.library_path.parent)
        pynvml.nvmlInit()
        assert pynvml.nvmlDeviceGetCount() == 1
        assert pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)) == "Simulated First"
        pynvml.nvmlDeviceSetPowerManagementLimit(pynvml.nvmlDeviceGetHandleByIndex(0), 150000)
        pynvml.nvmlShutdown()
        first_state = first.state_path
    assert STATE_ENV_VAR not in os.environ
    assert os.environ["LD_LIBRARY_PATH"] == "/opt/example/lib"
    assert not first_state.exists()

    specs = [SimulatedDeviceSpec(name="Simulated Second")] * 3
    with SimulatedNVML(specs) as second:
        pynvml.nvmlInit()
        assert pynvml.nvmlDeviceGetCount() == 3
        handle = pynvml.nvmlDeviceGetHandleByIndex(2)
        assert pynvml.nvmlDeviceGetName(handle) == "Simulated Second"
        assert (
            pynvml.nvmlDeviceGetPowerManagementLimit(pynvml.nvmlDeviceGetHandleByIndex(0)) == 400000
        )  # fresh state, not the first instance's
        assert second.num_devices == 3
        pynvml.nvmlShutdown()


def test_explicit_state_path(tmp_path):
    path = tmp_path / "nested" / "sim.state"
    with SimulatedNVML(1, state_path=path) as sim:
        assert sim.state_path == path and path.exists()
        pynvml.nvmlInit()
        assert pynvml.nvmlDeviceGetCount() == 1
        pynvml.nvmlShutdown()
    assert not path.exists()


def test_build_library_is_cached(tmp_path):
    first = build_library(tmp_path)
    mtime = first.stat().st_mtime_ns
    second = build_library(tmp_path)
    assert first == second and second.stat().st_mtime_ns == mtime
    assert first.name == "libnvidia-ml.so.1"
    assert first.parent.parent == tmp_path / "simnvml"
    assert not [p for p in first.parent.iterdir() if p.name.endswith(".tmp")]


def test_build_library_without_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SimulatedNVMLError, match="install gcc or set CC"):
        build_library(tmp_path)


# ---- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"idle_power_w": -1.0}, "idle_power_w"),
        ({"busy_power_w": 10.0}, "busy_power_w"),
        ({"min_limit_w": 500.0}, "min_limit_w"),
        ({"default_limit_w": 50.0}, "default_limit_w"),
        ({"speed": 0.0}, "speed"),
        ({"architecture": "fermi2"}, "architecture"),
        ({"busy_power_w": math.nan}, "busy_power_w"),
        ({"name": ""}, "name"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimulatedNVML([SimulatedDeviceSpec(**kwargs)])


def test_controller_validation(sim):
    with pytest.raises(ValueError, match="counter_period_s"):
        SimulatedNVML(1, counter_period_s=0)
    with pytest.raises(ValueError, match="devices"):
        SimulatedNVML(0)
    with pytest.raises(ValueError, match="unique"):
        SimulatedNVML([SimulatedDeviceSpec(uuid="GPU-x"), SimulatedDeviceSpec(uuid="GPU-x")])
    with pytest.raises(ValueError, match="out of range"):
        sim.set_load(2, 0.5)
    with pytest.raises(ValueError, match="load fraction"):
        sim.set_load(0, 1.5)
    with pytest.raises(ValueError, match="fault kind"):
        sim.set_fault(0, "melted")
    with pytest.raises(ValueError, match="outside device 0's range"):
        sim.set_power_limit_w(0, 50.0)
    with pytest.raises(ValueError, match="nominal_s"):
        sim.busy(0, -1.0)
    with pytest.raises(SimulatedNVMLError, match="not installed"):
        SimulatedNVML(1).power_w(0)
    assert "SimulatedNVML(devices=2" in repr(sim)


# ---- power profiles over wall time ---------------------------------------------------------


def _mid_tick(sim) -> None:
    """Sleep to the middle of a counter period (no read races a tick)."""
    origin, period = sim.counter_origin_s, sim.counter_period_s
    phase = (time.monotonic() - origin) % period
    time.sleep((0.5 * period - phase) % period)


@pytest.mark.parametrize("profile", benchmark_profiles(3), ids=lambda p: p.name)
def test_profile_counter_integrates_the_profile_exactly(simulated_nvml, profile):
    sim = simulated_nvml(1, counter_period_s=0.05)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    origin = time.monotonic() - 0.123
    sim.set_power_profile(0, profile, origin_s=origin)
    sim.set_load(0, 1.0)  # the load no longer matters: power follows the profile
    o, period = sim.counter_origin_s, sim.counter_period_s
    time.sleep(period)  # the first tick compared lies after the profile began
    readings = []
    for _ in range(4):
        _mid_tick(sim)
        mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        tick = o + math.floor((time.monotonic() - o) / period) * period
        readings.append((tick, mj))
        time.sleep(0.07)
    for (t0, e0), (t1, e1) in zip(readings, readings[1:], strict=False):
        expected_j = float(profile.energy_j(t0 - origin, t1 - origin))
        assert (e1 - e0) / 1000.0 == pytest.approx(expected_j, abs=2e-3)
        assert sim.profile_energy_j(0, t0, t1) == pytest.approx(expected_j, rel=1e-9, abs=1e-9)
    now = time.monotonic()
    assert sim.power_w(0) == pytest.approx(float(profile.power_w(now - origin)), rel=0.05, abs=5.0)


def test_profile_ground_truth_matches_python_for_any_window(sim):
    profile = PowerProfile.random_steps(seed=5, mean_hold_s=0.05, period_s=2.0)
    origin = time.monotonic() - 10.0
    sim.set_power_profile(1, profile, origin_s=origin)
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = np.sort(rng.uniform(-5.0, 30.0, 2)) + origin
        assert sim.profile_energy_j(1, a, b) == pytest.approx(
            float(profile.energy_j(a - origin, b - origin)), rel=1e-9, abs=1e-6
        )
    # exact integral: the mean power over whole periods is the profile's mean
    assert float(profile.energy_j(0.0, 20.0)) == pytest.approx(20.0 * profile.mean_power_w)


def test_ground_truth_sample_follows_the_profile(sim):
    profile = PowerProfile.square(0.2, low_w=50.0, high_w=500.0)
    sim.set_power_profile(0, profile)
    t0, e0 = sim.ground_truth_sample(0)
    time.sleep(0.3)
    t1, e1 = sim.ground_truth_sample(0)
    assert e1 - e0 == pytest.approx(sim.profile_energy_j(0, t0, t1), rel=1e-6)


def test_clearing_the_profile_returns_to_the_load_model(sim):
    sim.set_power_profile(0, PowerProfile.constant(123.0))
    assert sim.power_w(0) == pytest.approx(123.0)
    sim.set_power_profile(0, None)
    spec = sim.specs[0]
    assert sim.power_w(0) == pytest.approx(spec.idle_power_w)
    with pytest.raises(SimulatedNVMLError, match="no power profile"):
        sim.profile_energy_j(0, 0.0, 1.0)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PowerProfile("x", (0.0,), (-1.0,), (1.0,), 1.0), "powers"),
        (lambda: PowerProfile("x", (0.5,), (1.0,), (1.0,), 1.0), "start at 0"),
        (lambda: PowerProfile("x", (0.0, 0.0), (1.0, 1.0), (1.0, 1.0), 1.0), "increase"),
        (lambda: PowerProfile("x", (0.0,), (1.0,), (1.0,), math.inf), "period_s"),
        (lambda: PowerProfile.square(1.0, duty=1.5), "duty"),
    ],
)
def test_profile_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_set_power_profile_validation(sim):
    with pytest.raises(ValueError, match="PowerProfile"):
        sim.set_power_profile(0, "square")
    with pytest.raises(ValueError, match="origin_s"):
        sim.set_power_profile(0, PowerProfile.constant(), origin_s=math.nan)
