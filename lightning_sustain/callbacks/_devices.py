"""Which devices does this Lightning process train on? (shared by every callback)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Union

import lightning.pytorch as pl

from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.energy.discovery import open_devices, warn_once
from lightning_sustain.energy.errors import EnergyMeasurementError
from lightning_sustain.energy.nvml import (
    nvml_index_for_uuid,
    nvml_init,
    nvml_is_simulated,
    nvml_shutdown,
    resolve_visible_gpus,
)
from lightning_sustain.energy.rapl import DEFAULT_POWERCAP_ROOT

logger = logging.getLogger(__name__)

GpuSelection = Union[Literal["auto", "local_rank", "none"], list[int]]
CpuSelection = Literal["auto", "rapl", "estimate", "none"]


def validate_gpu_selection(gpus: object) -> GpuSelection:
    """Check the ``gpus`` argument of a callback.

    Raises:
        ValueError: anything other than ``"auto"``, ``"local_rank"``, ``"none"`` or a list
            of non-negative NVML indices.
    """
    if gpus in ("auto", "local_rank", "none"):
        return gpus  # type: ignore[return-value]
    if isinstance(gpus, Sequence) and not isinstance(gpus, str):
        indices = list(gpus)
        if all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            return indices
    raise ValueError(
        f"gpus={gpus!r} is not valid: use 'auto' (the GPU this process trains on), "
        "'local_rank', 'none', or a list of NVML device indices."
    )


def validate_cpu_selection(cpu: object) -> CpuSelection:
    """Check the ``cpu`` argument of a callback.

    Raises:
        ValueError: anything other than ``"auto"``, ``"rapl"``, ``"estimate"``, ``"none"``.
    """
    if cpu not in ("auto", "rapl", "estimate", "none"):
        raise ValueError(f"cpu={cpu!r} is not one of 'auto', 'rapl', 'estimate', 'none'.")
    return cpu  # type: ignore[return-value]


def _nvml_simulated() -> bool:
    try:
        nvml_init()
    except EnergyMeasurementError:
        return False
    try:
        return nvml_is_simulated()
    finally:
        nvml_shutdown()


def process_gpu_indices(trainer: pl.Trainer, gpus: GpuSelection) -> list[int]:
    """NVML indices of the GPUs this process should measure.

    ``"auto"``: on CUDA the process's root device (matched by UUID, so CUDA and NVML
    ordering differences do not matter); on CPU with the simulated NVML device, the
    simulated device of this process's local rank; otherwise none.
    ``"local_rank"``: the visible device whose CUDA ordinal is the local rank.
    """
    if gpus == "none":
        return []
    if isinstance(gpus, list):
        return list(gpus)
    root = trainer.strategy.root_device
    try:
        if gpus == "auto" and root.type == "cuda":
            import torch

            props = torch.cuda.get_device_properties(root.index or 0)
            uuid = str(getattr(props, "uuid", "") or "")
            if uuid:
                return [nvml_index_for_uuid(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")]
            visible = resolve_visible_gpus()
            ordinal = root.index or 0
        elif gpus == "auto" and not _nvml_simulated():
            return []
        else:
            visible = resolve_visible_gpus()
            ordinal = trainer.local_rank
    except EnergyMeasurementError as exc:
        warn_once("no-nvml", "GPU energy is not measured: %s", exc)
        return []
    if ordinal >= len(visible):
        warn_once(
            f"no-gpu-{ordinal}",
            "No visible GPU for local rank %d (%d visible); GPU energy is not measured.",
            ordinal,
            len(visible),
        )
        return []
    entry = visible[ordinal]
    if entry.mig or entry.nvml_index is None:
        warn_once(
            "mig",
            "CUDA device %d is a MIG slice (%s): NVML cannot measure energy per MIG slice, "
            "so GPU energy is not measured for this process.",
            ordinal,
            entry.uuid,
        )
        return []
    return [entry.nvml_index]


def open_process_devices(
    trainer: pl.Trainer, gpus: GpuSelection, cpu: CpuSelection, watts_per_core: float
) -> list[EnergyDevice]:
    """Open this process's devices; node-level RAPL zones only on local rank 0.

    RAPL measures a whole CPU package, shared by every process on the node, so only one
    process per node reads it; the per-process CPU-time estimate is counted by every rank.
    """
    indices = process_gpu_indices(trainer, gpus)
    cpu_mode: str = cpu
    if cpu in ("auto", "rapl") and trainer.local_rank != 0:
        cpu_mode = "estimate" if cpu == "auto" and not _rapl_on_node() else "none"
    return open_devices(indices, cpu=cpu_mode, watts_per_core=watts_per_core)


def _rapl_on_node() -> bool:
    root = Path(DEFAULT_POWERCAP_ROOT)
    return root.is_dir() and any(
        os.access(path, os.R_OK) for path in root.glob("intel-rapl:*/energy_uj")
    )
