"""Power over wall time, independent of the workload, for the SIMULATED NVML device.

A :class:`PowerProfile` is periodic and piecewise linear: segment ``j`` starts at
``starts_s[j]`` (the first at 0) and runs to the next start (the last to ``period_s``),
with power going linearly from ``start_power_w[j]`` to ``end_power_w[j]``. That covers
constant power, square waves, sawtooths, random steps and noise (random steps shorter than
a training step), and its integral is exact, so the ground-truth energy of any time
window is known (:meth:`PowerProfile.energy_j`).

:meth:`SimulatedNVML.set_power_profile` makes a simulated device draw a profile: the C
library integrates the same segments for its energy counter, so tests and benchmarks can
compare measured per-step energy with the exact figure. Everything here is simulated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Most segments one profile may have (the C library's fixed table size).
MAX_SEGMENTS = 4096


@dataclass(frozen=True)
class PowerProfile:
    """A periodic, piecewise-linear power profile (SIMULATED).

    Attributes:
        name: a short label for tables (``"square 1 s"``).
        starts_s: segment start times within one period, from 0, strictly increasing.
        start_power_w: power at each segment's start, in watts (>= 0).
        end_power_w: power at each segment's end, in watts (>= 0).
        period_s: the period, in seconds (> the last start).

    Raises:
        ValueError: the segments are inconsistent; the message names the problem.
    """

    name: str
    starts_s: tuple[float, ...]
    start_power_w: tuple[float, ...]
    end_power_w: tuple[float, ...]
    period_s: float

    def __post_init__(self) -> None:
        n = len(self.starts_s)
        if not 1 <= n <= MAX_SEGMENTS:
            raise ValueError(f"a profile needs 1 to {MAX_SEGMENTS} segments, got {n}")
        if len(self.start_power_w) != n or len(self.end_power_w) != n:
            raise ValueError("starts_s, start_power_w and end_power_w must have equal lengths")
        if not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ValueError(f"period_s must be a finite number > 0, got {self.period_s!r}")
        if self.starts_s[0] != 0.0:
            raise ValueError(f"the first segment must start at 0, got {self.starts_s[0]!r}")
        starts = np.asarray(self.starts_s, dtype=float)
        if np.any(np.diff(starts) <= 0) or starts[-1] >= self.period_s:
            raise ValueError("segment starts must increase strictly and stay below period_s")
        powers = np.asarray(self.start_power_w + self.end_power_w, dtype=float)
        if not np.all(np.isfinite(powers)) or np.any(powers < 0):
            raise ValueError("segment powers must be finite numbers >= 0")

    # -- exact ground truth -------------------------------------------------------------
    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        starts = np.asarray(self.starts_s, dtype=float)
        ends = np.append(starts[1:], self.period_s)
        p0 = np.asarray(self.start_power_w, dtype=float)
        p1 = np.asarray(self.end_power_w, dtype=float)
        cum = np.concatenate(([0.0], np.cumsum(0.5 * (p0 + p1) * (ends - starts))))
        return starts, ends, p0, p1, cum

    def cumulative_j(self, t_s: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """Exact energy from profile time 0 to each time (negative times count back)."""
        starts, ends, p0, p1, cum = self._tables()
        tau = np.asarray(t_s, dtype=float)
        n = np.floor(tau / self.period_s)
        r = np.clip(tau - n * self.period_s, 0.0, self.period_s)
        j = np.clip(np.searchsorted(starts, r, side="right") - 1, 0, len(starts) - 1)
        length = ends[j] - starts[j]
        x = r - starts[j]
        part = p0[j] * x + (p1[j] - p0[j]) * x * x / (2.0 * length)
        return n * cum[-1] + cum[j] + part

    def energy_j(self, t0_s: float | np.ndarray, t1_s: float | np.ndarray) -> np.ndarray:
        """Exact energy between profile times ``t0_s`` and ``t1_s``, in joules."""
        return self.cumulative_j(t1_s) - self.cumulative_j(t0_s)

    def power_w(self, t_s: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """Power at each profile time, in watts."""
        starts, ends, p0, p1, _ = self._tables()
        tau = np.asarray(t_s, dtype=float)
        r = np.clip(tau - np.floor(tau / self.period_s) * self.period_s, 0.0, self.period_s)
        j = np.clip(np.searchsorted(starts, r, side="right") - 1, 0, len(starts) - 1)
        return p0[j] + (p1[j] - p0[j]) * (r - starts[j]) / (ends[j] - starts[j])

    @property
    def mean_power_w(self) -> float:
        """Mean power over one period, in watts."""
        return float(self._tables()[4][-1] / self.period_s)

    # -- the families the benchmark and the property tests use ---------------------------
    @classmethod
    def constant(cls, power_w: float = 300.0) -> PowerProfile:
        """Constant power."""
        return cls("constant", (0.0,), (power_w,), (power_w,), 1.0)

    @classmethod
    def square(
        cls, period_s: float, low_w: float = 60.0, high_w: float = 450.0, duty: float = 0.5
    ) -> PowerProfile:
        """A square wave: ``low_w`` then ``high_w`` for ``duty`` of each period."""
        if not 0.0 < duty < 1.0:
            raise ValueError(f"duty must lie in (0, 1), got {duty!r}")
        split = (1.0 - duty) * period_s
        return cls(f"square {period_s:g} s", (0.0, split), (low_w, high_w), (low_w, high_w),
                   period_s)  # fmt: skip

    @classmethod
    def sawtooth(cls, period_s: float, low_w: float = 60.0, high_w: float = 450.0) -> PowerProfile:
        """A ramp from ``low_w`` to ``high_w`` over each period, then a drop."""
        return cls(f"sawtooth {period_s:g} s", (0.0,), (low_w,), (high_w,), period_s)

    @classmethod
    def random_steps(
        cls,
        seed: int,
        mean_hold_s: float = 0.3,
        low_w: float = 60.0,
        high_w: float = 450.0,
        period_s: float = 60.0,
    ) -> PowerProfile:
        """Power held at a random level for random (exponential) times, then changed."""
        rng = np.random.default_rng(seed)
        starts, t = [0.0], 0.0
        while True:
            t += max(float(rng.exponential(mean_hold_s)), 1e-3)
            if t >= period_s - 1e-3 or len(starts) >= MAX_SEGMENTS:
                break
            starts.append(t)
        levels = tuple(float(v) for v in rng.uniform(low_w, high_w, len(starts)))
        return cls(f"random steps {mean_hold_s:g} s", tuple(starts), levels, levels, period_s)

    @classmethod
    def noise(
        cls,
        seed: int,
        mean_w: float = 250.0,
        sigma_w: float = 60.0,
        hold_s: float = 0.005,
        period_s: float = 10.0,
    ) -> PowerProfile:
        """Random power around ``mean_w``, a new value every ``hold_s`` (clipped at 0)."""
        n = min(int(round(period_s / hold_s)), MAX_SEGMENTS)
        period_s = n * hold_s
        rng = np.random.default_rng(seed)
        levels = tuple(float(v) for v in np.clip(rng.normal(mean_w, sigma_w, n), 0.0, None))
        starts = tuple(k * hold_s for k in range(n))
        return cls(f"noise {hold_s * 1e3:g} ms", starts, levels, levels, period_s)


def benchmark_profiles(seed: int = 0) -> list[PowerProfile]:
    """The profiles of the accuracy benchmark and the property tests' examples."""
    return [
        PowerProfile.constant(300.0),
        PowerProfile.square(1.0),
        PowerProfile.square(0.05),
        PowerProfile.sawtooth(1.0),
        PowerProfile.random_steps(seed),
        PowerProfile.noise(seed),
    ]
