"""Per-step attribution when steps are shorter than a device's counter updates.

An NVML energy counter updates about every 100 ms. Linear interpolation of the
cumulative curve gives exact totals over many steps but spreads each update interval's
energy evenly over time, so a 20 ms step that mostly waited gets the same power as one
that computed. When steps are shorter than about two counter updates, each step's energy
is instead modelled as ``E_i = a + b * d_i`` (a fixed energy per step for the work it
does, plus power ``b`` for its duration ``d_i``): ``a`` and ``b`` are fitted by least
squares to the counter's own update intervals (with slow forgetting, so the model follows
the workload), and a batch's interpolated total is then shared out in proportion to
``a + b * d_i``. Totals stay exactly those of the counter; only the split between
neighbouring steps changes. With no usable fit the split stays proportional to duration.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StepAttribution:
    """Fits ``E = a + b * duration`` to one device's counter intervals and splits totals.

    Args:
        forgetting: weight kept by old statistics each time a batch is added (0..1).
    """

    def __init__(self, forgetting: float = 0.98) -> None:
        self.forgetting = forgetting
        self._xtx = np.zeros((2, 2))
        self._xty = np.zeros(2)
        self.fixed_j = 0.0
        self.power_w = 0.0
        self.fitted = False

    def update(
        self,
        step_bounds: Sequence[tuple[float, float]],
        counter_times_s: Sequence[float],
        counter_energies_j: Sequence[float],
    ) -> None:
        """Add the counter intervals that steps fully tile to the fit.

        Args:
            step_bounds: (start, end) of each step, in time order.
            counter_times_s: times of the counter updates around those steps.
            counter_energies_j: the cumulative energy at each update.
        """
        if len(counter_times_s) < 2 or not step_bounds:
            return
        bounds = np.asarray(step_bounds, dtype=float)
        starts, ends = bounds[:, 0], bounds[:, 1]
        durations = np.maximum(ends - starts, 1e-9)
        t = np.asarray(counter_times_s, dtype=float)
        e = np.asarray(counter_energies_j, dtype=float)
        t0, t1 = t[:-1], t[1:]
        inside = (t0 >= starts[0]) & (t1 <= ends[-1])  # intervals inside the steps' span
        if not inside.any():
            return
        t0, t1, de = t0[inside], t1[inside], (e[1:] - e[:-1])[inside]
        # overlap of every counter interval (rows) with every step (columns)
        overlap = np.clip(
            np.minimum(ends[None, :], t1[:, None]) - np.maximum(starts[None, :], t0[:, None]),
            0.0,
            None,
        )
        covered = overlap.sum(axis=1)
        full = covered >= 0.95 * (t1 - t0)  # skip intervals with a gap (validation, ...)
        if not full.any():
            return
        x = np.column_stack(((overlap[full] / durations).sum(axis=1), covered[full]))
        y = de[full]
        decay = self.forgetting ** len(y)
        self._xtx = decay * self._xtx + x.T @ x
        self._xty = decay * self._xty + x.T @ y
        self._solve()

    def _solve(self) -> None:
        xtx, xty = self._xtx, self._xty
        det = xtx[0, 0] * xtx[1, 1] - xtx[0, 1] * xtx[1, 0]
        if det > 1e-10 * xtx[0, 0] * xtx[1, 1] > 0:  # well conditioned 2 x 2 system
            a = (xtx[1, 1] * xty[0] - xtx[0, 1] * xty[1]) / det
            b = (xtx[0, 0] * xty[1] - xtx[1, 0] * xty[0]) / det
        else:
            a, b = -1.0, -1.0
        if a < 0 or b < 0:  # keep the physically meaningful, non-negative solution
            b_only = xty[1] / xtx[1, 1] if xtx[1, 1] > 0 else 0.0
            a_only = xty[0] / xtx[0, 0] if xtx[0, 0] > 0 else 0.0
            err_b = _sse(xtx, xty, 0.0, b_only)
            err_a = _sse(xtx, xty, a_only, 0.0)
            a, b = (0.0, b_only) if err_b <= err_a else (a_only, 0.0)
        self.fixed_j, self.power_w = float(max(a, 0.0)), float(max(b, 0.0))
        self.fitted = self.fixed_j > 0 or self.power_w > 0

    def split(self, total_j: float, durations_s: Sequence[float]) -> list[float]:
        """Share ``total_j`` among steps in proportion to ``a + b * duration``."""
        d = np.asarray(durations_s, dtype=float)
        weights = self.fixed_j + self.power_w * d if self.fitted else d.copy()
        if weights.sum() <= 0:
            weights = np.ones_like(d)
        return [float(v) for v in total_j * weights / weights.sum()]


def _sse(xtx: np.ndarray, xty: np.ndarray, a: float, b: float) -> float:
    beta = np.array([a, b])
    return float(beta @ xtx @ beta - 2 * beta @ xty)
