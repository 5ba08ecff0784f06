"""Time-resolved CO2e of a run: the energy curve x a carbon-intensity source, interval by interval.

:class:`TimeResolvedCarbon` holds one process's running figures. The run object hands it
spans of its open stages (``time.monotonic()`` times); it splits each span into intervals of
at most :attr:`TimeResolvedCarbon.resolution_s`, reads the cumulative energy of every device
at their ends, and applies
:func:`~lightning_sustain.energy.intensity.time_resolved_co2e` (energy x the source's mean
intensity over each interval x PUE). A bad intensity file never stops the run: the yearly
intensity is used instead and the reason is kept in :attr:`status` (unless ``strict``).
No Lightning import.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from lightning_sustain.energy.carbon import CarbonIntensity
from lightning_sustain.energy.intensity import (
    ConstantIntensity,
    IntensityDataError,
    IntensityProvider,
    TimeSeriesIntensity,
    time_resolved_co2e,
)

logger = logging.getLogger(__name__)

#: The longest interval integrated as one piece, seconds.
MAX_RESOLUTION_S = 60.0


class TimeResolvedCarbon:
    """Running time-resolved CO2e of one process.

    Args:
        provider: the intensity source.
        pue: power usage effectiveness applied.
        status: ``"ok"`` or ``"fallback: <reason>"``.
        resolution_s: the longest interval integrated as one piece.
    """

    def __init__(
        self, provider: IntensityProvider, pue: float, status: str, resolution_s: float
    ) -> None:
        self.provider = provider
        self.pue = pue
        self.status = status
        self.resolution_s = resolution_s
        self.energy_j = 0.0
        self.co2e_g = 0.0
        self.fallback_s = 0.0
        self.duration_s = 0.0
        self._warnings: list[str] = []
        self._failed = False

    @classmethod
    def from_settings(
        cls,
        *,
        intensity: IntensityProvider | None,
        intensity_file: str | None,
        timezone: str,
        strict: bool,
        annual: CarbonIntensity,
        pue: float,
        min_resolution_s: float = 0.05,
    ) -> TimeResolvedCarbon | None:
        """Build from the run's settings; None when no intensity source is given.

        Raises:
            IntensityDataError: the file is invalid and ``strict`` is set.
            ValueError: both ``intensity`` and ``intensity_file`` are given.
        """
        if intensity is not None and intensity_file is not None:
            raise ValueError("Give either intensity=... or intensity_file=..., not both.")
        if intensity is None and intensity_file is None:
            return None
        fallback = ConstantIntensity.from_carbon_intensity(annual)
        status = "ok"
        provider: IntensityProvider
        if intensity is not None:
            provider = intensity
        else:
            try:
                provider = TimeSeriesIntensity(
                    str(intensity_file), fallback=fallback, timezone=timezone, strict=strict
                )
            except (IntensityDataError, ValueError) as exc:
                if strict:
                    raise
                status = (
                    f"fallback: intensity file not usable ({exc}); the yearly intensity "
                    f"{fallback.describe()} is used for the whole run"
                )
                logger.warning("EnergyRun: %s", status)
                provider = fallback
        resolution = MAX_RESOLUTION_S
        series = getattr(provider, "series", None)
        if series is not None:  # several intervals per point of the series
            resolution = min(resolution, max(min_resolution_s, series.resolution_s / 4.0))
        return cls(provider, pue, status, resolution)

    def advance(self, meter: Any, start_s: float, end_s: float, unix_offset_s: float) -> None:
        """Integrate ``[start_s, end_s]`` (monotonic times) of the meter's energy curves.

        Never raises (measurement must not stop training) unless the source is strict.
        """
        if end_s <= start_s or meter is None:
            return
        try:
            refresh = getattr(self.provider, "refresh", None)
            if refresh is not None:
                refresh()
            n = max(1, math.ceil((end_s - start_s) / self.resolution_s))
            grid = np.linspace(start_s, end_s, n + 1)
            curves = meter.energy_at(grid.tolist())
            energy = np.zeros(n)
            for values in curves.values():
                energy += np.maximum(0.0, np.diff(np.asarray(values, dtype=float)))
            result = time_resolved_co2e(
                grid[:-1] + unix_offset_s, grid[1:] + unix_offset_s, energy, self.provider, self.pue
            )
        except IntensityDataError:
            if getattr(self.provider, "strict", False):
                raise
            return
        except Exception as exc:  # the annual figure stays; this one is marked incomplete
            if not self._failed:
                self._failed = True
                self.status = f"incomplete: time-resolved accounting failed ({exc})"
                logger.warning("EnergyRun: %s", self.status)
            return
        self.energy_j += result.total_energy_j
        self.co2e_g += result.total_co2e_g
        self.fallback_s += float(result.fallback_s.sum())
        self.duration_s += end_s - start_s
        for w in result.warnings:
            if w not in self._warnings:
                self._warnings.append(w)

    def record(self) -> dict[str, Any]:
        """This process's figures, JSON-ready (summed over ranks by the summary)."""
        return {
            "energy_j": self.energy_j,
            "co2e_g": self.co2e_g,
            "fallback_s": self.fallback_s,
            "duration_s": self.duration_s,
            "source": self.provider.describe(),
            "status": self.status,
            "resolution_s": self.resolution_s,
            "warnings": list(self._warnings),
        }


def unix_offset_s() -> float:
    """``time.time() - time.monotonic()``: adds to a monotonic time to give a Unix time."""
    return time.time() - time.monotonic()
