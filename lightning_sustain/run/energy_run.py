"""EnergyRun: one measured run, in any loop (no Lightning import).

This is the measuring core. Every front end is an adapter over it: the Trainer callback
(:class:`~lightning_sustain.EnergyMonitor`), Fabric (:mod:`lightning_sustain.fabric`) and a
plain PyTorch loop (use it directly). It owns:

- the process's devices and their sampler (:class:`~lightning_sustain.energy.meter.EnergyMeter`);
- **step boundaries** (:meth:`EnergyRun.step`: one timestamp per step on the training
  thread, nothing else);
- stages (``fit``, ``validate``, ``test``, ``predict``) and phases inside fit
  (``validation``), each kept, never overwritten, for the life of the object and across a
  resume (:meth:`state_dict`);
- the per-step trace (``energy_trace.csv``), the **summary** (``energy_summary.json``,
  written by :meth:`end_stage`), per-rank records for failures, and the report;
- cross-rank sums through plain ``torch.distributed`` at log intervals and stage ends,
  never per step and never on an exception path.

Example (a plain loop)::

    from lightning_sustain import EnergyRun

    with EnergyRun(dirpath="runs/exp1") as run:  # stage "fit"
        for x, y in loader:
            loss = model(x, y); loss.backward(); opt.step(); opt.zero_grad()
            run.step(samples=len(x))
    with run.stage("predict"):
        for x in test_loader:
            model(x); run.step(samples=len(x))
    run.close()
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_sustain.energy.accounting import EnergyAccountant, PhaseTotals, StepEnergy
from lightning_sustain.energy.carbon import (
    CarbonIntensity,
    co2e_g,
    joules_to_kwh,
    resolve_carbon_intensity,
)
from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.energy.efficiency import StepFlops
from lightning_sustain.energy.estimate import (
    DEFAULT_WATTS_PER_CORE,
    validate_positive,
    validate_positive_int,
)
from lightning_sustain.energy.intensity import IntensityProvider
from lightning_sustain.energy.meter import EnergyMeter
from lightning_sustain.energy.types import DeviceInfo
from lightning_sustain.report.trace import (
    SUMMARY_FILENAME,
    TRACE_FILENAME,
    TraceWriter,
    device_labels,
    write_summary,
)
from lightning_sustain.run.carbon_time import TimeResolvedCarbon, unix_offset_s
from lightning_sustain.run.devices import (
    CpuSelection,
    GpuSelection,
    open_rank_devices,
    validate_cpu_selection,
    validate_gpu_selection,
)
from lightning_sustain.run.distributed import (
    RankInfo,
    all_gather_objects,
    all_reduce_sum,
    process_group_ready,
)
from lightning_sustain.run.summary import (
    PHASE_NAMES,
    STAGES,
    add_efficiency,
    add_phase,
    build_summary,
    combine_phases,
    empty_phase,
    empty_phases,
    phase_energy_j,
    summarise_rank_files,
    write_rank_record,
)

logger = logging.getLogger(__name__)

#: Prefix of every metric key, in loggers, ``callback_metrics`` and the progress bar alike.
METRIC_PREFIX = "energy/"
#: Keys shown in a progress bar (a subset of the logged keys, same names).
PROGRESS_BAR_KEYS = (f"{METRIC_PREFIX}power_w", f"{METRIC_PREFIX}energy_kwh")
STATE_VERSION = 2
#: A log interval wakes the resolver only when its last run is at least this old, seconds.
LOG_REFRESH_S = 0.25


class _CudaClock:
    """Step boundaries as CUDA events, converted to host time once they completed."""

    def __init__(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)
        self._ref = torch.cuda.Event(enable_timing=True)
        self._ref.record()
        self._ref.synchronize()  # once per run: aligns GPU time with time.monotonic()
        self._ref_host_s = time.monotonic()

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def to_host_s(self, event: Any) -> float | None:
        if isinstance(event, float):
            return event
        if not event.query():
            return None
        return self._ref_host_s + self._ref.elapsed_time(event) / 1000.0


def _train_phase(totals: PhaseTotals) -> dict[str, Any]:
    phase = empty_phase()
    phase["device_energy_j"] = dict(totals.device_energy_j)
    phase["duration_s"] = totals.duration_s
    phase["batches"] = totals.steps
    phase["rank_batches"] = totals.steps
    phase["samples"] = totals.samples
    return phase


class EnergyRun:
    """One measured run: devices, step boundaries, stages, trace, summary, cross-rank sums.

    Args:
        dirpath: where the trace, summary, rank records and report go; ``None`` writes
            nothing (figures stay available from :attr:`summary` and :attr:`metrics`).
        nvml_devices: GPUs to measure: ``"auto"`` (the GPU this process computes on; on
            CPU with the simulated NVML device, the simulated device of the local rank),
            ``"local_rank"``, ``"none"`` or a list of NVML indices.
        cpu: ``"auto"`` (RAPL where readable, else estimated), ``"rapl"``, ``"estimate"``
            or ``"none"``. RAPL is read by local rank 0 only (it measures the whole node).
        watts_per_core: power of one fully busy CPU core for the CPU estimate, watts.
        carbon_intensity_g_per_kwh: grid intensity in gCO2e/kWh (exclusive with
            ``country``; neither: the world average).
        country: ISO 3166 country code looked up in the shipped table.
        pue: the data centre's power usage effectiveness (>= 1.0).
        interval_s: sampling interval; ``None`` uses each device's preferred interval.
        log_every_n_steps: training steps between log intervals (metrics, cross-rank
            sums, rank records).
        trace: stream the per-step CSV trace (global rank zero).
        report: write ``report.md``/``.html`` after each completed stage (rank zero).
        write_files: ``False`` measures but writes nothing (e.g. ``fast_dev_run``).
        ranks: this process's place in the job; ``None`` detects it (``torch.distributed``
            or the launcher's variables) when the run opens.
        root_device: the ``torch.device`` this process computes on (``None``: detected
            from ``LOCAL_RANK`` when CUDA is available, else CPU). On CUDA, step
            boundaries are CUDA events (no synchronisation per step).
        sync: sum figures over ranks through ``torch.distributed`` at log intervals and
            stage ends. Every rank must then call :meth:`step` the same number of times
            between log intervals and end stages together (as DDP loops do).
        devices: already-open devices to measure instead of opening them here.
        rank_record_interval_s: the shortest time between two writes of this rank's
            record at log intervals (a file write; after a failure, a rank's figures are
            at most this old).
        resolve_interval_s: how often the background resolver turns recorded step
            boundaries into per-step energy (and trace rows); the training thread never
            does this work except at stage ends and checkpoints.
        intensity_file: a carbon-intensity time series (CSV/JSON, see
            :mod:`lightning_sustain.energy.intensity`): the summary then carries
            time-resolved CO2e next to the location-based (yearly) figure. A file that
            cannot be used is a warning and the yearly intensity is used (stated in the
            summary), never an error, unless ``intensity_strict``.
        intensity_timezone: IANA zone of naive timestamps in ``intensity_file``.
        intensity: an intensity source object instead of a file (e.g. a live provider).
        intensity_strict: raise on an unusable intensity file or uncovered time.
        flops_per_step: FLOPs of one training batch on one rank (a
            :class:`~lightning_sustain.energy.efficiency.StepFlops` from
            :func:`~lightning_sustain.energy.efficiency.count_step_flops`); see
            :meth:`set_flops_per_step`.

    Raises:
        ValueError: a setting is not valid; the message names it.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        *,
        nvml_devices: GpuSelection = "auto",
        cpu: CpuSelection = "auto",
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
        carbon_intensity_g_per_kwh: float | None = None,
        country: str | None = None,
        pue: float = 1.0,
        interval_s: float | None = None,
        log_every_n_steps: int = 50,
        trace: bool = True,
        report: bool = True,
        write_files: bool = True,
        ranks: RankInfo | None = None,
        root_device: torch.device | None = None,
        sync: bool = True,
        devices: Sequence[EnergyDevice] | None = None,
        rank_record_interval_s: float = 10.0,
        resolve_interval_s: float = 0.5,
        intensity_file: str | os.PathLike[str] | None = None,
        intensity_timezone: str = "UTC",
        intensity: IntensityProvider | None = None,
        intensity_strict: bool = False,
        flops_per_step: StepFlops | None = None,
    ) -> None:
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.nvml_devices = validate_gpu_selection(nvml_devices, "nvml_devices")
        self.cpu = validate_cpu_selection(cpu)
        self.watts_per_core = validate_positive("watts_per_core", watts_per_core)
        self.carbon: CarbonIntensity = resolve_carbon_intensity(carbon_intensity_g_per_kwh, country)
        self.pue = validate_positive("pue", pue)
        if self.pue < 1.0:
            raise ValueError(f"pue must be >= 1.0 (facility energy / IT energy), got {pue!r}.")
        self.interval_s = (
            None if interval_s is None else validate_positive("interval_s", interval_s)
        )
        self.log_every_n_steps = int(validate_positive_int("log_every_n_steps", log_every_n_steps))
        self.trace = trace
        self.report = report
        self.write_files = write_files
        self.ranks = ranks
        self.root_device = root_device
        self.sync = sync
        self._given_devices = list(devices) if devices is not None else None
        self.rank_record_interval_s = rank_record_interval_s
        self.resolve_interval_s = validate_positive("resolve_interval_s", resolve_interval_s)
        self.carbon_time: TimeResolvedCarbon | None = TimeResolvedCarbon.from_settings(
            intensity=intensity,
            intensity_file=None if intensity_file is None else str(intensity_file),
            timezone=intensity_timezone,
            strict=intensity_strict,
            annual=self.carbon,
            pue=self.pue,
        )
        self._carbon_t: float | None = None  # monotonic time integrated up to (open stage)
        self._carbon_stop: float | None = None  # the closing stage's end: never integrate past
        self._unix_offset_s = unix_offset_s()
        self._started_unix_s: float | None = None
        self._step_flops: dict[str, StepFlops] = {}
        self.flops_note: str | None = None
        if flops_per_step is not None:
            self.set_flops_per_step(flops_per_step)
        self._step_tokens: dict[int, int] = {}
        self._window_samples = 0
        self._window_tokens = 0
        # the resolver thread and the caller's thread share the resolved state below
        self._lock = threading.RLock()
        self._resolver: threading.Thread | None = None
        self._stop_resolver = threading.Event()
        self._wake_resolver = threading.Event()

        self.meter: EnergyMeter | None = None
        self.accountant: EnergyAccountant | None = None
        self._device_infos: list[DeviceInfo] = []
        self._failures: dict[str, str] = {}
        self._cuda_clock: _CudaClock | None = None
        self._pending_cuda: list[tuple[int, int, Any, Any, int]] = []
        self._trace_writer: TraceWriter | None = None
        self._trace_started = False

        self._prior: dict[str, Any] | None = None  # cluster totals restored from a checkpoint
        self._resumed = False
        self._phases = empty_phases()  # this process's resolved phases (train: closed meters)
        self._intervals: list[tuple[str, int, int, int, int, int]] = []
        self._optimizer_steps_done = 0
        self._stage_optimizer_steps = 0
        self._stages_log: list[dict[str, Any]] = []
        self._metric_marks: list[tuple[int, dict[str, Any]]] = []
        self._metric_history: list[dict[str, Any]] = []
        self._summary: dict[str, Any] | None = None
        self.metrics: dict[str, float] = {}

        self._stage: str | None = None
        self._stage_mark: int | None = None
        self._stage_t0_s = 0.0
        self._fit_base_j = 0.0
        self._fit_base_s = 0.0
        self._phase = "idle"
        self._phase_mark: int | None = None
        self._phase_t0_s = 0.0
        self._batches = self._samples = self._tokens = 0
        self._train_tokens = 0
        self._last: Any = None
        self._index = 0
        self._epoch = 0
        self._since_flush = 0
        self._last_resolve_s = time.monotonic()
        self._last_record_s = 0.0
        self._window_energy_j = 0.0
        self._window_duration_s = 0.0
        self._window_steps = 0

    # -- devices ------------------------------------------------------------------------
    def open(self) -> EnergyRun:
        """Open the devices and start sampling (done by :meth:`start_stage` when needed)."""
        if self.meter is not None:
            return self
        if self.ranks is None:
            self.ranks = RankInfo.detect()
        if self.root_device is None and torch.cuda.is_available():
            self.root_device = torch.device(
                "cuda", self.ranks.local_rank % torch.cuda.device_count()
            )
        if self._given_devices is not None:
            devices, self._given_devices = self._given_devices, []
        else:
            devices = open_rank_devices(
                self.nvml_devices,
                self.cpu,
                self.watts_per_core,
                self.root_device,
                self.ranks.local_rank,
            )
        if not devices:
            logger.warning(
                "EnergyRun measures no device (nvml_devices=%r, cpu=%r): energy figures will be 0.",
                self.nvml_devices,
                self.cpu,
            )
        self.meter = EnergyMeter(devices, interval_s=self.interval_s)
        self.accountant = EnergyAccountant(self.meter, on_steps=self._on_resolved_steps)
        self._device_infos = self.meter.device_infos
        self._start_resolver()
        if self.root_device is not None and getattr(self.root_device, "type", "") == "cuda":
            self._cuda_clock = _CudaClock(self.root_device)
        labels = ", ".join(f"{i.name} [{i.provenance_label}]" for i in self._device_infos)
        logger.info("EnergyRun measuring: %s", labels or "nothing")
        return self

    # -- energy budget (its logic: lightning_sustain/budget/energy_budget.py) --------------
    # (kept in this one block: attach_budget / should_stop; nothing else in EnergyRun knows
    # about budgets, and the hot path (step) is untouched)
    def attach_budget(
        self,
        budget: Any,
        *,
        action: str = "stop",
        save_checkpoint: Any = None,
        trial_checkpoint: Any = None,
        check_every_n_steps: int | None = None,
    ) -> Any:
        """Enforce an energy budget on this run (Fabric and plain loops).

        The Trainer has :class:`~lightning_sustain.EnergyBudget` for this. Call
        :meth:`should_stop` after each :meth:`step` of the ``fit`` stage::

            run = EnergyRun("out")
            budget = run.attach_budget(50_000.0, save_checkpoint=lambda: save("last.ckpt"))
            with run:
                for batch in loader:
                    ...; run.step(samples=len(batch))
                    if run.should_stop():   # checkpoint written, budget not crossed
                        break

        Args:
            budget: the budget in joules (all ranks and resumes together), or an
                :class:`~lightning_sustain.budget.energy_budget.EnergyBudgetCore`.
            action: ``"stop"`` (:meth:`should_stop` returns True), ``"raise"``
                (:class:`~lightning_sustain.BudgetExceeded` after the checkpoint) or
                ``"warn"`` (a warning, once; training goes on).
            save_checkpoint: writes the stop checkpoint and returns its path (its energy
                is counted); None writes none.
            trial_checkpoint: serialises the same state to memory (no file); timed once
                after the start-up steps to reserve the checkpoint's energy. None reserves
                a fifth of a step until the real one was measured.
            check_every_n_steps: steps between checks (None: every step on one process,
                every ``log_every_n_steps`` under ``torch.distributed``: a check is a
                small all-reduce there, and every rank must call :meth:`should_stop`).

        Returns:
            The budget's core (its ``spent_j``, ``last_check``, ``state_dict`` for resume).
        """
        from lightning_sustain.budget.energy_budget import EnergyBudgetCore

        core = budget if isinstance(budget, EnergyBudgetCore) else EnergyBudgetCore(
            budget, action  # type: ignore[arg-type]
        )
        core.save_checkpoint = save_checkpoint
        core.trial_checkpoint = trial_checkpoint
        every = check_every_n_steps
        if every is None:
            world = self.ranks.world_size if self.ranks else RankInfo.detect().world_size
            every = 1 if world <= 1 else self.log_every_n_steps
        self._budget = core
        self._budget_every = int(validate_positive_int("check_every_n_steps", every))
        return core

    def should_stop(self, validation_follows: bool = False) -> bool:
        """After a training step: can the attached budget not afford another one?

        Measures the step's end, checks the budget (every ``check_every_n_steps``) and
        acts: ``stop`` writes the checkpoint and returns True, ``raise`` writes it and
        raises, ``warn`` warns once and returns False. Without a budget, or outside the
        ``fit`` stage: False.

        Args:
            validation_follows: the loop validates after stopping: reserve it. Tell the
                budget what a validation run costs by calling ``core.begin("validation")``
                / ``core.end("validation")`` around the loop's validation (before one was
                measured, each of ``core.set_validation_batches(n)`` batches is bounded
                by a training step).

        Raises:
            BudgetExceeded: ``action="raise"`` and the budget cannot afford another step.
        """
        core = getattr(self, "_budget", None)
        if core is None or self._stage != "fit" or self.meter is None:
            return False
        now = time.monotonic()
        if core.meter is not self.meter:
            if core.started:  # the devices were reopened (a later fit): keep counting
                core.prior_spent_j = core.spent_j
            core.start(self.meter, now_s=self._stage_t0_s)
        steps = core.step_end(now)
        if steps % self._budget_every:
            return False
        sync = self.sync and process_group_ready()

        def reduce_sum(values: Sequence[float]) -> list[float]:
            summed = all_reduce_sum({str(i): float(v) for i, v in enumerate(values)})
            return [summed[str(i)] for i in range(len(values))]

        check = core.check(
            now,
            steps_ahead=self._budget_every,
            validation_follows=validation_follows,
            reduce_sum=reduce_sum if sync else None,
        )
        if check.would_cross:
            core.enforce(check, save=core.save_checkpoint)  # raises for "raise"
            return core.action == "stop"
        if not core.probed and core.action != "warn":
            due = core.probe_due()
            if sync:
                due = reduce_sum([1.0 if due else 0.0])[0] >= self.ranks.world_size  # type: ignore[union-attr]
            if due:
                core.probe(core.trial_checkpoint)
        return False

    # -- pickling (ddp_spawn pickles the Trainer's callbacks into each rank) --------------
    _LIVE_FIELDS = (
        "_resolver", "meter", "accountant", "_cuda_clock", "_trace_writer", "_pending_cuda",
    )  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        """Everything but live resources: threads, locks, open devices and files.

        A copy in another process (a spawned rank) opens its own devices when its first
        stage starts; the totals recorded so far travel with it.
        """
        state = dict(self.__dict__)
        for name in ("_lock", "_stop_resolver", "_wake_resolver"):
            state.pop(name, None)
        for name in self._LIVE_FIELDS:
            state[name] = [] if name == "_pending_cuda" else None
        state["_stage"] = None
        state["_trace_started"] = False
        if self.meter is not None and self._given_devices == []:
            # devices handed to this run were consumed by its meter and do not travel:
            # the copy discovers its own from nvml_devices / cpu
            state["_given_devices"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._stop_resolver = threading.Event()
        self._wake_resolver = threading.Event()

    def close(self) -> None:
        """End an open stage (as completed), stop sampling and close the trace.

        The object keeps every total: a later :meth:`start_stage` opens the devices again
        and keeps counting.
        """
        if self._stage is not None:
            self.end_stage()
        self._close_meter()

    def _start_resolver(self) -> None:
        self._stop_resolver = threading.Event()
        self._resolver = threading.Thread(
            target=self._resolver_loop,
            args=(self._stop_resolver,),
            name="lightning-sustain-resolver",
            daemon=True,
        )
        self._resolver.start()

    def _resolver_loop(self, stop: threading.Event) -> None:
        warned = False
        while not stop.is_set():
            self._wake_resolver.wait(self.resolve_interval_s)
            self._wake_resolver.clear()
            if stop.is_set():
                return
            try:
                self._resolve(convert_cuda=False)
                self._advance_carbon(final=False)
            except Exception as exc:  # measurement must never take training down
                if not warned:
                    logger.warning("EnergyRun's resolver failed (figures may lag): %s", exc)
                    warned = True

    def _stop_resolver_thread(self) -> None:
        thread, self._resolver = self._resolver, None
        if thread is None:
            return
        self._stop_resolver.set()
        self._wake_resolver.set()
        if thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def _close_meter(self) -> None:
        self._stop_resolver_thread()
        if self._trace_writer is not None:
            self._trace_writer.close()
            self._trace_writer = None
        if self.meter is not None and self.accountant is not None:
            self._failures.update(self.meter.failures())
            add_phase(
                self._phases["train"],
                _train_phase(self.accountant.totals["train"]),
                across_ranks=False,
            )
            self._phases["train"]["tokens"] += self._train_tokens
            self._train_tokens = 0
            if self._intervals:
                logger.debug("EnergyRun dropped %d unresolved intervals", len(self._intervals))
            self._intervals = []
            self._metric_marks = []
            self._step_tokens = {}
            self.meter.close()
        self.meter = None
        self.accountant = None
        self._cuda_clock = None
        self._pending_cuda = []

    @property
    def device_infos(self) -> list[DeviceInfo]:
        """The measured devices (of the last opening)."""
        return list(self._device_infos)

    @property
    def is_global_zero(self) -> bool:
        """True on the process that writes the job's files."""
        return self.ranks is None or self.ranks.is_global_zero

    # -- stages and phases --------------------------------------------------------------
    @property
    def current_stage(self) -> str | None:
        """The open stage, or None."""
        return self._stage

    @property
    def current_phase(self) -> str:
        """The phase step boundaries are counted in: ``train``, ``validation``, a stage."""
        return self._phase

    def start_stage(self, stage: str = "fit") -> None:
        """Open a stage (``fit``, ``validate``, ``test`` or ``predict``).

        In ``fit``, :meth:`step` records training steps (per-step energy, trace rows); in
        the other stages it counts batches, samples and tokens of the stage.

        Raises:
            ValueError: an unknown stage name.
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if self._stage is not None:
            self.end_stage()
        self.open()
        assert self.meter is not None and self.accountant is not None
        # make sure every curve has started before the first step (a counter may take one
        # update period to show a change)
        self.meter.wait_until_covered(time.monotonic(), timeout_s=0.5)
        now = time.monotonic()
        self._stage = stage
        self._stage_t0_s = now
        self._stage_mark = self.accountant.mark(now)
        self._unix_offset_s = unix_offset_s()
        if self._started_unix_s is None and (stage == "fit" or not self._stages_log):
            # the trace's times count from the (first) fit start of this process
            self._started_unix_s = now + self._unix_offset_s
        with self._lock:
            self._carbon_t, self._carbon_stop = now, None
        self._stage_optimizer_steps = 0
        self._since_flush = 0
        if stage == "fit":
            self._fit_base_j = phase_energy_j(self._phases["fit"]) + self._prior_energy("fit")
            self._fit_base_s = self._phases["fit"]["duration_s"] + self._prior_duration("fit")
            self._open_trace(now)
            self._enter_phase("train", now)
        else:
            self._enter_phase(stage, now)

    def _open_trace(self, t0_s: float) -> None:
        if not (self.trace and self.write_files and self.dirpath is not None):
            return
        if not self.is_global_zero or self._trace_writer is not None:
            return
        try:
            self._trace_writer = TraceWriter(
                self.dirpath / TRACE_FILENAME,
                self._device_infos,
                t0_s=t0_s,
                rank=self.ranks.global_rank if self.ranks else 0,
                append=self._resumed or self._trace_started,
            )
            self._trace_started = True
        except OSError as exc:
            logger.warning("EnergyRun cannot write its trace: %s", exc)

    def _enter_phase(self, phase: str, now: float) -> None:
        self._phase = phase
        self._phase_t0_s = now
        self._last = None
        self._batches = self._samples = self._tokens = 0
        if phase not in ("train", self._stage) and self.accountant is not None:
            self._phase_mark = self.accountant.mark(now)
        else:
            self._phase_mark = None

    def _leave_phase(self, now: float) -> None:
        if self._phase_mark is not None and self.accountant is not None:
            end = self.accountant.mark(now)
            with self._lock:
                self._intervals.append(
                    (self._phase, self._phase_mark, end, self._batches, self._samples, self._tokens)
                )
        self._phase_mark = None

    def begin_phase(self, phase: str = "validation") -> None:
        """Enter a phase inside the open stage (``validation`` inside ``fit``).

        Step boundaries counted meanwhile go to that phase; the next training step starts
        at its own first boundary.
        """
        if phase not in PHASE_NAMES or phase in ("train", "fit"):
            raise ValueError(
                "phase must be one of 'validation', 'validate', 'test', 'predict', 'explain', "
                f"got {phase!r}"
            )
        if phase == "explain" and self._stage != "fit":
            return  # an explanation is measured as a part of fit only
        if self._stage is None:
            self.start_stage("validate" if phase == "validation" else phase)
            return
        now = time.monotonic()
        self._leave_phase(now)
        self._enter_phase(phase, now)

    def end_phase(self) -> None:
        """Leave the phase entered by :meth:`begin_phase` (back to training in ``fit``)."""
        if self._stage is None or self._phase in ("train", self._stage):
            return
        now = time.monotonic()
        self._leave_phase(now)
        self._enter_phase("train" if self._stage == "fit" else self._stage, now)

    @contextlib.contextmanager
    def stage(self, stage: str) -> Iterator[EnergyRun]:
        """Context manager around :meth:`start_stage` / :meth:`end_stage`.

        On an exception the stage ends as interrupted, without any collective.
        """
        self.start_stage(stage)
        try:
            yield self
        except BaseException as exc:
            self.fail(exc)
            raise
        self.end_stage()

    @contextlib.contextmanager
    def phase_scope(self, phase: str = "validation") -> Iterator[EnergyRun]:
        """Context manager around :meth:`begin_phase` / :meth:`end_phase`."""
        self.begin_phase(phase)
        try:
            yield self
        finally:
            self.end_phase()

    def __enter__(self) -> EnergyRun:
        if self._stage is None:
            self.start_stage("fit")
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.fail(exc)
        else:
            self.end_stage()

    # -- hot path -----------------------------------------------------------------------
    def begin_step(self) -> None:
        """Mark where the next step starts when nothing marked it yet (optional).

        Steps are contiguous: a step starts where the previous one ended. After a phase
        change the first step starts at the phase's start unless this is called.
        """
        if self._last is None and self._phase == "train":
            clock = self._cuda_clock
            self._last = clock.mark() if clock is not None else time.monotonic()

    def step(
        self,
        samples: int = 0,
        tokens: int = 0,
        *,
        optimizer_step: bool = True,
        index: int | None = None,
    ) -> dict[str, float] | None:
        """Record the end of a step (one timestamp; energy is resolved later).

        Args:
            samples: samples in the step's batch.
            tokens: tokens in the step's batch.
            optimizer_step: the step ended with an optimizer step (``False`` while
                accumulating gradients); counts ``steps`` in the summary.
            index: the step's index in the trace; ``None`` numbers batches from 0.

        Returns:
            The metrics of a log interval when this step closed one, else None.
        """
        clock = self._cuda_clock
        now = clock.mark() if clock is not None else time.monotonic()
        if self._phase != "train":
            self._batches += 1
            self._samples += samples
            self._tokens += tokens
            return None
        start = self._last if self._last is not None else self._phase_t0_s
        self._last = now
        if index is None:
            index = self._index
        self._index = index + 1
        if optimizer_step:
            self._stage_optimizer_steps += 1
        self._train_tokens += tokens
        if tokens:
            self._step_tokens[index] = tokens
        accountant = self.accountant
        if accountant is None:
            return None
        if clock is not None:
            self._pending_cuda.append((index, self._epoch, start, now, samples))
        else:
            accountant.record_step(index, self._epoch, start, now, samples)
        self._since_flush += 1
        if self._since_flush >= self.log_every_n_steps:
            return self.flush()
        if accountant.needs_resolve():  # bounds memory if the resolver falls behind
            self._wake_resolver.set()
        return None

    def set_epoch(self, epoch: int) -> None:
        """The epoch written in trace rows from now on."""
        self._epoch = epoch

    def set_optimizer_steps(self, steps: int) -> None:
        """Optimizer steps of the open stage, when the loop counts them itself.

        The Trainer adapter passes ``trainer.global_step`` progress here, so ``steps``
        matches Lightning under gradient accumulation and any number of optimizers.
        """
        self._stage_optimizer_steps = int(steps)

    # -- resolution and log intervals ---------------------------------------------------
    def _convert_cuda(self, wait: bool = False) -> None:
        clock, accountant = self._cuda_clock, self.accountant
        if clock is None or accountant is None:
            return
        remaining = []
        for index, epoch, start, end, samples in self._pending_cuda:
            if wait and not isinstance(end, float):
                end.synchronize()
            end_s, start_s = clock.to_host_s(end), clock.to_host_s(start)
            if end_s is None or start_s is None:
                remaining.append((index, epoch, start, end, samples))
            else:
                accountant.record_step(index, epoch, start_s, end_s, samples)
        self._pending_cuda = remaining

    def _resolve(
        self, wait: bool = False, timeout_s: float = 2.0, convert_cuda: bool = True
    ) -> None:
        with self._lock:
            accountant = self.accountant
            if accountant is None:
                return
            self._last_resolve_s = time.monotonic()
            if convert_cuda:  # CUDA events are only touched on the thread that records them
                self._convert_cuda(wait)
            accountant.resolve(wait=wait, timeout_s=timeout_s)
            self._resolve_intervals()

    def _resolve_intervals(self) -> None:
        accountant = self.accountant
        if accountant is None:
            return
        pending = []
        for interval in self._intervals:
            phase, start_mark, end_mark, batches, samples, tokens = interval
            start, end = accountant.energy_at_mark(start_mark), accountant.energy_at_mark(end_mark)
            t0, t1 = accountant.time_of_mark(start_mark), accountant.time_of_mark(end_mark)
            if start is None or end is None or t0 is None or t1 is None:
                pending.append(interval)
                continue
            add_phase(
                self._phases[phase],
                {
                    "device_energy_j": {d: end[d] - start.get(d, 0.0) for d in end},
                    "duration_s": t1 - t0,
                    "batches": batches,
                    "samples": samples,
                    "tokens": tokens,
                },
                across_ranks=False,
            )
        self._intervals = pending
        self._resolve_metric_marks()

    def _on_resolved_steps(self, steps: list[StepEnergy]) -> None:
        tokens = self._step_tokens
        for s in steps:
            self._window_energy_j += s.energy_j
            self._window_duration_s += s.duration_s
            self._window_samples += s.samples
            if tokens:
                self._window_tokens += tokens.pop(s.step, 0)
        self._window_steps += len(steps)
        if self._trace_writer is not None:
            try:
                self._trace_writer.write(steps)
            except OSError as exc:
                logger.warning("EnergyRun stopped writing its trace: %s", exc)
                self._trace_writer.close()
                self._trace_writer = None

    def _train_totals(self) -> dict[str, Any]:
        phase = copy.deepcopy(self._phases["train"])
        if self.accountant is not None:
            add_phase(phase, _train_phase(self.accountant.totals["train"]), across_ranks=False)
        phase["tokens"] = self._phases["train"]["tokens"] + self._train_tokens
        return phase

    def _stage_start_energy(self) -> dict[str, float] | None:
        """Cumulative energy per device at the open stage's start (None: not known yet).

        The resolver evaluates the stage's start mark in its next batch; until then (early
        in a stage) the curves answer directly once they cover the start, so log intervals
        do not have to wake the resolver for it.
        """
        if self.accountant is None or self._stage_mark is None:
            return None
        start = self.accountant.energy_at_mark(self._stage_mark)
        if start is not None or self.meter is None:
            return start
        covered = self.meter.latest_time_s()
        if covered is None or covered < self._stage_t0_s:
            return None
        return {d: v[0] for d, v in self.meter.energy_at([self._stage_t0_s]).items()}

    def _open_stage_energy_j(self, until_s: float) -> float:
        """Energy of the open stage from its start to ``until_s`` (0 while unresolved)."""
        if self.accountant is None or self.meter is None or self._stage_mark is None:
            return 0.0
        start = self._stage_start_energy()
        if start is None:
            return 0.0
        curves = self.meter.energy_at([until_s])
        return float(sum(values[0] - start.get(d, 0.0) for d, values in curves.items()))

    def flush(self, sync: bool | None = None) -> dict[str, float]:
        """Log-interval work: resolve, sum over ranks, write this rank's record.

        Called by :meth:`step` every ``log_every_n_steps`` training steps. Call it yourself
        only where every rank calls it too (it holds one small collective when ``sync``).

        Returns:
            The job-wide metrics (``energy/...`` keys), also kept in :attr:`metrics`.
        """
        self._since_flush = 0
        # the steps themselves are resolved by the resolver thread: here only what it
        # resolved so far is read (at most resolve_interval_s old)
        with self._lock:
            if self._cuda_clock is not None:
                self._convert_cuda()
            if self._window_duration_s > 0:
                power_w = self._window_energy_j / self._window_duration_s
            else:  # no step resolved in this window yet: the curves' last second instead
                power_w = self._recent_power_w()
            train = self._train_totals()
            covered = self.meter.latest_time_s() if self.meter is not None else None
            run_j = self._closed_run_energy_j()
            if covered is not None and self._stage is not None:
                run_j += self._open_stage_energy_j(covered)
            local = {
                "train_energy_j": phase_energy_j(train),
                "power_w": power_w,
                "window_energy_j": self._window_energy_j,
                "window_steps": float(self._window_steps),
                "window_samples": float(self._window_samples),
                "window_tokens": float(self._window_tokens),
                "run_energy_j": run_j,
            }
            self._window_energy_j = self._window_duration_s = 0.0
            self._window_steps = self._window_samples = self._window_tokens = 0
        # Wake the resolver so the next interval's figures are fresh, at most every
        # LOG_REFRESH_S: waking it at every log interval made it run ~15 times a second at
        # short steps (its per-run cost is fixed: curve queries, the attribution's choice)
        if time.monotonic() - self._last_resolve_s >= LOG_REFRESH_S:
            self._wake_resolver.set()
        do_sync = self.sync if sync is None else sync
        cluster = all_reduce_sum(local) if do_sync else local
        train_j = cluster["train_energy_j"] + self._prior_energy("train")
        total_j = cluster["run_energy_j"] + sum(self._prior_energy(s) for s in STAGES)
        steps = max(1.0, cluster["window_steps"])
        metrics = {
            f"{METRIC_PREFIX}energy_kwh": joules_to_kwh(total_j),
            f"{METRIC_PREFIX}co2e_g": co2e_g(total_j, self.carbon, self.pue),
            f"{METRIC_PREFIX}train_energy_kwh": joules_to_kwh(train_j),
            f"{METRIC_PREFIX}train_co2e_g": co2e_g(train_j, self.carbon, self.pue),
            f"{METRIC_PREFIX}power_w": cluster["power_w"],
            f"{METRIC_PREFIX}step_energy_j": cluster["window_energy_j"] / steps,
        }
        metrics.update(self._window_efficiency(cluster))
        if self.meter is not None and (self.ranks is None or self.ranks.world_size == 1):
            labels = device_labels(self._device_infos)
            for device_id, power in self.meter.power_w().items():
                if power is not None:
                    metrics[f"{METRIC_PREFIX}{labels[device_id]}_power_w"] = power
        self.metrics = metrics
        now = time.monotonic()
        if now - self._last_record_s >= self.rank_record_interval_s:
            self._last_record_s = now
            self._write_rank_record(open_until=covered, status="running")
        return metrics

    def _recent_power_w(self, span_s: float = 1.0) -> float:
        if self.meter is None:
            return 0.0
        total = 0.0
        for stream in self.meter.streams:
            latest = stream.latest_time_s
            if latest is None:
                continue
            first = stream.first_time_s or latest
            total += stream.mean_power_w(max(first, latest - span_s), latest) or 0.0
        return total

    def _closed_run_energy_j(self) -> float:
        return float(sum(phase_energy_j(self._phases[s]) for s in STAGES))

    def _prior_energy(self, phase: str) -> float:
        if not self._prior:
            return 0.0
        return phase_energy_j(self._prior.get("phases", {}).get(phase, {}))

    def _prior_duration(self, phase: str) -> float:
        if not self._prior:
            return 0.0
        return float(self._prior.get("phases", {}).get(phase, {}).get("duration_s", 0.0))

    # -- metric history (energy to target) ----------------------------------------------
    def record_metrics(self, values: dict[str, float], **payload: Any) -> None:
        """Remember metric values now, with the fit energy spent so far (for the report).

        Args:
            values: metric name -> value.
            **payload: extra fields (``epoch``, ``step``).
        """
        if self.accountant is None or self._stage != "fit" or not values:
            return
        mark = self.accountant.mark(time.monotonic())
        self._metric_marks.append((mark, dict(payload, metrics=dict(values))))

    def _resolve_metric_marks(self) -> None:
        accountant = self.accountant
        if accountant is None or self._stage_mark is None or not self._metric_marks:
            return
        start = accountant.energy_at_mark(self._stage_mark)
        start_t = accountant.time_of_mark(self._stage_mark)
        if start is None or start_t is None:
            return
        pending = []
        for mark, payload in self._metric_marks:
            at, t_s = accountant.energy_at_mark(mark), accountant.time_of_mark(mark)
            if at is None or t_s is None:
                pending.append((mark, payload))
                continue
            energy_j = self._fit_base_j + sum(at[d] - start.get(d, 0.0) for d in at)
            self._metric_history.append(
                dict(
                    payload,
                    energy_j=energy_j,
                    co2e_g=co2e_g(energy_j, self.carbon, self.pue),
                    elapsed_s=self._fit_base_s + t_s - start_t,
                )
            )
        self._metric_marks = pending

    # -- efficiency and time-resolved carbon -------------------------------------------
    def set_flops_per_step(
        self, flops: StepFlops | int, *, method: str | None = None, phase: str = "train"
    ) -> None:
        """FLOPs of one batch on one rank, for J per TFLOP and TFLOP/s per W.

        Count them once on a sample batch with
        :func:`~lightning_sustain.energy.efficiency.count_step_flops` (forward and
        backward for ``"train"``, forward only for ``"predict"``), or pass a number and
        say how it was obtained in ``method``. Under DDP every rank runs this many FLOPs
        per batch: the summary sets ``flops x`` batches summed over ranks against the
        energy of every rank.

        Raises:
            ValueError: a negative or non-integer count, a number without ``method``, or
                a phase other than ``"train"``/``"predict"``.
        """
        if phase not in ("train", "predict"):
            raise ValueError(f"phase must be 'train' or 'predict', got {phase!r}.")
        if not isinstance(flops, StepFlops):
            if isinstance(flops, bool) or not isinstance(flops, int) or flops < 0:
                raise ValueError(f"flops per step must be a non-negative integer, got {flops!r}.")
            if not method:
                raise ValueError(
                    "set_flops_per_step(<number>) needs method=... saying how the FLOPs were "
                    "counted (or pass count_step_flops(...))."
                )
            flops = StepFlops(flops, phase == "train", None, None, method)
        elif method:
            flops = StepFlops(
                flops.flops_per_step, flops.train, flops.samples_per_step,
                flops.tokens_per_step, method,
            )  # fmt: skip
        self._step_flops[phase] = flops

    @property
    def flops_per_step(self) -> dict[str, StepFlops]:
        """The FLOPs per batch set so far, by phase (``train``, ``predict``)."""
        return dict(self._step_flops)

    def _window_efficiency(self, cluster: dict[str, float]) -> dict[str, float]:
        """Log-interval figures over the steps resolved since the last interval (all ranks)."""
        energy = cluster["window_energy_j"]
        out: dict[str, float] = {}
        if energy <= 0:
            return out
        flops = self._step_flops.get("train")
        if flops is not None and flops.flops_per_step > 0 and cluster["window_steps"] > 0:
            tflop = flops.flops_per_step * cluster["window_steps"] / 1e12
            out[f"{METRIC_PREFIX}j_per_tflop"] = energy / tflop
            out[f"{METRIC_PREFIX}tflops_per_s_per_w"] = tflop / energy
        if cluster.get("window_samples", 0) > 0:
            out[f"{METRIC_PREFIX}samples_per_j"] = cluster["window_samples"] / energy
        if cluster.get("window_tokens", 0) > 0:
            out[f"{METRIC_PREFIX}tokens_per_j"] = cluster["window_tokens"] / energy
        return out

    def _advance_carbon(self, final: bool, until: float | None = None) -> None:
        """Integrate time-resolved CO2e of the open stage up to now (or ``until``)."""
        tr = self.carbon_time
        if tr is None:
            return
        with self._lock:
            meter, start = self.meter, self._carbon_t
            if meter is None or start is None or self._stage is None:
                return
            end = until if until is not None else meter.latest_time_s()
            if end is not None and self._carbon_stop is not None:
                end = min(end, self._carbon_stop)
            if end is None or (until is None and end - start < tr.resolution_s):
                return
            tr.advance(meter, start, end, self._unix_offset_s)
            self._carbon_t = end
            if final:
                self._carbon_t = self._carbon_stop = None

    def _finish_summary(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Add ``started_at`` and the efficiency figures to a freshly built summary."""
        if self._started_unix_s is not None:
            summary["started_at"] = _dt.datetime.fromtimestamp(
                self._started_unix_s, _dt.timezone.utc
            ).isoformat(timespec="milliseconds")
        try:
            add_efficiency(summary, self._step_flops, self.flops_note)
        except Exception as exc:  # figures are optional; the summary is not
            logger.warning("EnergyRun could not compute the efficiency figures: %s", exc)
        return summary

    # -- records and summaries ----------------------------------------------------------
    def local_record(self, open_until: float | None = None) -> dict[str, Any]:
        """This rank's record: its phases, optimizer steps, devices and failures.

        Args:
            open_until: include the open stage up to this ``time.monotonic()`` moment.
        """
        with self._lock:
            phases = copy.deepcopy(self._phases)
            phases["train"] = self._train_totals()
        if open_until is not None and self._stage is not None and self.accountant is not None:
            start = self._stage_start_energy()
            if start is not None and self.meter is not None:
                curves = self.meter.energy_at([open_until])
                add_phase(
                    phases[self._stage],
                    {
                        "device_energy_j": {d: v[0] - start.get(d, 0.0) for d, v in curves.items()},
                        "duration_s": max(0.0, open_until - self._stage_t0_s),
                        "batches": self._batches,
                        "samples": self._samples,
                        "tokens": self._tokens,
                    },
                    across_ranks=False,
                )
        failures = dict(self._failures)
        if self.meter is not None:
            failures.update(self.meter.failures())
        ranks = self.ranks or RankInfo()
        return {
            "global_rank": ranks.global_rank,
            "local_rank": ranks.local_rank,
            "node_rank": ranks.node_rank,
            "world_size": ranks.world_size,
            "hostname": os.uname().nodename if hasattr(os, "uname") else "",
            "pid": os.getpid(),
            "written_unix_s": time.time(),
            "devices": [
                {
                    "device_id": i.device_id,
                    "name": i.name,
                    "kind": i.kind,
                    "provenance": i.provenance_label,
                    "simulated": i.simulated,
                    "fit_energy_j": phases["fit"]["device_energy_j"].get(i.device_id, 0.0),
                    "train_energy_j": phases["train"]["device_energy_j"].get(i.device_id, 0.0),
                }
                for i in self._device_infos
            ],
            "phases": phases,
            "optimizer_steps": self._optimizer_steps_done + self._stage_optimizer_steps,
            "failures": failures,
            "metric_history": list(self._metric_history),
            **({"carbon_time": self.carbon_time.record()} if self.carbon_time else {}),
        }

    def _write_rank_record(self, open_until: float | None, status: str) -> None:
        if not self.write_files or self.dirpath is None:
            return
        record = self.local_record(open_until)
        record["status"] = status
        write_rank_record(self.dirpath, record)

    def end_stage(self, status: str = "completed", gather: bool = True) -> dict[str, Any] | None:
        """Close the open stage, write the summary (rank zero) and the report.

        Args:
            status: ``"completed"`` or a reason such as ``"interrupted: KeyboardInterrupt"``.
            gather: collect every rank's record through ``torch.distributed`` (every rank
                must call this). ``False`` (exception paths) collects nothing: the summary
                adds the other ranks' last written records and names those missing.

        Returns:
            The job summary (on every rank), or None when no stage was open.
        """
        if self._stage is None:
            return None
        stage = self._stage
        now = time.monotonic()
        self._carbon_stop = now
        self._leave_phase(now)
        if self.accountant is not None and self._stage_mark is not None:
            end = self.accountant.mark(now)
            counts = (0, 0, 0) if stage == "fit" else (self._batches, self._samples, self._tokens)
            with self._lock:
                self._intervals.append((stage, self._stage_mark, end, *counts))
        try:
            self._resolve(wait=True)
        except Exception as exc:  # a summary must still be written
            logger.warning("EnergyRun could not resolve the last steps: %s", exc)
        self._advance_carbon(final=True, until=now)
        self._optimizer_steps_done += self._stage_optimizer_steps
        self._stage_optimizer_steps = 0
        self._stages_log.append({"stage": stage, "status": status})
        self._stage = None
        self._stage_mark = None
        self._phase = "idle"
        self._last = None
        record = self.local_record()
        record["status"] = status
        world = self.ranks.world_size if self.ranks else 1
        summary_status = status
        if gather and self.sync and process_group_ready():
            ranks_records = all_gather_objects(record)
            summary = self._summary_from(ranks_records, summary_status, world, [])
        elif world > 1 and self.dirpath is not None:
            self._write_rank_record(None, status)
            summary = summarise_rank_files(
                self.dirpath,
                world,
                carbon=self.carbon,
                pue=self.pue,
                prior=self._prior,
                status=summary_status,
                resumed=self._resumed,
                stages=self._all_stages(),
                own=record,
            )
        else:
            summary = self._summary_from([record], summary_status, world, [])
        summary = self._finish_summary(summary)
        self._summary = summary
        self.metrics = dict(self.metrics)
        self.metrics[f"{METRIC_PREFIX}energy_kwh"] = summary["totals"]["energy_kwh"]
        self.metrics[f"{METRIC_PREFIX}co2e_g"] = summary["totals"]["co2e_g"]
        self.metrics[f"{METRIC_PREFIX}train_energy_kwh"] = joules_to_kwh(
            summary["totals"]["train_energy_j"]
        )
        for key in ("j_per_tflop", "tflops_per_s_per_w", "tokens_per_j", "samples_per_j",
                    "co2e_time_resolved_g"):  # fmt: skip
            value = summary["totals"].get(key)
            if value is not None:
                self.metrics[f"{METRIC_PREFIX}{key}"] = float(value)
        if self.write_files and self.dirpath is not None:
            self._write_rank_record(None, status)
            # rank zero writes the job summary; on a failure path any rank writes what it knows
            if self.is_global_zero or not gather:
                self._write_summary(summary)
                if self.report and status == "completed" and self.is_global_zero:
                    self._write_report()
        return summary

    def _all_stages(self) -> list[dict[str, Any]]:
        prior = list(self._prior.get("stages", [])) if self._prior else []
        return prior + list(self._stages_log)

    def _summary_from(
        self, records: list[dict[str, Any]], status: str, world: int, missing: list[int]
    ) -> dict[str, Any]:
        return build_summary(
            records,
            prior=self._prior,
            carbon=self.carbon,
            pue=self.pue,
            status=status,
            resumed=self._resumed,
            world_size=world,
            stages=self._all_stages(),
            missing_ranks=missing,
        )

    def _write_summary(self, summary: dict[str, Any]) -> None:
        assert self.dirpath is not None
        try:
            path = write_summary(self.dirpath / SUMMARY_FILENAME, summary)
        except OSError as exc:
            logger.warning("EnergyRun could not write its summary: %s", exc)
            return
        totals = summary["totals"]
        logger.info(
            "Energy: %.4g kWh (%s), %.4g g CO2e over %.1f s; summary in %s",
            totals["energy_kwh"],
            summary["provenance"],
            totals["co2e_g"],
            totals["duration_s"],
            path,
        )

    def _write_report(self) -> None:
        try:
            from lightning_sustain.report.builder import build_report

            result = build_report(self.dirpath)  # type: ignore[arg-type]
            logger.info("Sustainability report: %s", result.markdown_path)
        except Exception as exc:  # the report must never fail a finished run
            logger.warning("EnergyRun could not write the report: %s", exc)

    def fail(self, exc: BaseException | str) -> None:
        """Exception path: keep what was measured, without any collective, and close.

        The open stage ends as ``interrupted: <exception type>``; its energy up to now, the
        earlier stages and the other ranks' last records stay in the summary.
        """
        reason = exc if isinstance(exc, str) else type(exc).__name__
        try:
            if self._stage is not None:
                self.end_stage(status=f"interrupted: {reason}", gather=False)
        except Exception as err:  # never mask the user's exception
            logger.warning("EnergyRun could not write its summary after an error: %s", err)
        finally:
            self._close_meter()

    @property
    def summary(self) -> dict[str, Any] | None:
        """The last job summary (on every rank), or None."""
        return self._summary

    def total_energy_j(self, phase: str = "train") -> float:
        """This process's energy in a phase so far plus the checkpointed total, joules.

        Only steps already resolved at a log interval are included.
        """
        own = self._train_totals() if phase == "train" else self._phases.get(phase, {})
        return phase_energy_j(own) + self._prior_energy(phase)

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Job-wide totals so far, the open stage included, so a resume keeps counting.

        With ``sync`` under ``torch.distributed`` this gathers every rank's record (every
        rank must call it, as Lightning does when saving a checkpoint).
        """
        until = None
        if self.accountant is not None:
            now = time.monotonic()
            self._resolve(wait=True, timeout_s=1.0)
            if self.meter is not None:
                covered = self.meter.wait_until_covered(now, timeout_s=1.0)
                until = now if covered else self.meter.latest_time_s()
            if until is not None:  # the checkpoint carries time-resolved CO2e up to `until`
                self._advance_carbon(final=False, until=until)
        record = self.local_record(open_until=until)
        records = all_gather_objects(record) if self.sync and process_group_ready() else [record]
        phases, optimizer_steps = combine_phases(records, self._prior)
        state = {
            "version": STATE_VERSION,
            "phases": phases,
            "optimizer_steps": optimizer_steps,
            "stages": self._all_stages(),
        }
        carbon_parts = [r["carbon_time"] for r in records if "carbon_time" in r]
        prior_carbon = (self._prior or {}).get("carbon_time")
        if prior_carbon:
            carbon_parts.append(prior_carbon)
        if carbon_parts:
            state["carbon_time"] = {
                key: sum(float(p.get(key, 0.0)) for p in carbon_parts)
                for key in ("energy_j", "co2e_g", "fallback_s", "duration_s")
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: its totals become the run's prior.

        What this object recorded before is superseded (the checkpoint already holds it).

        Raises:
            ValueError: the state is not in a known format.
        """
        version = state.get("version") if isinstance(state, dict) else None
        if version == 1 and isinstance(state.get("totals"), dict):
            phases = empty_phases()
            for name, value in state["totals"].items():
                if name in phases and isinstance(value, dict):
                    converted = empty_phase()
                    converted["device_energy_j"] = {
                        k: float(v) for k, v in value.get("device_energy_j", {}).items()
                    }
                    converted["duration_s"] = float(value.get("duration_s", 0.0))
                    converted["batches"] = int(value.get("steps", 0))
                    converted["samples"] = int(value.get("samples", 0))
                    phases[name] = converted
            prior = {"phases": phases, "optimizer_steps": phases["train"]["batches"], "stages": []}
        elif version == STATE_VERSION and isinstance(state.get("phases"), dict):
            prior = {
                "phases": {**empty_phases(), **copy.deepcopy(state["phases"])},
                "optimizer_steps": int(state.get("optimizer_steps", 0)),
                "stages": list(state.get("stages", [])),
            }
            if isinstance(state.get("carbon_time"), dict):
                prior["carbon_time"] = dict(state["carbon_time"])
        else:
            raise ValueError(
                "The checkpoint's energy state is not in a known format; start a new run or "
                "remove the EnergyMonitor state from the checkpoint."
            )
        self._prior = prior
        self._resumed = True
        self._index = int(prior["phases"]["train"].get("batches", 0))
        if self._stage is None:
            self._phases = empty_phases()
            self._train_tokens = 0
            self._optimizer_steps_done = 0
            self._stages_log = []
            self._metric_history = []
            if self.accountant is not None:
                # the live accountant's steps are in the checkpoint too: count from here on
                self._phases["train"] = {
                    **empty_phase(),
                    **{
                        k: -v if isinstance(v, (int, float)) else v
                        for k, v in _train_phase(self.accountant.totals["train"]).items()
                        if k != "device_energy_j"
                    },
                    "device_energy_j": {
                        d: -j for d, j in self.accountant.totals["train"].device_energy_j.items()
                    },
                }
