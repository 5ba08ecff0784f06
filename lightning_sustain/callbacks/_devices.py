"""Which devices does this Lightning process train on? (shared by every callback).

The logic lives in :mod:`lightning_sustain.run.devices` (no Lightning there); this module
adapts a ``Trainer`` to it and keeps the names the callbacks import.
"""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.run.devices import (
    CpuSelection,
    GpuSelection,
    gpu_indices_for,
    open_rank_devices,
    rapl_on_node,
    validate_cpu_selection,
)
from lightning_sustain.run.devices import validate_gpu_selection as _validate_gpu_selection

__all__ = [
    "CpuSelection",
    "GpuSelection",
    "open_process_devices",
    "process_gpu_indices",
    "validate_cpu_selection",
    "validate_gpu_selection",
]

_rapl_on_node = rapl_on_node


def validate_gpu_selection(gpus: object, name: str = "gpus") -> GpuSelection:
    """Check a callback's GPU selection argument (see :mod:`lightning_sustain.run.devices`)."""
    return _validate_gpu_selection(gpus, name)


def process_gpu_indices(trainer: pl.Trainer, gpus: GpuSelection) -> list[int]:
    """NVML indices of the GPUs this Trainer process should measure."""
    return gpu_indices_for(gpus, trainer.strategy.root_device, trainer.local_rank)


def open_process_devices(
    trainer: pl.Trainer, gpus: GpuSelection, cpu: CpuSelection, watts_per_core: float
) -> list[EnergyDevice]:
    """Open this Trainer process's devices; node-level RAPL zones only on local rank 0."""
    return open_rank_devices(
        gpus, cpu, watts_per_core, trainer.strategy.root_device, trainer.local_rank
    )
