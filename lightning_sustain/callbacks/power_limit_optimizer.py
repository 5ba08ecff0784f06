"""PowerLimitOptimizer: profile a few GPU power limits during the first steps, keep the best.

Thin glue over :mod:`lightning_sustain.budget.optimizer` (the choice),
:class:`~lightning_sustain.budget.limits.PowerLimitGuard` (limits that always come back)
and :class:`~lightning_sustain.energy.meter.EnergyMeter` (energy per profiled phase).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_sustain._deprecation import renamed_argument
from lightning_sustain.budget.limits import PowerLimitGuard, ensure_sigterm_handler
from lightning_sustain.budget.optimizer import (
    OBJECTIVES,
    LimitProfile,
    candidate_limits_w,
    choose_limit,
)
from lightning_sustain.callbacks._devices import (
    GpuSelection,
    process_gpu_indices,
    validate_gpu_selection,
)
from lightning_sustain.energy.discovery import open_devices
from lightning_sustain.energy.errors import PowerLimitError
from lightning_sustain.energy.estimate import as_int, as_number, validate_positive
from lightning_sustain.energy.meter import EnergyMeter
from lightning_sustain.energy.nvml import NvmlGpu, open_gpus

logger = logging.getLogger(__name__)


class PowerLimitOptimizer(Callback):
    r"""Find the GPU power limit that best serves an objective, within an allowed slowdown.

    After ``warmup_steps`` steps, each candidate limit is in force for
    ``steps_per_limit`` steps. Energy (measured) and time per step are recorded for each.
    The callback then keeps the limit that minimises energy per step (``"energy"``),
    time per step (``"time"``) or energy x time (``"balanced"``), among the limits at
    most ``max_slowdown`` slower than the fastest one. The original limits come back at
    the end of fit, on errors and on SIGTERM, as with :class:`PowerBudget`. Without
    permission to set limits it warns once and does nothing.

    Example::

        trainer = Trainer(callbacks=[PowerLimitOptimizer(objective="energy")])

    Args:
        objective: ``"energy"``, ``"time"`` or ``"balanced"``.
        max_slowdown: the allowed extra time per step, as a fraction of the fastest.
        limits_w: the limits to profile; None: 100, 90, 80, 70 and 60% of the default
            limit, clamped to the device's range.
        warmup_steps: steps before profiling starts (>= 1; the first step is start-up).
        steps_per_limit: steps measured at each limit.
        nvml_devices: which GPUs (see :class:`EnergyMonitor`).
        gpus: deprecated name of ``nvml_devices``.

    Raises:
        ValueError: a setting is not valid; the message names it.
    """

    def __init__(
        self,
        objective: Literal["energy", "time", "balanced"] = "energy",
        max_slowdown: float = 0.1,
        limits_w: list[float] | None = None,
        warmup_steps: int = 3,
        steps_per_limit: int = 5,
        nvml_devices: GpuSelection = "auto",
        gpus: GpuSelection | None = None,
    ) -> None:
        super().__init__()
        gpus = renamed_argument("PowerLimitOptimizer", "gpus", gpus, "nvml_devices", nvml_devices)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is not one of {', '.join(OBJECTIVES)}.")
        max_slowdown = as_number("max_slowdown", max_slowdown)
        if not 0 <= max_slowdown < 10:
            raise ValueError(f"max_slowdown must be in [0, 10), got {max_slowdown!r}.")
        for name, value, low in (
            ("warmup_steps", warmup_steps, 1),
            ("steps_per_limit", steps_per_limit, 1),
        ):
            if as_int(name, value) < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        warmup_steps, steps_per_limit = int(warmup_steps), int(steps_per_limit)
        if limits_w is not None:
            if isinstance(limits_w, (str, bytes)) or not len(limits_w):
                raise ValueError(
                    f"limits_w must be a non-empty list of watts > 0, got {limits_w!r}."
                )
            limits_w = [validate_positive(f"limits_w[{i}]", w) for i, w in enumerate(limits_w)]
        self.objective = objective
        self.max_slowdown = float(max_slowdown)
        self.limits_w = None if limits_w is None else [float(w) for w in limits_w]
        self.warmup_steps = warmup_steps
        self.steps_per_limit = steps_per_limit
        self.gpus = validate_gpu_selection(gpus)

        self.profiles: list[LimitProfile] = []
        self.chosen: LimitProfile | None = None
        self.guard: PowerLimitGuard | None = None
        self.meter: EnergyMeter | None = None
        self._gpus: list[NvmlGpu] = []
        self._candidates: list[float] = []
        self._phases: list[tuple[float, float, float, int]] = []  # limit, start, end, steps
        self._phase_start_s = 0.0
        self._phase_steps = 0
        self._steps = 0
        self._active = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning_sustain.callbacks.power_budget import PowerBudget

        if any(isinstance(cb, PowerBudget) for cb in trainer.callbacks):
            raise MisconfigurationException(
                "PowerLimitOptimizer and PowerBudget both set GPU power limits; use one of them "
                "(PowerBudget to cap watts, PowerLimitOptimizer to minimise energy)."
            )
        if sum(isinstance(cb, PowerLimitOptimizer) for cb in trainer.callbacks) > 1:
            raise MisconfigurationException("Use at most one PowerLimitOptimizer per Trainer.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.profiles, self.chosen, self._phases, self._steps = [], None, [], 0
        indices = process_gpu_indices(trainer, self.gpus)
        if not indices:
            logger.warning("PowerLimitOptimizer: no NVML GPU for this process; nothing to tune.")
            return
        try:
            self._gpus = open_gpus(indices)
            gpu = self._gpus[0]
            low_w, high_w = gpu.power_limit_range_w()
            self._candidates = (
                sorted({min(max(w, low_w), high_w) for w in self.limits_w}, reverse=True)
                if self.limits_w is not None
                else candidate_limits_w(gpu.default_power_limit_w(), low_w, high_w)
            )
        except Exception as exc:  # NVML trouble: tuning is optional, training goes on
            logger.warning("PowerLimitOptimizer disabled: %s", exc)
            self._close()
            return
        self.guard = PowerLimitGuard(self._gpus)
        ensure_sigterm_handler()
        self.meter = EnergyMeter(open_devices(indices, cpu="none"))
        self._active = True
        logger.info(
            "PowerLimitOptimizer: profiling limits %s W for %d steps each (objective=%r, "
            "max_slowdown=%.0f%%).",
            ", ".join(f"{w:.0f}" for w in self._candidates),
            self.steps_per_limit,
            self.objective,
            100 * self.max_slowdown,
        )

    def _set_all(self, limit_w: float) -> bool:
        assert self.guard is not None
        try:
            for gpu in self._gpus:
                self.guard.set_limit_w(gpu, limit_w)
        except PowerLimitError as exc:
            logger.warning(
                "PowerLimitOptimizer disabled: %s The original limits are restored.", exc
            )
            self._close()
            return False
        return True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._active or self.chosen is not None:
            return
        self._steps += 1
        now = time.monotonic()
        if self._steps < self.warmup_steps:
            return
        if self._steps > self.warmup_steps:
            self._phase_steps += 1
            if self._phase_steps < self.steps_per_limit:
                return
            limit = self._candidates[len(self._phases)]
            self._phases.append((limit, self._phase_start_s, now, self._phase_steps))
            if len(self._phases) == len(self._candidates):
                self._decide()
                return
        # the next phase starts now (the first one right after the warm-up)
        if self._set_all(self._candidates[len(self._phases)]):
            self._phase_start_s = time.monotonic()
            self._phase_steps = 0

    def _decide(self) -> None:
        assert self.meter is not None
        self.meter.wait_until_covered(self._phases[-1][2], timeout_s=1.0)
        for limit, start, end, steps in self._phases:
            energy_j = sum(self.meter.energy_between(start, end).values())
            self.profiles.append(
                LimitProfile(limit, energy_j / steps, (end - start) / steps, steps)
            )
        self.chosen = choose_limit(self.profiles, self.objective, self.max_slowdown)
        if not self._set_all(self.chosen.limit_w):
            return
        base = max(self.profiles, key=lambda p: p.limit_w)
        logger.info(
            "PowerLimitOptimizer: keeping %.0f W (%.1f J/step, %.1f ms/step; at %.0f W: "
            "%.1f J/step, %.1f ms/step).",
            self.chosen.limit_w,
            self.chosen.energy_per_step_j,
            1000 * self.chosen.time_per_step_s,
            base.limit_w,
            base.energy_per_step_j,
            1000 * base.time_per_step_s,
        )

    def _close(self) -> None:
        self._active = False
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        for gpu in self._gpus:
            gpu.close()
        self._gpus = []
        if self.meter is not None:
            self.meter.close()
            self.meter = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()
