"""PowerBudget: a cap on the watts a training run draws, enforced, not just reported.

Thin glue: the hardware cap is :class:`~lightning_sustain.budget.limits.PowerLimitGuard`
(NVML power limits that always come back), the software cap is
:class:`~lightning_sustain.budget.throttle.SoftwareThrottle` (idle time between steps,
sized by feedback on measured power), measurement is
:class:`~lightning_sustain.energy.meter.EnergyMeter`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_sustain._deprecation import renamed_argument
from lightning_sustain.budget.limits import PowerLimitGuard, ensure_sigterm_handler
from lightning_sustain.budget.shares import device_share_w
from lightning_sustain.budget.throttle import SoftwareThrottle
from lightning_sustain.callbacks._devices import (
    CpuSelection,
    GpuSelection,
    process_gpu_indices,
    validate_cpu_selection,
    validate_gpu_selection,
)
from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.energy.discovery import open_devices
from lightning_sustain.energy.errors import (
    PowerLimitError,
    PowerLimitPermissionError,
)
from lightning_sustain.energy.estimate import DEFAULT_WATTS_PER_CORE, validate_positive
from lightning_sustain.energy.meter import EnergyMeter
from lightning_sustain.energy.nvml import NvmlGpu, open_gpus

logger = logging.getLogger(__name__)

_METRIC_PREFIX = "power_budget/"


class PowerBudgetError(MisconfigurationException):
    """A PowerBudget cannot be enforced as configured (the message says what to change)."""


@dataclass
class PowerBudgetReport:
    """What a :class:`PowerBudget` enforced in this process.

    Attributes:
        mode: ``"hardware"`` or ``"software"`` (None before fit starts).
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


class PowerBudget(Callback):
    r"""Keep the power a run draws at or below a budget.

    ``hardware`` mode sets the NVML power limit of every GPU this process trains on,
    clamped to the range the device accepts (with a warning when clamping), and puts the
    original limit back when fit ends, when training raises, on KeyboardInterrupt and on
    SIGTERM (a journal covers SIGKILL; see :mod:`lightning_sustain.budget.limits`).
    ``software`` mode keeps the rolling mean power at or below the budget by inserting
    idle time between steps, decided by a feedback controller on measured power; it
    works without root, without NVML (CPU energy is then the measured quantity) and
    with any accelerator. ``auto`` uses hardware where permitted, else software, and says
    which and why in one log line.

    Logged through ``pl_module.log`` every ``log_every_n_steps``:
    ``power_budget/limit_w`` (the limit or target in force), ``power_budget/mean_power_w``
    (measured) and ``power_budget/throttled_s`` (idle time inserted so far).

    Example::

        trainer = Trainer(callbacks=[PowerBudget(watts=250)])

    Args:
        watts: the budget in watts (> 0).
        per: ``"device"``: each device may draw ``watts``; ``"job"``: all ranks together,
            split equally between ranks (and within a rank between its devices).
        mode: ``"auto"``, ``"hardware"`` or ``"software"``.
        nvml_devices: which GPUs to cap: ``"auto"`` (the GPU this process trains on),
            ``"local_rank"``, ``"none"`` or NVML indices.
        gpus: deprecated name of ``nvml_devices``.
        cpu: CPU measurement for software mode on a machine without NVML GPUs: ``"auto"``,
            ``"rapl"``, ``"estimate"`` (``"none"`` disables software mode there).
        watts_per_core: power of one busy core for the CPU estimate, in watts.
        window_s: the window of the mean power the software throttle controls, in seconds.
        max_sleep_s: the longest idle period inserted after one step, in seconds.
        interval_s: sampling interval; None uses each device's preferred interval.

    Raises:
        ValueError: a setting is not valid; the message names it.
    """

    def __init__(
        self,
        watts: float,
        per: Literal["device", "job"] = "device",
        mode: Literal["auto", "hardware", "software"] = "auto",
        nvml_devices: GpuSelection = "auto",
        cpu: CpuSelection = "auto",
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
        window_s: float = 10.0,
        max_sleep_s: float = 2.0,
        interval_s: float | None = None,
        gpus: GpuSelection | None = None,
    ) -> None:
        super().__init__()
        gpus = renamed_argument("PowerBudget", "gpus", gpus, "nvml_devices", nvml_devices)
        self.watts = validate_positive("watts", watts)
        if per not in ("device", "job"):
            raise ValueError(f"per={per!r} is not valid: use 'device' or 'job'.")
        if mode not in ("auto", "hardware", "software"):
            raise ValueError(f"mode={mode!r} is not valid: use 'auto', 'hardware' or 'software'.")
        validate_cpu_selection(cpu)
        self.per = per
        self.mode = mode
        self.gpus = validate_gpu_selection(gpus)
        self.cpu = cpu
        self.watts_per_core = validate_positive("watts_per_core", watts_per_core)
        self.window_s = validate_positive("window_s", window_s)
        self.max_sleep_s = validate_positive("max_sleep_s", max_sleep_s)
        self.interval_s = (
            None if interval_s is None else validate_positive("interval_s", interval_s)
        )

        self.report = PowerBudgetReport()
        self.throttle: SoftwareThrottle | None = None
        self.guard: PowerLimitGuard | None = None
        self.meter: EnergyMeter | None = None
        self._gpus: list[NvmlGpu] = []
        self._device_budget_w: float | None = None
        self._measured_until_s = 0.0
        self._steps = 0
        self._active = False

    # -- shares ------------------------------------------------------------------------
    def device_budget_w(self, world_size: int, devices_in_rank: int) -> float:
        """The budget of one device of a rank under this callback's ``per`` setting.

        ``per="job"`` splits ``watts`` equally between ``world_size`` ranks, then between
        the rank's devices; the DDP power-shifting strategy may replace the split through
        :meth:`set_rank_budget_w`.
        """
        return device_share_w(self.watts, self.per, world_size, max(1, devices_in_rank))

    @property
    def rank_budget_w(self) -> float | None:
        """This process's budget in force (all its devices), in watts; None before fit."""
        return self.report.rank_budget_w

    def set_rank_budget_w(self, watts: float) -> None:
        """Change this process's budget while training (e.g. power shifted between ranks).

        Hardware mode re-applies the device limits (clamped); software mode changes the
        throttle's target. Takes effect from the next step.

        Raises:
            ValueError: a non-positive budget.
            RuntimeError: called before the budget is in force (before ``on_fit_start``).
        """
        watts = validate_positive("watts", watts)
        if not self._active:
            raise RuntimeError(
                "set_rank_budget_w() needs a running fit (call it after on_fit_start)."
            )
        self.report.rank_budget_w = watts
        if self.report.mode == "hardware" and self.guard is not None and self._gpus:
            self._device_budget_w = watts / len(self._gpus)
            self._apply_limits()
        elif self.throttle is not None:
            self.throttle.set_target_w(watts)

    # -- set-up ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        others = [cb for cb in trainer.callbacks if isinstance(cb, PowerBudget) and cb is not self]
        if others:
            raise PowerBudgetError(
                f"{len(others) + 1} PowerBudget callbacks are attached to one Trainer; they "
                "would fight over the same devices. Keep one PowerBudget (use per='device' "
                "or per='job' to say what `watts` covers)."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            return
        self.report = PowerBudgetReport()
        self._steps = 0
        self._active = True
        indices = process_gpu_indices(trainer, self.gpus)
        mode, reason = self.mode, ""
        if self.mode in ("auto", "hardware"):
            mode, reason = self._try_hardware(trainer, indices)
        if mode == "software":
            self._start_software(trainer, indices, reason)
        if self.report.mode == "hardware":
            ensure_sigterm_handler()  # Lightning re-registers its own handler at each fit
        if self.meter is not None:
            self.meter.wait_until_covered(time.monotonic(), timeout_s=0.5)
            self._measured_until_s = self.meter.latest_time_s() or time.monotonic()

    def _try_hardware(self, trainer: pl.Trainer, indices: list[int]) -> tuple[str, str]:
        if not indices:
            reason = "this process trains on no NVML GPU, so no power limit can be set"
            if self.mode == "hardware":
                raise PowerBudgetError(
                    f"PowerBudget(mode='hardware'): {reason}. Use mode='software' (idle time "
                    "between steps) or mode='auto'."
                )
            return "software", reason
        try:
            self._gpus = open_gpus(indices)
        except Exception as exc:  # NVML errors the energy layer does not map (GPU lost)
            if self.mode == "hardware":
                raise PowerBudgetError(f"PowerBudget(mode='hardware'): {exc}") from exc
            return "software", f"the GPU could not be opened through NVML ({exc})"
        self._device_budget_w = self.device_budget_w(trainer.world_size, len(self._gpus))
        self.report.rank_budget_w = self._device_budget_w * len(self._gpus)
        self.guard = PowerLimitGuard(self._gpus)
        try:
            self._apply_limits()
        except PowerLimitError as exc:
            self._close_hardware()
            if self.mode == "hardware":
                what = (
                    "NVML refused to set the power limit (NO_PERMISSION)"
                    if isinstance(exc, PowerLimitPermissionError)
                    else "NVML failed to set the power limit"
                )
                raise PowerBudgetError(
                    f"PowerBudget(mode='hardware', watts={self.watts:g}): {what}: {exc}. The "
                    "devices keep their original limits. Use mode='software' or mode='auto'."
                ) from exc
            if isinstance(exc, PowerLimitPermissionError):
                return "software", "NVML refused to set the power limit (NO_PERMISSION; needs root)"
            return "software", f"NVML failed to set the power limit ({exc})"
        self.report.mode = "hardware"
        self.report.reason = "NVML power limits are permitted"
        limits = ", ".join(f"{w:.0f} W" for w in self.report.limits_w.values())
        logger.info(
            "PowerBudget: hardware mode (NVML power limit %s on %d GPU(s); originals are "
            "restored at the end of fit, on errors and on SIGTERM).",
            limits,
            len(self._gpus),
        )
        self.meter = EnergyMeter(open_devices(indices, cpu="none"), interval_s=self.interval_s)
        return "hardware", ""

    def _apply_limits(self) -> None:
        assert self.guard is not None and self._device_budget_w is not None
        for gpu in self._gpus:
            low_w, high_w = gpu.power_limit_range_w()
            wanted = self._device_budget_w
            if not low_w <= wanted <= high_w:
                logger.warning(
                    "PowerBudget(watts=%g, per=%r): %.1f W for GPU %s is outside the range the "
                    "device accepts [%.0f, %.0f] W; the limit is clamped to %.0f W.",
                    self.watts,
                    self.per,
                    wanted,
                    gpu.uuid,
                    low_w,
                    high_w,
                    min(max(wanted, low_w), high_w),
                )
            self.report.limits_w[gpu.info.device_id] = self.guard.set_limit_w(gpu, wanted)

    def _start_software(self, trainer: pl.Trainer, indices: list[int], reason: str) -> None:
        devices: list[EnergyDevice] = open_devices(indices, cpu="none") if indices else []
        if not devices and self.cpu != "none":
            devices = open_devices([], cpu=self.cpu, watts_per_core=self.watts_per_core)
            measured = "the CPU"
        else:
            measured = f"{len(devices)} GPU(s)"
        if not devices:
            raise PowerBudgetError(
                "PowerBudget(mode='software') has nothing to measure: no NVML GPU and "
                "cpu='none'. Set cpu='auto' or 'estimate'."
            )
        self.meter = EnergyMeter(devices, interval_s=self.interval_s)
        n = len(devices)
        self._device_budget_w = self.device_budget_w(trainer.world_size, n)
        target_w = self._device_budget_w * n
        self.throttle = SoftwareThrottle(
            target_w, window_s=self.window_s, max_sleep_s=self.max_sleep_s
        )
        self.report.mode = "software"
        self.report.rank_budget_w = target_w
        self.report.reason = reason or "mode='software' was asked for"
        if self.mode == "auto":
            logger.info(
                "PowerBudget: software mode (idle time between steps, target %.1f W on %s) "
                "because %s.",
                target_w,
                measured,
                reason,
            )
        else:
            logger.info(
                "PowerBudget: software mode (idle time between steps, target %.1f W on %s).",
                target_w,
                measured,
            )

    # -- hot path ----------------------------------------------------------------------
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._steps += 1
        self.report.steps = self._steps
        if self.throttle is not None and self.meter is not None:
            sleep_s = self._throttle_step()
            if sleep_s > 0:
                time.sleep(sleep_s)
                self.report.throttled_s += sleep_s
        every = max(1, trainer.log_every_n_steps)
        if self._steps % every == 0 and trainer.loggers:
            self._log(pl_module)

    def _throttle_step(self) -> float:
        assert self.throttle is not None and self.meter is not None
        now = time.monotonic()
        covered = self.meter.latest_time_s()
        start = self._measured_until_s
        if covered is None or covered <= start:
            return self.throttle.update(0.0, 0.0, pending_s=max(0.0, now - start), now_s=now)
        covered = min(covered, now)
        energy_j = sum(self.meter.energy_between(start, covered).values())
        self._measured_until_s = covered
        return self.throttle.update(
            max(0.0, energy_j), covered - start, pending_s=now - covered, now_s=now
        )

    def _mean_power_w(self) -> float | None:
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

    def _log(self, pl_module: pl.LightningModule) -> None:
        self.report.mean_power_w = self._mean_power_w()
        if self.report.mode == "hardware":
            limit_w = sum(self.report.limits_w.values())
        else:
            limit_w = self.report.rank_budget_w or 0.0
        metrics = {
            f"{_METRIC_PREFIX}limit_w": float(limit_w),
            f"{_METRIC_PREFIX}throttled_s": float(self.report.throttled_s),
        }
        if self.report.mean_power_w is not None:
            metrics[f"{_METRIC_PREFIX}mean_power_w"] = float(self.report.mean_power_w)
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=True)

    # -- tear-down ---------------------------------------------------------------------
    def _close_hardware(self) -> None:
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        for gpu in self._gpus:
            gpu.close()
        self._gpus = []

    def _finish(self) -> None:
        self._active = False
        self.report.mean_power_w = self._mean_power_w()
        self._close_hardware()
        if self.meter is not None:
            self.meter.close()
            self.meter = None
        logger.info(
            "PowerBudget (%s): budget %.1f W, measured mean %s, %.2f s throttled over %d steps.",
            self.report.mode,
            self.report.rank_budget_w or 0.0,
            "unknown" if self.report.mean_power_w is None else f"{self.report.mean_power_w:.1f} W",
            self.report.throttled_s,
            self.report.steps,
        )
        self.throttle = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_once()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finish_once()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        try:
            self._finish_once()
        except Exception as exc:  # never mask the user's exception
            logger.error("PowerBudget could not finish cleanly after an error: %s", exc)
            self._close_hardware()

    def _finish_once(self) -> None:
        if self._active:
            self._finish()
