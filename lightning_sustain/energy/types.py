"""Value types shared by every energy device and the meter.

Nothing here imports Lightning or torch: the energy layer is usable on its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Provenance(str, enum.Enum):
    """Where an energy figure comes from.

    Attributes:
        COUNTER: a hardware cumulative-energy counter (NVML total energy, RAPL).
        INTEGRATED: power samples integrated over time by the meter.
        ESTIMATED: a model (e.g. CPU time x watts per core), not a measurement.
    """

    COUNTER = "counter"
    INTEGRATED = "integrated"
    ESTIMATED = "estimated"

    def __str__(self) -> str:
        return self.value


def provenance_label(provenance: Provenance | str, simulated: bool) -> str:
    """Human-readable provenance tag, e.g. ``"counter (simulated)"``.

    Args:
        provenance: the provenance of the figure.
        simulated: whether the figure comes from the simulated NVML device.

    Returns:
        The label shown next to every energy figure in logs and reports.
    """
    label = str(Provenance(provenance))
    return f"{label} (simulated)" if simulated else label


@dataclass(frozen=True)
class DeviceInfo:
    """Static description of a measured device.

    Attributes:
        device_id: stable identifier, unique within a process (``gpu:<uuid>``,
            ``rapl:<zone path>``, ``cpu-estimate:<pid>``).
        kind: ``"gpu"``, ``"cpu"`` or ``"dram"``.
        name: human-readable name (``"NVIDIA H100 80GB HBM3"``, ``"package-0"``).
        provenance: how this device's energy is obtained.
        simulated: True when the device is the simulated NVML device.
        index: device index in its own namespace (NVML index, RAPL zone number), if any.
    """

    device_id: str
    kind: str
    name: str
    provenance: Provenance
    simulated: bool = False
    index: int | None = None

    @property
    def provenance_label(self) -> str:
        """Provenance tag including ``(simulated)`` where it applies."""
        return provenance_label(self.provenance, self.simulated)


@dataclass(frozen=True)
class EnergyReading:
    """One cumulative-energy reading of one device.

    Attributes:
        timestamp_s: ``time.monotonic()`` when the value applies (for a counter that
            updates periodically this is the best estimate of the update time).
        energy_j: cumulative energy since the device was opened, in joules.
        power_w: the most recent power figure, in watts, if the device has one.
    """

    timestamp_s: float
    energy_j: float
    power_w: float | None = None
