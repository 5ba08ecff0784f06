"""PowerBudget: a cap on the watts a training run draws, enforced, not just reported.

Thin Lightning glue over :class:`~lightning_sustain.budget.power_cap.PowerCapController`
(NVML limits through :class:`~lightning_sustain.budget.limits.PowerLimitGuard`, software
throttle, per-rank share, measured mean power): this module maps Trainer hooks to it and
logs its figures through ``pl_module.log``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_sustain._deprecation import renamed_argument
from lightning_sustain.budget.limits import PowerLimitGuard
from lightning_sustain.budget.power_cap import PowerCapController, PowerCapError, PowerCapReport
from lightning_sustain.budget.shares import device_share_w
from lightning_sustain.budget.throttle import SoftwareThrottle
from lightning_sustain.callbacks._devices import (
    CpuSelection,
    GpuSelection,
    process_gpu_indices,
    validate_cpu_selection,
    validate_gpu_selection,
)
from lightning_sustain.energy.estimate import DEFAULT_WATTS_PER_CORE, validate_positive
from lightning_sustain.energy.meter import EnergyMeter

logger = logging.getLogger(__name__)

_METRIC_PREFIX = "power_budget/"

#: What a :class:`PowerBudget` enforced in this process (the controller's report).
PowerBudgetReport = PowerCapReport


class PowerBudgetError(MisconfigurationException):
    """A PowerBudget cannot be enforced as configured (the message says what to change)."""


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
        validate_cpu_selection(cpu)
        # the controller checks every setting (one set of rules, one set of messages)
        checked = PowerCapController(
            watts,
            per,
            mode,
            cpu=cpu,
            watts_per_core=watts_per_core,
            window_s=window_s,
            max_sleep_s=max_sleep_s,
            interval_s=interval_s,
        )
        self.watts = checked.watts
        self.per = checked.per
        self.mode = checked.mode
        self.gpus = validate_gpu_selection(gpus)
        self.cpu = cpu
        self.watts_per_core = checked.watts_per_core
        self.window_s = checked.window_s
        self.max_sleep_s = checked.max_sleep_s
        self.interval_s = checked.interval_s
        #: the controller in force during fit (what strategies look for; None outside fit)
        self.power_cap: PowerCapController | None = None
        self._report = PowerCapReport()

    # -- the controller's state, under the names this callback always had -----------------
    @property
    def report(self) -> PowerCapReport:
        """What this callback enforced (kept after fit ends)."""
        return self.power_cap.report if self.power_cap is not None else self._report

    @property
    def guard(self) -> PowerLimitGuard | None:
        """The hardware limits' guard while in force."""
        return self.power_cap.guard if self.power_cap is not None else None

    @property
    def throttle(self) -> SoftwareThrottle | None:
        """The software throttle while in force."""
        return self.power_cap.throttle if self.power_cap is not None else None

    @property
    def meter(self) -> EnergyMeter | None:
        """The meter of the budgeted devices while in force."""
        return self.power_cap.meter if self.power_cap is not None else None

    # -- shares ------------------------------------------------------------------------
    def device_budget_w(self, world_size: int, devices_in_rank: int) -> float:
        """One device's budget under ``per`` (see :meth:`PowerCapController.device_budget_w`)."""
        return device_share_w(self.watts, self.per, world_size, max(1, devices_in_rank))

    @property
    def rank_budget_w(self) -> float | None:
        """This process's budget in force (all its devices), in watts; None before fit."""
        return self.report.rank_budget_w

    def set_rank_budget_w(self, watts: float) -> None:
        """Change this process's budget while training (power shifted between ranks).

        See :meth:`PowerCapController.set_rank_budget_w`.

        Raises:
            ValueError: a non-positive budget.
            RuntimeError: called before the budget is in force (before ``on_fit_start``).
        """
        watts = validate_positive("watts", watts)
        if self.power_cap is None or not self.power_cap.active:
            raise RuntimeError(
                "set_rank_budget_w() needs a running fit (call it after on_fit_start)."
            )
        self.power_cap.set_rank_budget_w(watts)

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
        if self.power_cap is not None and self.power_cap.active:
            return
        self.power_cap = PowerCapController(
            self.watts,
            self.per,
            self.mode,
            cpu=self.cpu,
            watts_per_core=self.watts_per_core,
            window_s=self.window_s,
            max_sleep_s=self.max_sleep_s,
            interval_s=self.interval_s,
            name="PowerBudget",
            log=logger,
        )
        try:
            self.power_cap.start(process_gpu_indices(trainer, self.gpus), trainer.world_size)
        except PowerCapError as exc:
            self._finish()
            raise PowerBudgetError(str(exc)) from exc.__cause__

    # -- hot path ----------------------------------------------------------------------
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        cap = self.power_cap
        if cap is None or not cap.active:
            return
        cap.after_step()
        every = max(1, trainer.log_every_n_steps)
        if cap.report.steps % every == 0 and trainer.loggers:
            self._log(pl_module, cap)

    def _log(self, pl_module: pl.LightningModule, cap: PowerCapController) -> None:
        cap.report.mean_power_w = cap.mean_power_w()
        metrics = {
            f"{_METRIC_PREFIX}limit_w": cap.limit_w(),
            f"{_METRIC_PREFIX}throttled_s": float(cap.report.throttled_s),
        }
        if cap.report.mean_power_w is not None:
            metrics[f"{_METRIC_PREFIX}mean_power_w"] = float(cap.report.mean_power_w)
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=True)

    # -- tear-down ---------------------------------------------------------------------
    def _finish(self) -> None:
        cap = self.power_cap
        if cap is None:
            return
        self._report = cap.report
        try:
            cap.close()
        finally:
            self.power_cap = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finish()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        cap = self.power_cap
        try:
            self._finish()
        except Exception as exc:  # never mask the user's exception
            logger.error("PowerBudget could not finish cleanly after an error: %s", exc)
            if cap is not None:
                cap.abort()
