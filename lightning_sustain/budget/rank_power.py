"""One DDP rank's power limit under power shifting (no Lightning, no process group here).

:class:`RankPowerLimit` holds what a rank needs to take part in power shifting: whether
its GPU's limit can be set (hardware, journalled by
:class:`~lightning_sustain.budget.limits.PowerLimitGuard` and always restored), else a
software throttle, or the share of a job-wide
:class:`~lightning_sustain.budget.power_cap.PowerCapController` (``PowerBudget(per="job")``),
and applies :class:`~lightning_sustain.budget.shifting.PowerShiftingPolicy`'s decisions
from the per-rank rows its caller gathered (every decrease before any increase, a barrier
in between). The caller (:class:`~lightning_sustain.run.ddp_accounting.DDPAccounting`)
owns the gathering and passes a ``barrier`` callable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from lightning_sustain.budget.limits import PowerLimitGuard, ensure_sigterm_handler
from lightning_sustain.budget.power_cap import PowerCapController, throttle_from_meter
from lightning_sustain.budget.shifting import PowerShiftingPolicy, RankPowerState
from lightning_sustain.budget.throttle import SoftwareThrottle
from lightning_sustain.energy.discovery import warn_once
from lightning_sustain.energy.errors import PowerLimitError
from lightning_sustain.energy.meter import EnergyMeter
from lightning_sustain.energy.nvml import NvmlGpu

logger = logging.getLogger(__name__)

# limit modes exchanged between ranks
MODE_NONE, MODE_HARDWARE, MODE_SOFTWARE = 0.0, 1.0, 2.0

Rows = list[dict[str, float]]


def rank_states(ranks: Rows) -> list[RankPowerState]:
    """The policy's view of gathered per-rank rows (wait, limit, range, GPU power)."""
    states = []
    for rank, r in enumerate(ranks):
        step_s = r["step_s"]
        wait = min(1.0, r["wait_s"] / step_s) if step_s > 0 else 0.0
        window_s = r["window_s"]
        power = r["gpu_window_energy_j"] / window_s if window_s > 0 else None
        adjustable = r["mode"] != MODE_NONE
        states.append(
            RankPowerState(
                rank=rank,
                wait_fraction=wait,
                limit_w=r["limit_w"] if adjustable else 0.0,
                min_limit_w=r["min_limit_w"] if adjustable else 0.0,
                max_limit_w=r["max_limit_w"] if adjustable else 0.0,
                power_w=power,
                adjustable=adjustable,
            )
        )
    return states


def _warn_about_modes(ranks: Rows) -> None:
    modes = [r["mode"] for r in ranks]
    soft = [i for i, m in enumerate(modes) if m == MODE_SOFTWARE]
    if soft and any(m == MODE_HARDWARE for m in modes):
        logger.warning(
            "Rank(s) %s cannot set hardware power limits (NVML refused: run as root or "
            "`nvidia-smi -acp UNRESTRICTED`) while the others can; those ranks are "
            "throttled in software to their share of the budget instead.",
            soft,
        )
    elif soft:
        logger.warning(
            "No rank may set hardware power limits; every rank is throttled in "
            "software to its share of the budget."
        )
    without = [i for i, m in enumerate(modes) if m == MODE_NONE]
    if without:
        logger.warning(
            "Rank(s) %s have no GPU power limit to shift; they keep running as they are.",
            without,
        )
    ranges = {(r["min_limit_w"], r["max_limit_w"]) for r in ranks if r["mode"] != MODE_NONE}
    if len(ranges) > 1:
        logger.warning(
            "The devices have different power-limit ranges (%s): each rank's limit stays "
            "inside its own device's range, and a budget too small for every maximum is "
            "shared in proportion to each device's maximum limit.",
            ", ".join(f"[{lo:.0f}, {hi:.0f}] W" for lo, hi in sorted(ranges)),
        )


class RankPowerLimit:
    """This rank's limit in power shifting: hardware, software throttle or a cap's share.

    Args:
        global_rank: this rank.
        gpu: the GPU whose limit is shifted (None: the rank takes no part).
        shift_power: shifting requested.
        job_power_budget_w: the job's budget in watts, or None.
        target_slack: wait fraction kept as a margin on every rank.
        measure_wait: whether the wait is measured (shifting needs it).
    """

    def __init__(
        self,
        global_rank: int,
        gpu: NvmlGpu | None,
        *,
        shift_power: bool = False,
        job_power_budget_w: float | None = None,
        target_slack: float = 0.05,
        measure_wait: bool = True,
    ) -> None:
        self.global_rank = global_rank
        self.gpu = gpu
        self.shift_power = bool(shift_power) or job_power_budget_w is not None
        self.job_power_budget_w = job_power_budget_w
        self.measure_wait = measure_wait
        self.policy = PowerShiftingPolicy(target_slack=target_slack)
        self.guard: PowerLimitGuard | None = None
        self.throttle: SoftwareThrottle | None = None
        self.power_cap: PowerCapController | None = None
        self.mode = MODE_NONE
        self.range_w: tuple[float, float] = (0.0, 0.0)
        self.limit_w = 0.0
        self.budget_w: float | None = None
        self.decisions = 0
        self._throttle_mark_s: float | None = None

    @property
    def is_global_zero(self) -> bool:
        """True on the rank that logs the job-wide messages."""
        return self.global_rank == 0

    def fields(self) -> dict[str, float]:
        """This rank's limit fields for the gathered vector."""
        low_w, high_w = self.range_w
        return {
            "limit_w": self.limit_w if self.mode != MODE_NONE else 0.0,
            "min_limit_w": low_w,
            "max_limit_w": high_w,
            "mode": self.mode,
        }

    def summary(self) -> dict[str, Any]:
        """The ``power_shifting`` entry of a DDP summary."""
        return {
            "enabled": self.shift_power,
            "job_budget_w": self.budget_w,
            "rounds": self.decisions,
        }

    # -- a job-wide power cap --------------------------------------------------------------
    def attach_power_cap(self, cap: PowerCapController | None) -> None:
        """Use a job-wide cap: ``per="job"`` turns shifting on, ``per="device"`` off.

        With ``per="job"`` the cap owns the limits (and their restoration); this object
        only hands the rank its share through ``cap.set_rank_budget_w``.
        """
        if cap is None:
            return
        if cap.per == "job" and not self.measure_wait:
            if self.is_global_zero:
                logger.warning(
                    "PowerBudget(per='job') is split equally between ranks: power shifting "
                    "needs measure_wait=True on SustainDDPStrategy."
                )
        elif cap.per == "job":
            self.power_cap = cap
            self.shift_power = True
        elif self.shift_power:
            if self.is_global_zero:
                logger.warning(
                    "PowerBudget(per='device') fixes every device's limit at %.0f W, so power "
                    "shifting is off. Use PowerBudget(per='job') to let the strategy move "
                    "power between ranks inside the job's budget.",
                    cap.watts,
                )
            self.shift_power = False

    # -- probing, applying, restoring ------------------------------------------------------
    def probe(self) -> None:
        """Find whether this rank can set hardware limits, else whether it can throttle."""
        gpu = self.gpu
        self.mode = MODE_NONE
        if gpu is None:
            return
        try:
            self.range_w = gpu.power_limit_range_w()
            self.limit_w = gpu.power_limit_w()
        except PowerLimitError as exc:
            warn_once(
                "ddp-limits-unreadable", "Power limits of %s are unreadable: %s", gpu.uuid, exc
            )
            return
        cap = self.power_cap
        if cap is not None:
            self.mode = MODE_HARDWARE if cap.report.mode == "hardware" else MODE_SOFTWARE
            share_w = cap.rank_budget_w
            if isinstance(share_w, (int, float)) and share_w > 0:
                self.limit_w = float(share_w)
            return
        if self.guard is None:
            self.guard = PowerLimitGuard([gpu])
        try:
            if self.guard.can_set_limits(gpu):  # sets the limit to itself: nothing journaled
                self.mode = MODE_HARDWARE
                ensure_sigterm_handler()
            else:
                logger.info(
                    "Rank power limits cannot be set on %s (NVML NO_PERMISSION; needs root): "
                    "this rank is throttled in software when power is shifted.",
                    gpu.uuid,
                )
                self.mode = MODE_SOFTWARE
        except PowerLimitError as exc:
            warn_once("ddp-limit-failed", "Cannot set the power limit of %s: %s", gpu.uuid, exc)
            self.mode = MODE_SOFTWARE

    def apply(self, limit_w: float) -> None:
        """Put this rank's limit at ``limit_w`` (hardware, the cap's share or throttle)."""
        if self.power_cap is not None:
            try:
                self.power_cap.set_rank_budget_w(limit_w)
                self.limit_w = float(limit_w)
            except (RuntimeError, ValueError, PowerLimitError) as exc:
                warn_once("ddp-budget-callback", "PowerBudget refused the new share: %s", exc)
            return
        if self.mode == MODE_HARDWARE and self.guard is not None and self.gpu is not None:
            try:
                self.limit_w = self.guard.set_limit_w(self.gpu, limit_w)
            except PowerLimitError as exc:
                warn_once(
                    "ddp-limit-set",
                    "Setting the power limit failed (%s); this rank is throttled in software.",
                    exc,
                )
                self.mode = MODE_SOFTWARE
        if self.mode == MODE_SOFTWARE:
            self.limit_w = float(limit_w)
            if self.throttle is None:
                self.throttle = SoftwareThrottle(target_power_w=self.limit_w)
                self._throttle_mark_s = time.monotonic()
            else:
                self.throttle.set_target_w(self.limit_w)

    def restore(self) -> None:
        """Put back every limit this rank set (idempotent; a job-wide cap restores its own)."""
        if self.guard is not None:
            failed = self.guard.restore()
            self.guard.close()
            self.guard = None
            if not failed and self.mode == MODE_HARDWARE:
                logger.info("Power limits restored.")
        self.throttle = None

    def throttle_after_step(self, meter: EnergyMeter | None) -> float:
        """Software mode: sleep the idle time the throttle decides from the GPU's energy."""
        throttle, gpu = self.throttle, self.gpu
        if meter is None or gpu is None or throttle is None or self._throttle_mark_s is None:
            return 0.0
        sleep_s, self._throttle_mark_s = throttle_from_meter(
            throttle, meter, self._throttle_mark_s, device_ids=[gpu.info.device_id]
        )
        if sleep_s > 0:
            time.sleep(sleep_s)
        return sleep_s

    # -- shifting --------------------------------------------------------------------------
    def _job_budget_w(self, ranks: Rows) -> float:
        """The job budget: the argument, a job-wide cap, or the current sum of limits."""
        candidates: list[tuple[float, str]] = []
        if self.job_power_budget_w is not None:
            candidates.append((self.job_power_budget_w, "job_power_budget_w"))
        if self.power_cap is not None:
            candidates.append((float(self.power_cap.watts), "PowerBudget(per='job')"))
        if candidates:
            budget_w, source = min(candidates)
            if len({round(c[0], 3) for c in candidates}) > 1 and self.is_global_zero:
                logger.warning(
                    "Two job power budgets were given (%s); the lower one, %.0f W from %s, "
                    "is used.",
                    ", ".join(f"{w:.0f} W from {s}" for w, s in candidates),
                    budget_w,
                    source,
                )
            return budget_w
        budget_w = sum(r["limit_w"] for r in ranks)
        if self.is_global_zero:
            logger.warning(
                "Power shifting was requested (shift_power=True) without a job power budget "
                "(job_power_budget_w or PowerBudget(per='job')). The budget is the sum of the "
                "devices' current limits, %.0f W: power moves between ranks, the job never "
                "draws more than before. Set job_power_budget_w to cap the job.",
                budget_w,
            )
        return budget_w

    def start(self, gather: Callable[[], Rows], barrier: Callable[[], None]) -> None:
        """Probe every rank (one gather), decide the budget and the initial limits."""
        self.probe()
        ranks = gather()
        modes = [r["mode"] for r in ranks]
        if all(m == MODE_NONE for m in modes):
            if self.is_global_zero:
                logger.warning(
                    "Power shifting is off: no rank has a GPU whose power limit can be read "
                    "(NVML unavailable or no GPU). Training continues without shifting."
                )
            self.shift_power = False
            return
        if self.is_global_zero:
            _warn_about_modes(ranks)
        self.budget_w = self._job_budget_w(ranks)
        states = rank_states(ranks)
        limits = self.policy.initial_limits(states, self.budget_w)
        self._apply_in_order(limits, states, barrier)
        if self.is_global_zero:
            logger.info(
                "Power shifting on: job budget %.0f W, initial limits %s W.",
                self.budget_w,
                [round(v) for v in limits],
            )

    def rebalance(self, ranks: Rows, barrier: Callable[[], None]) -> None:
        """One re-balancing round from the rows every rank gathered (the same everywhere)."""
        if self.budget_w is None:
            return
        decision = self.policy.rebalance(rank_states(ranks), self.budget_w)
        self.decisions += 1
        self._apply_in_order(list(decision.limits_w), rank_states(ranks), barrier)
        if decision.changed and self.is_global_zero:
            logger.info(
                "Power shifted (critical rank %d): limits %s W, total %.0f W of %.0f W.",
                decision.critical_rank,
                [round(v) for v in decision.limits_w],
                decision.total_w,
                decision.budget_w,
            )

    def _apply_in_order(
        self, limits_w: list[float], states: list[RankPowerState], barrier: Callable[[], None]
    ) -> None:
        """Apply this rank's new limit: every decrease happens before any increase.

        Every rank computes the same decision, so all know whether some rank raises its
        limit; if one does, a barrier separates the decreases from the increases and the
        sum of the limits in force never exceeds the budget, even for a moment.
        """
        mine = limits_w[self.global_rank]
        active = self.mode != MODE_NONE
        if active and mine < self.limit_w - 0.5:
            self.apply(mine)
        raising = any(
            s.adjustable and new > s.limit_w + 0.5 for new, s in zip(limits_w, states, strict=True)
        )
        if raising:
            barrier()
            if active and mine > self.limit_w + 0.5:
                self.apply(mine)
        if self.mode == MODE_SOFTWARE and self.throttle is None:
            self.apply(mine)
