"""A SYNTHETIC grid carbon-intensity trace: a daily sinusoid plus noise, for tests and demos.

Real grids swing 2-5x within a day (solar at noon, gas and coal in the evening peak).
:func:`diurnal_intensity` gives a series with that shape whose "day" can be compressed to
minutes, so a controller can be exercised over several days in a short test. Everything
it produces is synthetic; nothing is fetched.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from lightning_sustain.energy.intensity import IntensitySeries


def diurnal_intensity(
    start_unix_s: float,
    duration_s: float,
    *,
    period_s: float = 86_400.0,
    mean_g_per_kwh: float = 300.0,
    swing: float = 3.0,
    noise: float = 0.05,
    resolution_s: float | None = None,
    phase: float = 0.0,
    seed: int | None = 0,
) -> IntensitySeries:
    """A sinusoidal daily intensity with multiplicative noise.

    ``I(t) = mean * (1 + a * sin(2 pi (t - start) / period + phase)) * (1 + noise * N(0, 1))``
    where ``a = (swing - 1) / (swing + 1)``, so that the noise-free peak is ``swing``
    times the trough.

    Args:
        start_unix_s: time of the first point (Unix seconds).
        duration_s: length covered; one extra point past the end is added.
        period_s: length of one "day" in seconds (compress it for tests).
        mean_g_per_kwh: mean intensity.
        swing: peak / trough ratio (> 1).
        noise: relative standard deviation of the noise (clipped so values stay > 0).
        resolution_s: spacing of points; default ``period_s / 96`` (15 min in a real day).
        phase: phase of the sinusoid, radians.
        seed: random seed for the noise.

    Returns:
        The series (source ``"synthetic diurnal"``).
    """
    if not swing > 1.0 or not period_s > 0 or not duration_s > 0 or not mean_g_per_kwh > 0:
        raise ValueError("need swing > 1, period_s > 0, duration_s > 0 and mean_g_per_kwh > 0.")
    step = resolution_s if resolution_s is not None else period_s / 96.0
    n = int(math.ceil(duration_s / step)) + 2
    t = start_unix_s + step * np.arange(n)
    a = (swing - 1.0) / (swing + 1.0)
    base = mean_g_per_kwh * (1.0 + a * np.sin(2 * np.pi * (t - start_unix_s) / period_s + phase))
    rng = np.random.default_rng(seed)
    factor = np.clip(1.0 + noise * rng.standard_normal(n), 0.2, None)
    return IntensitySeries(
        t, base * factor, source=f"synthetic diurnal (period {period_s:g} s, swing {swing:g}x)"
    )


def write_intensity_csv(series: IntensitySeries, path: str | os.PathLike[str]) -> Path:
    """Write a series as the generic CSV format (``timestamp,g_co2e_per_kwh``, Unix seconds)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "g_co2e_per_kwh"])
        for t, v in zip(series.times_unix_s, series.g_co2e_per_kwh, strict=True):
            writer.writerow([f"{t:.3f}", f"{v:.3f}"])
    return out
