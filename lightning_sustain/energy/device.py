"""The abstract energy device every vendor backend implements."""

from __future__ import annotations

import abc

from lightning_sustain.energy.types import DeviceInfo, EnergyReading


class EnergyDevice(abc.ABC):
    """A source of cumulative energy readings.

    Implementations return joules accumulated since the device object was opened, with
    the monotonic timestamp the value applies to. ``read`` is called from the meter's
    sampler thread only; implementations need not be thread-safe beyond that.
    """

    info: DeviceInfo

    #: Suggested sampling interval for this device, in seconds (``None``: meter default).
    preferred_interval_s: float | None = None

    @abc.abstractmethod
    def read(self) -> EnergyReading:
        """Return the current cumulative energy reading.

        Raises:
            EnergyMeasurementError: if the device cannot be read any more.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release any resource held by the device."""

    def __repr__(self) -> str:
        info = self.info
        return f"{type(self).__name__}({info.device_id!r}, provenance={info.provenance_label!r})"
