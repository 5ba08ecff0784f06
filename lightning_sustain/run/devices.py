"""Which devices does this process measure? (Lightning-free; every front end uses it).

A process measures the GPU it computes on (matched by UUID through NVML), or on CPU
with the simulated NVML device the simulated GPU of its local rank, plus the CPU: RAPL
zones (whole node, so read by local rank 0 only) or a CPU-time estimate (every process).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

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

GpuSelection = Union[Literal["auto", "local_rank", "none"], list[int]]
CpuSelection = Literal["auto", "rapl", "estimate", "none"]


def validate_gpu_selection(value: object, name: str = "nvml_devices") -> GpuSelection:
    """Check a GPU selection (``"auto"``, ``"local_rank"``, ``"none"`` or NVML indices).

    Args:
        value: the selection.
        name: the argument's name, used in the error message.

    Raises:
        ValueError: anything else.
    """
    if value in ("auto", "local_rank", "none"):
        return value  # type: ignore[return-value]
    if isinstance(value, Sequence) and not isinstance(value, str):
        indices = list(value)
        if all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            return indices
    raise ValueError(
        f"{name}={value!r} is not valid: use 'auto' (the GPU this process computes on), "
        "'local_rank', 'none', or a list of NVML device indices."
    )


def validate_cpu_selection(cpu: object) -> CpuSelection:
    """Check a CPU measurement mode.

    Raises:
        ValueError: anything other than ``"auto"``, ``"rapl"``, ``"estimate"``, ``"none"``.
    """
    if cpu not in ("auto", "rapl", "estimate", "none"):
        raise ValueError(f"cpu={cpu!r} is not one of 'auto', 'rapl', 'estimate', 'none'.")
    return cpu  # type: ignore[return-value]


def nvml_simulated() -> bool:
    """True when NVML is served by the simulated library (tests, demos)."""
    try:
        nvml_init()
    except EnergyMeasurementError:
        return False
    try:
        return nvml_is_simulated()
    finally:
        nvml_shutdown()


def gpu_indices_for(selection: GpuSelection, root_device: Any, local_rank: int) -> list[int]:
    """NVML indices of the GPUs a process should measure.

    Args:
        selection: ``"auto"``: on CUDA the process's device (matched by UUID, so CUDA and
            NVML ordering differences do not matter); on CPU with the simulated NVML device,
            the simulated device of the local rank; otherwise none. ``"local_rank"``: the
            visible device whose CUDA ordinal is the local rank. A list: those indices.
        root_device: the ``torch.device`` the process computes on (``None``: CPU).
        local_rank: the process's rank on its node.
    """
    if selection == "none":
        return []
    if isinstance(selection, list):
        return list(selection)
    is_cuda = getattr(root_device, "type", None) == "cuda"
    try:
        if selection == "auto" and is_cuda:
            import torch

            props = torch.cuda.get_device_properties(root_device.index or 0)
            uuid = str(getattr(props, "uuid", "") or "")
            if uuid:
                return [nvml_index_for_uuid(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")]
            visible = resolve_visible_gpus()
            ordinal = root_device.index or 0
        elif selection == "auto" and not nvml_simulated():
            return []
        else:
            visible = resolve_visible_gpus()
            ordinal = local_rank
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


def rapl_on_node() -> bool:
    """True when a RAPL zone of this node is readable."""
    root = Path(DEFAULT_POWERCAP_ROOT)
    return root.is_dir() and any(
        os.access(path, os.R_OK) for path in root.glob("intel-rapl:*/energy_uj")
    )


def open_rank_devices(
    selection: GpuSelection,
    cpu: CpuSelection,
    watts_per_core: float,
    root_device: Any = None,
    local_rank: int = 0,
) -> list[EnergyDevice]:
    """Open this process's devices; node-level RAPL zones only on local rank 0.

    RAPL measures a whole CPU package, shared by every process on the node, so only one
    process per node reads it; the per-process CPU-time estimate is counted by every rank.
    """
    indices = gpu_indices_for(selection, root_device, local_rank)
    cpu_mode: str = cpu
    if cpu in ("auto", "rapl") and local_rank != 0:
        cpu_mode = "estimate" if cpu == "auto" and not rapl_on_node() else "none"
    return open_devices(indices, cpu=cpu_mode, watts_per_core=watts_per_core)
