"""Exceptions of the energy layer: one class per failure, each saying what to do."""

from __future__ import annotations


class EnergyMeasurementError(RuntimeError):
    """Base class: a device could not be measured."""


class DeviceUnavailableError(EnergyMeasurementError):
    """The device or its driver is not there (no NVML library, no RAPL zone, GPU lost)."""


class MeasurementNotSupportedError(EnergyMeasurementError):
    """The device exists but cannot report energy or power (MIG slice, old driver)."""


class PowerLimitError(RuntimeError):
    """Reading or setting a device power limit failed."""


class PowerLimitPermissionError(PowerLimitError):
    """The driver refused to change the power limit (NVML ``NO_PERMISSION``).

    Setting a GPU power limit needs root or ``nvidia-smi -acp UNRESTRICTED``; where
    neither is possible use the software power budget instead.
    """
