"""An energy budget's control logic, for any loop (no Lightning import).

:class:`EnergyBudgetCore` counts the energy a run spends on the sampled curves of an
:class:`~lightning_sustain.energy.meter.EnergyMeter` (the meter of an
:class:`~lightning_sustain.run.EnergyRun`, or any meter), keeps a bound on what the next
steps, the stop checkpoint and a following validation run will cost, and decides before a
step whether the budget can still afford it. Front ends only translate their loop into
calls: the Trainer callback :class:`~lightning_sustain.EnergyBudget`,
:meth:`EnergyRun.attach_budget <lightning_sustain.run.EnergyRun.attach_budget>` for Fabric
and plain PyTorch loops.

How a decision is made (every check, usually every step):

1. **Spent** is the measured energy up to the curve's newest point plus the unmeasured
   tail (a counter lags by up to one update period), the tail priced at the highest power
   seen (a bound, never an estimate).
2. **Reserve** is a bound on what follows a decision to continue: the next step(s), the
   stop checkpoint (``stop``/``raise``) and the validation run Lightning makes after an
   early stop (only when one follows). Each is the largest measured cost of its kind
   (exact windows of the measured curve) or the highest power seen times its longest
   recent duration, whichever is larger, with a small margin.
3. If ``spent + reserve`` stays within the budget, training continues without waiting.
   Otherwise the check waits (at most ``sync_timeout_s``, about one counter period) until
   the curve covers the step's end, and decides again on measured energy: the tail bound
   then shrinks to the sampler's latency, so the stop comes within about one step of the
   budget instead of one counter period's worth of energy early.

Under ``torch.distributed`` the caller passes ``reduce_sum`` (a sum over ranks); both
values of a check are reduced together, and the second (exact) round runs on every rank
or none, since it depends only on the reduced first round.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightning_sustain.budget.forecast import steps_that_fit
from lightning_sustain.energy.carbon import JOULES_PER_KWH
from lightning_sustain.energy.meter import EnergyMeter

logger = logging.getLogger(__name__)

#: Version of :meth:`EnergyBudgetCore.state_dict` (the Trainer callback saves the same).
STATE_VERSION = 1

Action = Literal["stop", "warn", "raise"]
ReduceSum = Callable[[Sequence[float]], Sequence[float]]

# segments of the measured curve shorter than this are merged before a power is taken
# from them (a late poll would otherwise show a spike)
_MIN_SEGMENT_S = 0.04
# steps 1 and 2 include start-up and a one-time wait: their energies are not bounds
_WARMUP_STEPS = 2
# idle power below this fraction of the work's power: the device's power follows the work
_IDLE_RATIO = 0.5
# work segments needed before the idle power is compared with the work's
_MIN_WORK_SEGMENTS = 4


class BudgetExceeded(RuntimeError):
    """The energy or CO2e budget would be exceeded by the next step (``action="raise"``).

    Attributes:
        spent_j: energy spent so far, all ranks and resumes included, in joules.
        budget_j: the budget, in joules.
        checkpoint_path: the checkpoint saved before raising (None when none was saved).
    """

    def __init__(self, message: str, spent_j: float, budget_j: float, checkpoint_path: str | None):
        super().__init__(message)
        self.spent_j = spent_j
        self.budget_j = budget_j
        self.checkpoint_path = checkpoint_path


@dataclass(frozen=True)
class Reserve:
    """Room kept for what may follow a decision to continue, in joules (this process).

    Attributes:
        steps_j: the next step(s) before the next check.
        checkpoint_j: writing the stop checkpoint (0 for ``warn``).
        validation_j: the validation run after an early stop (0 unless one follows).
    """

    steps_j: float
    checkpoint_j: float
    validation_j: float

    @property
    def total_j(self) -> float:
        """Everything reserved, in joules."""
        return self.steps_j + self.checkpoint_j + self.validation_j


@dataclass(frozen=True)
class BudgetCheck:
    """The outcome of one check (job-wide figures when a ``reduce_sum`` was given).

    Attributes:
        spent_j: energy counted so far (earlier runs included), in joules.
        reserve_j: room kept for what follows, in joules.
        budget_j: the budget, in joules.
        would_cross: the budget cannot afford another step: stop, raise or warn now.
        exact: decided on measured energy (the check waited for the counter).
        waited_s: how long the check waited for the counter.
    """

    spent_j: float
    reserve_j: float
    budget_j: float
    would_cross: bool
    exact: bool
    waited_s: float = 0.0

    @property
    def remaining_j(self) -> float:
        """Budget left after what was spent, in joules (negative when over)."""
        return self.budget_j - self.spent_j


def _describe_j(energy_j: float) -> str:
    return f"{energy_j / JOULES_PER_KWH:.6g} kWh ({energy_j:.6g} J)"


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class EnergyBudgetCore:
    """Spent energy, reserves and the stop decision of an energy budget (no Lightning).

    Args:
        budget_j: the budget in joules (> 0), all ranks and resumes together.
        action: ``"stop"``, ``"raise"`` or ``"warn"`` (what the front end does when a check
            says the budget cannot afford another step; ``warn`` reserves no checkpoint).
        window: how many recent steps the next-step bound looks at.
        margin: relative margin on every measured bound (0.05: 5 %).
        power_window_s: how far back the highest power seen is remembered, in seconds.
        sync_timeout_s: the longest wait for the counter at an exact check, in seconds.
        budget_text: how messages name the budget (default ``budget_j=<J>``).
        describe: how messages show an energy (default: kWh and J).

    Raises:
        ValueError: a setting is not valid; the message names it.
    """

    def __init__(
        self,
        budget_j: float,
        action: Action = "stop",
        *,
        window: int = 16,
        margin: float = 0.05,
        power_window_s: float = 60.0,
        sync_timeout_s: float = 0.5,
        budget_text: str | None = None,
        describe: Callable[[float], str] | None = None,
    ) -> None:
        if isinstance(budget_j, bool) or not isinstance(budget_j, (int, float)):
            try:
                budget_j = float(budget_j)  # numpy and torch scalars
            except (TypeError, ValueError):
                raise ValueError(f"budget_j must be a number > 0, got {budget_j!r}.") from None
        if not (math.isfinite(budget_j) and budget_j > 0):
            raise ValueError(f"budget_j must be a finite number > 0, got {budget_j!r}.")
        if action not in ("stop", "warn", "raise"):
            raise ValueError(f"action={action!r} is not valid: use 'stop', 'warn' or 'raise'.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an integer >= 2, got {window!r}.")
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {margin!r}.")
        for name, value in (("power_window_s", power_window_s), ("sync_timeout_s", sync_timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
        self.budget_j = float(budget_j)
        self.action: Action = action
        self.window = window
        self.margin = float(margin)
        self.power_window_s = float(power_window_s)
        self.sync_timeout_s = float(sync_timeout_s)
        self.budget_text = budget_text or f"budget_j={self.budget_j:g}"
        self.describe: Callable[[float], str] = describe or _describe_j
        #: a check said the budget cannot afford another step
        self.exceeded = False
        #: the checkpoint written before stopping or raising
        self.checkpoint_path: str | None = None
        self._warned_exceeded = False
        self._final_spent_j: float | None = None
        self._reduced = False
        #: energy of earlier runs (all ranks), from a checkpoint, in joules
        self.prior_spent_j = 0.0
        #: what the last run's last check reserved (all ranks), from a checkpoint
        self.prior_reserve_j = 0.0
        #: the last check, job-wide
        self.last_check: BudgetCheck | None = None
        #: this process's energy spent writing the stop checkpoint, in joules
        self.checkpoint_energy_j = 0.0
        self.meter: EnergyMeter | None = None
        #: for loops driving the core themselves (EnergyRun.attach_budget): writes the stop
        #: checkpoint and returns its path / serialises the same state to memory
        self.save_checkpoint: Callable[[], str | None] | None = None
        self.trial_checkpoint: Callable[[], object] | None = None
        self._reset()

    def _reset(self) -> None:
        self._t_start_s: float | None = None
        self._measured_j = 0.0
        self._measured_until_s = 0.0
        self._seg_start: dict[str, tuple[float, float]] = {}  # device -> (time, cumulative J)
        self._powers: dict[str, deque[tuple[float, float]]] = {}  # device -> (end time, W)
        self.steps = 0
        self._last_end_s: float | None = None
        self._step_ends: deque[tuple[int, float]] = deque(maxlen=4 * self.window + 8)
        self._durations: deque[float] = deque(maxlen=self.window)
        self._step_energies: deque[float] = deque(maxlen=self.window)
        self._last_measured_step = _WARMUP_STEPS
        # measured windows of the other costs: pending (start, end), then exact (J, s)
        self._pending: dict[str, list[tuple[float, float]]] = {"checkpoint": [], "validation": []}
        self._costs: dict[str, deque[tuple[float, float]]] = {
            "checkpoint": deque(maxlen=8),
            "validation": deque(maxlen=8),
        }
        self._open: dict[str, float] = {}
        self._val_batches_bound = 0
        # windows without training work (the probe, checkpoint writes, waits for the
        # counter): curve segments overlapping them are not the work's power
        self._idle_spans: deque[tuple[float, float]] = deque(maxlen=64)
        self._work_from_s = math.inf  # the work's power is taken after the start-up steps
        self._work_powers: dict[str, list[float]] = {}
        #: mean power while the loop did no training work (the probe), in watts
        self.idle_power_w: float | None = None
        #: does the device's power run independently of the work? (None: not known yet)
        self.power_follows_time: bool | None = None
        self._checkpoint_durations: deque[float] = deque(maxlen=8)
        self._probe_tried = False
        self._trial_s = 0.0  # the trial checkpoint write's duration
        self._warm_durations: list[float] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, meter: EnergyMeter | None, now_s: float | None = None) -> None:
        """Start counting on ``meter``'s curves (at a fit's start; the meter stays the caller's).

        Waits (at most ``sync_timeout_s``) until the curves cover the start, so nothing
        before it is counted and nothing after it is missed.
        """
        self._reset()
        self.meter = meter
        self.last_check = None
        self.checkpoint_energy_j = 0.0
        self._final_spent_j = None
        now = time.monotonic() if now_s is None else now_s
        if meter is not None:
            meter.wait_until_covered(now, timeout_s=self.sync_timeout_s)
        self._t_start_s = now
        self._measured_until_s = now
        self._last_end_s = now
        if meter is not None:
            for device_id, values in meter.energy_at([now]).items():
                self._seg_start[device_id] = (now, values[0])

    def stop(self) -> None:
        """Stop counting (the meter is the caller's to close); the figures stay."""
        if self.meter is not None:
            self._advance(time.monotonic())
        self.meter = None

    @property
    def started(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._t_start_s is not None and self.meter is not None

    # -- measurement ----------------------------------------------------------------------
    def _advance(self, now_s: float) -> None:
        """Take in the curve up to its newest point (never past ``now_s``)."""
        meter = self.meter
        if meter is None or self._t_start_s is None:
            return
        covered = meter.latest_time_s()
        if covered is None or covered <= self._measured_until_s:
            return
        covered = min(covered, now_s)
        if covered <= self._measured_until_s:
            return
        increment = sum(meter.energy_between(self._measured_until_s, covered).values())
        self._measured_j += max(0.0, increment)
        self._measured_until_s = covered
        horizon = covered - self.power_window_s
        for stream in meter.streams:
            device_id = stream.info.device_id
            start = self._seg_start.get(device_id)
            if start is None:
                continue
            times, energies = stream.points_between(start[0], covered, context=0)
            t0, e0 = start
            for t, e in zip(times, energies, strict=True):
                if t <= covered and t - t0 >= _MIN_SEGMENT_S:
                    power_w = max(0.0, (e - e0) / (t - t0))
                    powers = self._powers.setdefault(device_id, deque())
                    powers.append((t, power_w))
                    while powers and powers[0][0] < horizon:
                        powers.popleft()
                    if t0 >= self._work_from_s and not any(
                        a < t and b > t0 for a, b in self._idle_spans
                    ):
                        work = self._work_powers.setdefault(device_id, [])
                        if len(work) < 4096:
                            work.append(power_w)
                    t0, e0 = t, e
            self._seg_start[device_id] = (t0, e0)
        self._measure_windows()

    def _measure_windows(self) -> None:
        """Exact energies of the steps and windows the measured curve now covers."""
        meter = self.meter
        if meter is None:
            return
        until = self._measured_until_s
        previous: tuple[int, float] | None = None
        for n, t in self._step_ends:
            if t > until:
                break
            if n > self._last_measured_step and previous is not None and previous[0] == n - 1:
                energy = sum(meter.energy_between(previous[1], t).values())
                self._step_energies.append(max(0.0, energy))
                self._last_measured_step = n
            previous = (n, t)
        for kind, windows in self._pending.items():
            keep = []
            for t0, t1 in windows:
                if t1 <= until:
                    energy = max(0.0, sum(meter.energy_between(t0, t1).values()))
                    self._costs[kind].append((energy, t1 - t0))
                else:
                    keep.append((t0, t1))
            self._pending[kind] = keep
        self._classify()

    def _classify(self) -> None:
        """Decide whether the device's power follows the work.

        From the idle probe and the work's curve segments (their low decile: a phase of
        lower power counts).
        """
        if self.idle_power_w is None or self.power_follows_time is True:
            return
        devices = self.meter.streams if self.meter is not None else []
        lows = []
        for stream in devices:
            work = self._work_powers.get(stream.info.device_id, [])
            if len(work) < _MIN_WORK_SEGMENTS:
                return
            lows.append(_quantile(work, 0.25))
        # a device that idles while the loop does no work draws well below its lowest
        # working power; one that does not (shared, throttled, a wall-time power profile)
        # is priced by time at the highest power seen (sticky: once seen, kept)
        self.power_follows_time = self.idle_power_w >= _IDLE_RATIO * sum(lows)

    def _burst_w(self, device_id: str, fallback: float | None) -> float:
        powers = self._powers.get(device_id)
        return max(p for _, p in powers) if powers else (fallback or 0.0)

    def power_bound_w(self) -> float:
        """The highest power seen within ``power_window_s`` (all devices), in watts.

        Each device's highest mean power over a measured curve segment (at least 40 ms),
        summed over devices; before any segment, the devices' latest power figures.
        """
        total = 0.0
        meter = self.meter
        streams = meter.streams if meter is not None else []
        for stream in streams:
            powers = self._powers.get(stream.info.device_id)
            if powers:
                total += max(p for _, p in powers)
            else:
                total += stream.last_power_w or 0.0
        if total <= 0 and self._powers:
            total = sum(max((p for _, p in q), default=0.0) for q in self._powers.values())
        return total

    def measured_j(self, now_s: float | None = None) -> tuple[float, float]:
        """This process's measured energy since :meth:`start` and the time it reaches."""
        self._advance(time.monotonic() if now_s is None else now_s)
        return self._measured_j, self._measured_until_s

    def spent_bound_j(self, now_s: float) -> float:
        """This process's energy since :meth:`start` up to ``now_s``, in joules.

        Measured energy plus a bound on the unmeasured tail (at 1.25 x the highest power
        seen).
        """
        self._advance(now_s)
        return self._measured_j + self.tail_bound_j(now_s)

    def tail_bound_j(self, now_s: float) -> float:
        """A bound on the energy from the curve's newest point to ``now_s``, in joules.

        Every step that ends in the tail at its bound (the first one may have started
        before it), any validation run or checkpoint write in it at theirs, and never
        less than the tail's time at 1.25 x the highest burst power seen.
        """
        since = self._measured_until_s
        tail_s = max(0.0, now_s - since)
        if tail_s <= 0:
            return 0.0
        steps = sum(1 for n, t in self._step_ends if n > 0 and since < t <= now_s)
        bound = steps * (self.next_step_j() or 0.0)
        if any(t1 > since for _, t1 in self._pending["validation"]):
            bound += self.validation_j()
        if any(t1 > since for _, t1 in self._pending["checkpoint"]):
            bound += self.checkpoint_j()
        return max(bound, tail_s * 1.25 * self.power_bound_w())

    def spent_estimate_j(self, now_s: float) -> float:
        """Like :meth:`spent_bound_j` with the tail at the last second's mean power."""
        self._advance(now_s)
        tail_s = max(0.0, now_s - self._measured_until_s)
        return self._measured_j + tail_s * self._recent_power_w()

    def _recent_power_w(self) -> float:
        meter = self.meter
        if meter is None:
            return 0.0
        total = 0.0
        for stream in meter.streams:
            latest = stream.latest_time_s
            if latest is None:
                continue
            first = stream.first_time_s or latest
            total += stream.mean_power_w(max(first, latest - 1.0), latest) or 0.0
        return total

    # -- what the loop reports --------------------------------------------------------------
    def step_end(self, now_s: float | None = None) -> int:
        """Record the end of a training step (a timestamp; nothing is read). Returns its number."""
        now = time.monotonic() if now_s is None else now_s
        self.steps += 1
        if self._last_end_s is not None:
            duration = max(0.0, now - self._last_end_s)
            if self.steps > _WARMUP_STEPS:
                self._durations.append(duration)
            else:
                self._warm_durations.append(duration)
        self._last_end_s = now
        self._step_ends.append((self.steps, now))
        if self.steps == _WARMUP_STEPS:
            self._work_from_s = now
        return self.steps

    def begin(self, kind: Literal["checkpoint", "validation"], now_s: float | None = None) -> None:
        """A checkpoint write or a validation run starts (its cost is measured)."""
        self._open[kind] = time.monotonic() if now_s is None else now_s

    def end(self, kind: Literal["checkpoint", "validation"], now_s: float | None = None) -> None:
        """The window opened by :meth:`begin` ends; its exact energy is taken once measured.

        The next training step starts here (the time in between is not a step).
        """
        start = self._open.pop(kind, None)
        now = time.monotonic() if now_s is None else now_s
        if start is not None and now > start:
            self._pending[kind].append((start, now))
            if kind == "checkpoint":
                self._checkpoint_durations.append(now - start)
                self._idle_spans.append((start, now))
        self._last_end_s = now
        # the next step's boundary pairs with this one, not with the step before
        self._step_ends.append((-1, now))

    @property
    def probed(self) -> bool:
        """True once :meth:`probe` ran in this run."""
        return self.idle_power_w is not None or self._probe_tried

    def probe_due(self) -> bool:
        """Whether to :meth:`probe` now (this process's answer; under DDP all must agree).

        Once, at the first check after the start-up steps where the budget affords it:
        room beyond the reserve for three counter updates at the highest power seen.
        """
        check = self.last_check
        if self.probed or self.steps <= _WARMUP_STEPS or check is None or check.would_cross:
            return False
        cost_j = 3.0 * (self.update_period_s() or 0.1) * self.power_bound_w()
        return check.remaining_j - check.reserve_j >= cost_j

    def probe(self, write: Callable[[], object] | None = None) -> None:
        """Measure the power while the loop does no training work, and a write's duration.

        Once, after the start-up steps (``stop``/``raise``: with a trial of the checkpoint
        write as ``write``, called twice: the second is timed). The window runs from one
        counter update to the first update after ``write`` returned, so its energy is
        exact (it costs up to two update periods). Compared with the lower quartile of the
        training's curve segments (at least four, outside such windows), it tells
        whether the device's power follows the work (then what is not a step is priced at
        this idle power) or runs independently of it (then everything is priced by time
        at the highest power seen). Until known, the second is assumed.
        """
        meter = self.meter
        self._probe_tried = True
        if meter is None or self._t_start_s is None:
            return
        ends = [t for n, t in self._step_ends if n > 0]
        now = time.monotonic()
        meter.wait_until_covered(now, timeout_s=self.sync_timeout_s)
        t0 = meter.latest_time_s()
        if write is not None:
            write()  # the first write in a process pays one-time costs (imports, caches)
        started = time.monotonic()
        if write is not None:
            write()
        ended = time.monotonic()
        if write is not None:
            self._trial_s = ended - started
        meter.wait_until_covered(ended + 1e-6, timeout_s=self.sync_timeout_s)
        t1 = meter.latest_time_s()
        self._last_end_s = time.monotonic()
        self._step_ends.append((-1, self._last_end_s))
        self._idle_spans.append((now, self._last_end_s))
        if t0 is None or t1 is None or t1 - t0 <= 0 or not ends:
            return
        self.idle_power_w = sum(meter.energy_between(t0, t1).values()) / (t1 - t0)
        self._classify()

    def set_validation_batches(self, batches: int) -> None:
        """How many batches a validation run has (bounds it before one was measured)."""
        self._val_batches_bound = max(0, int(batches))

    # -- bounds -----------------------------------------------------------------------------
    @property
    def _by_time(self) -> bool:
        # until a window without work was measured, assume the worst
        return self.power_follows_time is not False

    def _cost_bound_j(self, energies: Sequence[float], durations: Sequence[float]) -> float:
        """A bound on a cost from its measured windows, in joules.

        The largest measured energy, with the margin twice; where power may run
        independently of the work, the highest power seen times the longest duration if
        larger.
        """
        bound = max(energies, default=0.0) * (1.0 + 2 * self.margin)
        if durations and self._by_time:
            bound = max(bound, self.power_bound_w() * max(durations) * (1.0 + self.margin))
        return bound

    def windowed_step_j(self) -> float | None:
        """The largest energy per step over recent windows of consecutive steps, in joules.

        Each window runs from one step end to a later one at least three counter updates
        away (its energy is then known to a small part of a step, where single steps
        shorter than an update are not); None before such a window was measured.
        """
        meter = self.meter
        if meter is None:
            return None
        span = max(0.15, 3.0 * (self.update_period_s() or 0.05))
        until = self._measured_until_s
        ends = [(n, t) for n, t in self._step_ends if t <= until]
        best: float | None = None
        first = a = 0  # the run of consecutive steps, and the window's start
        for b, (n_b, t_b) in enumerate(ends):
            if n_b <= 0:  # a validation run or a checkpoint write: windows restart after it
                first = a = b + 1
                continue
            if b > first and n_b != ends[b - 1][0] + 1:
                first = a = b
            while a + 1 < b and t_b - ends[a + 1][1] >= span:
                a += 1
            if a < b and t_b - ends[a][1] >= span:
                energy = sum(meter.energy_between(ends[a][1], t_b).values()) / (b - a)
                best = energy if best is None else max(best, energy)
        return best

    def next_step_j(self) -> float | None:
        """A bound on the next training step's energy, in joules (None before one ran).

        Steps longer than two counter updates are measured one by one: the largest of the
        last ``window``, with the margin. Shorter steps are not (a counter update spans
        several of them), and where the device's power may run independently of the work
        a measured step says little about the next: then also the highest power seen
        times the recent steps' duration (the longest where power may run independently
        of the work, else their mean; the margin twice), if larger. During
        the start-up steps: their mean energy so far (after a resume, at least what the
        last run reserved).
        """
        energies = list(self._step_energies)
        durations = list(self._durations)
        if not energies and not durations:
            if not self._warm_durations or self._last_end_s is None:
                return None
            # the start-up steps: their mean (a first step is often slow; its time at the
            # highest power would stop small budgets before they started)
            spent_j = self.spent_estimate_j(self._last_end_s)
            # after a resume, what the last run reserved bounds them too
            return max(
                spent_j / len(self._warm_durations) * (1.0 + self.margin), self.prior_reserve_j
            )
        period = self.update_period_s() or 0.0
        long_steps = bool(durations) and _quantile(durations, 0.5) >= 2.0 * period
        bound = max(energies, default=0.0) * (1.0 + self.margin) if long_steps else 0.0
        windowed = None if long_steps else self.windowed_step_j()
        if windowed is not None:
            bound = max(bound, windowed * (1.0 + 2 * self.margin))
        # before the probe the steps are not priced by time (the start-up steps are slow:
        # that would stop small budgets early); what follows a decision is
        follows_time = self.power_follows_time is True
        if durations and (follows_time or (not long_steps and windowed is None) or not (
            energies or windowed
        )):
            # power that follows the work: a longer step is mostly idle time, and the
            # mean duration at the highest power is the bound; otherwise a long one
            # costs its time at that power
            mean_s = sum(durations) / len(durations)
            d_s = max(durations) if follows_time else mean_s
            bound = max(bound, self.power_bound_w() * d_s * (1.0 + 2 * self.margin))
        return bound

    def checkpoint_j(self) -> float:
        """A bound on writing the stop checkpoint, in joules (0 for ``warn``).

        The trial write (four times its duration plus 30 ms: the real write adds a file
        and the framework's bookkeeping) and real writes once made; priced at the idle
        power with a 50 % margin where the device's power follows the work, else at the
        highest power seen; before any, a fifth of a step.
        """
        if self.action == "warn":
            return 0.0
        durations = list(self._checkpoint_durations)
        energies = [e for e, _ in self._costs["checkpoint"]]
        if not durations and not self._trial_s:
            return 0.2 * (self.next_step_j() or 0.0)
        # a trial serialises to memory; the real write adds the file and the framework's
        # bookkeeping (measured here at 2-10 times the trial): four times it plus 30 ms
        trial_s = self._trial_s
        longest_s = max(max(durations, default=0.0), 4.0 * trial_s + 0.03 if trial_s else 0.0)
        if self._by_time:
            return self._cost_bound_j(energies, [longest_s])
        # power follows the work: a write draws about what the device draws idle
        idle_w = self.idle_power_w or 0.0
        return max(max(energies, default=0.0), 1.5 * idle_w * longest_s)

    def validation_j(self) -> float:
        """A bound on one validation run, in joules.

        The measured runs, priced like :meth:`checkpoint_j`; before one was measured, one
        training-step bound per validation batch.
        """
        costs = self._costs["validation"]
        if costs:
            energy = max(e for e, _ in costs) * (1.0 + 2 * self.margin)
            # a run shorter than a counter update is not measured exactly: its time (with
            # a quarter more: the loop's time jitters) at the highest power seen bounds it
            return max(energy, 1.25 * self.power_bound_w() * max(d for _, d in costs))
        return self._val_batches_bound * (self.next_step_j() or 0.0)

    def reserve(self, steps_ahead: int = 1, validation_follows: bool = False) -> Reserve:
        """The room a decision to continue must keep, for this process, in joules.

        Args:
            steps_ahead: steps until the next check.
            validation_follows: a validation run follows a stop (Lightning's early stop).
        """
        return Reserve(
            steps_j=(self.next_step_j() or 0.0) * max(1, steps_ahead),
            checkpoint_j=self.checkpoint_j(),
            validation_j=self.validation_j() if validation_follows else 0.0,
        )

    # -- the decision -------------------------------------------------------------------------
    def check(
        self,
        now_s: float | None = None,
        *,
        steps_ahead: int = 1,
        validation_follows: bool = False,
        reduce_sum: ReduceSum | None = None,
    ) -> BudgetCheck:
        """Can the budget afford another ``steps_ahead`` steps (and the stop after them)?

        Call it after :meth:`step_end`, on every rank at the same steps when
        ``reduce_sum`` sums over ranks.

        Args:
            now_s: the step's end (``time.monotonic()``); None: now.
            steps_ahead: steps until the next check.
            validation_follows: a validation run would follow a stop.
            reduce_sum: sums a list of floats over ranks (None: one process).

        Returns:
            The check (also kept in :attr:`last_check`).
        """
        now = time.monotonic() if now_s is None else now_s
        reduce = reduce_sum or (lambda values: values)
        self._reduced = reduce_sum is not None

        def decide(at_s: float, exact: bool, waited_s: float) -> BudgetCheck:
            # decided on the bound of the unmeasured tail; "spent" says the estimate
            bound = self.spent_bound_j(at_s)
            estimate = self.spent_estimate_j(at_s)
            reserve = self.reserve(steps_ahead, validation_follows).total_j
            bound_run, spent_run, reserve_all = (
                float(v) for v in reduce([bound, estimate, reserve])
            )
            cross = self.prior_spent_j + bound_run + reserve_all > self.budget_j
            spent = self.prior_spent_j + spent_run
            return BudgetCheck(spent, reserve_all, self.budget_j, cross, exact, waited_s)

        result = decide(now, exact=False, waited_s=0.0)
        if result.would_cross and self.meter is not None:
            # near the budget: measure up to the step's end instead of bounding the tail,
            # if the budget affords the wait (up to an update period, which draws power
            # too) and the stop after it
            stop_j = self.checkpoint_j() + (self.validation_j() if validation_follows else 0.0)
            wait_j = self.wait_bound_j()
            # (the tail at the recent power here: a bound on it is what the wait replaces)
            spent_j, wait_stop_j = (
                float(v) for v in reduce([self.spent_estimate_j(now), wait_j + stop_j])
            )
            if self.prior_spent_j + spent_j + wait_stop_j <= self.budget_j:
                waited = time.monotonic()
                self.meter.wait_until_covered(now, timeout_s=self.sync_timeout_s)
                after = time.monotonic()
                self._idle_spans.append((now, after))
                result = decide(after, exact=True, waited_s=after - waited)
        self.last_check = result
        if logger.isEnabledFor(logging.DEBUG):
            r = self.reserve(steps_ahead, validation_follows)
            logger.debug(
                "energy budget check at step %d: spent %.4g J, reserve %.4g J (steps %.4g, "
                "checkpoint %.4g, validation %.4g), budget %.4g J, cross=%s exact=%s, power "
                "follows %s, highest power %.4g W",
                self.steps, result.spent_j, result.reserve_j, r.steps_j, r.checkpoint_j,
                r.validation_j, self.budget_j, result.would_cross, result.exact,
                {None: "unknown", True: "time", False: "work"}[self.power_follows_time],
                self.power_bound_w(),
            )  # fmt: skip
        return result

    def enforce(
        self, check: BudgetCheck, save: Callable[[], str | None] | None = None
    ) -> str | None:
        """Act on a check that would cross the budget.

        ``warn`` logs once and returns. ``stop`` and ``raise`` call ``save`` (which writes
        the stop checkpoint and returns its path), count its energy, then ``raise`` raises
        :class:`BudgetExceeded`; ``stop`` returns the path and the loop stops.

        Args:
            check: the check that would cross (:attr:`BudgetCheck.would_cross`).
            save: writes the checkpoint; None writes none.

        Returns:
            The checkpoint path (None when none was written).

        Raises:
            BudgetExceeded: ``action="raise"``.
        """
        budget_j = self.budget_j
        spent, reserve = check.spent_j, check.reserve_j
        self.exceeded = True
        if spent > budget_j or reserve > budget_j or self.steps <= 1:
            logger.warning(
                "Energy budget: %s spent and ~%.4g J reserved for the next step, with a "
                "budget of %s (%s): the budget is smaller than the energy of the first "
                "steps; raise it.",
                self.describe(spent),
                reserve,
                self.budget_text,
                self.describe(budget_j),
            )
        if self.action == "warn":
            if not self._warned_exceeded:
                self._warned_exceeded = True
                logger.warning(
                    "Energy budget: the next step would exceed the budget %s (spent %s); "
                    "action='warn', so training continues past it.",
                    self.budget_text,
                    self.describe(spent),
                )
            return None
        path: str | None = None
        if save is not None:
            started = time.monotonic()
            path = save()
            self.record_checkpoint(started, time.monotonic())
            self.checkpoint_path = path
        if not self._reduced:
            # on one process: "spent" from the curve as far as it now reaches (the
            # decision may have used an estimated tail), the checkpoint included
            self._final_spent_j = self.prior_spent_j + self.spent_estimate_j(time.monotonic())
        fits = steps_that_fit(budget_j - spent, reserve) if reserve > 0 else 0
        message = (
            f"Energy budget {self.budget_text} reached: {self.describe(spent)} spent of "
            f"{self.describe(budget_j)}; the next step and stopping (~{reserve:.4g} J) would "
            f"cross it ({fits} more fit)."
        )
        if path is not None:
            message += (
                f" Checkpoint saved to {path} (writing it used ~{self.checkpoint_energy_j:.3g} J "
                "on this process); resume with a larger budget to continue."
            )
        if self.action == "raise":
            raise BudgetExceeded(message, spent, budget_j, path)
        logger.warning("Energy budget: %s Stopping.", message)
        return path

    def wait_bound_j(self) -> float:
        """A bound on waiting (at most ``sync_timeout_s``) for the counter, in joules."""
        period_s = min(self.sync_timeout_s, 1.2 * (self.update_period_s() or self.sync_timeout_s))
        power_w = self.power_bound_w()
        if not self._by_time and self.idle_power_w is not None:
            power_w = 1.5 * self.idle_power_w
        return period_s * power_w

    def record_checkpoint(self, started_s: float, ended_s: float) -> float:
        """The stop checkpoint was written between two times: count and remember its cost.

        Returns:
            Its energy on this process (measured tail at the recent power), in joules.
        """
        self._open["checkpoint"] = started_s
        self.end("checkpoint", ended_s)
        before = self.spent_estimate_j(started_s)
        after = self.spent_estimate_j(ended_s)
        self.checkpoint_energy_j = max(0.0, after - before)
        return self.checkpoint_energy_j

    @property
    def spent_j(self) -> float:
        """Energy counted so far, in joules.

        All ranks at the last check, earlier runs and the stop checkpoint.
        """
        if self._final_spent_j is not None:
            return max(self._final_spent_j, self.prior_spent_j)
        if self.last_check is None:
            return self.prior_spent_j
        return max(self.last_check.spent_j + self.checkpoint_energy_j, self.prior_spent_j)

    def mean_step_j(self) -> float | None:
        """Mean measured energy per step after the start-up steps (None before known)."""
        meter = self.meter
        if meter is None:
            return None
        until = self._measured_until_s
        ends = [(n, t) for n, t in self._step_ends if n >= _WARMUP_STEPS and t <= until]
        if len(ends) < 2:
            return None
        (n0, t0), (n1, t1) = ends[0], ends[-1]
        if n1 <= n0:
            return None
        return sum(meter.energy_between(t0, t1).values()) / (n1 - n0)

    # -- resume -------------------------------------------------------------------------------
    def update_period_s(self) -> float | None:
        """The curves' update period, from their recent points (None before known)."""
        meter = self.meter
        if meter is None:
            return None
        periods = []
        for stream in meter.streams:
            latest = stream.latest_time_s
            if latest is None:
                continue
            times, _ = stream.points_between(latest - 2.0, latest, context=0)
            gaps = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
            if gaps:
                periods.append(_quantile(gaps, 0.5))
        return max(periods) if periods else None

    def state_dict(self, reduce_sum: ReduceSum | None = None) -> dict[str, Any]:
        """Measured energy so far (all ranks, earlier runs) and the last reserve.

        Measured energy only (no bounded tail): when the curve's newest point is more
        than a quarter of an update period old, this waits (at most ``sync_timeout_s``)
        until the curves cover now, so a resume counts what was spent.
        """
        local = 0.0
        if self.meter is not None and self._t_start_s is not None:
            now = time.monotonic()
            latest = self.meter.latest_time_s()
            period = self.update_period_s()
            fresh = latest is not None and period is not None and now - latest <= 0.25 * period
            if not fresh:
                self.meter.wait_until_covered(now, timeout_s=self.sync_timeout_s)
            local, _ = self.measured_j(now)
        step_j = self.next_step_j() or 0.0
        reduce = reduce_sum or (lambda values: values)
        local, step_j = (float(v) for v in reduce([local, step_j]))
        reserve = self.last_check.reserve_j if self.last_check is not None else 0.0
        return {
            "version": STATE_VERSION,
            "spent_j": self.prior_spent_j + local,
            "step_j": max(step_j, reserve),
            "budget_j": self.budget_j,
        }

    def load_state_dict(self, state: dict[str, Any], owner: str = "EnergyBudget") -> None:
        """Continue counting from a checkpoint's state.

        Raises:
            ValueError: the state is not in a known format.
        """
        if (
            not isinstance(state, dict)
            or state.get("version") != STATE_VERSION
            or "spent_j" not in state
        ):
            raise ValueError(
                f"The checkpoint's {owner} state is not in a known format; start a new "
                "run or remove the callback state from the checkpoint."
            )
        self.prior_spent_j = float(state["spent_j"])
        self.prior_reserve_j = float(state.get("step_j", 0.0))

    def resume_would_cross(self) -> bool:
        """After :meth:`load_state_dict`: the last run's reserve no longer fits the budget."""
        return self.prior_spent_j + self.prior_reserve_j > self.budget_j

    # -- pickling (ddp_spawn pickles the Trainer's callbacks into each rank) ------------------
    def __getstate__(self) -> dict[str, Any]:
        """Settings and figures; the meter (live resources) does not travel."""
        state = dict(self.__dict__)
        state["meter"] = None
        state["save_checkpoint"] = state["trial_checkpoint"] = None  # closures stay here
        if state.get("describe") is _describe_j:
            state.pop("describe")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("describe", _describe_j)
        self.__dict__.update(state)
