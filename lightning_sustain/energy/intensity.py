"""Carbon-intensity sources over time, and CO2e integrated interval by interval.

Three kinds of source share one small interface (:class:`IntensityProvider`):

- :class:`ConstantIntensity`: one figure for every hour (the behaviour before time
  resolution; a user-supplied value or the shipped yearly table through
  :func:`annual_intensity`).
- :class:`TimeSeriesIntensity`: a series of (time, gCO2e/kWh [, marginal]) read from a
  file by :func:`read_intensity_file`, in the formats public grid-data exports use:

  * ``generic`` CSV: ``timestamp,g_co2e_per_kwh[,marginal_g_co2e_per_kwh]``;
  * ``electricitymaps`` CSV (``Datetime (UTC)``, ``Carbon Intensity gCO₂eq/kWh (Life
    cycle)`` / ``(direct)``) and JSON (``{"history": [{"datetime", "carbonIntensity"}]}``);
  * ``watttime`` CSV (``point_time,value``) and JSON (``{"data": [...], "meta":
    {"units": ...}}``): marginal operating emissions rates, converted from lbs/MWh;
  * ``entsoe`` CSV: hourly generation per production type (``MTU``, ``<type> - Actual
    Aggregated [MW]``) converted with :data:`ENTSOE_EMISSION_FACTORS_G_PER_KWH`.

- anything else a user writes (a live API client) that has the same methods.

Nothing here downloads: files are read from disk.

**Interpolation.** ``"previous"`` (default): a value stamped ``t_i`` holds on
``[t_i, t_{i+1})``, as hourly averages are published. ``"linear"``: straight lines
between points. The last point holds for one *resolution* (the median spacing).

**Gaps and stale data.** Two points further apart than ``max_gap_s`` (default: 3 x the
resolution) leave a gap; a time before the first point, in a gap, or more than one
resolution after the last point is *not covered*: the fallback intensity (by default
the shipped yearly average for ``fallback_country``, else the world average) is used,
the first occurrence is logged as a warning, and :class:`TimeResolvedCO2e` counts the
seconds that used it so that reports can say so. ``strict=True`` raises
:class:`IntensityDataError` instead.

**Time zones.** Timestamps with an offset (``+01:00``, ``Z``) are exact; naive
timestamps are read in ``timezone`` (default ``"UTC"``, an IANA name such as
``"Europe/Berlin"``); numbers are Unix seconds. Internally every time is Unix seconds.

**Bad files.** Unsorted or duplicate timestamps, negative or non-numeric values and
unknown units raise :class:`IntensityDataError` naming the file, the row (1-based,
header included) and what to do. An empty value is a gap, not an error.

**A file that changes during the run.** :meth:`TimeSeriesIntensity.refresh` re-reads
the file when its size or modification time changed; a valid new version replaces the
old one (logged), an invalid one is ignored with a warning and the old data stays in
use (``strict=True``: the error is raised).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from lightning_sustain.energy.carbon import (
    JOULES_PER_KWH,
    CarbonIntensity,
    carbon_intensity_for,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ENTSOE_EMISSION_FACTORS_G_PER_KWH",
    "ConstantIntensity",
    "IntensityDataError",
    "IntensityProvider",
    "IntensityReading",
    "IntensitySeries",
    "TimeResolvedCO2e",
    "TimeSeriesIntensity",
    "annual_intensity",
    "read_intensity_file",
    "time_resolved_co2e",
]

#: grams per pound: WattTime publishes MOER in lbs CO2 per MWh.
GRAMS_PER_POUND = 453.59237

#: Unit spellings accepted in a ``unit`` column, a header or ``meta.units``, and their
#: factor to gCO2e/kWh.
UNIT_FACTORS: dict[str, float] = {
    "g/kwh": 1.0,
    "gco2/kwh": 1.0,
    "gco2e/kwh": 1.0,
    "gco2eq/kwh": 1.0,
    "g_co2e_per_kwh": 1.0,
    "kg/kwh": 1000.0,
    "kgco2e/kwh": 1000.0,
    "kg/mwh": 1.0,
    "kgco2e/mwh": 1.0,
    "t/mwh": 1000.0,
    "tco2e/mwh": 1000.0,
    "lbs/mwh": GRAMS_PER_POUND / 1000.0,
    "lb/mwh": GRAMS_PER_POUND / 1000.0,
    "lbs_co2_per_mwh": GRAMS_PER_POUND / 1000.0,
}

#: Life-cycle emission factors (gCO2e/kWh) applied to ENTSO-E production types. Median
#: values of IPCC AR5 WG3 Annex III (2014), table A.III.2; "Fossil Oil" (not in that
#: table) uses 650, the value Electricity Maps uses for oil. Types not listed here make
#: :func:`read_intensity_file` raise, naming the column, so that no generation is dropped
#: silently; pass ``emission_factors`` to add or override.
ENTSOE_EMISSION_FACTORS_G_PER_KWH: dict[str, float] = {
    "biomass": 230.0,
    "fossil brown coal/lignite": 820.0,
    "fossil coal-derived gas": 820.0,
    "fossil gas": 490.0,
    "fossil hard coal": 820.0,
    "fossil oil": 650.0,
    "fossil oil shale": 820.0,
    "fossil peat": 820.0,
    "geothermal": 38.0,
    "hydro pumped storage": 24.0,
    "hydro run-of-river and poundage": 24.0,
    "hydro water reservoir": 24.0,
    "marine": 24.0,
    "nuclear": 12.0,
    "other": 700.0,
    "other renewable": 38.0,
    "solar": 48.0,
    "waste": 620.0,
    "wind offshore": 12.0,
    "wind onshore": 11.0,
}

Format = Literal["auto", "generic", "electricitymaps", "watttime", "entsoe", "json"]
Interpolation = Literal["previous", "linear"]


class IntensityDataError(ValueError):
    """A carbon-intensity file or series cannot be used; the message names file and row."""


@dataclass(frozen=True)
class IntensityReading:
    """The intensity at one instant and how it was obtained.

    Attributes:
        g_co2e_per_kwh: average (attributional) intensity, gCO2e/kWh.
        status: ``"series"`` (from the time series), ``"constant"`` (a constant source),
            or ``"fallback"`` (the time series does not cover this time).
        source: a citation or file name.
        marginal_g_co2e_per_kwh: marginal intensity where the series has it.
    """

    g_co2e_per_kwh: float
    status: str
    source: str
    marginal_g_co2e_per_kwh: float | None = None


@runtime_checkable
class IntensityProvider(Protocol):
    """What the controller and the accounting need from a carbon-intensity source.

    Implement these three methods to plug in a live source (a grid operator's API, a
    forecast service); nothing in lightning_sustain calls the network itself.
    """

    def intensity_at(self, time_unix_s: float) -> IntensityReading:
        """The intensity at a Unix time."""
        ...

    def mean_intensity(self, start_unix_s: float, end_unix_s: float) -> tuple[float, float]:
        """Time-mean intensity over ``[start, end]`` (gCO2e/kWh) and the fallback seconds in it."""
        ...

    def describe(self) -> str:
        """One line naming the source, for logs and reports."""
        ...


def annual_intensity(country: str | None = None) -> ConstantIntensity:
    """The shipped yearly national average (Ember) as a constant source."""
    return ConstantIntensity.from_carbon_intensity(carbon_intensity_for(country or "WORLD"))


@dataclass(frozen=True)
class ConstantIntensity:
    """One intensity for every instant.

    Args:
        g_co2e_per_kwh: the intensity, gCO2e/kWh (>= 0).
        source: where it came from.
    """

    g_co2e_per_kwh: float
    source: str = "user-supplied"

    def __post_init__(self) -> None:
        value = self.g_co2e_per_kwh
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"g_co2e_per_kwh must be a finite number >= 0, got {value!r}.")

    @classmethod
    def from_carbon_intensity(cls, intensity: CarbonIntensity) -> ConstantIntensity:
        """Wrap a :class:`~lightning_sustain.energy.carbon.CarbonIntensity`."""
        return cls(intensity.g_co2e_per_kwh, intensity.source)

    def intensity_at(self, time_unix_s: float) -> IntensityReading:
        """The constant, whatever the time."""
        return IntensityReading(self.g_co2e_per_kwh, "constant", self.source)

    def mean_intensity(self, start_unix_s: float, end_unix_s: float) -> tuple[float, float]:
        """The constant and no fallback seconds."""
        return self.g_co2e_per_kwh, 0.0

    def describe(self) -> str:
        """One line naming the value and its source."""
        return f"constant {self.g_co2e_per_kwh:g} gCO2e/kWh ({self.source})"


@dataclass(frozen=True)
class IntensitySeries:
    """A validated time series of carbon intensity.

    Attributes:
        times_unix_s: strictly increasing Unix times, seconds.
        g_co2e_per_kwh: average intensity at each time (NaN: missing, a gap).
        marginal_g_co2e_per_kwh: marginal intensity at each time, if the source has it.
        source: file name and format, or a description.
    """

    times_unix_s: np.ndarray
    g_co2e_per_kwh: np.ndarray
    marginal_g_co2e_per_kwh: np.ndarray | None = None
    source: str = "series"

    def __post_init__(self) -> None:
        t = np.asarray(self.times_unix_s, dtype=float)
        v = np.asarray(self.g_co2e_per_kwh, dtype=float)
        if t.ndim != 1 or t.shape != v.shape:
            raise IntensityDataError(f"{self.source}: times and values must be 1-D, same length.")
        if t.size == 0 or not np.isfinite(v).any():
            raise IntensityDataError(f"{self.source}: the series has no usable value.")
        if not np.isfinite(t).all():
            raise IntensityDataError(f"{self.source}: a timestamp is not finite.")
        steps = np.diff(t)
        if (steps <= 0).any():
            i = int(np.argmax(steps <= 0)) + 1
            what = "duplicate" if steps[i - 1] == 0 else "earlier than the one before"
            raise IntensityDataError(
                f"{self.source}: point {i + 1} has a timestamp {what} (times must be strictly "
                "increasing; sort the file and remove duplicates)."
            )
        if (v[np.isfinite(v)] < 0).any():
            i = int(np.argmax(np.isfinite(v) & (v < 0)))
            raise IntensityDataError(
                f"{self.source}: point {i + 1} has a negative intensity {v[i]!r} gCO2e/kWh."
            )
        object.__setattr__(self, "times_unix_s", t)
        object.__setattr__(self, "g_co2e_per_kwh", v)
        if self.marginal_g_co2e_per_kwh is not None:
            m = np.asarray(self.marginal_g_co2e_per_kwh, dtype=float)
            if m.shape != t.shape:
                raise IntensityDataError(f"{self.source}: marginal values have the wrong length.")
            object.__setattr__(self, "marginal_g_co2e_per_kwh", m)

    @property
    def resolution_s(self) -> float:
        """The median spacing of the points (3600 s for a single point)."""
        if self.times_unix_s.size < 2:
            return 3600.0
        return float(np.median(np.diff(self.times_unix_s)))


class TimeSeriesIntensity:
    """An intensity time series with interpolation, gaps and a fallback.

    Args:
        series: the series, or a path read with :func:`read_intensity_file`.
        interpolation: ``"previous"`` (step, default) or ``"linear"``.
        max_gap_s: points further apart than this leave a gap (fallback in between);
            default 3 x the series' resolution.
        fallback: used where the series does not cover a time; default: the shipped
            yearly average of ``fallback_country`` (world average when None).
        fallback_country: see ``fallback``.
        strict: raise :class:`IntensityDataError` instead of falling back (and on a
            file that changed into an invalid one).
        file_format: format of the file (``"auto"`` detects it).
        timezone: IANA zone for naive timestamps in the file.
        emission_factors: extra or replacement ENTSO-E factors, gCO2e/kWh per type.

    Raises:
        IntensityDataError: the file or series is invalid (message names file and row).
    """

    def __init__(
        self,
        series: IntensitySeries | str | os.PathLike[str],
        *,
        interpolation: Interpolation = "previous",
        max_gap_s: float | None = None,
        fallback: ConstantIntensity | None = None,
        fallback_country: str | None = None,
        strict: bool = False,
        file_format: Format = "auto",
        timezone: str = "UTC",
        emission_factors: dict[str, float] | None = None,
    ) -> None:
        if interpolation not in ("previous", "linear"):
            raise ValueError(f"interpolation={interpolation!r}: use 'previous' or 'linear'.")
        self.interpolation = interpolation
        self.strict = strict
        self._read_kwargs: dict[str, Any] = {
            "file_format": file_format,
            "timezone": timezone,
            "emission_factors": emission_factors,
        }
        self.path: Path | None = None
        self._stamp: tuple[int, int] | None = None
        if isinstance(series, IntensitySeries):
            loaded = series
        else:
            self.path = Path(series)
            self._stamp = self._file_stamp()
            loaded = read_intensity_file(self.path, **self._read_kwargs)
        self._max_gap_given = max_gap_s
        if max_gap_s is not None and (not math.isfinite(max_gap_s) or max_gap_s <= 0):
            raise ValueError(f"max_gap_s must be a positive number, got {max_gap_s!r}.")
        self.fallback = fallback or annual_intensity(fallback_country)
        self.warnings: list[str] = []
        self._warned_fallback = False
        self._install(loaded)

    # -- construction ---------------------------------------------------------------
    def _file_stamp(self) -> tuple[int, int] | None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _install(self, series: IntensitySeries) -> None:
        self.series = series
        self.max_gap_s = (
            self._max_gap_given if self._max_gap_given is not None else 3.0 * series.resolution_s
        )
        self._build_segments()

    def _build_segments(self) -> None:
        """Tile [first, last + resolution] with segments (start, end, v0, v1, is_fallback)."""
        t, v = self.series.times_unix_s, self.series.g_co2e_per_kwh
        res = self.series.resolution_s
        fb = self.fallback.g_co2e_per_kwh
        starts: list[float] = []
        ends: list[float] = []
        v0: list[float] = []
        v1: list[float] = []
        flag: list[bool] = []

        def add(s: float, e: float, a: float, b: float, is_fb: bool) -> None:
            if e > s:
                starts.append(s)
                ends.append(e)
                v0.append(a)
                v1.append(b)
                flag.append(is_fb)

        n = t.size
        for i in range(n):
            nxt = t[i + 1] if i + 1 < n else t[i] + res
            known = math.isfinite(v[i])
            if not known:
                add(t[i], nxt, fb, fb, True)
                continue
            if i + 1 < n and nxt - t[i] > self.max_gap_s:
                hold_end = t[i] + res
                add(t[i], hold_end, v[i], v[i], False)
                add(hold_end, nxt, fb, fb, True)
                continue
            if self.interpolation == "linear" and i + 1 < n and math.isfinite(v[i + 1]):
                add(t[i], nxt, v[i], v[i + 1], False)
            else:
                add(t[i], nxt, v[i], v[i], False)
        self._s = np.asarray(starts)
        self._e = np.asarray(ends)
        self._v0 = np.asarray(v0)
        self._v1 = np.asarray(v1)
        self._fb = np.asarray(flag, dtype=float)
        seg_int = (self._e - self._s) * (self._v0 + self._v1) / 2.0
        self._cum = np.concatenate([[0.0], np.cumsum(seg_int)])
        self._cum_fb = np.concatenate([[0.0], np.cumsum((self._e - self._s) * self._fb)])
        self.start_unix_s = float(self._s[0])
        self.end_unix_s = float(self._e[-1])

    # -- queries --------------------------------------------------------------------
    def covers(self, start_unix_s: float, end_unix_s: float) -> bool:
        """True when no fallback is needed anywhere in ``[start, end]``."""
        return self.mean_intensity(start_unix_s, end_unix_s)[1] == 0.0

    def _integrals(self, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Integral of intensity and of the fallback indicator from ``start`` to each time."""
        fb = self.fallback.g_co2e_per_kwh
        t = np.asarray(times, dtype=float)
        idx = np.clip(np.searchsorted(self._s, t, side="right") - 1, 0, self._s.size - 1)
        s, e = self._s[idx], self._e[idx]
        span = np.where(e > s, e - s, 1.0)
        inside = np.clip(t, s, e)
        frac = (inside - s) / span
        v_at = self._v0[idx] + frac * (self._v1[idx] - self._v0[idx])
        partial = (inside - s) * (self._v0[idx] + v_at) / 2.0
        value = self._cum[idx] + partial
        fb_time = self._cum_fb[idx] + (inside - s) * self._fb[idx]
        before = t < self.start_unix_s
        after = t > self.end_unix_s
        value = np.where(before, (t - self.start_unix_s) * fb, value)
        fb_time = np.where(before, t - self.start_unix_s, fb_time)
        value = np.where(after, self._cum[-1] + (t - self.end_unix_s) * fb, value)
        fb_time = np.where(after, self._cum_fb[-1] + (t - self.end_unix_s), fb_time)
        return value, fb_time

    def _values_at(self, times: np.ndarray) -> np.ndarray:
        """The interpolated value at each time (the fallback where not covered)."""
        t = np.asarray(times, dtype=float)
        idx = np.clip(np.searchsorted(self._s, t, side="right") - 1, 0, self._s.size - 1)
        s, e = self._s[idx], self._e[idx]
        frac = np.clip((t - s) / np.where(e > s, e - s, 1.0), 0.0, 1.0)
        v = self._v0[idx] + frac * (self._v1[idx] - self._v0[idx])
        outside = (t < self.start_unix_s) | (t >= self.end_unix_s) | (self._fb[idx] > 0)
        return np.where(outside, self.fallback.g_co2e_per_kwh, v)

    def _note_fallback(self, fallback_s: float, where: str) -> None:
        if fallback_s <= 0:
            return
        message = (
            f"{self.describe()} does not cover {where}; {fallback_s:.0f} s use the fallback "
            f"{self.fallback.describe()}"
        )
        if self.strict:
            raise IntensityDataError(message + " (strict mode).")
        if not self._warned_fallback:
            self._warned_fallback = True
            self.warnings.append(message)
            logger.warning("%s. Later gaps are counted, not logged.", message)

    def intensity_at(self, time_unix_s: float) -> IntensityReading:
        """The interpolated intensity at a Unix time (the fallback where not covered)."""
        t = float(time_unix_s)
        idx = int(np.searchsorted(self._s, t, side="right") - 1)
        if idx < 0 or t >= self.end_unix_s or self._fb[idx]:
            self._note_fallback(1.0, _iso(t))
            return IntensityReading(self.fallback.g_co2e_per_kwh, "fallback", self.fallback.source)
        s, e = self._s[idx], self._e[idx]
        value = self._v0[idx] + (t - s) / (e - s) * (self._v1[idx] - self._v0[idx])
        marginal = None
        m = self.series.marginal_g_co2e_per_kwh
        if m is not None:
            j = int(np.searchsorted(self.series.times_unix_s, t, side="right") - 1)
            marginal = float(m[j]) if math.isfinite(m[j]) else None
        return IntensityReading(float(value), "series", self.series.source, marginal)

    def mean_intensity(self, start_unix_s: float, end_unix_s: float) -> tuple[float, float]:
        """Exact time-mean over ``[start, end]`` of the series, and fallback seconds."""
        values, fb = self.mean_intensities([start_unix_s], [end_unix_s])
        return float(values[0]), float(fb[0])

    def mean_intensities(
        self, start_unix_s: Sequence[float] | np.ndarray, end_unix_s: Sequence[float] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised :meth:`mean_intensity`: time-mean intensity and fallback seconds per interval.

        A zero-length interval gets the intensity at its instant.
        """
        a = np.asarray(start_unix_s, dtype=float)
        b = np.asarray(end_unix_s, dtype=float)
        ia, fa = self._integrals(a)
        ib, fbb = self._integrals(b)
        length = b - a
        safe = np.where(length > 1e-6, length, 1.0)
        mean = (ib - ia) / safe
        fallback_s = np.maximum(0.0, fbb - fa)
        zero = length <= 1e-6  # an instant: the value there (no round-off of a tiny difference)
        if zero.any():
            mean[zero] = self._values_at(a[zero])
            fallback_s[zero] = 0.0
        if a.size:
            self._note_fallback(float(fallback_s.sum()), f"{_iso(a.min())}..{_iso(b.max())}")
        return mean, fallback_s

    def describe(self) -> str:
        """One line naming the file (or series) and the interpolation."""
        return f"time series {self.series.source} ({self.interpolation})"

    # -- a file that changes --------------------------------------------------------
    def refresh(self) -> bool:
        """Re-read the file if it changed on disk.

        Returns:
            True when a new valid version replaced the data in use.

        Raises:
            IntensityDataError: the new version is invalid and ``strict`` is set.
        """
        if self.path is None:
            return False
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            series = read_intensity_file(self.path, **self._read_kwargs)
        except (IntensityDataError, OSError) as exc:
            if self.strict:
                raise IntensityDataError(
                    f"{self.path} changed into an invalid file: {exc}"
                ) from exc
            message = (
                f"{self.path} changed during the run and the new version cannot be used "
                f"({exc}); the previous version stays in use."
            )
            self.warnings.append(message)
            logger.warning(message)
            return False
        self._install(series)
        logger.info("%s changed during the run; the new version is in use.", self.path)
        return True


# -- accounting -----------------------------------------------------------------------
@dataclass
class TimeResolvedCO2e:
    """CO2e of a run computed interval by interval.

    Attributes:
        start_unix_s: interval starts.
        end_unix_s: interval ends.
        energy_j: IT energy per interval, joules.
        intensity_g_per_kwh: time-mean intensity per interval.
        co2e_g: grams CO2e per interval (PUE applied).
        fallback_s: seconds per interval where the fallback intensity was used.
        pue: the PUE applied.
        source: :meth:`IntensityProvider.describe` of the source.
        warnings: what the source warned about (coverage, file changes).
    """

    start_unix_s: np.ndarray
    end_unix_s: np.ndarray
    energy_j: np.ndarray
    intensity_g_per_kwh: np.ndarray
    co2e_g: np.ndarray
    fallback_s: np.ndarray
    pue: float
    source: str
    warnings: list[str] = field(default_factory=list)

    @property
    def total_co2e_g(self) -> float:
        """Sum over the intervals, grams CO2e."""
        return float(self.co2e_g.sum())

    @property
    def total_energy_j(self) -> float:
        """Sum over the intervals, joules."""
        return float(self.energy_j.sum())

    @property
    def mean_intensity_g_per_kwh(self) -> float:
        """Energy-weighted mean intensity (what a single factor would have to be)."""
        kwh = self.total_energy_j / JOULES_PER_KWH * self.pue
        return self.total_co2e_g / kwh if kwh > 0 else float("nan")

    @property
    def fallback_fraction(self) -> float:
        """Share of the run's time that used the fallback intensity."""
        total = float(np.sum(self.end_unix_s - self.start_unix_s))
        return float(self.fallback_s.sum()) / total if total > 0 else 0.0


def time_resolved_co2e(
    start_unix_s: Sequence[float] | np.ndarray,
    end_unix_s: Sequence[float] | np.ndarray,
    energy_j: Sequence[float] | np.ndarray,
    provider: IntensityProvider,
    pue: float = 1.0,
) -> TimeResolvedCO2e:
    """CO2e of each interval: its energy x the source's mean intensity over that interval.

    Power is taken as constant within an interval (the trace's resolution), so the
    intensity is averaged over the interval's time. This is what an
    :class:`~lightning_sustain.callbacks.energy_monitor.EnergyMonitor` should call with
    its step trace (step start/end as Unix times, energy per step).

    Raises:
        ValueError: lengths differ, an interval ends before it starts, an energy is
            negative, or ``pue`` < 1.
    """
    a = np.asarray(start_unix_s, dtype=float)
    b = np.asarray(end_unix_s, dtype=float)
    e = np.asarray(energy_j, dtype=float)
    if not (a.shape == b.shape == e.shape) or a.ndim != 1:
        raise ValueError("start_unix_s, end_unix_s and energy_j must be 1-D of one length.")
    if (b < a).any():
        raise ValueError(f"interval {int(np.argmax(b < a))} ends before it starts.")
    if not np.isfinite(e).all() or (e < 0).any():
        raise ValueError("energy_j must be finite and >= 0.")
    if not math.isfinite(pue) or pue < 1.0:
        raise ValueError(f"pue must be >= 1.0, got {pue!r}.")
    if isinstance(provider, TimeSeriesIntensity):
        mean, fb = provider.mean_intensities(a, b)
    else:
        pairs = [provider.mean_intensity(float(x), float(y)) for x, y in zip(a, b, strict=True)]
        mean = np.asarray([p[0] for p in pairs], dtype=float)
        fb = np.asarray([p[1] for p in pairs], dtype=float)
    co2 = e / JOULES_PER_KWH * pue * mean
    warnings = list(getattr(provider, "warnings", []))
    return TimeResolvedCO2e(a, b, e, mean, co2, fb, float(pue), provider.describe(), warnings)


# -- parsing --------------------------------------------------------------------------
def _iso(t: float) -> str:
    try:
        return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{t:g} (Unix s)"


def _zone(timezone: str) -> _dt.tzinfo:
    if timezone.upper() in ("UTC", "Z"):
        return _dt.timezone.utc
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo(timezone)
    except Exception as exc:
        raise IntensityDataError(
            f"timezone={timezone!r} is not a known IANA time zone (e.g. 'Europe/Berlin')."
        ) from exc


_ENTSOE_MTU = re.compile(r"^\s*(\d{2})\.(\d{2})\.(\d{4}) (\d{2}):(\d{2})")


def _parse_time(text: Any, zone: _dt.tzinfo, where: str) -> float:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text):
            raise IntensityDataError(f"{where}: the timestamp {text!r} is not finite.")
        return float(text)
    raw = str(text).strip()
    if not raw:
        raise IntensityDataError(f"{where}: the timestamp is empty.")
    try:
        return float(raw)
    except ValueError:
        pass
    m = _ENTSOE_MTU.match(raw)
    if m:
        day, month, year, hour, minute = (int(x) for x in m.groups())
        if "(UTC)" in raw:
            zone = _dt.timezone.utc
        stamp = _dt.datetime(year, month, day, hour, minute, tzinfo=zone)
        return stamp.timestamp()
    iso = raw.replace("Z", "+00:00").replace(" UTC", "+00:00")
    try:
        stamp = _dt.datetime.fromisoformat(iso)
    except ValueError as exc:
        raise IntensityDataError(
            f"{where}: {raw!r} is not a timestamp (use ISO 8601, e.g. 2024-01-31T13:00:00Z, "
            "or Unix seconds)."
        ) from exc
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=zone)
    return stamp.timestamp()


def _parse_value(text: Any, factor: float, where: str, column: str) -> float:
    if text is None:
        return float("nan")
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip()
        if raw == "" or raw.lower() in ("nan", "null", "none", "n/e", "n/a", "-"):
            return float("nan")
        try:
            value = float(raw)
        except ValueError as exc:
            raise IntensityDataError(
                f"{where}: column {column!r} holds {raw!r}, not a number."
            ) from exc
    if not math.isfinite(value):
        return float("nan")
    if value < 0:
        raise IntensityDataError(
            f"{where}: column {column!r} is negative ({value!r}); carbon intensity and "
            "generation cannot be negative. Fix or remove the row."
        )
    return value * factor


def _unit_factor(unit: str, where: str) -> float:
    key = unit.strip().lower().replace(" ", "").replace("₂", "2").replace("co2eq", "co2e")
    key = key.replace("gco2eq", "gco2e")
    if key in UNIT_FACTORS:
        return UNIT_FACTORS[key]
    raise IntensityDataError(
        f"{where}: unit {unit!r} is not known; use one of {', '.join(sorted(UNIT_FACTORS))} "
        "(or convert the file to gCO2e/kWh)."
    )


def _finish(
    times: list[float],
    values: list[float],
    marginal: list[float] | None,
    path: str,
    rows: list[int],
    tag: str = "",
) -> IntensitySeries:
    for k in range(1, len(times)):
        if times[k] == times[k - 1]:
            raise IntensityDataError(
                f"{path}: row {rows[k]} repeats the timestamp of row {rows[k - 1]} "
                f"({_iso(times[k])}); remove the duplicate."
            )
        if times[k] < times[k - 1]:
            raise IntensityDataError(
                f"{path}: row {rows[k]} ({_iso(times[k])}) is earlier than row {rows[k - 1]} "
                f"({_iso(times[k - 1])}); sort the file by time."
            )
    if not times:
        raise IntensityDataError(f"{path}: no data rows.")
    if not any(math.isfinite(v) for v in values):
        raise IntensityDataError(f"{path}: every intensity value is empty.")
    m = None
    if marginal is not None and any(math.isfinite(x) for x in marginal):
        m = np.asarray(marginal, dtype=float)
    return IntensitySeries(np.asarray(times), np.asarray(values), m, source=f"{path}{tag}")


def _detect(header: list[str]) -> str:
    low = [h.strip().lower() for h in header]
    if any(h.startswith("datetime (utc)") for h in low) and any(
        "carbon intensity" in h for h in low
    ):
        return "electricitymaps"
    if "point_time" in low:
        return "watttime"
    if any(h.startswith("mtu") for h in low) or any("actual aggregated" in h for h in low):
        return "entsoe"
    return "generic"


def _find(header: list[str], *patterns: str) -> int | None:
    low = [h.strip().lower() for h in header]
    for pattern in patterns:
        for i, h in enumerate(low):
            if re.fullmatch(pattern, h):
                return i
    return None


def _read_csv(
    text: str,
    path: str,
    file_format: str,
    zone: _dt.tzinfo,
    factors: dict[str, float],
) -> IntensitySeries:
    lines = text.splitlines()
    first = 0
    while first < len(lines) and (not lines[first].strip() or lines[first].startswith("#")):
        first += 1
    reader = csv.reader(io.StringIO("\n".join(lines[first:])))
    try:
        header = next(reader)
    except StopIteration:
        raise IntensityDataError(f"{path}: the file is empty (no header row).") from None
    fmt = _detect(header) if file_format == "auto" else file_format
    header_row = first + 1
    where_h = f"{path}: header (row {header_row})"
    time_col: int | None
    value_col: int | None
    marginal_col: int | None = None
    unit_col: int | None = None
    factor = 1.0
    gen_cols: list[tuple[int, float]] = []
    if fmt == "electricitymaps":
        time_col = _find(header, r"datetime \(utc\)", r"datetime")
        value_col = _find(
            header,
            r"carbon intensity gco.?eq/kwh \((life cycle|lca)\)",
            r"carbon intensity gco.?eq/kwh \(direct\)",
            r"carbon intensity.*",
        )
        zone = _dt.timezone.utc
    elif fmt == "watttime":
        time_col = _find(header, r"point_time")
        marginal_col = _find(header, r"value")
        unit_col = _find(header, r"units?")
        value_col = None
        factor = UNIT_FACTORS["lbs/mwh"]
    elif fmt == "entsoe":
        time_col = _find(header, r"mtu.*", r"datetime.*", r"timestamp")
        value_col = None
        for i, h in enumerate(header):
            m = re.fullmatch(r"\s*(.+?)\s*-\s*actual aggregated \[mw\]\s*", h.lower())
            if not m:
                continue
            kind = m.group(1).strip()
            if kind not in factors:
                raise IntensityDataError(
                    f"{where_h}: production type {kind!r} (column {h!r}) has no emission "
                    "factor; pass emission_factors={...} with its gCO2e/kWh."
                )
            gen_cols.append((i, factors[kind]))
        if not gen_cols:
            raise IntensityDataError(
                f"{where_h}: no '<type> - Actual Aggregated [MW]' columns (ENTSO-E format)."
            )
    elif fmt == "generic":
        time_col = _find(header, r"timestamp", r"time", r"datetime", r"date")
        value_col = _find(
            header,
            r"g_co2e_per_kwh",
            r"carbon_intensity",
            r"intensity",
            r"value",
            r"carbonintensity",
        )
        marginal_col = _find(header, r"marginal_g_co2e_per_kwh", r"marginal")
        unit_col = _find(header, r"units?")
        if value_col is None:
            unit_match = [
                (i, re.fullmatch(r"\s*(?:carbon_)?intensity\s*\[(.+)\]\s*", h, re.IGNORECASE))
                for i, h in enumerate(header)
            ]
            for i, m in unit_match:
                if m:
                    value_col, factor = i, _unit_factor(m.group(1), where_h)
                    break
    else:
        raise IntensityDataError(f"file_format={file_format!r} is not a CSV format.")
    if time_col is None:
        raise IntensityDataError(f"{where_h}: no time column found in {header!r} ({fmt} format).")
    if value_col is None and marginal_col is None and not gen_cols:
        raise IntensityDataError(
            f"{where_h}: no intensity column found in {header!r}; name it g_co2e_per_kwh "
            f"({fmt} format)."
        )
    times: list[float] = []
    values: list[float] = []
    marginal: list[float] | None = [] if marginal_col is not None else None
    rows: list[int] = []
    for offset, row in enumerate(reader):
        row_no = header_row + 1 + offset
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}: row {row_no}"
        if len(row) < len(header):
            raise IntensityDataError(f"{where}: {len(row)} fields, the header has {len(header)}.")
        row_factor = factor
        if unit_col is not None:
            row_factor = _unit_factor(row[unit_col], f"{where}, column {header[unit_col]!r}")
        times.append(_parse_time(row[time_col], zone, where))
        rows.append(row_no)
        if gen_cols:
            mw = [(_parse_value(row[i], 1.0, where, header[i]), f) for i, f in gen_cols]
            known = [(x, f) for x, f in mw if math.isfinite(x)]
            total = sum(x for x, _ in known)
            values.append(sum(x * f for x, f in known) / total if total > 0 else float("nan"))
        elif value_col is not None:
            values.append(_parse_value(row[value_col], row_factor, where, header[value_col]))
        if marginal is not None and marginal_col is not None:
            marginal.append(
                _parse_value(row[marginal_col], row_factor, where, header[marginal_col])
            )
    tag = f" [{fmt}]"
    if value_col is None and not gen_cols and marginal is not None:
        # WattTime publishes marginal rates only: they are the series' values, stated.
        values = list(marginal)
        tag = f" [{fmt}] (WattTime marginal MOER used as intensity)"
    return _finish(times, values, marginal, path, rows, tag)


def _read_json(text: str, path: str, zone: _dt.tzinfo) -> IntensitySeries:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IntensityDataError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}."
        ) from exc
    factor = 1.0
    fmt = "json"
    marginal_only = False
    if isinstance(data, dict):
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        unit = meta.get("units") or data.get("units") or data.get("unit")
        if unit is not None:
            factor = _unit_factor(str(unit), f"{path}: units")
        for key in ("history", "forecast", "data"):
            if isinstance(data.get(key), list):
                if key == "data" and meta:
                    fmt, marginal_only = "watttime", True
                elif key in ("history", "forecast"):
                    fmt = "electricitymaps"
                data = data[key]
                break
    if not isinstance(data, list):
        raise IntensityDataError(
            f"{path}: expected a list of records (or an object with 'history', 'forecast' "
            "or 'data')."
        )
    times: list[float] = []
    values: list[float] = []
    marginal: list[float] = []
    rows: list[int] = []
    for i, rec in enumerate(data):
        where = f"{path}: record {i + 1}"
        if not isinstance(rec, dict):
            raise IntensityDataError(f"{where}: not an object.")
        tkey = next((k for k in ("datetime", "timestamp", "point_time", "time") if k in rec), None)
        vkey = next(
            (k for k in ("carbonIntensity", "g_co2e_per_kwh", "value", "intensity") if k in rec),
            None,
        )
        if tkey is None or vkey is None:
            raise IntensityDataError(
                f"{where}: needs a time ('datetime', 'timestamp' or 'point_time') and a value "
                "('carbonIntensity', 'g_co2e_per_kwh' or 'value')."
            )
        rec_factor = _unit_factor(str(rec["unit"]), where) if "unit" in rec else factor
        times.append(_parse_time(rec[tkey], zone, where))
        values.append(_parse_value(rec[vkey], rec_factor, where, vkey))
        mkey = "marginal_g_co2e_per_kwh"
        marginal.append(
            _parse_value(rec.get(mkey), rec_factor, where, mkey)
            if not marginal_only
            else values[-1]
        )
        rows.append(i + 1)
    tag = f" [{fmt}]"
    if marginal_only:
        tag += " (WattTime marginal MOER used as intensity)"
    return _finish(times, values, marginal, path, rows, tag)


def read_intensity_file(
    path: str | os.PathLike[str],
    *,
    file_format: Format = "auto",
    timezone: str = "UTC",
    emission_factors: dict[str, float] | None = None,
    max_bytes: int = 64 * 1024 * 1024,
) -> IntensitySeries:
    """Read a carbon-intensity time series from a CSV or JSON file.

    Args:
        path: the file.
        file_format: ``"auto"`` (JSON by content, CSV formats by header), ``"generic"``,
            ``"electricitymaps"``, ``"watttime"``, ``"entsoe"`` or ``"json"``.
        timezone: IANA zone for timestamps without an offset.
        emission_factors: ENTSO-E production type (lower case) -> gCO2e/kWh, added to
            :data:`ENTSOE_EMISSION_FACTORS_G_PER_KWH`.
        max_bytes: refuse larger files (bounded memory).

    Returns:
        The series, values in gCO2e/kWh.

    Raises:
        IntensityDataError: the file cannot be read or is invalid; the message names the
            file and the row.
    """
    name = str(path)
    zone = _zone(timezone)
    factors = dict(ENTSOE_EMISSION_FACTORS_G_PER_KWH)
    for kind, value in (emission_factors or {}).items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise IntensityDataError(f"emission_factors[{kind!r}] must be a number >= 0.")
        factors[kind.strip().lower()] = float(value)
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise IntensityDataError(
                f"{name}: {size} bytes is over the {max_bytes}-byte limit; trim the file to "
                "the period of the run."
            )
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise IntensityDataError(f"{name}: cannot read the intensity file: {exc}.") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IntensityDataError(f"{name}: not UTF-8 text (byte {exc.start}).") from exc
    stripped = text.lstrip()
    if file_format == "json" or (file_format == "auto" and stripped[:1] in ("[", "{")):
        return _read_json(text, name, zone)
    return _read_csv(text, name, file_format, zone, factors)
