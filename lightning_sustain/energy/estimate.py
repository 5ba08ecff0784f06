"""A CPU energy estimate where no counter exists: process CPU time x watts per core.

The figure is an estimate and is always tagged ``estimated``. The default of
:data:`DEFAULT_WATTS_PER_CORE` watts per fully busy core is a middle value for current
server and desktop CPUs (e.g. a 205 W, 32-core server part gives 6.4 W per core; a
125 W, 8-core desktop part about 15 W); set your own from your CPU's TDP divided by
its core count.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import time

from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.energy.types import DeviceInfo, EnergyReading, Provenance

logger = logging.getLogger(__name__)

#: Watts drawn by one fully busy CPU core, used when nothing better is known.
DEFAULT_WATTS_PER_CORE = 10.0


def _unwrap_scalar(value: object) -> object:
    """A numpy/torch scalar (or 0-d array/tensor) as the Python number it holds."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()  # type: ignore[union-attr]
    return value


def as_number(name: str, value: object) -> float:
    """A finite real setting as float: Python, numpy and torch scalars accepted.

    Raises:
        ValueError: a bool, a non-number, NaN or an infinity; the message names the setting.
    """
    raw = _unwrap_scalar(value)
    if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    number = float(raw)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return number


def as_int(name: str, value: object) -> int:
    """An integer setting as int: Python, numpy and torch integer scalars accepted.

    Raises:
        ValueError: a bool or a non-integer; the message names the setting.
    """
    raw = _unwrap_scalar(value)
    if isinstance(raw, bool) or not isinstance(raw, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    return int(raw)


def validate_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Check a numeric setting and return it as float.

    Args:
        name: the setting's name, used in the error message.
        value: the value given by the user (numpy and torch scalars accepted).
        allow_zero: accept 0.

    Raises:
        ValueError: the value is not a finite number, negative, or zero when not allowed.
    """
    number = as_number(name, value)
    if number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")
    return number


def validate_positive_int(name: str, value: int | None) -> int | None:
    """Check an optional positive integer setting (``None`` passes through).

    Raises:
        ValueError: the value is not an integer >= 1 (booleans are refused).
    """
    if value is None:
        return None
    try:
        number = as_int(name, value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return number


class CpuTimeEstimate(EnergyDevice):
    """Estimated CPU energy of this process (and its live child processes).

    Energy = CPU seconds used since the device was opened x ``watts_per_core``. Child
    processes (DataLoader workers) are included when ``psutil`` is available; their list
    is refreshed at most every 5 seconds (a new worker is counted from then on).

    Args:
        watts_per_core: power of one fully busy core, in watts.
        include_children: add the CPU time of live child processes.
    """

    preferred_interval_s = 0.1

    def __init__(
        self, watts_per_core: float = DEFAULT_WATTS_PER_CORE, include_children: bool = True
    ) -> None:
        self.watts_per_core = validate_positive("watts_per_core", watts_per_core)
        self.info = DeviceInfo(
            device_id=f"cpu-estimate:{os.getpid()}",
            kind="cpu",
            name=f"CPU time x {self.watts_per_core:g} W/core (process {os.getpid()})",
            provenance=Provenance.ESTIMATED,
        )
        self._process = None
        self._children: list = []
        self._children_refreshed_s = 0.0
        self._child_seconds: dict[int, float] = {}
        if include_children:
            try:
                import psutil

                self._process = psutil.Process()
            except Exception:  # pragma: no cover - psutil is a dependency
                self._process = None
        self._start_cpu_s = self._cpu_seconds()

    def _own_cpu_seconds(self) -> float:
        times = os.times()
        return times.user + times.system

    def _children_cpu_seconds(self) -> float:
        if self._process is None:
            return 0.0
        now = time.monotonic()
        if now - self._children_refreshed_s > 5.0:  # scanning /proc costs ~2 ms
            try:
                self._children = self._process.children(recursive=True)
            except Exception:
                self._children = []
            self._children_refreshed_s = now
        for child in self._children:
            try:
                times = child.cpu_times()
            except Exception:
                continue  # the child ended: keep its last known CPU time
            self._child_seconds[child.pid] = times.user + times.system
        return sum(self._child_seconds.values())

    def _cpu_seconds(self) -> float:
        return self._own_cpu_seconds() + self._children_cpu_seconds()

    def read(self) -> EnergyReading:
        """Return the estimated cumulative energy."""
        now = time.monotonic()
        energy_j = max(0.0, self._cpu_seconds() - self._start_cpu_s) * self.watts_per_core
        return EnergyReading(now, energy_j, None)
