"""A software power throttle: idle time between steps, sized by feedback on measured power.

Where a GPU's power limit cannot be set (NVML ``NO_PERMISSION``, no NVML, CPU only), the
mean power of a process can still be kept at a budget by inserting idle time between
training steps: a device that waits draws its idle power, so the mean over a window is
``(E_work + P_idle * t_idle) / (t_work + t_idle)``.

:class:`SoftwareThrottle` decides how long to idle. It keeps an energy *ledger*: every
measured interval adds ``energy - target * duration`` to the debt, and the next idle
period is sized to pay the debt back at ``target - P_idle`` watts. Paying back exactly
what was measured is an integral controller; measurements arrive late (an NVML energy
counter updates every ~100 ms), so the time not yet measured is predicted from a small
model of the device (busy and idle power, learnt from the measurements with exponential
forgetting) and from the idle periods the throttle itself ordered (a Smith predictor).
Without the prediction a delayed integral controller oscillates.

The throttle is plain Python with no Lightning or device import: feed it measured energy,
it answers seconds to sleep. :class:`~lightning_sustain.callbacks.PowerBudget` uses it in
software mode and the DDP power-shifting strategy uses it for ranks that cannot set
hardware limits.

Example::

    throttle = SoftwareThrottle(target_power_w=200.0)
    for batch in data:
        train_step(batch)
        energy_j, duration_s = meter_since_last_call()   # includes the last sleep
        time.sleep(throttle.update(energy_j, duration_s))
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from lightning_sustain.energy.estimate import as_number

logger = logging.getLogger(__name__)

__all__ = ["SoftwareThrottle", "ThrottleStats"]


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    value = as_number(name, value)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}.")
    return float(value)


@dataclass
class ThrottleStats:
    """What a :class:`SoftwareThrottle` has done so far.

    Attributes:
        target_power_w: the target in force, in watts.
        mean_power_w: measured mean power over the last ``window_s`` (None before any
            measurement), in watts.
        throttled_s: total idle time ordered, in seconds.
        debt_j: energy above the target still to be paid back (negative: small credit).
        busy_power_w: learnt power while working (None until learnt), in watts.
        idle_power_w: learnt or given power while idling, in watts.
        updates: number of :meth:`SoftwareThrottle.update` calls.
    """

    target_power_w: float
    mean_power_w: float | None
    throttled_s: float
    debt_j: float
    busy_power_w: float | None
    idle_power_w: float | None
    updates: int


class SoftwareThrottle:
    """Feedback controller that keeps a rolling mean power at or below a target.

    Args:
        target_power_w: the power budget, in watts (> 0).
        idle_power_w: the power drawn while idling, in watts, if known; otherwise it is
            learnt from measurements that include ordered idle time (until then half the
            busy power, at most half the target, is assumed).
        window_s: length of the rolling window reported by :attr:`mean_power_w`, and the
            most debt carried (``target * window_s`` joules), in seconds.
        max_sleep_s: the longest single idle period; a larger debt is paid over several
            steps.
        credit_s: how much unused budget may be banked, as seconds at the target power;
            small, so a quiet period cannot be followed by a burst above the target.
        forgetting: weight kept per update by the power model (0 < f <= 1).

    Raises:
        ValueError: a setting is out of range; the message names it.
    """

    def __init__(
        self,
        target_power_w: float,
        *,
        idle_power_w: float | None = None,
        window_s: float = 10.0,
        max_sleep_s: float = 2.0,
        credit_s: float = 0.05,
        forgetting: float = 0.9,
    ) -> None:
        self._target_w = _positive("target_power_w", target_power_w)
        self._given_idle_w = None
        if idle_power_w is not None:
            self._given_idle_w = _positive("idle_power_w", idle_power_w, allow_zero=True)
        self.window_s = _positive("window_s", window_s)
        self.max_sleep_s = _positive("max_sleep_s", max_sleep_s)
        self.credit_s = _positive("credit_s", credit_s, allow_zero=True)
        self.forgetting = _positive("forgetting", forgetting)
        #: how far from collinear the (busy, idle) data must be before idle power is fitted
        self.min_conditioning = 0.05
        if self.forgetting > 1:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting!r}.")
        self.reset()

    # -- configuration ------------------------------------------------------------------
    @property
    def target_power_w(self) -> float:
        """The power target in force, in watts."""
        return self._target_w

    def set_target_w(self, target_power_w: float) -> None:
        """Change the target (e.g. when power is shifted between ranks).

        The debt already measured is kept (energy above the old target is still owed),
        clamped to what one window at the new target allows.

        Raises:
            ValueError: the target is not a positive number.
        """
        new_target = _positive("target_power_w", target_power_w)
        if new_target > self._target_w:
            self._given_up = False  # a higher target may be reachable: measure again
        self._target_w = new_target
        self._debt_j = self._clamp_debt(self._debt_j)

    def reset(self) -> None:
        """Forget every measurement, the debt and the statistics (keeps the settings)."""
        self._debt_j = 0.0
        self._throttled_s = 0.0
        self._updates = 0
        self._window: deque[tuple[float, float]] = deque()  # (duration_s, energy_j)
        self._window_s = 0.0
        self._window_j = 0.0
        self._sleeps: deque[tuple[float, float]] = deque()  # ordered idle (start_s, end_s)
        self._measured_until_s: float | None = None
        # exponentially forgotten least-squares statistics of E = Pb * busy + Pi * idle
        self._s_bb = self._s_bi = self._s_ii = self._s_be = self._s_ie = 0.0
        self._given_up = False
        self._fit: tuple[float, float] | None = None

    # -- model ----------------------------------------------------------------------------
    @property
    def busy_power_w(self) -> float | None:
        """Learnt power while working, in watts (None before the first measurement)."""
        model = self._solve()
        return None if model is None else model[0]

    @property
    def idle_power_w(self) -> float | None:
        """Given or learnt power while idling, in watts (None when unknown)."""
        if self._given_idle_w is not None:
            return self._given_idle_w
        model = self._solve()
        return None if model is None or not model[2] else model[1]

    def _solve(self) -> tuple[float, float, bool] | None:
        """Busy power, idle power and whether the idle power is known (given or fitted)."""
        if self._s_bb <= 1e-12:
            return None
        if self._given_idle_w is not None:
            idle = self._given_idle_w
            return max(0.0, (self._s_be - idle * self._s_bi) / self._s_bb), idle, True
        busy = max(0.0, self._s_be / self._s_bb)
        det = self._s_bb * self._s_ii - self._s_bi**2
        # the 2x2 system is well posed only when the intervals' idle shares differ enough
        # (near-collinear data would give wild estimates): keep the last good fit otherwise
        if self._s_ii > 1e-9 and det > self.min_conditioning * self._s_bb * self._s_ii:
            fit_busy = (self._s_be * self._s_ii - self._s_ie * self._s_bi) / det
            fit_idle = (self._s_ie * self._s_bb - self._s_be * self._s_bi) / det
            if 0 <= fit_idle <= fit_busy:
                self._fit = (fit_busy, fit_idle)
        if self._fit is not None:
            fit_busy, fit_idle = self._fit
            # busy power from the latest data with the fitted idle power removed
            busy = max(fit_idle, (self._s_be - fit_idle * self._s_bi) / self._s_bb)
            return busy, fit_idle, True
        return busy, busy / 2.0, False

    def _idle_overlap_s(self, t0_s: float, t1_s: float) -> float:
        overlap = 0.0
        for start, end in self._sleeps:
            lo, hi = max(start, t0_s), min(end, t1_s)
            if hi > lo:
                overlap += hi - lo
        return overlap

    def _learn(self, energy_j: float, duration_s: float, idle_s: float) -> None:
        busy_s = max(0.0, duration_s - idle_s)
        f = self.forgetting
        # normalise by duration so long and short intervals weigh alike
        w = 1.0 / duration_s
        self._s_bb = f * self._s_bb + w * busy_s * busy_s
        self._s_bi = f * self._s_bi + w * busy_s * idle_s
        self._s_ii = f * self._s_ii + w * idle_s * idle_s
        self._s_be = f * self._s_be + w * busy_s * energy_j
        self._s_ie = f * self._s_ie + w * idle_s * energy_j

    def _clamp_debt(self, debt_j: float) -> float:
        return min(max(debt_j, -self._target_w * self.credit_s), self._target_w * self.window_s)

    # -- control --------------------------------------------------------------------------
    def update(
        self,
        energy_j: float,
        duration_s: float,
        *,
        pending_s: float = 0.0,
        now_s: float | None = None,
    ) -> float:
        """Feed one measured interval; get the idle time to insert now.

        Intervals must be contiguous: each call reports the energy of the measured time
        since the previous call's measured time, *including* the idle time previously
        ordered. Reporting only the working part of each step overstates the mean power
        and throttles too much.

        Args:
            energy_j: joules measured over the new interval (>= 0).
            duration_s: length of that interval, in seconds (> 0, or 0 to feed nothing
                new and only re-plan with ``pending_s``).
            pending_s: time between the end of the measured interval and now whose
                energy is not measured yet (e.g. a counter that updates every 100 ms); it
                is predicted from the learnt model and the idle time already ordered.
            now_s: the current ``time.monotonic()``; None reads the clock.

        Returns:
            Seconds to idle now (0 when the mean is within budget), at most
            ``max_sleep_s``.

        Raises:
            ValueError: a negative or non-finite energy, duration or pending time.
        """
        energy_j = _positive("energy_j", energy_j, allow_zero=True)
        duration_s = _positive("duration_s", duration_s, allow_zero=True)
        pending_s = _positive("pending_s", pending_s, allow_zero=True)
        now = time.monotonic() if now_s is None else float(now_s)
        self._updates += 1
        target = self._target_w
        measured_end = now - pending_s
        if duration_s > 0:
            idle_s = self._idle_overlap_s(measured_end - duration_s, measured_end)
            self._learn(energy_j, duration_s, min(idle_s, duration_s))
            self._debt_j = self._clamp_debt(self._debt_j + energy_j - target * duration_s)
            self._window.append((duration_s, energy_j))
            self._window_s += duration_s
            self._window_j += energy_j
            while self._window and self._window_s - self._window[0][0] >= self.window_s:
                d, e = self._window.popleft()
                self._window_s -= d
                self._window_j -= e
        self._measured_until_s = measured_end
        # ordered idle periods measured long ago are no longer needed (kept 2 s, so a
        # measured interval of up to 2 s still knows its idle share)
        while self._sleeps and self._sleeps[0][1] <= measured_end - 2.0:
            self._sleeps.popleft()

        model = self._solve()
        if model is None:
            return 0.0
        busy_w, idle_w, idle_known = model
        if not idle_known:
            idle_w = min(idle_w, 0.5 * target)  # a guess until idle time was measured
        # predict the energy of the time not measured yet (Smith predictor)
        predicted_j = 0.0
        if pending_s > 0:
            idle_pending = min(pending_s, self._idle_overlap_s(measured_end, now))
            predicted_j = busy_w * (pending_s - idle_pending) + idle_w * idle_pending
        debt_j = self._debt_j + predicted_j - target * pending_s
        if debt_j <= 0:
            return 0.0
        if self._given_up:
            return 0.0
        margin_w = target - idle_w
        if idle_known and (margin_w <= 0.02 * target or idle_w >= 0.95 * busy_w):
            # measured: idling does not lower the power (enough) to reach the target, so
            # every idle period would only add time and energy: stop throttling
            self._given_up = True
            logger.warning(
                "Idling does not lower the power enough to reach the target: measured "
                "%.1f W while idle, %.1f W while working, target %.1f W. The software "
                "throttle stops (it would only make the run longer and use more energy); "
                "raise the budget or use a hardware power limit.",
                idle_w,
                busy_w,
                target,
            )
            return 0.0
        if margin_w <= 0.02 * target:
            margin_w = 0.02 * target  # a guess of the idle power: probe, then measure
        sleep_s = min(debt_j / margin_w, self.max_sleep_s)
        self._sleeps.append((now, now + sleep_s))
        self._throttled_s += sleep_s
        return sleep_s

    # -- reporting ------------------------------------------------------------------------
    @property
    def mean_power_w(self) -> float | None:
        """Measured mean power over (about) the last ``window_s`` seconds, in watts."""
        if self._window_s <= 0:
            return None
        return self._window_j / self._window_s

    @property
    def effective(self) -> bool:
        """False once measurements showed that idling cannot reach the target (it stopped)."""
        return not self._given_up

    @property
    def throttled_s(self) -> float:
        """Total idle time ordered so far, in seconds."""
        return self._throttled_s

    @property
    def debt_j(self) -> float:
        """Measured energy above the target not yet paid back, in joules."""
        return self._debt_j

    def stats(self) -> ThrottleStats:
        """A snapshot of the throttle's state for logging."""
        return ThrottleStats(
            target_power_w=self._target_w,
            mean_power_w=self.mean_power_w,
            throttled_s=self._throttled_s,
            debt_j=self._debt_j,
            busy_power_w=self.busy_power_w,
            idle_power_w=self.idle_power_w,
            updates=self._updates,
        )

    def __repr__(self) -> str:
        return (
            f"SoftwareThrottle(target_power_w={self._target_w:.1f}, "
            f"throttled_s={self._throttled_s:.2f}, debt_j={self._debt_j:.1f})"
        )
