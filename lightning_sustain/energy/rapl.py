"""CPU package and DRAM energy through the Linux powercap RAPL interface.

Reads ``/sys/class/powercap/intel-rapl:*/energy_uj`` (also used by AMD CPUs on recent
kernels), handles counter wraparound through ``max_energy_range_uj`` and warns once
when the files are not readable (since Linux 5.10 they are root-only by default).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.energy.errors import DeviceUnavailableError
from lightning_sustain.energy.types import DeviceInfo, EnergyReading, Provenance

logger = logging.getLogger(__name__)

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
_unreadable_warned = False


class RaplZone(EnergyDevice):
    """One RAPL zone (a CPU package or its DRAM sub-zone).

    Args:
        zone_dir: the zone's sysfs directory, e.g. ``/sys/class/powercap/intel-rapl:0``.

    Raises:
        DeviceUnavailableError: the zone's files are missing or unreadable.
    """

    preferred_interval_s = 0.05

    def __init__(self, zone_dir: str | os.PathLike[str]) -> None:
        self.zone_dir = Path(zone_dir)
        self._energy_file = self.zone_dir / "energy_uj"
        try:
            name = (self.zone_dir / "name").read_text().strip()
            self.max_energy_range_uj = int((self.zone_dir / "max_energy_range_uj").read_text())
            self._last_raw_uj = self._read_raw_uj()
        except PermissionError as exc:
            raise DeviceUnavailableError(
                f"RAPL zone {self.zone_dir} is not readable ({exc.strerror}); run as root or "
                f"`sudo chmod a+r {self.zone_dir}/energy_uj` to measure CPU energy."
            ) from exc
        except (OSError, ValueError) as exc:
            raise DeviceUnavailableError(f"RAPL zone {self.zone_dir} is not usable: {exc}") from exc
        kind = "dram" if name.startswith("dram") else "cpu"
        self.info = DeviceInfo(
            device_id=f"rapl:{self.zone_dir.name}",
            kind=kind,
            name=name,
            provenance=Provenance.COUNTER,
            index=None,
        )
        self._energy_j = 0.0
        self._last_time_s = time.monotonic()

    def _read_raw_uj(self) -> int:
        return int(self._energy_file.read_text())

    def read(self) -> EnergyReading:
        """Read the zone's counter, adding the wrapped range when it rolled over."""
        now = time.monotonic()
        try:
            raw_uj = self._read_raw_uj()
        except (OSError, ValueError) as exc:
            raise DeviceUnavailableError(
                f"RAPL zone {self.zone_dir} stopped answering: {exc}"
            ) from exc
        delta_uj = raw_uj - self._last_raw_uj
        if delta_uj < 0:
            delta_uj += self.max_energy_range_uj  # the counter wrapped around
        self._last_raw_uj = raw_uj
        delta_j = delta_uj / 1e6
        interval_s = now - self._last_time_s
        self._last_time_s = now
        self._energy_j += delta_j
        power_w = delta_j / interval_s if interval_s > 0 else None
        return EnergyReading(now, self._energy_j, power_w)


def discover_rapl_zones(root: str | os.PathLike[str] = DEFAULT_POWERCAP_ROOT) -> list[RaplZone]:
    """Open every CPU package zone and its DRAM sub-zone.

    Core, uncore and psys zones are skipped: core and uncore are parts of the package
    figure and psys overlaps it, so adding them would double count.

    Args:
        root: the powercap directory (a fake tree in tests).

    Returns:
        The readable zones; an empty list (with one warning per process when zones exist
        but cannot be read) otherwise.
    """
    global _unreadable_warned
    root_path = Path(root)
    if not root_path.is_dir():
        return []
    zones: list[RaplZone] = []
    problems: list[str] = []
    for package_dir in sorted(root_path.glob("intel-rapl:*")):
        if package_dir.name.count(":") != 1:
            continue
        candidates = [package_dir] + sorted(package_dir.glob(f"{package_dir.name}:*"))
        for zone_dir in candidates:
            try:
                name = (zone_dir / "name").read_text().strip()
            except OSError:
                continue
            if not (name.startswith("package") or name.startswith("dram")):
                continue
            try:
                zones.append(RaplZone(zone_dir))
            except DeviceUnavailableError as exc:
                problems.append(str(exc))
    if problems and not _unreadable_warned:
        _unreadable_warned = True
        logger.warning(
            "CPU energy through RAPL is not available: %s CPU energy is estimated instead.",
            problems[0],
        )
    return zones
