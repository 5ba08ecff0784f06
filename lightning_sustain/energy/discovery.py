"""Opening the devices a process should measure, with honest fallbacks."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.energy.errors import EnergyMeasurementError
from lightning_sustain.energy.estimate import DEFAULT_WATTS_PER_CORE, CpuTimeEstimate
from lightning_sustain.energy.nvml import NvmlGpu
from lightning_sustain.energy.rapl import DEFAULT_POWERCAP_ROOT, discover_rapl_zones

logger = logging.getLogger(__name__)

CPU_MODES = ("auto", "rapl", "estimate", "none")
_warned: set[str] = set()


def warn_once(key: str, message: str, *args: object) -> None:
    """Log a warning the first time ``key`` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    logger.warning(message, *args)


def open_devices(
    gpu_indices: Sequence[int] = (),
    cpu: str = "auto",
    watts_per_core: float = DEFAULT_WATTS_PER_CORE,
    powercap_root: str = DEFAULT_POWERCAP_ROOT,
) -> list[EnergyDevice]:
    """Open the GPUs (by NVML index) and the CPU measurement this process should use.

    A GPU that cannot be measured (no NVML, MIG mode, lost) is skipped with one warning;
    the run continues with what can be measured.

    Args:
        gpu_indices: NVML indices of the GPUs this process trains on.
        cpu: ``"auto"`` (RAPL where readable, else the estimate), ``"rapl"``,
            ``"estimate"`` or ``"none"``.
        watts_per_core: power of one busy core for the CPU estimate, in watts.
        powercap_root: the powercap sysfs directory.

    Raises:
        ValueError: an unknown ``cpu`` mode or a bad ``watts_per_core``.
    """
    if cpu not in CPU_MODES:
        raise ValueError(f"cpu={cpu!r} is not one of {', '.join(CPU_MODES)}.")
    devices: list[EnergyDevice] = []
    for index in gpu_indices:
        try:
            devices.append(NvmlGpu(int(index)))
        except EnergyMeasurementError as exc:
            warn_once(f"gpu-{index}-{type(exc).__name__}", "GPU %s is not measured: %s", index, exc)
    if cpu in ("auto", "rapl"):
        zones = discover_rapl_zones(powercap_root)
        if zones:
            devices.extend(zones)
        elif cpu == "rapl":
            warn_once(
                "rapl-missing",
                "cpu='rapl' was asked for but no readable RAPL zone exists under %s; CPU "
                "energy is estimated instead.",
                powercap_root,
            )
            devices.append(CpuTimeEstimate(watts_per_core))
        else:
            devices.append(CpuTimeEstimate(watts_per_core))
    elif cpu == "estimate":
        devices.append(CpuTimeEstimate(watts_per_core))
    return devices
