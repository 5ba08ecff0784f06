"""Turning step boundaries into per-step and per-phase energy (no Lightning here).

The training thread only calls :meth:`EnergyAccountant.record_step` (a list append).
:meth:`EnergyAccountant.resolve`, called at log intervals, interpolates the meter's
curves at the recorded boundaries for every step whose end the curves already cover.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_sustain.energy.attribution import Choice, StepAttribution, attribute_steps
from lightning_sustain.energy.meter import EnergyMeter

logger = logging.getLogger(__name__)

PHASES = ("train", "validation", "test", "predict", "fit", "explain")
#: Most recent step boundaries kept as the attribution's context.
_RECENT_STEPS = 4096


@dataclass(slots=True)
class StepEnergy:
    """Energy of one training step.

    Attributes:
        step: global step index (0-based, the step this batch produced).
        epoch: epoch index.
        start_s: ``time.monotonic()`` at the step's start.
        end_s: ``time.monotonic()`` at the step's end.
        energy_j: joules of all measured devices together.
        device_energy_j: joules per device id.
        samples: samples in the batch (0 when unknown).
    """

    step: int
    epoch: int
    start_s: float
    end_s: float
    energy_j: float
    device_energy_j: dict[str, float]
    samples: int

    @property
    def duration_s(self) -> float:
        """Step duration in seconds."""
        return self.end_s - self.start_s

    @property
    def power_w(self) -> float:
        """Mean power over the step, in watts."""
        return self.energy_j / self.duration_s if self.duration_s > 0 else 0.0


@dataclass
class PhaseTotals:
    """Accumulated energy of one phase (train, validation, test, predict, fit).

    Attributes:
        device_energy_j: joules per device id.
        duration_s: seconds spent in the phase.
        steps: steps (batches) counted.
        samples: samples counted.
    """

    device_energy_j: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0
    steps: int = 0
    samples: int = 0

    @property
    def energy_j(self) -> float:
        """Joules of all devices together."""
        return float(sum(self.device_energy_j.values()))

    def add_energy(self, device_energy_j: dict[str, float]) -> None:
        """Add joules per device."""
        for device_id, joules in device_energy_j.items():
            self.device_energy_j[device_id] = self.device_energy_j.get(device_id, 0.0) + joules

    def merge(self, other: PhaseTotals) -> None:
        """Add another phase's totals into this one."""
        self.add_energy(other.device_energy_j)
        self.duration_s += other.duration_s
        self.steps += other.steps
        self.samples += other.samples

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "energy_j": self.energy_j,
            "device_energy_j": dict(self.device_energy_j),
            "duration_s": self.duration_s,
            "steps": self.steps,
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PhaseTotals:
        """Inverse of :meth:`to_dict`."""
        return cls(
            device_energy_j={k: float(v) for k, v in data.get("device_energy_j", {}).items()},
            duration_s=float(data.get("duration_s", 0.0)),
            steps=int(data.get("steps", 0)),
            samples=int(data.get("samples", 0)),
        )


def totals_to_dict(totals: dict[str, PhaseTotals]) -> dict[str, dict[str, Any]]:
    """Serialise a phase -> totals mapping."""
    return {phase: t.to_dict() for phase, t in totals.items()}


def totals_from_dict(data: dict[str, Any]) -> dict[str, PhaseTotals]:
    """Deserialise a phase -> totals mapping."""
    return {phase: PhaseTotals.from_dict(value) for phase, value in data.items()}


def empty_totals() -> dict[str, PhaseTotals]:
    """A fresh mapping with every phase at zero."""
    return {phase: PhaseTotals() for phase in PHASES}


class EnergyAccountant:
    """Per-step and per-phase energy from recorded boundaries and an :class:`EnergyMeter`.

    Args:
        meter: the meter whose curves answer the queries.
        on_steps: called with every batch of newly resolved steps (e.g. a trace writer).
        max_pending: resolve early once this many steps wait (bounds memory).
        attribute_short_steps: attribute each counter update's energy to the steps that
            overlap it with the reconstruction of
            :mod:`~lightning_sustain.energy.attribution` that best predicts held-out counter
            points (plain interpolation where none does clearly better); False: plain
            interpolation always. Energy never moves between update intervals.
        attribution_lookback_s: seconds of recent curve the choice is made on.
        choice_refresh_s: a device's choice is made again once this much curve time has
            passed since the last one (batches resolved sooner reuse it: the choice looks
            at ``attribution_lookback_s`` of curve, which hardly changes meanwhile).
    """

    def __init__(
        self,
        meter: EnergyMeter,
        on_steps: Callable[[list[StepEnergy]], None] | None = None,
        max_pending: int = 4096,
        attribute_short_steps: bool = True,
        attribution_lookback_s: float = 10.0,
        choice_refresh_s: float = 0.5,
    ) -> None:
        self.meter = meter
        self.on_steps = on_steps
        self.max_pending = max_pending
        self.attribute_short_steps = attribute_short_steps
        self._attribution: dict[str, StepAttribution] = {}
        self.attribution_lookback_s = attribution_lookback_s
        self.choice_refresh_s = choice_refresh_s
        self._choice_made_at: dict[str, float] = {}
        self._recent_starts = np.zeros(0)
        self._recent_ends = np.zeros(0)
        #: the reconstruction chosen at the last resolve, per device (diagnostics)
        self.last_choice: dict[str, Choice] = {}
        self.totals: dict[str, PhaseTotals] = empty_totals()
        self._pending_steps: list[tuple[int, int, float, float, int]] = []
        self._pending_intervals: list[tuple[str, int, int, int, int]] = []
        self._pending_marks: list[tuple[int, float]] = []
        self._marks: dict[int, dict[str, float]] = {}
        self._mark_times: dict[int, float] = {}
        self._next_mark = 0
        self.last_resolved: list[StepEnergy] = []
        # record_step/mark/record_interval may run on the training thread while resolve runs
        # on a background thread: the intake lock guards the pending lists (held for an
        # append or a swap only), the resolve lock serialises resolutions.
        self._intake_lock = threading.Lock()
        self._resolve_lock = threading.RLock()

    # -- hot path ---------------------------------------------------------------------
    def record_step(
        self, step: int, epoch: int, start_s: float, end_s: float, samples: int
    ) -> None:
        """Remember a training step's boundaries (no measurement happens here)."""
        with self._intake_lock:  # uncontended: ~0.1 us; resolve may run on another thread
            self._pending_steps.append((step, epoch, start_s, end_s, samples))

    @property
    def pending_steps(self) -> int:
        """Steps recorded but not yet resolved."""
        return len(self._pending_steps)

    def needs_resolve(self) -> bool:
        """True when the pending list reached ``max_pending``."""
        return len(self._pending_steps) >= self.max_pending

    def mark(self, t_s: float) -> int:
        """Remember a moment whose cumulative energy is wanted; returns its id.

        Used for phase starts and ends and metric evaluations (see :meth:`energy_at_mark`).

        Marks are evaluated at the next :meth:`resolve` that covers them, while the
        moment is still inside the meter's history, so intervals of any length are exact.
        """
        with self._intake_lock:
            mark_id = self._next_mark
            self._next_mark += 1
            self._pending_marks.append((mark_id, t_s))
        return mark_id

    def energy_at_mark(self, mark_id: int) -> dict[str, float] | None:
        """Cumulative energy per device at a resolved mark (None while pending)."""
        return self._marks.get(mark_id)

    def time_of_mark(self, mark_id: int) -> float | None:
        """The moment a mark stands for."""
        return self._mark_times.get(mark_id)

    def record_interval(
        self, phase: str, start_mark: int, end_mark: int, steps: int = 0, samples: int = 0
    ) -> None:
        """Add the energy between two marks to a phase (validation, test, the whole fit)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        with self._intake_lock:
            self._pending_intervals.append((phase, start_mark, end_mark, steps, samples))

    # -- resolution -------------------------------------------------------------------
    def resolve(self, wait: bool = False, timeout_s: float = 2.0) -> list[StepEnergy]:
        """Compute energy for every pending step and interval the curves cover.

        Args:
            wait: block (up to ``timeout_s``) until the curves cover everything pending;
                used at the end of a run. On timeout the remainder is resolved with the
                last known values.
            timeout_s: the longest wait.

        Returns:
            The steps resolved by this call, oldest first.
        """
        with self._resolve_lock:
            with self._intake_lock:
                steps, self._pending_steps = self._pending_steps, []
                marks, self._pending_marks = self._pending_marks, []
                intervals, self._pending_intervals = self._pending_intervals, []
            try:
                resolved, steps, marks, intervals = self._resolve_taken(
                    steps, marks, intervals, wait, timeout_s
                )
            finally:
                with self._intake_lock:  # give back what is not covered yet, in order
                    self._pending_steps = steps + self._pending_steps
                    self._pending_marks = marks + self._pending_marks
                    self._pending_intervals = intervals + self._pending_intervals
        if resolved and self.on_steps is not None:
            self.on_steps(resolved)
        self.last_resolved = resolved
        return resolved

    def _resolve_taken(
        self,
        steps: list[tuple[int, int, float, float, int]],
        marks: list[tuple[int, float]],
        intervals: list[tuple[str, int, int, int, int]],
        wait: bool,
        timeout_s: float,
    ) -> tuple[list[StepEnergy], list[Any], list[Any], list[Any]]:
        pending_times = [s[3] for s in steps] + [t for _, t in marks]
        if not pending_times and not intervals:
            return [], steps, marks, intervals
        if wait:
            if pending_times:
                self.meter.wait_until_covered(max(pending_times), timeout_s=timeout_s)
            covered_until = float("inf")
        else:
            # attribution wants the update interval after a step's end too
            covered = self.meter.latest_time_s(points_after=1 if self.attribute_short_steps else 0)
            if covered is None:
                covered = float("inf") if not self.meter.streams or self.meter.failures() else None
            if covered is None:
                return [], steps, marks, intervals
            covered_until = covered
        ready = [s for s in steps if s[3] <= covered_until]
        steps = [s for s in steps if s[3] > covered_until]
        resolved = self._resolve_steps(ready)
        ready_marks = [m for m in marks if m[1] <= covered_until]
        marks = [m for m in marks if m[1] > covered_until]
        if ready_marks:
            curves = self.meter.energy_at([t for _, t in ready_marks])
            for k, (mark_id, t_s) in enumerate(ready_marks):
                self._marks[mark_id] = {device: values[k] for device, values in curves.items()}
                self._mark_times[mark_id] = t_s
        still_pending = []
        for interval in intervals:
            phase, start_mark, end_mark, n_steps, samples = interval
            start, end = self._marks.get(start_mark), self._marks.get(end_mark)
            if start is None or end is None:
                still_pending.append(interval)
                continue
            totals = self.totals[phase]
            totals.add_energy({d: end[d] - start.get(d, 0.0) for d in end})
            totals.duration_s += self._mark_times[end_mark] - self._mark_times[start_mark]
            totals.steps += n_steps
            totals.samples += samples
        return resolved, steps, marks, still_pending

    def _resolve_steps(self, ready: list[tuple[int, int, float, float, int]]) -> list[StepEnergy]:
        """Energy of a batch of steps, computed per batch with arrays (no per-step numpy)."""
        if not ready:
            return []
        n = len(ready)
        steps_col, epochs_col, starts_col, ends_col, samples_col = zip(*ready, strict=True)
        starts = np.fromiter(starts_col, float, n)
        ends = np.fromiter(ends_col, float, n)
        times = np.empty(2 * n)
        times[0::2], times[1::2] = starts, ends
        per_step: dict[str, np.ndarray] = {}
        for stream in self.meter.streams:
            values = stream.energy_at_array(times)
            per_step[stream.info.device_id] = values[1::2] - values[0::2]
        if self.attribute_short_steps:
            self._attribute(starts, ends, per_step)
        train = self.totals["train"]
        train.add_energy({d: float(v.sum()) for d, v in per_step.items()})
        train.duration_s += float((ends - starts).sum())
        train.steps += n
        train.samples += sum(samples_col)
        ids = list(per_step)
        columns = [per_step[d].tolist() for d in ids]
        totals = np.sum(list(per_step.values()), axis=0).tolist() if ids else [0.0] * n
        if len(ids) == 1:
            only = ids[0]
            per_device = [{only: v} for v in columns[0]]
        else:
            per_device = [dict(zip(ids, row, strict=True)) for row in zip(*columns, strict=True)]
        return list(map(StepEnergy, steps_col, epochs_col, starts_col, ends_col, totals,
                        per_device, samples_col))  # fmt: skip

    def _attribute(
        self, starts: np.ndarray, ends: np.ndarray, per_step: dict[str, np.ndarray]
    ) -> None:
        """Re-split each counter update's energy among the steps overlapping it.

        Plain interpolation (already in ``per_step``) is replaced only by a reconstruction
        that :func:`~lightning_sustain.energy.attribution.choose_method` found to predict
        held-out counter points of the recent curve better; energy never leaves its update
        interval, so per-step figures stay consistent with the counter's totals.
        """
        lookback_t0 = float(starts[0]) - self.attribution_lookback_s
        # the recent steps (the affine density's context), kept as arrays, trimmed to the
        # lookback and to at most `_RECENT_STEPS` steps
        rs = np.concatenate((self._recent_starts, starts))
        re_ = np.concatenate((self._recent_ends, ends))
        keep = re_ >= lookback_t0
        if keep.size and not keep[0] or rs.size > _RECENT_STEPS:
            first = max(int(np.argmax(keep)) if keep.any() else rs.size, rs.size - _RECENT_STEPS)
            rs, re_ = rs[first:], re_[first:]
        self._recent_starts, self._recent_ends = rs, re_
        context = (rs, re_)
        for stream in self.meter.streams:
            device_id = stream.info.device_id
            if device_id not in per_step or stream.failure is not None:
                continue
            times, energies = stream.points_between(lookback_t0, float(ends[-1]), context=2)
            if len(times) < 3:
                continue
            model = self._attribution.setdefault(device_id, StepAttribution())
            span_t, span_e = stream.points_between(float(starts[0]), float(ends[-1]))
            model.update(np.column_stack((starts, ends)), span_t, span_e)
            affine = (model.fixed_j, model.power_w) if model.fitted else None
            method = "auto"
            previous = self.last_choice.get(device_id)
            made_at = self._choice_made_at.get(device_id)
            if (
                previous is not None
                and made_at is not None
                and float(ends[-1]) - made_at < self.choice_refresh_s
                and (previous.method != "affine" or affine is not None)
            ):
                method = previous.method
            values, choice = attribute_steps(
                times, energies, starts, ends, method=method, affine=affine, context_steps=context
            )
            if method == "auto":
                self.last_choice[device_id] = choice
                self._choice_made_at[device_id] = float(ends[-1])
            if choice.method != "plain":
                per_step[device_id] = np.asarray(values, dtype=float)
