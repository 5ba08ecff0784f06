"""NvmlGpu and PowerLimitGuard through the real pynvml bindings and the simulated device."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lightning_sustain.budget.limits import PowerLimitGuard, journal_path
from lightning_sustain.energy.errors import (
    DeviceUnavailableError,
    MeasurementNotSupportedError,
    PowerLimitPermissionError,
)
from lightning_sustain.energy.meter import EnergyMeter
from lightning_sustain.energy.nvml import NvmlGpu, nvml_is_simulated, resolve_visible_gpus
from lightning_sustain.energy.types import Provenance
from lightning_sustain.testing import SimulatedDeviceSpec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _journal(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SUSTAIN_LIMIT_JOURNAL", str(tmp_path / "journal.json"))


def test_counter_mode_is_simulated_counter(sim) -> None:
    gpu = NvmlGpu(0)
    try:
        assert nvml_is_simulated()
        assert gpu.mode == "counter"
        assert gpu.info.provenance is Provenance.COUNTER
        assert gpu.info.simulated and gpu.info.provenance_label == "counter (simulated)"
        assert gpu.info.device_id == f"gpu:{sim.uuid(0)}"
    finally:
        gpu.close()


def test_counter_energy_matches_ground_truth(simulated_nvml) -> None:
    sim = simulated_nvml(1, counter_period_s=0.1)
    with EnergyMeter([NvmlGpu(0)]) as meter:
        time.sleep(0.15)
        t0, e0 = sim.ground_truth_sample(0)
        for _ in range(25):
            sim.busy(0, 0.05)
            time.sleep(0.03)
        t1, e1 = sim.ground_truth_sample(0)
        assert meter.wait_until_covered(t1, timeout_s=1.0)
        measured = meter.energy_between(t0, t1)[f"gpu:{sim.uuid(0)}"]
    truth = e1 - e0
    # over ~2 s, the 100 ms counter quantisation costs at most a few percent
    assert measured == pytest.approx(truth, rel=0.04)


def test_pre_volta_falls_back_to_integrated_power(simulated_nvml) -> None:
    sim = simulated_nvml([SimulatedDeviceSpec(architecture="pascal")], counter_period_s=0.02)
    gpu = NvmlGpu(0)
    try:
        assert gpu.mode == "field" and gpu.info.provenance is Provenance.INTEGRATED
        first = gpu.read()
        g0 = sim.ground_truth_energy_j(0)
        sim.set_load(0, 1.0)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            last = gpu.read()
            time.sleep(0.005)
        sim.set_load(0, 0.0)
        truth = sim.ground_truth_energy_j(0) - g0
        assert last.power_w == pytest.approx(350.0, rel=0.01)
        # sample-and-hold power with a 20 ms update period: within ~10 % over 0.3 s
        assert last.energy_j - first.energy_j == pytest.approx(truth, rel=0.1)
    finally:
        gpu.close()


def test_no_field_values_uses_power_usage(simulated_nvml) -> None:
    spec = SimulatedDeviceSpec(architecture="pascal", field_values_supported=False)
    simulated_nvml([spec])
    gpu = NvmlGpu(0)
    try:
        assert gpu.mode == "power"
        assert gpu.read().power_w == pytest.approx(70.0, rel=0.01)
    finally:
        gpu.close()


def test_mig_mode_is_a_clear_error(simulated_nvml) -> None:
    simulated_nvml([SimulatedDeviceSpec(mig_enabled=True)])
    with pytest.raises(MeasurementNotSupportedError, match="MIG"):
        NvmlGpu(0)


def test_bad_index(sim) -> None:
    with pytest.raises(DeviceUnavailableError, match="does not exist"):
        NvmlGpu(7)


def test_gpu_lost_mid_run_degrades(sim, caplog) -> None:
    with caplog.at_level(logging.WARNING), EnergyMeter([NvmlGpu(1)]) as meter:
        time.sleep(0.05)
        sim.set_fault(1, "gpu_lost")
        time.sleep(0.1)
        failures = meter.failures()
    sim.set_fault(1, None)
    assert "lost" in next(iter(failures.values()))
    assert any("stopped" in r.message for r in caplog.records)


def test_counter_backwards_warns_once_and_keeps_monotone(sim, caplog) -> None:
    gpu = NvmlGpu(0)
    try:
        gpu.read()
        time.sleep(0.12)
        before = gpu.read()
        sim.set_fault(0, "counter_backwards")
        with caplog.at_level(logging.WARNING):
            assert gpu.read() is None
            time.sleep(0.12)
            after = gpu.read()
        assert after is not None and after.energy_j >= before.energy_j
        assert sum("went backwards" in r.message for r in caplog.records) == 1
    finally:
        gpu.close()


def test_cuda_visible_devices_indices_and_uuids(simulated_nvml) -> None:
    sim = simulated_nvml(3)
    assert [v.nvml_index for v in resolve_visible_gpus("2,0")] == [2, 0]
    # full UUIDs, with or without the GPU- prefix, as CUDA accepts them
    by_uuid = resolve_visible_gpus(f"{sim.uuid(1)},{sim.uuid(2)[4:]}")
    assert [v.nvml_index for v in by_uuid] == [1, 2]
    # an ambiguous prefix matches several devices: CUDA stops there, and so do we
    assert resolve_visible_gpus("GPU-00000000") == []
    assert [v.nvml_index for v in resolve_visible_gpus("1,9,0")] == [1]  # stops at invalid
    mig = resolve_visible_gpus("MIG-abc")
    assert mig[0].mig and mig[0].nvml_index is None
    assert len(resolve_visible_gpus("")) == 0


def test_power_limits_read_and_set(sim) -> None:
    gpu = NvmlGpu(0)
    try:
        assert gpu.power_limit_range_w() == (100.0, 400.0)
        assert gpu.default_power_limit_w() == 400.0
        gpu.set_power_limit_w(250.0)
        assert gpu.power_limit_w() == 250.0 == sim.power_limit_w(0)
        sim.set_limit_permitted(0, False)
        with pytest.raises(PowerLimitPermissionError, match="software power budget"):
            gpu.set_power_limit_w(200.0)
    finally:
        sim.set_limit_permitted(0, True)
        sim.set_power_limit_w(0, 400.0)
        gpu.close()


def test_guard_clamps_and_restores(sim, caplog) -> None:
    gpu = NvmlGpu(0)
    try:
        with caplog.at_level(logging.INFO), PowerLimitGuard([gpu]) as guard:
            assert guard.set_limit_w(gpu, 50.0) == 100.0
            assert sim.power_limit_w(0) == 100.0
            assert guard.changed
        assert sim.power_limit_w(0) == 400.0
        assert any("outside its range" in r.message for r in caplog.records)
        assert not journal_path().exists() or sim.uuid(0) not in journal_path().read_text()
    finally:
        gpu.close()


def test_guard_restores_on_exception(sim) -> None:
    gpu = NvmlGpu(0)
    try:
        with pytest.raises(RuntimeError), PowerLimitGuard([gpu]) as guard:
            guard.set_limit_w(gpu, 200.0)
            raise RuntimeError("training failed")
        assert sim.power_limit_w(0) == 400.0
    finally:
        gpu.close()


CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    from lightning_sustain.energy.nvml import NvmlGpu
    from lightning_sustain.budget.limits import PowerLimitGuard
    gpu = NvmlGpu(0)
    guard = PowerLimitGuard([gpu])
    guard.set_limit_w(gpu, 150.0)
    print("capped", flush=True)
    time.sleep(30)
    """
)


def _spawn_capping_child(tmp_path: Path) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "capped"
    return proc


def test_sigterm_restores_limit_in_another_process(sim, tmp_path: Path) -> None:
    proc = _spawn_capping_child(tmp_path)
    assert sim.power_limit_w(0) == 150.0
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGTERM
    assert sim.power_limit_w(0) == 400.0


def test_sigkill_leaves_journal_and_next_guard_restores(sim, tmp_path: Path, caplog) -> None:
    proc = _spawn_capping_child(tmp_path)
    proc.kill()
    proc.wait(timeout=10)
    assert sim.power_limit_w(0) == 150.0, "SIGKILL cannot be caught"
    gpu = NvmlGpu(0)
    try:
        with caplog.at_level(logging.WARNING):
            PowerLimitGuard([gpu]).close()
        assert sim.power_limit_w(0) == 400.0
        assert any("no longer runs" in r.message for r in caplog.records)
    finally:
        gpu.close()


def test_no_nvml_library_is_a_clear_error(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LD_LIBRARY", "LIGHTNING_SUSTAIN"))
    }
    code = (
        "from lightning_sustain.energy.nvml import NvmlGpu\n"
        "from lightning_sustain.energy.errors import DeviceUnavailableError\n"
        "try:\n    NvmlGpu(0)\nexcept DeviceUnavailableError as e:\n    print('OK', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert out.stdout.startswith("OK") and "NVML is not available" in out.stdout, out.stderr


def test_opening_a_lost_gpu_is_our_error(sim) -> None:
    sim.set_fault(1, "gpu_lost")
    try:
        with pytest.raises(DeviceUnavailableError, match="lost"):
            NvmlGpu(1)
    finally:
        sim.set_fault(1, None)


def test_journal_updates_are_serialised_across_processes(sim, tmp_path: Path) -> None:
    # two processes cap and restore different devices at the same time; afterwards the
    # journal holds no stale entry and both limits are back
    script = tmp_path / "cap.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(REPO)!r})
            from lightning_sustain.energy.nvml import NvmlGpu
            from lightning_sustain.budget.limits import PowerLimitGuard
            gpu = NvmlGpu(int(sys.argv[1]))
            for _ in range(30):
                with PowerLimitGuard([gpu]) as guard:
                    guard.set_limit_w(gpu, 200.0)
            """
        )
    )
    procs = [subprocess.Popen([sys.executable, str(script), str(i)]) for i in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert sim.power_limit_w(0) == 400.0 and sim.power_limit_w(1) == 400.0
    text = journal_path().read_text() if journal_path().exists() else "{}"
    assert sim.uuid(0) not in text and sim.uuid(1) not in text
