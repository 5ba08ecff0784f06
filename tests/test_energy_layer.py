"""Energy layer without Lightning: RAPL, CPU estimate, carbon, meter, accounting."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_sustain.energy import carbon, rapl
from lightning_sustain.energy.accounting import EnergyAccountant
from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.energy.discovery import open_devices
from lightning_sustain.energy.errors import DeviceUnavailableError
from lightning_sustain.energy.estimate import CpuTimeEstimate, validate_positive
from lightning_sustain.energy.meter import EnergyMeter, active_sampler_threads
from lightning_sustain.energy.types import DeviceInfo, EnergyReading, Provenance


class LinearDevice(EnergyDevice):
    """A device drawing constant power: energy = power * (t - t0). Exact ground truth."""

    preferred_interval_s = 0.005

    def __init__(self, power_w: float = 100.0, name: str = "linear") -> None:
        self.power_w = power_w
        self.t0 = time.monotonic()
        self.reads = 0
        self.fail_after: int | None = None
        self.closed = False
        self.info = DeviceInfo(f"test:{name}", "gpu", name, Provenance.COUNTER)

    def read(self) -> EnergyReading:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise DeviceUnavailableError("device lost in test")
        now = time.monotonic()
        return EnergyReading(now, self.power_w * (now - self.t0), self.power_w)

    def close(self) -> None:
        self.closed = True


# -- RAPL ------------------------------------------------------------------------------
def make_zone(root: Path, name: str, zone: str, energy_uj: int, max_uj: int = 1000_000_000) -> Path:
    d = root / zone
    d.mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def test_rapl_discovers_package_and_dram_but_not_core(tmp_path: Path) -> None:
    make_zone(tmp_path, "package-0", "intel-rapl:0", 100)
    make_zone(tmp_path / "intel-rapl:0", "core", "intel-rapl:0:0", 5)
    make_zone(tmp_path / "intel-rapl:0", "dram", "intel-rapl:0:1", 7)
    make_zone(tmp_path, "psys", "intel-rapl:1", 9)
    zones = rapl.discover_rapl_zones(tmp_path)
    assert sorted(z.info.name for z in zones) == ["dram", "package-0"]
    assert {z.info.kind for z in zones} == {"cpu", "dram"}
    assert all(z.info.provenance is Provenance.COUNTER for z in zones)


def test_rapl_counter_wraparound(tmp_path: Path) -> None:
    zone_dir = make_zone(tmp_path, "package-0", "intel-rapl:0", 999_000_000, max_uj=1_000_000_000)
    zone = rapl.RaplZone(zone_dir)
    (zone_dir / "energy_uj").write_text("999_500_000".replace("_", ""))
    assert zone.read().energy_j == pytest.approx(0.5)
    (zone_dir / "energy_uj").write_text("1000000")  # wrapped: +0.5 J to the top, +1 J after
    assert zone.read().energy_j == pytest.approx(0.5 + 0.5 + 1.0)


def test_rapl_permission_denied_warns_once_and_returns_nothing(
    tmp_path: Path, caplog, monkeypatch
) -> None:
    # CI runs as root, where chmod cannot deny reading: make the read raise instead,
    # exactly as a non-root read of energy_uj does on Linux >= 5.10.
    make_zone(tmp_path, "package-0", "intel-rapl:0", 1)
    real_read_text = Path.read_text

    def denied(self: Path, *args, **kwargs):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    rapl._unreadable_warned = False
    with caplog.at_level(logging.WARNING):
        assert rapl.discover_rapl_zones(tmp_path) == []
        assert rapl.discover_rapl_zones(tmp_path) == []
    messages = [r.message for r in caplog.records if "not readable" in r.message]
    assert len(messages) == 1 and "chmod a+r" in messages[0]


def test_rapl_unreadable_as_root_via_bad_content(tmp_path: Path, caplog) -> None:
    # As root a chmod cannot make the file unreadable; a file that cannot be parsed
    # (what some kernels return when access is denied) takes the same path.
    zone_dir = make_zone(tmp_path, "package-0", "intel-rapl:0", 1)
    (zone_dir / "energy_uj").write_text("permission denied\n")
    rapl._unreadable_warned = False
    with caplog.at_level(logging.WARNING):
        assert rapl.discover_rapl_zones(tmp_path) == []
        rapl.discover_rapl_zones(tmp_path)
    warnings = [r for r in caplog.records if "RAPL is not available" in r.message]
    assert len(warnings) == 1
    assert "estimated instead" in warnings[0].message


def test_rapl_missing_root_is_empty(tmp_path: Path) -> None:
    assert rapl.discover_rapl_zones(tmp_path / "nope") == []


# -- CPU estimate, settings ---------------------------------------------------------------
def test_cpu_estimate_tracks_cpu_time() -> None:
    device = CpuTimeEstimate(watts_per_core=20.0, include_children=False)
    start = device.read().energy_j
    t_end = time.process_time() + 0.2
    x = 0
    while time.process_time() < t_end:
        x += 1
    energy = device.read().energy_j - start
    assert device.info.provenance is Provenance.ESTIMATED
    assert 20.0 * 0.15 <= energy <= 20.0 * 0.6


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "10", True, None])
def test_bad_watts_per_core_named(bad) -> None:
    with pytest.raises(ValueError, match="watts_per_core"):
        CpuTimeEstimate(watts_per_core=bad)


def test_validate_positive_allows_zero_when_asked() -> None:
    assert validate_positive("x", 0, allow_zero=True) == 0.0
    with pytest.raises(ValueError, match="x must be"):
        validate_positive("x", 0)


def test_open_devices_falls_back_to_estimate_without_rapl(tmp_path: Path) -> None:
    devices = open_devices([], cpu="auto", powercap_root=str(tmp_path / "none"))
    assert [d.info.provenance for d in devices] == [Provenance.ESTIMATED]
    assert open_devices([], cpu="none") == []
    with pytest.raises(ValueError, match="cpu="):
        open_devices([], cpu="gpu")


# -- carbon ------------------------------------------------------------------------------
def test_carbon_lookup_and_arithmetic() -> None:
    de = carbon.carbon_intensity_for("de")
    assert de.region == "DE" and de.g_co2e_per_kwh > 100 and "Ember" in de.source
    assert carbon.carbon_intensity_for("DEU") == de
    assert carbon.co2e_g(3.6e6, de, pue=1.5) == pytest.approx(de.g_co2e_per_kwh * 1.5)
    assert carbon.resolve_carbon_intensity().region == "WORLD"
    assert carbon.resolve_carbon_intensity(carbon_intensity_g_per_kwh=100).source == "user-supplied"


def test_carbon_bad_input() -> None:
    with pytest.raises(ValueError, match="not in the shipped"):
        carbon.carbon_intensity_for("XX")
    with pytest.raises(ValueError, match="either"):
        carbon.resolve_carbon_intensity(100, "DE")
    with pytest.raises(ValueError, match="carbon_intensity_g_per_kwh"):
        carbon.resolve_carbon_intensity(-5)


# -- meter -------------------------------------------------------------------------------
def test_meter_interpolates_linear_curve_exactly() -> None:
    device = LinearDevice(power_w=250.0)
    with EnergyMeter([device]) as meter:
        t0 = time.monotonic()
        time.sleep(0.12)
        t1 = time.monotonic()
        assert meter.wait_until_covered(t1)
        energy = meter.energy_between(t0, t1)[device.info.device_id]
    assert energy == pytest.approx(250.0 * (t1 - t0), rel=1e-6)
    assert device.closed


def test_meters_share_one_stream_per_device_and_stop_thread() -> None:
    device_a = LinearDevice(name="shared")
    device_b = LinearDevice(name="shared")  # same device id: must be deduplicated
    meter_a = EnergyMeter([device_a])
    meter_b = EnergyMeter([device_b])
    assert device_b.closed, "the duplicate device is closed, not sampled twice"
    assert meter_a.streams[0] is meter_b.streams[0]
    assert active_sampler_threads() == 1
    meter_a.close()
    assert not device_a.closed, "still used by meter_b"
    meter_b.close()
    assert device_a.closed
    deadline = time.monotonic() + 2
    while active_sampler_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert active_sampler_threads() == 0


def test_meter_garbage_collection_releases_devices() -> None:
    device = LinearDevice(name="gc")
    meter = EnergyMeter([device])
    del meter
    gc.collect()
    assert device.closed
    deadline = time.monotonic() + 2
    while active_sampler_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert active_sampler_threads() == 0


def test_meter_device_failure_warns_once_and_degrades(caplog) -> None:
    device = LinearDevice(name="flaky")
    device.fail_after = 3
    with caplog.at_level(logging.WARNING), EnergyMeter([device]) as meter:
        time.sleep(0.1)
        failures = meter.failures()
        assert "device lost in test" in failures[device.info.device_id]
        before = meter.energy_between(0, time.monotonic())[device.info.device_id]
        time.sleep(0.05)
        after = meter.energy_between(0, time.monotonic())[device.info.device_id]
        assert after == before, "no energy invented after the failure"
    assert sum("measurement of flaky stopped" in r.message for r in caplog.records) == 1


def test_meter_bad_settings() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        EnergyMeter([], interval_s=-1)
    with pytest.raises(ValueError, match="history_s"):
        EnergyMeter([], history_s=0)


def test_meter_memory_bounded_by_history() -> None:
    device = LinearDevice(name="bounded")
    with EnergyMeter([device], interval_s=0.001, history_s=0.05) as meter:
        time.sleep(0.5)
        stream = meter.streams[0]
        # points kept never exceed roughly 2 x history / interval (trimmed in halves)
        assert len(stream._times_s) < 2 * 0.05 / 0.001 + 1100


def test_no_thread_left_in_a_fresh_process() -> None:
    code = (
        "import threading, time\n"
        "from lightning_sustain.energy.meter import EnergyMeter\n"
        "from lightning_sustain.energy.estimate import CpuTimeEstimate\n"
        "m = EnergyMeter([CpuTimeEstimate()]); time.sleep(0.05); m.close()\n"
        "time.sleep(0.1)\n"
        "print(sorted(t.name for t in threading.enumerate()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['MainThread']"


# -- accounting --------------------------------------------------------------------------
def test_accountant_resolves_steps_and_phases() -> None:
    device = LinearDevice(power_w=100.0, name="acct")
    with EnergyMeter([device]) as meter:
        written = []
        acct = EnergyAccountant(meter, on_steps=written.extend)
        t = time.monotonic()
        acct.record_step(0, 0, t, t + 0.02, 8)
        acct.record_step(1, 0, t + 0.02, t + 0.05, 8)
        start, end = acct.mark(t + 0.05), acct.mark(t + 0.06)
        acct.record_interval("validation", start, end, steps=2)
        time.sleep(0.08)
        resolved = acct.resolve(wait=True)
    assert [s.step for s in resolved] == [0, 1]
    assert resolved[0].energy_j == pytest.approx(2.0, rel=1e-3)
    assert resolved[1].energy_j == pytest.approx(3.0, rel=1e-3)
    assert resolved[1].power_w == pytest.approx(100.0, rel=1e-3)
    assert acct.totals["train"].samples == 16 and acct.totals["train"].steps == 2
    assert acct.totals["validation"].energy_j == pytest.approx(1.0, rel=1e-3)
    assert written == resolved
    with pytest.raises(ValueError, match="phase"):
        acct.record_interval("warmup", start, end)
    assert acct.energy_at_mark(end)[device.info.device_id] > 0


def test_accountant_waits_for_coverage_without_blocking_by_default() -> None:
    device = LinearDevice(name="lag")
    device.preferred_interval_s = 0.2
    with EnergyMeter([device]) as meter:
        acct = EnergyAccountant(meter)
        future = time.monotonic() + 0.1
        acct.record_step(0, 0, future - 0.05, future, 1)
        assert acct.resolve() == []  # not covered yet: stays pending
        assert acct.pending_steps == 1
        assert len(acct.resolve(wait=True)) == 1


# -- a window from construction on (issue 10) ------------------------------------------------
def test_meter_curve_starts_before_construction_returns(simulated_nvml) -> None:
    """A window opened right after construction is measured in full, counter or Python."""
    import numpy as np

    from lightning_sustain.energy.nvml import NvmlGpu
    from lightning_sustain.testing import PowerProfile

    sim = simulated_nvml(1, counter_period_s=0.1)
    sim.set_power_profile(0, PowerProfile.constant(200.0))
    for native in (True, False):
        gpu = NvmlGpu(0, native_poller=native)
        with EnergyMeter([gpu]) as meter:
            t0 = time.monotonic()
            assert meter.curve_start_s() is not None and meter.curve_start_s() <= t0
            time.sleep(0.5)
            t1 = time.monotonic()
            assert meter.wait_until_covered(t1, timeout_s=1.0)
            ratio = meter.energy_between(t0, t1)[gpu.info.device_id] / (200.0 * (t1 - t0))
        # before: 0.90-0.97 (everything before the first counter change was lost)
        assert float(np.clip(ratio, 0, 2)) == pytest.approx(1.0, abs=0.05)


def test_accountant_attributes_a_square_wave_within_update_intervals(simulated_nvml) -> None:
    """Real pynvml, simulated square wave: ours never worse than plain interpolation."""
    import numpy as np

    from lightning_sustain.energy.nvml import NvmlGpu
    from lightning_sustain.testing import PowerProfile

    sim = simulated_nvml(1, counter_period_s=0.1)
    sim.set_power_profile(0, PowerProfile.square(0.8), origin_s=time.monotonic() - 0.37)
    gpu = NvmlGpu(0)
    with EnergyMeter([gpu]) as meter:
        got_ours: list = []
        got_plain: list = []
        ours = EnergyAccountant(meter, on_steps=got_ours.extend)
        plain = EnergyAccountant(meter, on_steps=got_plain.extend, attribute_short_steps=False)
        t = time.monotonic()
        bounds = []
        for k in range(150):
            time.sleep(0.02)
            end = time.monotonic()
            for acct in (ours, plain):
                acct.record_step(k, 0, t, end, 1)
            bounds.append((t, end))
            t = end
            if k % 50 == 49:
                ours.resolve()
                plain.resolve()
        ours.resolve(wait=True)
        plain.resolve(wait=True)
        choice = ours.last_choice[gpu.info.device_id]
    assert [s.step for s in got_ours] == list(range(150))
    truth = np.array([sim.profile_energy_j(0, a, b) for a, b in bounds])
    err_ours = np.abs(np.array([s.energy_j for s in got_ours]) - truth).sum()
    err_plain = np.abs(np.array([s.energy_j for s in got_plain]) - truth).sum()
    assert err_ours <= 1.05 * err_plain, choice
    assert sum(s.energy_j for s in got_ours) == pytest.approx(truth.sum(), rel=0.01)
    assert ours.totals["train"].steps == 150
