"""EnergyBudget: stop (or raise, or warn) before a run spends more than its energy or CO2e.

A thin Lightning adapter. The budget's logic (spent energy, the next-step, checkpoint and
validation reserves, the decision, the resume state) is
:class:`~lightning_sustain.budget.energy_budget.EnergyBudgetCore`, shared with Fabric and
plain loops (:meth:`EnergyRun.attach_budget <lightning_sustain.run.EnergyRun.attach_budget>`);
measurement is :class:`~lightning_sustain.energy.meter.EnergyMeter` (its curves are shared
with any :class:`EnergyMonitor` on the same devices); the forecast is
:mod:`lightning_sustain.budget.forecast`. This module translates hooks into calls, writes
the checkpoint, sets ``trainer.should_stop`` and logs.
"""

from __future__ import annotations

import io
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_sustain._compat import can_stop_early
from lightning_sustain._deprecation import renamed_argument
from lightning_sustain.budget.energy_budget import (
    BudgetCheck,
    BudgetExceeded,
    EnergyBudgetCore,
    ReduceSum,
)
from lightning_sustain.budget.forecast import EnergyForecast, forecast_energy
from lightning_sustain.callbacks._devices import (
    CpuSelection,
    GpuSelection,
    open_process_devices,
    validate_cpu_selection,
    validate_gpu_selection,
)
from lightning_sustain.energy.carbon import (
    JOULES_PER_KWH,
    CarbonIntensity,
    co2e_g,
    joules_to_kwh,
    resolve_carbon_intensity,
)
from lightning_sustain.energy.estimate import (
    DEFAULT_WATTS_PER_CORE,
    as_int,
    validate_positive,
    validate_positive_int,
)
from lightning_sustain.energy.meter import EnergyMeter

__all__ = ["BudgetExceeded", "EnergyBudget"]

logger = logging.getLogger(__name__)

_METRIC_PREFIX = "energy_budget/"
# the trial checkpoint goes to fsspec's in-memory file system (never to disk)
_TRIAL_PATH = "memory://lightning_sustain-budget-trial/trial.ckpt"


def _remove_trial() -> None:
    try:
        import fsspec

        fsspec.filesystem("memory").rm(_TRIAL_PATH.split("://", 1)[1])
    except Exception:  # nothing was written
        pass


class EnergyBudget(Callback):
    r"""Enforce a budget on a run's energy (kWh) or CO2e (grams).

    Energy is measured on the devices this process trains on (NVML GPUs; the CPU through
    RAPL or an estimate) from the start of training, summed over all ranks, and carried
    across resumes through the checkpoint. After ``forecast_after_steps`` steps the
    whole run's energy and CO2e are forecast from the measured energy per step and the
    Trainer's planned steps (``max_steps`` / ``max_epochs`` and the dataloader length),
    logged, and a warning names the number of steps that fit when the forecast exceeds
    the budget.

    Before the next step would cross the budget:

    - ``action="stop"``: a checkpoint is saved through ``Trainer.save_checkpoint`` and
      training stops gracefully (``trainer.should_stop``, all ranks agreeing through
      ``reduce_boolean_decision``). Resuming from it continues counting.
    - ``action="raise"``: the same checkpoint, then :class:`BudgetExceeded`.
    - ``action="warn"``: training continues; a warning says so (once).

    Logged through the Trainer's loggers: ``energy_budget/spent_kwh``,
    ``energy_budget/spent_co2e_g``, ``energy_budget/remaining_fraction`` and, once
    known, ``energy_budget/forecast_kwh`` and ``energy_budget/forecast_co2e_g``.

    Example::

        trainer = Trainer(callbacks=[EnergyBudget(max_kwh=2.0, action="stop")])

    Args:
        max_kwh: the energy budget in kWh (IT energy, as measured). Exclusive with
            ``max_co2e_g``.
        max_co2e_g: the budget in grams of CO2e, converted with the carbon intensity and
            ``pue``.
        action: ``"stop"``, ``"warn"`` or ``"raise"``.
        forecast_after_steps: steps of warm-up before the forecast (>= 2; the first step
            is excluded from the energy per step).
        carbon_intensity_g_per_kwh: grid intensity in gCO2e/kWh; exclusive with ``country``.
        country: ISO 3166 code looked up in the shipped table; neither given: world average.
        pue: the data centre's power usage effectiveness (>= 1.0), applied to CO2e.
        nvml_devices: which GPUs to count (see :class:`EnergyMonitor`).
        gpus: deprecated name of ``nvml_devices``.
        cpu: CPU measurement: ``"auto"``, ``"rapl"``, ``"estimate"`` or ``"none"``.
        watts_per_core: power of one busy core for the CPU estimate, in watts.
        check_every_n_steps: how often the budget is checked (a small all-reduce under
            DDP); the check looks that many steps ahead. None: every step on one
            process, every ``log_every_n_steps`` under DDP.
        checkpoint_dir: where the stop checkpoint goes; None: the ModelCheckpoint's
            directory, else ``<default_root_dir>/checkpoints``.
        interval_s: sampling interval; None uses each device's preferred interval.

    Raises:
        ValueError: a setting is not valid; the message names it.
    """

    def __init__(
        self,
        max_kwh: float | None = None,
        max_co2e_g: float | None = None,
        action: Literal["stop", "warn", "raise"] = "stop",
        forecast_after_steps: int = 10,
        carbon_intensity_g_per_kwh: float | None = None,
        country: str | None = None,
        pue: float = 1.0,
        nvml_devices: GpuSelection = "auto",
        cpu: CpuSelection = "auto",
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
        check_every_n_steps: int | None = None,
        checkpoint_dir: str | None = None,
        interval_s: float | None = None,
        gpus: GpuSelection | None = None,
    ) -> None:
        super().__init__()
        gpus = renamed_argument("EnergyBudget", "gpus", gpus, "nvml_devices", nvml_devices)
        if (max_kwh is None) == (max_co2e_g is None):
            raise ValueError(
                "EnergyBudget needs exactly one of max_kwh (energy) or max_co2e_g (emissions)."
            )
        self.carbon: CarbonIntensity = resolve_carbon_intensity(carbon_intensity_g_per_kwh, country)
        self.pue = validate_positive("pue", pue)
        if self.pue < 1.0:
            raise ValueError(f"pue must be >= 1.0 (facility energy / IT energy), got {pue!r}.")
        self.max_kwh = None if max_kwh is None else validate_positive("max_kwh", max_kwh)
        self.max_co2e_g = (
            None if max_co2e_g is None else validate_positive("max_co2e_g", max_co2e_g)
        )
        if self.max_co2e_g is not None and self.carbon.g_co2e_per_kwh <= 0:
            raise ValueError(
                "max_co2e_g cannot be enforced with a carbon intensity of 0 gCO2e/kWh: every "
                "run would fit. Use max_kwh, or give the real carbon_intensity_g_per_kwh."
            )
        if action not in ("stop", "warn", "raise"):
            raise ValueError(f"action={action!r} is not valid: use 'stop', 'warn' or 'raise'.")
        self.action = action
        try:
            forecast_ok = as_int("forecast_after_steps", forecast_after_steps) >= 2
        except ValueError:
            forecast_ok = False
        if not forecast_ok:
            raise ValueError(
                f"forecast_after_steps must be an integer >= 2, got {forecast_after_steps!r}."
            )
        self.forecast_after_steps = int(forecast_after_steps)
        self.gpus = validate_gpu_selection(gpus)
        self.cpu = validate_cpu_selection(cpu)
        self.watts_per_core = validate_positive("watts_per_core", watts_per_core)
        self.check_every_n_steps = validate_positive_int("check_every_n_steps", check_every_n_steps)
        self.checkpoint_dir = checkpoint_dir
        self.interval_s = (
            None if interval_s is None else validate_positive("interval_s", interval_s)
        )

        self.meter: EnergyMeter | None = None
        self.forecast: EnergyForecast | None = None
        #: the budget's logic (Lightning-free); this callback drives it
        self.core = EnergyBudgetCore(
            self.budget_j, action, budget_text=self._budget_text(), describe=self._describe
        )
        self._warned_forecast = False

    # -- figures kept by the core -----------------------------------------------------------
    @property
    def prior_spent_j(self) -> float:
        """Energy of earlier runs (all ranks), from the checkpoint, in joules."""
        return self.core.prior_spent_j

    @property
    def exceeded(self) -> bool:
        """True once a check said the budget cannot afford another step."""
        return self.core.exceeded

    @property
    def checkpoint_path(self) -> str | None:
        """The checkpoint written before stopping or raising."""
        return self.core.checkpoint_path

    @property
    def checkpoint_energy_j(self) -> float:
        """This process's energy spent writing the stop checkpoint, in joules."""
        return self.core.checkpoint_energy_j

    @property
    def spent_j(self) -> float:
        """Energy counted so far (all ranks at the last check, plus earlier runs), in joules."""
        return self.core.spent_j

    @property
    def budget_j(self) -> float:
        """The budget in joules (CO2e budgets converted with the intensity and PUE)."""
        if self.max_kwh is not None:
            return self.max_kwh * JOULES_PER_KWH
        assert self.max_co2e_g is not None
        return self.max_co2e_g / (self.carbon.g_co2e_per_kwh * self.pue) * JOULES_PER_KWH

    @property
    def state_key(self) -> str:
        # not the budget's value: resuming with a larger budget must find the spent energy
        return self._generate_state_key(unit="kwh" if self.max_kwh is not None else "co2e_g")

    def _describe(self, energy_j: float) -> str:
        kwh = joules_to_kwh(energy_j)
        co2 = co2e_g(energy_j, self.carbon, self.pue)
        return f"{kwh:.6g} kWh ({energy_j:.6g} J, {co2:.4g} g CO2e)"

    def _budget_text(self) -> str:
        if self.max_kwh is not None:
            return f"max_kwh={self.max_kwh:g}"
        return f"max_co2e_g={self.max_co2e_g:g}"

    # -- set-up and tear-down ----------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.meter is not None:
            return
        devices = open_process_devices(trainer, self.gpus, self.cpu, self.watts_per_core)
        if not devices:
            logger.warning(
                "EnergyBudget measures no device (gpus=%r, cpu=%r): the budget cannot be "
                "enforced. Set cpu='estimate' or check the GPU selection.",
                self.gpus,
                self.cpu,
            )
        self.meter = EnergyMeter(devices, interval_s=self.interval_s)
        if self.action != "warn":
            # a process's first checkpoint write pays one-time imports (about a second):
            # pay them here, before the budget counts, not in the stop
            try:
                trainer.strategy.checkpoint_io.save_checkpoint({}, _TRIAL_PATH)
            except Exception as exc:  # only a warm-up
                logger.debug("EnergyBudget: checkpoint warm-up failed: %s", exc)
            finally:
                _remove_trial()

    def _close(self) -> None:
        self.core.stop()
        if self.meter is not None:
            self.meter.close()
            self.meter = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    @staticmethod
    def _reducer(trainer: pl.Trainer) -> ReduceSum | None:
        if trainer.world_size <= 1:
            return None

        def reduce_sum(values: Any) -> list[float]:
            tensor = torch.tensor(
                list(values), dtype=torch.float64, device=trainer.strategy.root_device
            )
            reduced = trainer.strategy.reduce(tensor, reduce_op="sum")
            return [float(v) for v in reduced.cpu().tolist()]

        return reduce_sum

    # -- hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the curves must cover the start before anything is counted; the wait is counted
        self.core.start(self.meter)
        self._warned_forecast = False
        if self.prior_spent_j > 0:
            logger.info(
                "EnergyBudget: resuming with %s already spent of %s.",
                self._describe(self.prior_spent_j),
                self._budget_text(),
            )
        if self.core.resume_would_cross():
            check = BudgetCheck(
                self.prior_spent_j, self.core.prior_reserve_j, self.budget_j, True, True
            )
            self.core.last_check = check
            self._act(trainer, check, save=False)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.core.started:
            return
        now = time.monotonic()
        steps = self.core.step_end(now)
        every = self.check_every_n_steps or (
            1 if trainer.world_size <= 1 else max(1, trainer.log_every_n_steps)
        )
        log_every = max(1, trainer.log_every_n_steps)
        forecast_due = steps >= self.forecast_after_steps and (
            self.forecast is None or steps % log_every == 0
        )
        if steps % every != 0 and not forecast_due:
            return
        check = self.core.check(
            now,
            steps_ahead=every,
            validation_follows=self._validation_follows(trainer, batch_idx, every),
            reduce_sum=self._reducer(trainer),
        )
        if forecast_due:
            self._update_forecast(trainer, check.spent_j)
        if steps % log_every == 0:
            self._log(trainer, check.spent_j)
        decision = trainer.strategy.reduce_boolean_decision(check.would_cross, all=False)
        if decision:
            self._act(trainer, check, save=True)
        elif self.action != "warn" and not self.core.probed:
            due = self.core.probe_due()
            if trainer.world_size > 1:  # the trial write is collective: all or none
                due = trainer.strategy.reduce_boolean_decision(due, all=True)
            if due:
                self._trial_checkpoint(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.core.started and not trainer.sanity_checking:
            self.core.begin("validation")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.core.started and not trainer.sanity_checking:
            # Lightning validates once more when a run stops early: its cost is reserved
            self.core.end("validation")

    # -- reserves that need the Trainer ---------------------------------------------------------
    def _validation_follows(
        self, trainer: pl.Trainer, batch_idx: int | None = None, steps_ahead: int = 1
    ) -> bool:
        """Whether a validation run follows before the next decision.

        Two cases: Lightning validates once more when a run stops early (only ``stop``
        waits for it: ``raise`` ends the run at once, ``warn`` keeps going), when
        validation is enabled and this is a validation epoch; and in any mode, a
        scheduled validation (``val_check_interval``) falls within the next
        ``steps_ahead`` batches, before the next check. Before a validation run was
        measured, each validation batch is bounded by a training step (the batch count is
        handed to the core here).
        """
        try:
            enabled = bool(trainer.enable_validation)
        except Exception:  # no fit loop (a Trainer stub) or no data source yet
            enabled = False
        every = getattr(trainer, "check_val_every_n_epoch", 1)
        if not enabled or (every is not None and (trainer.current_epoch + 1) % every != 0):
            return False
        scheduled = False
        interval = getattr(trainer, "val_check_batch", None)
        if batch_idx is not None and isinstance(interval, int) and interval > 0:
            # Lightning validates after batch b when (b + 1) % interval == 0
            scheduled = any((batch_idx + k) % interval == 0 for k in range(1, steps_ahead + 1))
        if self.action != "stop" and not scheduled:
            return False
        batches = getattr(trainer, "num_val_batches", None) or []
        count = sum(b for b in batches if isinstance(b, (int, float)) and math.isfinite(b))
        limit = getattr(trainer, "limit_val_batches", None)
        if not count and isinstance(limit, int) and not isinstance(limit, bool):
            count = limit  # before the loop knows its batches
        self.core.set_validation_batches(int(count))
        return True

    def _trial_checkpoint(self, trainer: pl.Trainer) -> None:
        """Serialise this run's checkpoint state once to memory and measure what it costs.

        Stopping writes a checkpoint after the decision; its energy must be reserved. The
        trial serialises what Lightning saves (the model, the optimizers and every other
        callback's ``state_dict``, which may wait for its own measurements) with
        ``torch.save`` to memory, without calling any ``on_save_checkpoint`` hook and
        without touching a file, inside the core's idle probe
        (:meth:`EnergyBudgetCore.probe`), which also measures the device's power while no
        training work runs.
        """

        def write() -> None:
            state: dict[str, Any] = {"state_dict": trainer.lightning_module.state_dict()}
            state["optimizer_states"] = [opt.state_dict() for opt in trainer.optimizers]
            state["callbacks"] = [
                cb.state_dict() for cb in trainer.callbacks if cb is not self  # type: ignore[attr-defined]
            ]
            try:  # the strategy's own writer, to memory (fsspec): no file, no hook
                trainer.strategy.checkpoint_io.save_checkpoint(state, _TRIAL_PATH)
            except Exception:
                torch.save(state, io.BytesIO())

        try:
            self.core.probe(write)
        except Exception as exc:  # never stop training because of the estimate
            logger.debug("EnergyBudget could not time a checkpoint write: %s", exc)
        finally:
            _remove_trial()

    # -- forecast and logging ----------------------------------------------------------
    def _update_forecast(self, trainer: pl.Trainer, spent: float) -> None:
        mean_batch_j = self.core.mean_step_j()
        if mean_batch_j is None or mean_batch_j <= 0:
            return
        accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        # the whole job's energy per step: this rank's, scaled by the cluster/rank ratio
        spent_local = self.core.spent_estimate_j(time.monotonic())
        spent_run = spent - self.prior_spent_j
        scale = spent_run / spent_local if spent_local > 0 and spent_run > 0 else 1.0
        step_j = mean_batch_j * accumulate * scale
        planned: int | None = None
        try:
            estimated = trainer.estimated_stepping_batches
        except Exception:  # an iterable dataset without max_steps, or changing accumulation
            estimated = float("inf")
        if isinstance(estimated, (int, float)) and math.isfinite(estimated) and estimated > 0:
            planned = int(estimated)
        forecast = forecast_energy(
            spent_j=spent,
            steps_done=int(trainer.global_step),
            energy_per_step_j=step_j,
            planned_steps=planned,
            budget_j=self.budget_j,
            carbon=self.carbon,
            pue=self.pue,
        )
        first = self.forecast is None
        self.forecast = forecast
        need = "an unknown amount" if forecast.total_j is None else self._describe(forecast.total_j)
        if first:
            logger.info(
                "EnergyBudget forecast after %d steps: %.4g J per step; the run's %s steps "
                "need %s; budget %s.",
                self.core.steps,
                step_j,
                planned if planned is not None else "(unbounded)",
                need,
                self._budget_text(),
            )
        if forecast.exceeds_budget and not self._warned_forecast:
            self._warned_forecast = True
            fit = forecast.steps_fit
            logger.warning(
                "EnergyBudget: the forecast %s exceeds the budget %s; only %s of the %s "
                "planned steps fit. action=%r: %s.",
                self._describe(forecast.total_j or 0.0),
                self._budget_text(),
                fit,
                planned,
                self.action,
                {
                    "stop": "training will checkpoint and stop before the budget is crossed",
                    "raise": "BudgetExceeded will be raised before the budget is crossed",
                    "warn": "training will continue past the budget",
                }[self.action],
            )

    def _log(self, trainer: pl.Trainer, spent: float) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = {
            f"{_METRIC_PREFIX}spent_kwh": joules_to_kwh(spent),
            f"{_METRIC_PREFIX}spent_co2e_g": co2e_g(spent, self.carbon, self.pue),
            f"{_METRIC_PREFIX}remaining_fraction": max(0.0, 1.0 - spent / self.budget_j),
        }
        if self.forecast is not None and self.forecast.total_j is not None:
            metrics[f"{_METRIC_PREFIX}forecast_kwh"] = joules_to_kwh(self.forecast.total_j)
            metrics[f"{_METRIC_PREFIX}forecast_co2e_g"] = co2e_g(
                self.forecast.total_j, self.carbon, self.pue
            )
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    # -- enforcement -------------------------------------------------------------------
    def _checkpoint_file(self, trainer: pl.Trainer) -> Path:
        if self.checkpoint_dir is not None:
            directory = Path(self.checkpoint_dir)
        else:
            callback = trainer.checkpoint_callback
            dirpath = getattr(callback, "dirpath", None) if callback is not None else None
            directory = Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"
        return directory / f"energy-budget-step={trainer.global_step}.ckpt"

    def _act(self, trainer: pl.Trainer, check: BudgetCheck, save: bool) -> None:
        def write() -> str:
            target = self._checkpoint_file(trainer)
            trainer.save_checkpoint(target)
            return str(target)

        self.core.enforce(check, save=write if save else None)  # raises for "raise"
        if self.action != "stop":
            return
        trainer.should_stop = True
        if not can_stop_early(trainer):
            logger.warning(
                "EnergyBudget: min_steps/min_epochs are not reached yet, so Lightning keeps "
                "training; the budget will be exceeded. Lower min_steps/min_epochs or use "
                "action='raise'."
            )

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Energy spent so far by all ranks (plus earlier runs), so a resume keeps counting.

        Measured energy only; see :meth:`EnergyBudgetCore.state_dict`.
        """
        dist = torch.distributed
        reduce_sum: ReduceSum | None = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:

            def reduce_sum(values: Any) -> list[float]:
                tensor = torch.tensor(list(values), dtype=torch.float64)
                if dist.get_backend() == "nccl":
                    tensor = tensor.cuda()
                dist.all_reduce(tensor)
                return [float(v) for v in tensor.cpu().tolist()]

        return self.core.state_dict(reduce_sum)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)
