"""EnergyBudget: stop (or raise, or warn) before a run spends more than its energy or CO2e.

Thin glue: measurement is :class:`~lightning_sustain.energy.meter.EnergyMeter` (shared
with any :class:`EnergyMonitor` on the same devices), the forecast and the per-step
estimate are :mod:`lightning_sustain.budget.forecast`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_sustain._compat import can_stop_early
from lightning_sustain._deprecation import renamed_argument
from lightning_sustain.budget.forecast import (
    EnergyForecast,
    StepEnergyTracker,
    forecast_energy,
    steps_that_fit,
)
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

logger = logging.getLogger(__name__)

_METRIC_PREFIX = "energy_budget/"
_STATE_VERSION = 1


def _upper_quartile(values: deque[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, (3 * len(ordered)) // 4)]


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
        self.prior_spent_j = 0.0  # all ranks, from earlier runs (checkpoint)
        self._prior_step_j = 0.0
        self.forecast: EnergyForecast | None = None
        self.exceeded = False
        self.checkpoint_path: str | None = None
        #: this process's energy spent writing the stop checkpoint, in joules
        self.checkpoint_energy_j = 0.0
        self._reset_run()

    def _measure_checkpoint_cost(self, trainer: pl.Trainer) -> None:
        """Time writing this run's checkpoint (to memory) and price it at the recent power.

        Stopping writes a checkpoint after the decision; its energy must be reserved. The
        trial write serialises the same state Lightning saves (model, optimizers,
        callbacks) with ``torch.save``; the time is priced at the busiest recent power.
        """
        import io

        try:
            start = time.monotonic()
            state = {"state_dict": trainer.lightning_module.state_dict()}
            state["optimizer_states"] = [opt.state_dict() for opt in trainer.optimizers]
            torch.save(state, io.BytesIO())
            elapsed_s = time.monotonic() - start
        except Exception as exc:  # never stop training because of the estimate
            logger.debug("EnergyBudget could not time a checkpoint write: %s", exc)
            return
        power_w = max(self._recent_power_w(), 0.0)
        step_j = self._tracker.next_step_j or 0.0
        # file writes and Lightning's own bookkeeping: at least twice the in-memory time,
        # and never less than a fifth of a step
        self._checkpoint_cost_j = max(2.0 * elapsed_s * power_w, 0.2 * step_j)

    def _reset_run(self) -> None:
        self._checkpoint_cost_j = 0.0
        self._t_start_s: float | None = None
        self._measured_j = 0.0
        self._measured_until_s = 0.0
        self._recent: deque[tuple[float, float]] = deque()  # (duration_s, energy_j)
        self._recent_s = 0.0
        self._tracker = StepEnergyTracker(warmup_steps=1)
        # (batch count, end time) of recent steps: the forecast uses measured energy only
        self._step_ends: deque[tuple[int, float]] = deque(maxlen=512)
        self._step_energies: deque[float] = deque(maxlen=16)  # measured, after warm-up
        # (time, predicted cumulative joules) at step ends, checked once measured
        self._predictions: deque[tuple[float, float]] = deque(maxlen=64)
        self._under_predicted: deque[float] = deque(maxlen=16)
        self._tail_from_steps = False
        self._last_measured_step = 2  # steps 1 and 2 include start-up and a one-time wait
        self._val_start_j: float | None = None
        self._val_j = 0.0
        self._warned_forecast = False
        self._warned_exceeded = False
        self._last_cluster: tuple[float, float] = (0.0, 0.0)
        self._last_local_j = 0.0  # this rank's spent energy at its last step end

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

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.meter is not None:
            self.meter.close()
            self.meter = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.meter is not None:
            self.meter.close()
            self.meter = None

    # -- measurement -------------------------------------------------------------------
    def _spent_run_j(self, now_s: float, at_step_end: bool = False) -> float:
        """This process's energy since training started, in joules.

        Measured energy, plus the unmeasured tail (a counter lags by up to one update
        period). At a step end the tail is predicted from the same tail of earlier, fully
        measured steps (a step's busiest part is often just before its end, so the mean
        power would underestimate it); elsewhere at the recent mean power.
        """
        meter = self.meter
        if meter is None or self._t_start_s is None:
            return self._measured_j
        covered = meter.latest_time_s()
        start = self._measured_until_s
        if covered is not None and covered > start:
            covered = min(covered, now_s)
            increment = sum(meter.energy_between(start, covered).values())
            self._measured_j += max(0.0, increment)
            self._measured_until_s = covered
            self._recent.append((covered - start, max(0.0, increment)))
            self._recent_s += covered - start
            while len(self._recent) > 1 and self._recent_s - self._recent[0][0] >= 1.0:
                self._recent_s -= self._recent.popleft()[0]
        pending_s = max(0.0, now_s - self._measured_until_s)
        if pending_s <= 0:
            return self._measured_j
        if at_step_end:
            tail_j = self._step_tail_j(pending_s)
            self._tail_from_steps = tail_j is not None
            if tail_j is not None:
                return self._measured_j + tail_j
        return self._measured_j + self._recent_power_w() * pending_s

    def _step_tail_j(self, tail_s: float) -> float | None:
        """Mean measured energy of the last ``tail_s`` seconds of recent measured steps."""
        if self.meter is None:
            return None
        start = self._t_start_s or 0.0
        ends = [
            t
            for n, t in list(self._step_ends)[-16:]
            if n >= 1 and t <= self._measured_until_s and t - tail_s >= start
        ][-8:]
        if not ends:
            return None
        total = 0.0
        for t in ends:
            total += sum(self.meter.energy_between(t - tail_s, t).values())
        return total / len(ends)

    def _recent_power_w(self) -> float:
        if self._recent_s > 0:
            return sum(e for _, e in self._recent) / self._recent_s
        if self.meter is None:
            return 0.0
        return sum(p for p in self.meter.power_w().values() if p is not None)

    def _cluster(self, trainer: pl.Trainer, values: list[float]) -> list[float]:
        if trainer.world_size <= 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
        reduced = trainer.strategy.reduce(tensor, reduce_op="sum")
        return [float(v) for v in reduced.cpu().tolist()]

    # -- hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_run()
        now = time.monotonic()
        if self.meter is not None:
            # the curves must cover the start before anything is counted; the wait itself
            # is counted (it is energy this run spends)
            self.meter.wait_until_covered(now, timeout_s=0.5)
        self._measured_until_s = now
        self._t_start_s = now
        self._tracker.start(0.0)
        budget_j = self.budget_j
        if self.prior_spent_j > 0:
            logger.info(
                "EnergyBudget: resuming with %s already spent of %s.",
                self._describe(self.prior_spent_j),
                self._budget_text(),
            )
        if self.prior_spent_j + self._prior_step_j > budget_j:
            self._act(trainer, self.prior_spent_j, self._prior_step_j, save=False)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._t_start_s is None:
            return
        now = time.monotonic()
        if self._tracker.steps == 0 and self.meter is not None:
            # once per run: wait (at most one counter period) until the first step is
            # measured, so every later decision knows what a step costs
            self.meter.wait_until_covered(now, timeout_s=0.5)
        if self._tracker.steps == 2 and self.action != "warn" and self._checkpoint_cost_j == 0:
            self._measure_checkpoint_cost(trainer)
            now = time.monotonic()
        spent_local = self._spent_run_j(now, at_step_end=True)
        self._last_local_j = spent_local
        self._tracker.step(spent_local)
        steps = self._tracker.steps
        self._step_ends.append((steps, now))
        if self._tail_from_steps:
            self._predictions.append((now, spent_local))
        self._measure_finished_steps()
        every = self.check_every_n_steps or (
            1 if trainer.world_size <= 1 else max(1, trainer.log_every_n_steps)
        )
        forecast_due = steps >= self.forecast_after_steps and (
            self.forecast is None or steps % max(1, trainer.log_every_n_steps) == 0
        )
        if steps % every != 0 and not forecast_due:
            return
        # the next steps, the last validation run, and how much the unmeasured tail was
        # recently underestimated (self-calibrating margin for the counter's lag)
        margin_j = _upper_quartile(self._under_predicted) or 0.0
        next_local = (
            (self._next_step_j() or 0.0) * every
            + self._validation_reserve_j(trainer)
            + self._checkpoint_reserve_j()
            + margin_j
        )
        spent_run, lookahead_j = self._cluster(trainer, [spent_local, next_local])
        spent = self.prior_spent_j + spent_run
        self._last_cluster = (spent, lookahead_j)
        if forecast_due:
            self._update_forecast(trainer, spent_local, spent_run, spent)
        if steps % max(1, trainer.log_every_n_steps) == 0:
            self._log(trainer, spent)
        would_cross = spent + lookahead_j > self.budget_j
        decision = trainer.strategy.reduce_boolean_decision(would_cross, all=False)
        if decision and not (self.action == "warn" and self._warned_exceeded):
            self._act(trainer, spent, lookahead_j, save=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t_start_s is not None and not trainer.sanity_checking:
            self._val_start_j = self._spent_run_j(time.monotonic())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start_j is not None:
            # Lightning runs validation once more when a run stops early: keep room for it
            self._val_j = max(0.0, self._spent_run_j(time.monotonic()) - self._val_start_j)
            self._val_start_j = None

    # -- forecast and logging ----------------------------------------------------------
    def _update_forecast(
        self, trainer: pl.Trainer, spent_local: float, spent_run: float, spent: float
    ) -> None:
        mean_batch_j = self._measured_step_j()
        if mean_batch_j is None or mean_batch_j <= 0:
            return
        accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        # the whole job's energy per step: this rank's, scaled by the cluster/rank ratio
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
                self._tracker.steps,
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

    def _measure_finished_steps(self) -> None:
        """Energy of each step whose end the measured curve now covers (exact, not predicted)."""
        if self.meter is None:
            return
        while self._predictions and self._predictions[0][0] <= self._measured_until_s:
            t, predicted_j = self._predictions.popleft()
            later_j = sum(self.meter.energy_between(t, self._measured_until_s).values())
            self._under_predicted.append(max(0.0, self._measured_j - later_j - predicted_j))
        previous: tuple[int, float] | None = None
        for n, t in self._step_ends:
            if t > self._measured_until_s:
                break
            if n > self._last_measured_step and previous is not None and previous[0] == n - 1:
                energy = sum(self.meter.energy_between(previous[1], t).values())
                self._step_energies.append(max(0.0, energy))
                self._last_measured_step = n
            previous = (n, t)

    def _next_step_j(self) -> float | None:
        """A conservative bound on the next step's energy, in joules.

        The largest of the last measured steps, with a 10 % margin (on a busy machine a
        step can take longer than the typical one); before any step is measured, the
        largest predicted one.
        """
        if len(self._step_energies) >= 2:
            return max(self._step_energies) * 1.1
        return self._tracker.next_step_j

    def _validation_reserve_j(self, trainer: pl.Trainer) -> float:
        """Room for the validation run that follows a stop, only when one will follow.

        ``raise`` ends the run at once and ``warn`` keeps going, so only ``stop`` needs
        it, and only when Lightning validates in this epoch (it validates once more when
        a run stops early). Before a validation run was measured, each validation batch
        is bounded by a training step.
        """
        if self.action != "stop":
            return 0.0
        try:
            enabled = bool(trainer.enable_validation)
        except Exception:  # no fit loop (a Trainer stub) or no data source yet
            enabled = False
        every = getattr(trainer, "check_val_every_n_epoch", 1)
        if not enabled or (every is not None and (trainer.current_epoch + 1) % every != 0):
            return 0.0
        if self._val_j > 0:
            return self._val_j * 1.1
        batches = getattr(trainer, "num_val_batches", None) or []
        count = sum(b for b in batches if isinstance(b, (int, float)) and math.isfinite(b))
        return count * (self._next_step_j() or 0.0)

    def _checkpoint_reserve_j(self) -> float:
        """Room for writing the stop checkpoint (``stop`` and ``raise`` save one).

        The cost measured when this run wrote one (a trial write after the warm-up, see
        :meth:`_measure_checkpoint_cost`), with a 50 % margin.
        """
        if self.action == "warn":
            return 0.0
        return self._checkpoint_cost_j * 1.5

    def _measured_step_j(self) -> float | None:
        """Mean energy per step from the measured curve, after the start-up steps."""
        if self.meter is None:
            return None
        covered = self.meter.latest_time_s()
        if covered is None:
            return None
        # from the end of step 2: the first step and the one-time wait after it are start-up
        ends = [(n, t) for n, t in self._step_ends if n >= 2 and t <= covered]
        if len(ends) < 2:
            return None
        (n0, t0), (n1, t1) = ends[0], ends[-1]
        return sum(self.meter.energy_between(t0, t1).values()) / (n1 - n0)

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

    def _act(self, trainer: pl.Trainer, spent: float, lookahead_j: float, save: bool) -> None:
        budget_j = self.budget_j
        over = spent > budget_j
        self.exceeded = True
        if over or lookahead_j > budget_j:
            logger.warning(
                "EnergyBudget: %s spent and ~%.4g J needed for the next step, with a "
                "budget of %s (%s): the budget is smaller than the energy of the first "
                "steps; raise %s.",
                self._describe(spent),
                lookahead_j,
                self._budget_text(),
                self._describe(budget_j),
                "max_kwh" if self.max_kwh is not None else "max_co2e_g",
            )
        if self.action == "warn":
            self._warned_exceeded = True
            logger.warning(
                "EnergyBudget: the next step would exceed the budget %s (spent %s); "
                "action='warn', so training continues past it.",
                self._budget_text(),
                self._describe(spent),
            )
            return
        path: str | None = None
        if save:
            target = self._checkpoint_file(trainer)
            before_j = self._spent_run_j(time.monotonic())
            trainer.save_checkpoint(target)
            path = str(target)
            self.checkpoint_path = path
            # writing the checkpoint is the cost of stopping: say what it was
            self.checkpoint_energy_j = max(0.0, self._spent_run_j(time.monotonic()) - before_j)
            self._checkpoint_cost_j = max(self._checkpoint_cost_j, self.checkpoint_energy_j)
            # the checkpoint's energy is spent too: "spent" stays what a monitor measures
            self._last_cluster = (spent + self.checkpoint_energy_j, self._last_cluster[1])
        fits = steps_that_fit(budget_j - spent, lookahead_j) if lookahead_j > 0 else 0
        message = (
            f"Energy budget {self._budget_text()} reached: {self._describe(spent)} spent of "
            f"{self._describe(budget_j)}; the next step (~{lookahead_j:.4g} J) would cross it "
            f"({fits} more fit)."
        )
        if path is not None:
            message += (
                f" Checkpoint saved to {path} (writing it used ~{self.checkpoint_energy_j:.3g} J "
                "on this process); resume with a larger budget to continue."
            )
        if self.action == "raise":
            raise BudgetExceeded(message, spent, budget_j, path)
        logger.warning("EnergyBudget: %s Stopping.", message)
        trainer.should_stop = True
        if not can_stop_early(trainer):
            logger.warning(
                "EnergyBudget: min_steps/min_epochs are not reached yet, so Lightning keeps "
                "training; the budget will be exceeded. Lower min_steps/min_epochs or use "
                "action='raise'."
            )

    @property
    def spent_j(self) -> float:
        """Energy counted so far (all ranks at the last check, plus earlier runs), in joules."""
        return max(self._last_cluster[0], self.prior_spent_j)

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Energy spent so far by all ranks (plus earlier runs), so a resume keeps counting."""
        local = 0.0
        if self._t_start_s is not None:
            # measured energy only (no predicted tail, no validation estimate): wait at most
            # one counter period until the curves cover now, so a resume counts what was spent
            now = time.monotonic()
            if self.meter is not None:
                self.meter.wait_until_covered(now, timeout_s=0.5)
            self._spent_run_j(now)
            local = self._measured_j
        step_j = self._next_step_j() or 0.0
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            tensor = torch.tensor([local, step_j], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                tensor = tensor.cuda()
            dist.all_reduce(tensor)
            local, step_j = (float(v) for v in tensor.cpu().tolist())
        # what the last check looked ahead (next steps, validation, measurement margin;
        # already summed over ranks), so a resume makes the same decision before a step
        return {
            "version": _STATE_VERSION,
            "spent_j": self.prior_spent_j + local,
            "step_j": max(step_j, self._last_cluster[1]),
            "budget_j": self.budget_j,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION or "spent_j" not in state_dict:
            raise ValueError(
                "The checkpoint's EnergyBudget state is not in a known format; start a new "
                "run or remove the callback state from the checkpoint."
            )
        self.prior_spent_j = float(state_dict["spent_j"])
        self._prior_step_j = float(state_dict.get("step_j", 0.0))
