"""CarbonAwareController: train harder when the grid is clean, less (or not at all) when dirty.

Thin glue: the decisions are :mod:`lightning_sustain.budget.carbon`, the intensity is
:mod:`lightning_sustain.energy.intensity`, hardware limits go through
:class:`~lightning_sustain.budget.limits.PowerLimitGuard` (always restored) and the
software fallback is :class:`~lightning_sustain.budget.throttle.SoftwareThrottle`.
See docs/carbon.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_sustain._deprecation import renamed_argument
from lightning_sustain.budget.carbon import (
    CarbonDecision,
    DecisionLog,
    plan_pause,
    plan_power,
    time_scale,
)
from lightning_sustain.budget.limits import PowerLimitGuard
from lightning_sustain.budget.power_cap import open_limit_guard, refusal_reason, throttle_from_meter
from lightning_sustain.budget.throttle import SoftwareThrottle
from lightning_sustain.callbacks._devices import (
    CpuSelection,
    GpuSelection,
    process_gpu_indices,
    validate_cpu_selection,
    validate_gpu_selection,
)
from lightning_sustain.energy.carbon import JOULES_PER_KWH, resolve_carbon_intensity
from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.energy.discovery import open_devices
from lightning_sustain.energy.errors import PowerLimitError
from lightning_sustain.energy.estimate import validate_positive
from lightning_sustain.energy.intensity import (
    ConstantIntensity,
    IntensityDataError,
    IntensityProvider,
    TimeSeriesIntensity,
)
from lightning_sustain.energy.meter import EnergyMeter
from lightning_sustain.energy.nvml import NvmlGpu

logger = logging.getLogger(__name__)

_METRIC_PREFIX = "carbon/"
_STATE_VERSION = 1
DECISIONS_FILENAME = "carbon_decisions.jsonl"
STATUS_FILENAME = "carbon_status.json"


class CarbonControllerError(MisconfigurationException):
    """The controller cannot run as configured; the message says what to change."""


def _parse_deadline(deadline: str) -> float:
    try:
        stamp = _dt.datetime.fromisoformat(deadline.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(
            f"deadline={deadline!r} is not an ISO 8601 time (e.g. '2025-03-01T06:00:00+01:00')."
        ) from exc
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=_dt.timezone.utc)
    return stamp.timestamp()


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


class CarbonAwareController(Callback):
    r"""Adapt training to the grid's carbon intensity, within a slowdown bound and a deadline.

    ``mode="power"``: after ``warmup_steps`` uncapped steps (which measure the uncapped
    step time and the busy power), every ``decide_every_s`` seconds the GPU power cap is
    set to ``clip(k / intensity, min_limit_fraction, 1)`` of the busy power, where ``k``
    is the most capping for which the intensity forecast says the run stays within
    ``max_slowdown`` of its uncapped wall time (see :mod:`lightning_sustain.budget.carbon`).
    The cap is an NVML power limit where permitted (restored at the end, on errors and
    on SIGTERM), else a software throttle (idle time between steps) at the same watts.

    ``mode="pause"``: when the intensity is above ``pause_above_g_per_kwh`` and the
    forecast has a cleaner period early enough for the remaining work to meet the
    deadline, ``on_pause="stop"`` saves a checkpoint, writes ``carbon_status.json``
    (``status: "paused_for_carbon"``, ``resume_at``) for a scheduler to requeue the job,
    and stops; ``on_pause="wait"`` idles in-process until then.

    ``max_co2e_g``: stop (with a checkpoint) before the time-resolved CO2e would exceed
    it. It works next to :class:`EnergyBudget` (whichever binds first stops), and is
    carried across resumes.

    Every decision (time, intensity, limit, reason, projected slowdown) goes to
    ``<dirpath>/carbon_decisions.jsonl`` (rank zero, nothing under ``fast_dev_run``), to
    the Python log (INFO), and to the Trainer's loggers as ``carbon/intensity_g_per_kwh``,
    ``carbon/limit_fraction``, ``carbon/co2e_g`` and ``carbon/projected_slowdown``.

    Args:
        mode: ``"power"`` or ``"pause"``.
        intensity_file: a CSV/JSON intensity time series (see docs/carbon.md); a file
            that cannot be read falls back to the constant intensity with a warning
            unless ``strict``.
        carbon_intensity_g_per_kwh: a constant intensity (exclusive with ``country``);
            also the fallback where the file does not cover the run.
        country: ISO code of the shipped yearly table, for the constant / fallback.
        provider: any :class:`~lightning_sustain.energy.intensity.IntensityProvider`
            (e.g. a live source); replaces ``intensity_file``.
        interpolation: ``"previous"`` or ``"linear"`` for the file.
        timezone: IANA zone of naive timestamps in the file.
        strict: a bad, incomplete or changed-into-invalid file raises instead of
            falling back.
        max_slowdown: the most extra wall time allowed, as a fraction of the uncapped
            run (power mode).
        min_limit_fraction: the lowest cap, as a fraction of the busy power.
        perf_exponent: the planning model's exponent (time ~ cap ** -exponent).
        power_control: ``"auto"`` (hardware where permitted, else software),
            ``"hardware"`` or ``"software"``.
        busy_power_w: the busy power per GPU the fractions refer to (e.g. read from
            ``nvidia-smi`` while training uncapped); None: the GPU's default power limit
            (conservative: the slowdown is over- rather than under-estimated).
        pause_above_g_per_kwh: pause threshold (pause mode).
        deadline: ISO 8601 time the run must end by (naive: UTC).
        deadline_s: or seconds after the first fit start (kept across resumes).
        on_pause: ``"stop"`` (checkpoint and stop) or ``"wait"`` (idle in-process).
        resume_overhead_s: time a stop-and-requeue costs (restart, reload), seconds.
        max_co2e_g: a time-resolved CO2e budget, grams.
        pue: power usage effectiveness applied to CO2e (>= 1).
        warmup_steps: uncapped steps that measure the step time and busy power (>= 2).
        decide_every_s: seconds between decisions.
        margin: fraction of the slowdown allowance (and of the remaining time before a
            deadline) held in reserve.
        dirpath: where the decision log and status file go; None: the Trainer's
            ``log_dir`` (else ``default_root_dir``).
        checkpoint_dir: where a pause or budget checkpoint goes; None:
            ``<default_root_dir>/checkpoints``.
        nvml_devices: which GPUs (see :class:`PowerBudget`).
        gpus: deprecated name of ``nvml_devices``.
        cpu: what is measured where there is no NVML GPU.
        interval_s: meter sampling interval.

    Raises:
        ValueError: a setting is invalid; the message names it.
    """

    def __init__(
        self,
        mode: Literal["power", "pause"] = "power",
        intensity_file: str | None = None,
        carbon_intensity_g_per_kwh: float | None = None,
        country: str | None = None,
        provider: Any = None,
        interpolation: Literal["previous", "linear"] = "previous",
        timezone: str = "UTC",
        strict: bool = False,
        max_slowdown: float = 0.05,
        min_limit_fraction: float = 0.5,
        perf_exponent: float = 1.0 / 3.0,
        power_control: Literal["auto", "hardware", "software"] = "auto",
        busy_power_w: float | None = None,
        pause_above_g_per_kwh: float | None = None,
        deadline: str | None = None,
        deadline_s: float | None = None,
        on_pause: Literal["stop", "wait"] = "stop",
        resume_overhead_s: float = 60.0,
        max_co2e_g: float | None = None,
        pue: float = 1.0,
        warmup_steps: int = 5,
        decide_every_s: float = 60.0,
        margin: float = 0.1,
        dirpath: str | None = None,
        checkpoint_dir: str | None = None,
        nvml_devices: GpuSelection = "auto",
        cpu: CpuSelection = "auto",
        interval_s: float | None = None,
        gpus: GpuSelection | None = None,
    ) -> None:
        super().__init__()
        gpus = renamed_argument("CarbonAwareController", "gpus", gpus, "nvml_devices", nvml_devices)
        if mode not in ("power", "pause"):
            raise ValueError(f"mode={mode!r} is not valid: use 'power' or 'pause'.")
        if power_control not in ("auto", "hardware", "software"):
            raise ValueError(f"power_control={power_control!r}: use auto, hardware or software.")
        if on_pause not in ("stop", "wait"):
            raise ValueError(f"on_pause={on_pause!r} is not valid: use 'stop' or 'wait'.")
        if mode == "pause" and pause_above_g_per_kwh is None:
            raise ValueError("mode='pause' needs pause_above_g_per_kwh (the pause threshold).")
        if deadline is not None and deadline_s is not None:
            raise ValueError("Give either deadline (a time) or deadline_s (seconds), not both.")
        self.mode = mode
        self.fallback = ConstantIntensity.from_carbon_intensity(
            resolve_carbon_intensity(carbon_intensity_g_per_kwh, country)
        )
        self.intensity_file = intensity_file
        self.interpolation = interpolation
        self.timezone = timezone
        self.strict = bool(strict)
        self.country = country
        if provider is not None and not isinstance(provider, IntensityProvider):
            raise ValueError(
                "provider must implement intensity_at, mean_intensity and describe "
                "(lightning_sustain.energy.intensity.IntensityProvider)."
            )
        self._given_provider = provider
        self.max_slowdown = validate_positive("max_slowdown", max_slowdown)
        self.min_limit_fraction = validate_positive("min_limit_fraction", min_limit_fraction)
        if self.min_limit_fraction > 1:
            raise ValueError(f"min_limit_fraction must be in (0, 1], got {min_limit_fraction!r}.")
        self.perf_exponent = validate_positive("perf_exponent", perf_exponent, allow_zero=True)
        self.power_control = power_control
        self.busy_power_w = (
            None if busy_power_w is None else validate_positive("busy_power_w", busy_power_w)
        )
        self.pause_above_g_per_kwh = (
            None
            if pause_above_g_per_kwh is None
            else validate_positive("pause_above_g_per_kwh", pause_above_g_per_kwh, allow_zero=True)
        )
        self.deadline_unix_s: float | None = (
            _parse_deadline(deadline) if deadline is not None else None
        )
        self.deadline_s = (
            None if deadline_s is None else validate_positive("deadline_s", deadline_s)
        )
        self.on_pause = on_pause
        self.resume_overhead_s = validate_positive(
            "resume_overhead_s", resume_overhead_s, allow_zero=True
        )
        self.max_co2e_g = (
            None if max_co2e_g is None else validate_positive("max_co2e_g", max_co2e_g)
        )
        self.pue = validate_positive("pue", pue)
        if self.pue < 1.0:
            raise ValueError(f"pue must be >= 1.0, got {pue!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 2:
            raise ValueError(f"warmup_steps must be an integer >= 2, got {warmup_steps!r}.")
        self.warmup_steps = warmup_steps
        self.decide_every_s = validate_positive("decide_every_s", decide_every_s)
        self.margin = validate_positive("margin", margin, allow_zero=True)
        if self.margin >= 1:
            raise ValueError(f"margin must be in [0, 1), got {margin!r}.")
        self.dirpath = dirpath
        self.checkpoint_dir = checkpoint_dir
        self.gpus = validate_gpu_selection(gpus)
        self.cpu = validate_cpu_selection(cpu)
        self.interval_s = (
            None if interval_s is None else validate_positive("interval_s", interval_s)
        )

        self.provider: IntensityProvider = self.fallback
        self.provider_note = ""
        self.log = DecisionLog(None)
        self.status: dict[str, Any] = {"status": "not started"}
        self.hardware_mode: str | None = None
        # carried across resumes
        self.first_start_unix_s: float | None = None
        self.co2e_g = 0.0
        self.energy_j = 0.0
        self.lost_prior_s = 0.0
        self.base_step_s: float | None = None
        #: wall time the whole run would take uncapped (fixed at the end of the warm-up)
        self.total_base_s: float | None = None
        self._ref_power_w: float | None = None
        self._active = False

    # -- set-up ------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode)

    def _load_provider(self) -> None:
        if self._given_provider is not None:
            self.provider = self._given_provider
            return
        if self.intensity_file is None:
            self.provider = self.fallback
            return
        try:
            self.provider = TimeSeriesIntensity(
                self.intensity_file,
                interpolation=self.interpolation,
                fallback=self.fallback,
                strict=self.strict,
                timezone=self.timezone,
            )
        except (IntensityDataError, ValueError) as exc:
            if self.strict:
                raise
            self.provider = self.fallback
            self.provider_note = (
                f"the intensity file could not be used ({exc}); the constant "
                f"{self.fallback.describe()} is used instead"
            )
            logger.warning("CarbonAwareController: %s.", self.provider_note)

    def _writes(self, trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero and not trainer.fast_dev_run

    def _dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._setup_mono_s = time.monotonic()
        self._startup_s: float | None = None
        others = [
            cb
            for cb in trainer.callbacks
            if isinstance(cb, CarbonAwareController) and cb is not self
        ]
        from lightning_sustain.callbacks.power_budget import PowerBudget

        if self.mode == "power" and any(isinstance(cb, PowerBudget) for cb in trainer.callbacks):
            raise CarbonControllerError(
                "CarbonAwareController(mode='power') and PowerBudget would both set the power "
                "limit; use one of them (or CarbonAwareController(mode='pause'))."
            )
        if others:
            raise CarbonControllerError("Only one CarbonAwareController per Trainer.")
        self._load_provider()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            return
        self._active = True
        now_unix = time.time()
        self._mono_to_unix = now_unix - time.monotonic()
        if self.first_start_unix_s is None:
            self.first_start_unix_s = now_unix
        if self.deadline_s is not None and self.deadline_unix_s is None:
            self.deadline_unix_s = self.first_start_unix_s + self.deadline_s
        if self.deadline_unix_s is not None and self.deadline_unix_s <= now_unix:
            logger.warning(
                "CarbonAwareController: the deadline %s has passed; training runs uncapped.",
                _iso(self.deadline_unix_s),
            )
        self.log = DecisionLog(
            self._dir(trainer) / DECISIONS_FILENAME if self._writes(trainer) else None
        )
        self._gpus: list[NvmlGpu] = []
        self.guard: PowerLimitGuard | None = None
        self.throttle: SoftwareThrottle | None = None
        indices = process_gpu_indices(trainer, self.gpus)
        devices: list[EnergyDevice] = open_devices(indices, cpu="none") if indices else []
        if not devices and self.cpu != "none":
            devices = open_devices([], cpu=self.cpu)
        self.meter: EnergyMeter | None = (
            EnergyMeter(devices, interval_s=self.interval_s) if devices else None
        )
        if self.mode == "power":
            self._open_power_control(indices)
        self._steps = 0
        self._warm_ends: list[float] = []
        self._last_end_s: float | None = None
        self._lost_run_s = 0.0  # wall time the caps cost in this fit
        self._uncapped_est: deque[float] = deque(maxlen=32)
        self._excluded_s = 0.0
        self._val_start: float | None = None
        self._last_decision_s = -math.inf
        self._every_steps: int | None = None
        self._every_from = 0
        self._fraction = 1.0
        self._step_times: deque[float] = deque(maxlen=32)
        self._step_co2e: deque[float] = deque(maxlen=8)
        self._measured_until_s = time.monotonic()
        if self.meter is not None:
            self.meter.wait_until_covered(self._measured_until_s, timeout_s=0.5)
        self.status = {"status": "training"}

    def _open_power_control(self, indices: list[int]) -> None:
        reason = ""
        if self.power_control in ("auto", "hardware") and indices:
            try:  # probes with the current limit, so nothing changes yet
                self.guard = open_limit_guard(indices)
                self._gpus = list(self.guard.devices)
                self.hardware_mode = "hardware"
            except PowerLimitError as exc:
                reason = refusal_reason(exc)
                if self.power_control == "hardware":
                    raise CarbonControllerError(
                        f"CarbonAwareController(power_control='hardware'): {reason}. Use "
                        "power_control='auto' or 'software'."
                    ) from exc
        elif self.power_control == "hardware":
            raise CarbonControllerError(
                "CarbonAwareController(power_control='hardware'): this process trains on no "
                "NVML GPU. Use power_control='auto' or 'software'."
            )
        else:
            reason = "power_control='software'" if indices else "this process has no NVML GPU"
        if self.hardware_mode is None:
            self.hardware_mode = "software"
        logger.info(
            "CarbonAwareController: power mode through %s%s; intensity from %s.",
            "NVML power limits" if self.hardware_mode == "hardware" else "a software throttle",
            f" because {reason}" if reason and self.hardware_mode == "software" else "",
            self.provider.describe(),
        )

    # -- measurement ---------------------------------------------------------------------
    def _unix(self, mono_s: float) -> float:
        return mono_s + self._mono_to_unix

    def _update_co2e(self, now_s: float) -> None:
        if self.meter is None:
            return
        covered = self.meter.latest_time_s()
        start = self._measured_until_s
        if covered is None or covered <= start:
            return
        covered = min(covered, now_s)
        energy_j = max(0.0, sum(self.meter.energy_between(start, covered).values()))
        try:
            intensity, _ = self.provider.mean_intensity(self._unix(start), self._unix(covered))
        except IntensityDataError:
            raise
        except Exception as exc:  # a user's provider failing must not stop training
            logger.warning("CarbonAwareController: the intensity provider failed: %s", exc)
            intensity = self.fallback.g_co2e_per_kwh
        grams = energy_j / JOULES_PER_KWH * self.pue * intensity
        self.energy_j += energy_j
        self.co2e_g += grams
        self._step_co2e.append(grams)
        self._measured_until_s = covered

    def _measure_ref_power(self) -> float | None:
        """The busy power the cap fractions refer to (all this process's capped devices).

        ``busy_power_w`` when given; else each GPU's default power limit (compute-bound
        training runs at about its limit; where the device draws less, a fraction caps
        less than the model assumes, so the projected slowdown errs high, never low);
        for the software throttle without GPUs, the warm-up's mean power.
        """
        if self.busy_power_w is not None:
            return self.busy_power_w * max(1, len(self._gpus))
        if self._gpus:
            return sum(gpu.default_power_limit_w() for gpu in self._gpus)
        if self.meter is None or len(self._warm_ends) < 2:
            return None
        t0, t1 = self._warm_ends[0], self._warm_ends[-1]
        total = sum(self.meter.energy_between(t0, t1).values())
        return total / (t1 - t0) if t1 > t0 and total > 0 else None

    # -- hot path --------------------------------------------------------------------------
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._active:
            return
        now = time.monotonic()
        self._steps += 1
        if getattr(self, "_startup_s", 0.0) is None:
            # set-up to first step: what a restart costs, and about what ending a fit costs
            self._startup_s = now - self._setup_mono_s
        if self._last_end_s is not None:
            interval = max(0.0, now - self._last_end_s - self._excluded_s)
            self._step_times.append(interval)
            if self.base_step_s is not None:
                # the share of this step the cap in force cost, under the planning model;
                # wall-clock noise of uncapped steps is not counted as slowdown
                scale = float(time_scale(self._fraction, self.perf_exponent))
                self._lost_run_s += interval * (1.0 - 1.0 / scale)
                self._uncapped_est.append(interval / scale)
                self.base_step_s = statistics.median(self._uncapped_est)
        self._excluded_s = 0.0
        self._last_end_s = now
        self._update_co2e(now)
        if self.base_step_s is None:
            self._warm_ends.append(now)
            if len(self._warm_ends) >= self.warmup_steps:
                gaps = [b - a for a, b in zip(self._warm_ends, self._warm_ends[1:], strict=False)]
                self.base_step_s = statistics.median(gaps[1:] or gaps)
                self._uncapped_est.extend(gaps[1:] or gaps)
                if self.total_base_s is None:
                    total = trainer.estimated_stepping_batches
                    if math.isfinite(total):
                        # the uncapped run's length, fixed once: the slowdown bound refers to it
                        self.total_base_s = float(total) * self.base_step_s
                self._ref_power_w = self._measure_ref_power()
                self._last_decision_s = -math.inf
        if self.throttle is not None and self._fraction < 1.0:
            sleep_s = self._throttle_step(now)
            if sleep_s > 0:
                time.sleep(sleep_s)
        due = self._decision_due(trainer, now)
        # one process: the budget is checked every step; under DDP only at decision
        # steps (a collective), so that no step pays for a collective
        if (trainer.world_size <= 1 or due) and self._check_co2e_budget(trainer):
            return
        if due:
            self._decide(trainer, pl_module)

    def _decision_due(self, trainer: pl.Trainer, now: float) -> bool:
        """Time-based on one process; under DDP every N steps, N agreed by rank zero.

        Ranks must reach a decision at the same step (pause decisions are collectives),
        and their clocks differ: rank zero's ``decide_every_s / step time`` is broadcast
        once, at a step every rank reaches together (end of the warm-up, or the first
        step after a resume).
        """
        if self.base_step_s is None:
            return False
        if trainer.world_size <= 1:
            if now - self._last_decision_s >= self.decide_every_s:
                self._last_decision_s = now
                return True
            return False
        if self._every_steps is None:
            n = max(1, round(self.decide_every_s / max(self.base_step_s, 1e-9)))
            self._every_steps = max(1, int(trainer.strategy.broadcast(n, src=0)))
            self._every_from = self._steps
        return (self._steps - self._every_from) % self._every_steps == 0

    def _throttle_step(self, now: float) -> float:
        assert self.throttle is not None and self.meter is not None
        sleep_s, self._throttle_until_s = throttle_from_meter(
            self.throttle, self.meter, self._throttle_until_s, now
        )
        return sleep_s

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None:
            self._excluded_s += time.monotonic() - self._val_start
            self._val_start = None

    # -- decisions -------------------------------------------------------------------------
    def _remaining_steps(self, trainer: pl.Trainer) -> float:
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            return math.inf
        return max(0.0, float(total) - trainer.global_step)

    def _lost_s(self, trainer: pl.Trainer) -> float:
        assert self.base_step_s is not None
        return self.lost_prior_s + self._lost_run_s

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now_unix = time.time()
        try:
            if isinstance(self.provider, TimeSeriesIntensity):
                self.provider.refresh()
            reading = self.provider.intensity_at(now_unix)
        except IntensityDataError:
            raise  # strict mode
        except Exception as exc:
            logger.warning("CarbonAwareController: the intensity provider failed: %s", exc)
            reading = self.fallback.intensity_at(now_unix)
        remaining = self._remaining_steps(trainer)
        assert self.base_step_s is not None
        self._warn_if_deadline_at_risk(now_unix, remaining)
        if self.mode == "power":
            self._decide_power(trainer, pl_module, now_unix, reading, remaining)
        else:
            self._decide_pause(trainer, pl_module, now_unix, reading, remaining)

    def _warn_if_deadline_at_risk(self, now_unix: float, remaining: float) -> None:
        if self.deadline_unix_s is None or getattr(self, "_warned_deadline", False):
            return
        needed_s = self._remaining_wall_s(remaining) if math.isfinite(remaining) else math.inf
        if now_unix + needed_s > self.deadline_unix_s:
            self._warned_deadline = True
            logger.warning(
                "CarbonAwareController: the deadline %s is at risk even at full power: ~%.0f s "
                "of work remain and %.0f s are left; no pause or cap is planned while it does "
                "not fit.",
                _iso(self.deadline_unix_s),
                needed_s,
                self.deadline_unix_s - now_unix,
            )

    def _hold_s(self, trainer: pl.Trainer, low: float) -> float:
        """The longest a cap decided now stays in force, seconds.

        Until the next decision, which comes at a step's end (one process) or after a fixed
        number of steps (DDP); each step at most as slow as under the lowest cap.
        """
        assert self.base_step_s is not None
        slowest_step_s = self.base_step_s * float(time_scale(low, self.perf_exponent))
        if trainer.world_size <= 1 or self._every_steps is None:
            return self.decide_every_s + slowest_step_s
        return self._every_steps * slowest_step_s

    def _decide_power(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        now_unix: float,
        reading: Any,
        remaining: float,
    ) -> None:
        assert self.base_step_s is not None
        lost = self._lost_s(trainer)
        total_base = self.total_base_s
        if not math.isfinite(remaining) or total_base is None:
            fraction, reason, plan_lost = 1.0, "the run's length is unknown (max_steps=-1)", 0.0
            total_base = math.inf
        else:
            allowed = self.max_slowdown * (1.0 - self.margin) * total_base - max(0.0, lost)
            low = self.min_limit_fraction
            if self._gpus and self._ref_power_w:
                floor_w = max(gpu.power_limit_range_w()[0] for gpu in self._gpus)
                low = max(low, floor_w * len(self._gpus) / self._ref_power_w)
            plan = plan_power(
                self.provider,
                now_unix,
                remaining_work_s=remaining * self.base_step_s,
                allowed_lost_s=allowed,
                min_fraction=min(1.0, low),
                perf_exponent=self.perf_exponent,
                deadline_unix_s=self.deadline_unix_s,
                hold_s=self._hold_s(trainer, min(1.0, low)),
            )
            fraction, reason, plan_lost = plan.fraction, plan.reason, plan.projected_lost_s
        projected = (max(0.0, lost) + plan_lost) / total_base
        limit_w = self._apply_fraction(fraction)
        self._record(
            trainer, pl_module, now_unix, reading, "limit", fraction, limit_w, reason, projected
        )

    def _apply_fraction(self, fraction: float) -> float | None:
        self._fraction = fraction
        ref = self._ref_power_w
        if self.guard is not None and self._gpus:
            applied = 0.0
            for gpu in self._gpus:
                if fraction >= 1.0 or ref is None:
                    wanted = self.guard.original_limit_w(gpu)
                else:
                    wanted = fraction * ref / len(self._gpus)
                try:
                    applied += self.guard.set_limit_w(gpu, wanted)
                except PowerLimitError as exc:
                    logger.warning("CarbonAwareController: could not set the limit: %s", exc)
            return applied
        if self.meter is None or ref is None:
            return None
        target = fraction * ref
        if fraction >= 1.0:
            self.throttle = None
            return None
        if self.throttle is None:
            self.throttle = SoftwareThrottle(target)
            self._throttle_until_s = self.meter.latest_time_s() or time.monotonic()
        else:
            self.throttle.set_target_w(target)
        return target

    def _remaining_wall_s(self, remaining: float) -> float:
        # the slowest recent step, not a typical one: a deadline is a hard bound
        per_step = max(self._step_times) if self._step_times else (self.base_step_s or 0.0)
        return remaining * per_step

    def _decide_pause(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        now_unix: float,
        reading: Any,
        remaining: float,
    ) -> None:
        assert self.pause_above_g_per_kwh is not None
        remaining_s = self._remaining_wall_s(remaining) if math.isfinite(remaining) else math.inf
        if not math.isfinite(remaining_s):
            plan_pause_ok, resume_at = False, None
            reason = "the run's length is unknown (max_steps=-1): no pause"
        else:
            startup = getattr(self, "_startup_s", None) or 0.0
            overhead = 0.0
            if self.on_pause == "stop":  # a restart costs at least what this start cost
                overhead = max(self.resume_overhead_s, 2.0 * startup)
            plan = plan_pause(
                self.provider,
                now_unix,
                threshold_g_per_kwh=self.pause_above_g_per_kwh,
                remaining_s=remaining_s + startup,  # the end of fit costs about as much
                deadline_unix_s=self.deadline_unix_s,
                resume_overhead_s=overhead,
                margin=max(self.margin, 0.5),
                resolution_s=max(1.0, self.decide_every_s / 4),
            )
            plan_pause_ok, resume_at, reason = plan.pause, plan.resume_at_unix_s, plan.reason
        if trainer.world_size > 1:
            plan_pause_ok = trainer.strategy.reduce_boolean_decision(plan_pause_ok, all=False)
            resume_at = trainer.strategy.broadcast(resume_at, src=0)
        if not plan_pause_ok or resume_at is None:
            self._record(trainer, pl_module, now_unix, reading, "run", None, None, reason, 0.0)
            return
        if self.on_pause == "wait":
            self._record(
                trainer,
                pl_module,
                now_unix,
                reading,
                "pause_wait",
                None,
                None,
                reason,
                0.0,
                resume_at,
            )
            self._wait_until(resume_at, trainer)
            self._last_decision_s = time.monotonic()
            return
        self._record(
            trainer, pl_module, now_unix, reading, "pause_stop", None, None, reason, 0.0, resume_at
        )
        self._stop_with_checkpoint(trainer, "paused_for_carbon", reason, resume_at, reading)

    def _wait_until(self, resume_at_unix: float, trainer: pl.Trainer) -> None:
        started = time.monotonic()
        while True:
            left = resume_at_unix - time.time()
            if left <= 0:
                break
            time.sleep(min(left, 1.0))
        waited = time.monotonic() - started
        self._excluded_s += waited
        self.status = {"status": "training", "waited_s": waited}

    def _checkpoint_path(self, trainer: pl.Trainer, tag: str) -> Path:
        directory = (
            Path(self.checkpoint_dir)
            if self.checkpoint_dir is not None
            else Path(trainer.default_root_dir) / "checkpoints"
        )
        return directory / f"carbon-{tag}-step={trainer.global_step}.ckpt"

    def _stop_with_checkpoint(
        self, trainer: pl.Trainer, status: str, reason: str, resume_at: float | None, reading: Any
    ) -> None:
        path: str | None = None
        if not trainer.fast_dev_run:
            target = self._checkpoint_path(trainer, "pause" if resume_at else "budget")
            trainer.save_checkpoint(target)
            path = str(target)
        self.status = {
            "status": status,
            "reason": reason,
            "checkpoint": path,
            "resume_at": _iso(resume_at),
            "resume_at_unix_s": resume_at,
            "resume_in_s": None if resume_at is None else max(0.0, resume_at - time.time()),
            "intensity_g_per_kwh": reading.g_co2e_per_kwh,
            "deadline": _iso(self.deadline_unix_s),
            "co2e_g": self.co2e_g,
            "step": trainer.global_step,
        }
        if self._writes(trainer):
            out = self._dir(trainer) / STATUS_FILENAME
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(self.status, indent=1))
            except OSError as exc:
                logger.warning("CarbonAwareController: could not write %s: %s", out, exc)
        logger.warning(
            "CarbonAwareController: %s: %s. Checkpoint %s.%s",
            status,
            reason,
            path,
            f" Resume at {_iso(resume_at)} (in {self.status['resume_in_s']:.0f} s)."
            if resume_at is not None
            else "",
        )
        trainer.should_stop = True

    def _check_co2e_budget(self, trainer: pl.Trainer) -> bool:
        if self.max_co2e_g is None or self.status.get("status") != "training":
            return False
        if self.base_step_s is None and trainer.world_size > 1:
            return False  # under DDP the first check is at the first decision step
        lookahead = max(self._step_co2e) * 2 if self._step_co2e else 0.0
        spent = self.co2e_g
        if trainer.world_size > 1:  # the budget covers every rank's devices
            import torch

            summed = trainer.strategy.reduce(
                torch.tensor([spent, lookahead], dtype=torch.float64,
                             device=trainer.strategy.root_device),
                reduce_op="sum",
            )  # fmt: skip
            spent, lookahead = (float(v) for v in summed.cpu().tolist())
        if spent + lookahead <= self.max_co2e_g:
            return False
        reading = self.provider.intensity_at(time.time())
        reason = (
            f"time-resolved CO2e {spent:.4g} g (all ranks) + ~{lookahead:.3g} g for the next "
            f"steps would exceed max_co2e_g={self.max_co2e_g:g}"
        )
        self._record(trainer, None, time.time(), reading, "budget_stop", None, None, reason, 0.0)
        self._stop_with_checkpoint(trainer, "co2e_budget_reached", reason, None, reading)
        return True

    def _record(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule | None,
        now_unix: float,
        reading: Any,
        action: str,
        fraction: float | None,
        limit_w: float | None,
        reason: str,
        projected: float,
        resume_at: float | None = None,
    ) -> None:
        decision = CarbonDecision(
            time_unix_s=now_unix,
            elapsed_s=now_unix - (self.first_start_unix_s or now_unix),
            step=int(trainer.global_step),
            intensity_g_per_kwh=float(reading.g_co2e_per_kwh),
            intensity_status=str(reading.status),
            action=action,
            limit_fraction=fraction,
            limit_w=limit_w,
            reason=reason,
            projected_slowdown=float(projected),
            resume_at_unix_s=resume_at,
            co2e_g=self.co2e_g,
        )
        self.log.append(decision)
        logger.info(
            "CarbonAwareController: step %d, %.0f gCO2e/kWh (%s): %s%s.",
            decision.step,
            decision.intensity_g_per_kwh,
            decision.intensity_status,
            action,
            f" {limit_w:.0f} W" if limit_w is not None else "",
        )
        if pl_module is not None and trainer.loggers:
            metrics = {
                f"{_METRIC_PREFIX}intensity_g_per_kwh": decision.intensity_g_per_kwh,
                f"{_METRIC_PREFIX}co2e_g": self.co2e_g,
                f"{_METRIC_PREFIX}projected_slowdown": decision.projected_slowdown,
            }
            if fraction is not None:
                metrics[f"{_METRIC_PREFIX}limit_fraction"] = fraction
            for name, value in metrics.items():
                pl_module.log(name, float(value), on_step=True, on_epoch=False, logger=True)

    # -- tear-down --------------------------------------------------------------------------
    def _close_guard(self) -> None:
        if getattr(self, "guard", None) is not None:
            self.guard.close()
            self.guard = None
        for gpu in getattr(self, "_gpus", []):
            gpu.close()
        self._gpus = []

    def _finish(self, trainer: pl.Trainer | None = None) -> None:
        if not self._active:
            return
        self._active = False
        try:
            self._update_co2e(time.monotonic())
        except Exception as exc:  # never lose the restore below
            logger.warning("CarbonAwareController: final CO2e update failed: %s", exc)
        if self.base_step_s is not None and trainer is not None:
            self.lost_prior_s = self._lost_s(trainer)
            self._lost_run_s = 0.0
        self._close_guard()
        self.throttle = None
        if self.meter is not None:
            self.meter.close()
            self.meter = None
        self.log.close()
        if self.status.get("status") == "training":
            self.status = {"status": "completed"}
        notes = [n for n in (self.provider_note, *getattr(self.provider, "warnings", [])) if n]
        logger.info(
            "CarbonAwareController: %s; %.4g g CO2e time-resolved over %.4g J; %d decisions.%s",
            self.status.get("status"),
            self.co2e_g,
            self.energy_j,
            len(self.log.decisions),
            (" Note: " + "; ".join(notes)) if notes else "",
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finish(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        try:
            self._finish(trainer)
        except Exception as exc:  # never mask the user's exception
            logger.error("CarbonAwareController could not finish cleanly: %s", exc)
            self._close_guard()

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """CO2e, energy, time lost and the deadline, so a resumed run continues the ledger."""
        lost = self.lost_prior_s
        if self._active and hasattr(self, "_lost_run_s"):
            lost = self.lost_prior_s + self._lost_run_s
        return {
            "version": _STATE_VERSION,
            "first_start_unix_s": self.first_start_unix_s,
            "deadline_unix_s": self.deadline_unix_s,
            "co2e_g": self.co2e_g,
            "energy_j": self.energy_j,
            "lost_s": lost,
            "base_step_s": self.base_step_s,
            "total_base_s": self.total_base_s,
            "ref_power_w": self._ref_power_w,
            "status": self.status.get("status"),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(
                "The checkpoint's CarbonAwareController state is not in a known format; "
                "remove the callback state from the checkpoint or start a new run."
            )
        self.first_start_unix_s = state_dict.get("first_start_unix_s")
        if state_dict.get("deadline_unix_s") is not None:
            self.deadline_unix_s = float(state_dict["deadline_unix_s"])
        self.co2e_g = float(state_dict.get("co2e_g", 0.0))
        self.energy_j = float(state_dict.get("energy_j", 0.0))
        self.lost_prior_s = float(state_dict.get("lost_s", 0.0))
        base = state_dict.get("base_step_s")
        self.base_step_s = None if base is None else float(base)
        total = state_dict.get("total_base_s")
        self.total_base_s = None if total is None else float(total)
        ref = state_dict.get("ref_power_w")
        self._ref_power_w = None if ref is None else float(ref)
        self._resumed_from = state_dict.get("status")


__all__ = [
    "DECISIONS_FILENAME",
    "STATUS_FILENAME",
    "CarbonAwareController",
    "CarbonControllerError",
]
