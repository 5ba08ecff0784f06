"""Power-cap control for one process, in any loop (no Lightning import).

:class:`PowerCapController` keeps the power a process's devices draw at or below a budget:
NVML power limits through :class:`~lightning_sustain.budget.limits.PowerLimitGuard`
(always restored) where the driver permits them, otherwise idle time between steps sized
by :class:`~lightning_sustain.budget.throttle.SoftwareThrottle` on measured power. It
splits a per-job budget into this rank's share
(:func:`~lightning_sustain.budget.shares.device_share_w`), takes a new share while
running (:meth:`PowerCapController.set_rank_budget_w`, used by power shifting) and
reports the mean power it measured.

The Trainer's :class:`~lightning_sustain.PowerBudget` callback, the DDP strategies and a
plain loop drive it the same way::

    cap = PowerCapController(watts=250)
    cap.start(nvml_indices=[0])
    try:
        for batch in loader:
            train_step(batch)
            cap.after_step()          # software mode: sleeps the idle time it decided
    finally:
        cap.close()                   # hardware limits back to their originals

The two helpers below are the pieces the other power controllers share:
:func:`open_limit_guard` (open GPUs and a guard, probing whether limits may be set) and
:func:`throttle_from_meter` (one throttle update from a meter's sampled curve).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from lightning_sustain.budget.limits import PowerLimitGuard, ensure_sigterm_handler
from lightning_sustain.budget.shares import device_share_w
from lightning_sustain.budget.throttle import SoftwareThrottle
from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.energy.discovery import open_devices
from lightning_sustain.energy.errors import PowerLimitError, PowerLimitPermissionError
from lightning_sustain.energy.estimate import DEFAULT_WATTS_PER_CORE, validate_positive
from lightning_sustain.energy.meter import EnergyMeter
from lightning_sustain.energy.nvml import NvmlGpu, open_gpus

logger = logging.getLogger(__name__)

CapMode = Literal["auto", "hardware", "software"]


class PowerCapError(RuntimeError):
    """A power cap cannot be enforced as configured (the message says what to change)."""


@dataclass
class PowerCapReport:
    """What a :class:`PowerCapController` enforced in this process.

    Attributes:
        mode: ``"hardware"`` or ``"software"`` (None before it starts).
        reason: why this mode was chosen.
        rank_budget_w: this process's budget (all its devices together), in watts.
        limits_w: hardware limit in force per device id (hardware mode).
        mean_power_w: measured mean power of this process's budgeted devices over the
            last ``window_s`` seconds, in watts (None before it is known).
        throttled_s: idle time inserted between steps (software mode), in seconds.
        steps: training steps seen.
    """

    mode: str | None = None
    reason: str = ""
    rank_budget_w: float | None = None
    limits_w: dict[str, float] = field(default_factory=dict)
    mean_power_w: float | None = None
    throttled_s: float = 0.0
    steps: int = 0


def refusal_reason(exc: PowerLimitError) -> str:
    """Why NVML did not set a limit, in the words every power controller logs."""
    if isinstance(exc, PowerLimitPermissionError):
        return "NVML refused to set the power limit (NO_PERMISSION)"
    return f"NVML failed to set the power limit ({exc})"


def open_limit_guard(nvml_indices: Sequence[int], probe: bool = True) -> PowerLimitGuard:
    """Open the GPUs and a :class:`PowerLimitGuard` over them, ready to cap.

    Args:
        nvml_indices: the GPUs.
        probe: set each GPU's limit to its current value, so a refusal shows now and
            nothing changes yet; installs the SIGTERM handler once permitted.

    Returns:
        The guard; its ``devices`` are the opened GPUs (closed by :func:`close_limit_guard`).

    Raises:
        PowerLimitError: the driver refuses (``PowerLimitPermissionError``) or fails;
            every opened GPU is closed again.
    """
    gpus = open_gpus(nvml_indices)
    guard: PowerLimitGuard | None = None
    try:
        guard = PowerLimitGuard(gpus)
        if probe:
            for gpu in gpus:
                guard.set_limit_w(gpu, gpu.power_limit_w())
            ensure_sigterm_handler()
    except BaseException:
        close_limit_guard(guard, gpus)
        raise
    return guard


def close_limit_guard(guard: PowerLimitGuard | None, gpus: Sequence[NvmlGpu] = ()) -> None:
    """Restore and close a guard, then close its GPUs (idempotent)."""
    devices = list(gpus) or (list(guard.devices) if guard is not None else [])
    try:
        if guard is not None:
            guard.close()
    finally:
        for gpu in devices:
            gpu.close()


def throttle_from_meter(
    throttle: SoftwareThrottle,
    meter: EnergyMeter,
    measured_until_s: float,
    now_s: float | None = None,
    device_ids: Sequence[str] | None = None,
) -> tuple[float, float]:
    """Feed a throttle the energy a meter measured since ``measured_until_s``.

    Args:
        throttle: the controller.
        meter: the sampled devices.
        measured_until_s: the end of what the throttle has seen (monotonic seconds).
        now_s: now (``time.monotonic()`` when None).
        device_ids: only these devices count (None: all of the meter's).

    Returns:
        The idle time to insert now, in seconds, and the new ``measured_until_s``.
    """
    now = time.monotonic() if now_s is None else now_s
    covered = meter.latest_time_s()
    if covered is None or covered <= measured_until_s:
        pending = max(0.0, now - measured_until_s)
        return throttle.update(0.0, 0.0, pending_s=pending, now_s=now), measured_until_s
    covered = min(covered, now)
    per_device = meter.energy_between(measured_until_s, covered)
    if device_ids is None:
        energy_j = sum(per_device.values())
    else:
        energy_j = sum(per_device.get(d, 0.0) for d in device_ids)
    sleep_s = throttle.update(
        max(0.0, energy_j), covered - measured_until_s, pending_s=now - covered, now_s=now
    )
    return sleep_s, covered


class PowerCapController:
    """Keep one process's power at or below a budget: NVML caps, else idle time.

    Args:
        watts: the budget in watts (> 0).
        per: ``"device"``: each device may draw ``watts``; ``"job"``: all ranks together,
            split equally between ranks (and within a rank between its devices).
        mode: ``"auto"`` (hardware where permitted, else software), ``"hardware"`` or
            ``"software"``.
        cpu: CPU measurement for software mode without NVML GPUs (``"auto"``,
            ``"rapl"``, ``"estimate"``; ``"none"`` disables software mode there).
        watts_per_core: power of one busy core for the CPU estimate, in watts.
        window_s: the window of the mean power the software throttle controls, seconds.
        max_sleep_s: the longest idle period inserted after one step, in seconds.
        interval_s: sampling interval; None uses each device's preferred interval.
        name: how messages name the owner (e.g. ``"PowerBudget"``).
        log: the logger its messages go to (the front end's, so users filter by it;
            default this module's).

    Raises:
        ValueError: a setting is not valid; the message names it.
    """

    def __init__(
        self,
        watts: float,
        per: Literal["device", "job"] = "device",
        mode: CapMode = "auto",
        *,
        cpu: str = "auto",
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
        window_s: float = 10.0,
        max_sleep_s: float = 2.0,
        interval_s: float | None = None,
        name: str = "PowerCapController",
        log: logging.Logger | None = None,
    ) -> None:
        self.watts = validate_positive("watts", watts)
        if per not in ("device", "job"):
            raise ValueError(f"per={per!r} is not valid: use 'device' or 'job'.")
        if mode not in ("auto", "hardware", "software"):
            raise ValueError(f"mode={mode!r} is not valid: use 'auto', 'hardware' or 'software'.")
        self.per = per
        self.mode = mode
        self.cpu = cpu
        self.watts_per_core = validate_positive("watts_per_core", watts_per_core)
        self.window_s = validate_positive("window_s", window_s)
        self.max_sleep_s = validate_positive("max_sleep_s", max_sleep_s)
        self.interval_s = (
            None if interval_s is None else validate_positive("interval_s", interval_s)
        )
        self.name = name
        self.log = log if log is not None else logger
        self.report = PowerCapReport()
        self.guard: PowerLimitGuard | None = None
        self.throttle: SoftwareThrottle | None = None
        self.meter: EnergyMeter | None = None
        self.gpus: list[NvmlGpu] = []
        self._device_budget_w: float | None = None
        self._measured_until_s = 0.0
        self.active = False

    # -- shares ------------------------------------------------------------------------
    def device_budget_w(self, world_size: int, devices_in_rank: int) -> float:
        """The budget of one device of a rank under ``per`` (``"job"`` splits equally)."""
        return device_share_w(self.watts, self.per, world_size, max(1, devices_in_rank))

    @property
    def rank_budget_w(self) -> float | None:
        """This process's budget in force (all its devices), in watts; None before start."""
        return self.report.rank_budget_w

    def set_rank_budget_w(self, watts: float) -> None:
        """Change this process's budget while running (e.g. power shifted between ranks).

        Hardware mode re-applies the device limits (clamped); software mode changes the
        throttle's target. Takes effect from the next step.

        Raises:
            ValueError: a non-positive budget.
            RuntimeError: called before :meth:`start`.
        """
        watts = validate_positive("watts", watts)
        if not self.active:
            raise RuntimeError(
                "set_rank_budget_w() needs a running fit (call it after on_fit_start)."
            )
        self.report.rank_budget_w = watts
        if self.report.mode == "hardware" and self.guard is not None and self.gpus:
            self._device_budget_w = watts / len(self.gpus)
            self._apply_limits()
        elif self.throttle is not None:
            self.throttle.set_target_w(watts)

    # -- start -------------------------------------------------------------------------
    def start(self, nvml_indices: Sequence[int], world_size: int = 1) -> None:
        """Put the cap in force on these GPUs (or on measured power in software mode).

        Raises:
            PowerCapError: ``mode="hardware"`` where limits cannot be set, or software
                mode with nothing to measure.
        """
        if self.active:
            return
        self.report = PowerCapReport()
        self.active = True
        indices = list(nvml_indices)
        mode, reason = self.mode, ""
        if self.mode in ("auto", "hardware"):
            mode, reason = self._try_hardware(indices, world_size)
        if mode == "software":
            self._start_software(indices, world_size, reason)
        if self.report.mode == "hardware":
            ensure_sigterm_handler()  # Lightning re-registers its own handler at each fit
        if self.meter is not None:
            self.meter.wait_until_covered(time.monotonic(), timeout_s=0.5)
            self._measured_until_s = self.meter.latest_time_s() or time.monotonic()

    def _try_hardware(self, indices: list[int], world_size: int) -> tuple[str, str]:
        if not indices:
            reason = "this process trains on no NVML GPU, so no power limit can be set"
            if self.mode == "hardware":
                raise PowerCapError(
                    f"{self.name}(mode='hardware'): {reason}. Use mode='software' (idle time "
                    "between steps) or mode='auto'."
                )
            return "software", reason
        try:
            self.gpus = open_gpus(indices)
        except Exception as exc:  # NVML errors the energy layer does not map (GPU lost)
            if self.mode == "hardware":
                raise PowerCapError(f"{self.name}(mode='hardware'): {exc}") from exc
            return "software", f"the GPU could not be opened through NVML ({exc})"
        self._device_budget_w = self.device_budget_w(world_size, len(self.gpus))
        self.report.rank_budget_w = self._device_budget_w * len(self.gpus)
        self.guard = PowerLimitGuard(self.gpus)
        try:
            self._apply_limits()
        except PowerLimitError as exc:
            self._close_hardware()
            if self.mode == "hardware":
                what = (
                    refusal_reason(exc)
                    if isinstance(exc, PowerLimitPermissionError)
                    else "NVML failed to set the power limit"
                )
                raise PowerCapError(
                    f"{self.name}(mode='hardware', watts={self.watts:g}): {what}: {exc}. The "
                    "devices keep their original limits. Use mode='software' or mode='auto'."
                ) from exc
            if isinstance(exc, PowerLimitPermissionError):
                return "software", "NVML refused to set the power limit (NO_PERMISSION; needs root)"
            return "software", refusal_reason(exc)
        self.report.mode = "hardware"
        self.report.reason = "NVML power limits are permitted"
        limits = ", ".join(f"{w:.0f} W" for w in self.report.limits_w.values())
        self.log.info(
            "%s: hardware mode (NVML power limit %s on %d GPU(s); originals are "
            "restored at the end of fit, on errors and on SIGTERM).",
            self.name,
            limits,
            len(self.gpus),
        )
        self.meter = EnergyMeter(open_devices(indices, cpu="none"), interval_s=self.interval_s)
        return "hardware", ""

    def _apply_limits(self) -> None:
        assert self.guard is not None and self._device_budget_w is not None
        for gpu in self.gpus:
            low_w, high_w = gpu.power_limit_range_w()
            wanted = self._device_budget_w
            if not low_w <= wanted <= high_w:
                self.log.warning(
                    "%s(watts=%g, per=%r): %.1f W for GPU %s is outside the range the "
                    "device accepts [%.0f, %.0f] W; the limit is clamped to %.0f W.",
                    self.name,
                    self.watts,
                    self.per,
                    wanted,
                    gpu.uuid,
                    low_w,
                    high_w,
                    min(max(wanted, low_w), high_w),
                )
            self.report.limits_w[gpu.info.device_id] = self.guard.set_limit_w(gpu, wanted)

    def _start_software(self, indices: list[int], world_size: int, reason: str) -> None:
        devices: list[EnergyDevice] = open_devices(indices, cpu="none") if indices else []
        if not devices and self.cpu != "none":
            devices = open_devices([], cpu=self.cpu, watts_per_core=self.watts_per_core)
            measured = "the CPU"
        else:
            measured = f"{len(devices)} GPU(s)"
        if not devices:
            raise PowerCapError(
                f"{self.name}(mode='software') has nothing to measure: no NVML GPU and "
                "cpu='none'. Set cpu='auto' or 'estimate'."
            )
        self.meter = EnergyMeter(devices, interval_s=self.interval_s)
        n = len(devices)
        self._device_budget_w = self.device_budget_w(world_size, n)
        target_w = self._device_budget_w * n
        self.throttle = SoftwareThrottle(
            target_w, window_s=self.window_s, max_sleep_s=self.max_sleep_s
        )
        self.report.mode = "software"
        self.report.rank_budget_w = target_w
        self.report.reason = reason or "mode='software' was asked for"
        because = f" because {reason}" if self.mode == "auto" else ""
        self.log.info(
            "%s: software mode (idle time between steps, target %.1f W on %s)%s.",
            self.name,
            target_w,
            measured,
            because,
        )

    # -- per step ----------------------------------------------------------------------
    def after_step(self, sleep: bool = True) -> float:
        """Count a step; in software mode decide (and by default sleep) the idle time.

        Returns:
            The idle time decided, in seconds (0 in hardware mode).
        """
        self.report.steps += 1
        if self.throttle is None or self.meter is None:
            return 0.0
        sleep_s, self._measured_until_s = throttle_from_meter(
            self.throttle, self.meter, self._measured_until_s
        )
        if sleep_s > 0:
            if sleep:
                time.sleep(sleep_s)
            self.report.throttled_s += sleep_s
        return sleep_s

    def mean_power_w(self) -> float | None:
        """Measured mean power of the budgeted devices over the last ``window_s``, watts."""
        if self.meter is None:
            return None
        if self.throttle is not None:
            return self.throttle.mean_power_w
        total, known = 0.0, False
        for stream in self.meter.streams:
            latest, first = stream.latest_time_s, stream.first_time_s
            if latest is None or first is None or latest <= first:
                continue
            power = stream.mean_power_w(max(first, latest - self.window_s), latest)
            if power is not None:
                total, known = total + power, True
        return total if known else None

    def limit_w(self) -> float:
        """The limit (hardware, summed over devices) or target (software) in force, watts."""
        if self.report.mode == "hardware":
            return float(sum(self.report.limits_w.values()))
        return float(self.report.rank_budget_w or 0.0)

    # -- end ---------------------------------------------------------------------------
    def _close_hardware(self) -> None:
        guard, gpus = self.guard, self.gpus
        self.guard, self.gpus = None, []
        close_limit_guard(guard, gpus)

    def close(self) -> None:
        """Restore every limit, stop measuring and log what was enforced (idempotent)."""
        if not self.active:
            return
        self.active = False
        try:
            self.report.mean_power_w = self.mean_power_w()
        finally:
            self._close_hardware()
            if self.meter is not None:
                self.meter.close()
                self.meter = None
            self.throttle = None
        mean = self.report.mean_power_w
        self.log.info(
            "%s (%s): budget %.1f W, measured mean %s, %.2f s throttled over %d steps.",
            self.name,
            self.report.mode,
            self.report.rank_budget_w or 0.0,
            "unknown" if mean is None else f"{mean:.1f} W",
            self.report.throttled_s,
            self.report.steps,
        )

    def abort(self) -> None:
        """Restore the hardware limits only (an error path that must not fail again)."""
        self._close_hardware()
