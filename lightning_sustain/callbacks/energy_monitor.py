"""EnergyMonitor: per-step energy, power and CO2e of a Lightning run.

The callback is thin glue: devices and sampling live in :mod:`lightning_sustain.energy`,
the trace and summary files in :mod:`lightning_sustain.report.trace`. The training hot
path records step boundaries only (a ``time.monotonic()`` call, or a CUDA event on GPU);
energy is resolved from the sampled curves at log intervals.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size

from lightning_sustain.callbacks._devices import (
    CpuSelection,
    GpuSelection,
    open_process_devices,
    validate_cpu_selection,
    validate_gpu_selection,
)
from lightning_sustain.energy.accounting import (
    EnergyAccountant,
    PhaseTotals,
    StepEnergy,
    empty_totals,
    totals_from_dict,
    totals_to_dict,
)
from lightning_sustain.energy.carbon import (
    CarbonIntensity,
    co2e_g,
    joules_to_kwh,
    resolve_carbon_intensity,
)
from lightning_sustain.energy.estimate import (
    DEFAULT_WATTS_PER_CORE,
    validate_positive,
    validate_positive_int,
)
from lightning_sustain.energy.meter import EnergyMeter
from lightning_sustain.report.trace import (
    SUMMARY_FILENAME,
    SUMMARY_SCHEMA,
    TRACE_FILENAME,
    TraceWriter,
    device_labels,
    write_summary,
)

logger = logging.getLogger(__name__)

_METRIC_PREFIX = "energy/"


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _batch_size(batch: Any) -> int:
    """Samples in a batch: a fast path for the usual shapes, Lightning's helper otherwise."""
    kind = type(batch)
    first = None
    if kind is tuple or kind is list:
        first = batch[0] if batch else None
    elif kind is dict:
        first = next(iter(batch.values()), None)
    elif kind is torch.Tensor:
        first = batch
    if type(first) is torch.Tensor and first.dim() > 0:
        return first.shape[0]
    try:
        return extract_batch_size(batch)
    except Exception:
        return 0


def _sum_histories(histories: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Cluster-wide metric history: rank 0's entries with energy summed over ranks."""
    if not histories:
        return []
    merged = [dict(entry) for entry in histories[0]]
    for other in histories[1:]:
        for entry, extra in zip(merged, other, strict=False):
            entry["energy_j"] += extra["energy_j"]
            entry["co2e_g"] += extra["co2e_g"]
    return merged


def end_is_late(end: Any, last_flush_s: float) -> bool:
    """True when a host timestamp is more than 30 s after the last flush."""
    return isinstance(end, float) and end - last_flush_s > 30.0


class _CudaClock:
    """Step boundaries as CUDA events, converted to host time once they completed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        torch.cuda.synchronize(device)
        self._ref = torch.cuda.Event(enable_timing=True)
        self._ref.record()
        self._ref.synchronize()  # once per run: aligns GPU time with time.monotonic()
        self._ref_host_s = time.monotonic()

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def to_host_s(self, event: torch.cuda.Event) -> float | None:
        if not event.query():
            return None
        return self._ref_host_s + self._ref.elapsed_time(event) / 1000.0


class EnergyMonitor(Callback):
    r"""Measure energy, power and CO2e of every training step, validation and test run.

    Energy comes from the GPUs this process trains on (NVML energy counter, or power
    samples integrated over time) and from the CPU (RAPL counters, or an estimate from
    CPU time). Every figure carries its provenance: ``counter``, ``integrated`` or
    ``estimated``, with ``(simulated)`` when it comes from the simulated NVML device.

    Logged every ``log_every_n_steps`` through the Trainer's loggers (``energy/*``
    metrics), shown in the progress bar (``power_W``, ``energy_Wh``), streamed per step to
    ``<log_dir>/energy_trace.csv`` and summarised at the end in
    ``<log_dir>/energy_summary.json``.

    Example::

        trainer = Trainer(callbacks=[EnergyMonitor(country="DE")])

    Args:
        gpus: ``"auto"`` (the GPU this process trains on; on CPU with the simulated NVML
            device, the simulated device of the local rank), ``"local_rank"``, ``"none"``
            or a list of NVML indices measured by every process.
        cpu: ``"auto"`` (RAPL where readable, else estimated), ``"rapl"``,
            ``"estimate"`` or ``"none"``. RAPL is read by local rank 0 only (it measures
            the whole node), the estimate by every process.
        watts_per_core: power of one fully busy CPU core for the CPU estimate, in watts.
        carbon_intensity_g_per_kwh: grid carbon intensity in gCO2e/kWh. Exclusive with
            ``country``; when neither is given, the world average is used.
        country: ISO 3166 country code looked up in the shipped table (Ember 2023).
        pue: the data centre's power usage effectiveness (>= 1.0), applied to CO2e and
            to facility energy.
        interval_s: sampling interval; ``None`` uses each device's preferred interval.
        log_every_n_steps: logging interval; ``None`` follows the Trainer's.
        progress_bar: show power and energy in the progress bar.
        trace: stream the per-step CSV trace.
        output_dir: where the trace and summary go; ``None`` means ``trainer.log_dir``.
        report: write ``report.md``/``report.html``/``emissions.csv`` next to the summary at
            the end of fit (see ``lightning-sustain report`` for the options).

    Raises:
        ValueError: a setting is not valid; the message names it.
    """

    def __init__(
        self,
        gpus: GpuSelection = "auto",
        cpu: CpuSelection = "auto",
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
        carbon_intensity_g_per_kwh: float | None = None,
        country: str | None = None,
        pue: float = 1.0,
        interval_s: float | None = None,
        log_every_n_steps: int | None = None,
        progress_bar: bool = True,
        trace: bool = True,
        output_dir: str | None = None,
        report: bool = True,
    ) -> None:
        super().__init__()
        self.gpus = validate_gpu_selection(gpus)
        self.cpu = validate_cpu_selection(cpu)
        self.watts_per_core = validate_positive("watts_per_core", watts_per_core)
        self.carbon: CarbonIntensity = resolve_carbon_intensity(carbon_intensity_g_per_kwh, country)
        self.pue = validate_positive("pue", pue)
        if self.pue < 1.0:
            raise ValueError(f"pue must be >= 1.0 (facility energy / IT energy), got {pue!r}.")
        self.interval_s = (
            None if interval_s is None else validate_positive("interval_s", interval_s)
        )
        self.log_every_n_steps = validate_positive_int("log_every_n_steps", log_every_n_steps)
        self.progress_bar = progress_bar
        self.trace = trace
        self.output_dir = output_dir
        self.report = report

        self.meter: EnergyMeter | None = None
        self.accountant: EnergyAccountant | None = None
        self._trace_writer: TraceWriter | None = None
        self._prior = empty_totals()  # cluster totals restored from a checkpoint
        self._resumed = False
        self._cuda_clock: _CudaClock | None = None
        self._pending_cuda: list[tuple[int, int, Any, Any, int]] = []
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._t0_s: float | None = None
        self._fit_start_mark: int | None = None
        self._last_flush_s = time.monotonic()
        self._metric_marks: list[tuple[int, dict[str, Any]]] = []
        self._metric_history: list[dict[str, Any]] = []
        self._batch_start: Any = None
        self._last_boundary: Any = None
        self._phase_start: dict[str, int] = {}
        self._phase_steps: dict[str, int] = {}
        self._phase_samples: dict[str, int] = {}
        self._steps_seen = 0
        self._batch_offset = 0
        self._epoch = 0
        self._log_every = 50
        self._window_energy_j = 0.0
        self._window_duration_s = 0.0
        self._last_cluster: dict[str, float] = {}
        self._output_path: Path | None = None
        self._summary: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(gpus=self.gpus, cpu=self.cpu)

    # -- set-up and tear-down ----------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.meter is not None:
            return
        devices = open_process_devices(trainer, self.gpus, self.cpu, self.watts_per_core)
        if not devices:
            logger.warning(
                "EnergyMonitor measures no device (gpus=%r, cpu=%r): energy figures will be 0.",
                self.gpus,
                self.cpu,
            )
        self.meter = EnergyMeter(devices, interval_s=self.interval_s)
        self.accountant = EnergyAccountant(self.meter, on_steps=self._on_resolved_steps)
        if trainer.strategy.root_device.type == "cuda":
            self._cuda_clock = _CudaClock(trainer.strategy.root_device)
        labels = ", ".join(f"{i.name} [{i.provenance_label}]" for i in self.meter.device_infos)
        logger.info("EnergyMonitor measuring: %s", labels or "nothing")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Keep what was measured: resolve, write a summary marked as interrupted, close.
        try:
            if self.accountant is not None and self._t0_s is not None:
                # No collective here: under DDP the other ranks may never reach one, so
                # each rank keeps only what it measured (rank zero writes it).
                self._finish_run(
                    trainer, status=f"interrupted: {type(exception).__name__}", gather=False
                )
        except Exception as exc:  # never mask the user's exception
            logger.warning("EnergyMonitor could not write its summary after an error: %s", exc)
        finally:
            self._close()

    def _close(self) -> None:
        if self._trace_writer is not None:
            self._trace_writer.close()
            self._trace_writer = None
        if self.meter is not None:
            self.meter.close()
            self.meter = None
            self.accountant = None

    # -- run boundaries ----------------------------------------------------------------
    def _start_run(self, trainer: pl.Trainer) -> None:
        self._reset_run_state()
        self._t0_s = time.monotonic()
        log_dir = self.output_dir or trainer.log_dir or trainer.default_root_dir
        self._output_path = Path(log_dir)
        if self.trace and trainer.is_global_zero and self.meter is not None:
            self._trace_writer = TraceWriter(
                self._output_path / TRACE_FILENAME,
                self.meter.device_infos,
                t0_s=self._t0_s,
                rank=trainer.global_rank,
                append=self._resumed,
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.meter is not None:
            # once per run: make sure every curve has started before the first step
            # (a hardware counter may take one update period, ~100 ms, to show a change)
            self.meter.wait_until_covered(time.monotonic(), timeout_s=0.5)
        self._start_run(trainer)
        if self.accountant is not None and self._t0_s is not None:
            self._fit_start_mark = self.accountant.mark(self._t0_s)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_start_mark is not None and self.accountant is not None:
            end = self.accountant.mark(time.monotonic())
            self.accountant.record_interval("fit", self._fit_start_mark, end)
        self._finish_run(trainer, status="completed")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0_s is None:
            self._start_run(trainer)
        self._begin_phase("test")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_phase("test")
        if trainer.state.fn != "fit":
            self._finish_run(trainer, status="completed")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0_s is None:
            self._start_run(trainer)
        self._begin_phase("validation")
        self._last_boundary = None  # the next training step starts at its own batch

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_phase("validation")
        if not trainer.sanity_checking and self.accountant is not None:
            values = {
                name: float(value)
                for name, value in trainer.callback_metrics.items()
                if _is_scalar(value) and not name.startswith(("power_W", "energy_Wh"))
            }
            if values:
                mark = self.accountant.mark(time.monotonic())
                payload = {"epoch": trainer.current_epoch, "step": trainer.global_step}
                self._metric_marks.append((mark, dict(payload, metrics=values)))
        if trainer.state.fn == "validate":
            self._finish_run(trainer, status="completed")

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._phase_steps["validation"] = self._phase_steps.get("validation", 0) + 1
        self._maybe_flush_by_time()

    def _maybe_flush_by_time(self) -> None:
        # keep marks resolved while they are inside the meter's history, however long
        # a phase runs without a training step
        if self.accountant is not None and time.monotonic() - self._last_flush_s > 30.0:
            self._last_flush_s = time.monotonic()
            self._convert_cuda_boundaries()
            self.accountant.resolve()

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._phase_steps["test"] = self._phase_steps.get("test", 0) + 1

    def _begin_phase(self, phase: str) -> None:
        if self.accountant is not None:
            self._phase_start[phase] = self.accountant.mark(time.monotonic())
        self._phase_steps[phase] = 0

    def _end_phase(self, phase: str) -> None:
        start = self._phase_start.pop(phase, None)
        if start is not None and self.accountant is not None:
            steps = self._phase_steps.pop(phase, 0)
            end = self.accountant.mark(time.monotonic())
            self.accountant.record_interval(phase, start, end, steps=steps)

    # -- hot path ----------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        clock = self._cuda_clock
        self._batch_start = clock.mark() if clock is not None else time.monotonic()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        clock = self._cuda_clock
        end = clock.mark() if clock is not None else time.monotonic()
        start = self._last_boundary if self._last_boundary is not None else self._batch_start
        self._last_boundary = end
        samples = _batch_size(batch)
        accountant = self.accountant
        if accountant is None:
            return
        step = self._batch_offset + self._steps_seen
        if clock is not None:
            self._pending_cuda.append((step, self._epoch, start, end, samples))
        else:
            accountant.record_step(step, self._epoch, start, end, samples)
        self._steps_seen += 1
        if self._steps_seen % self._log_every == 0 or accountant.needs_resolve():
            self._flush(trainer, pl_module)
        elif end_is_late(end, self._last_flush_s):
            self._maybe_flush_by_time()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # read once here, not per step: trainer properties walk the loop objects
        self._batch_offset = trainer.fit_loop.epoch_loop.batch_progress.total.completed
        self._log_every = self.log_every_n_steps or max(1, trainer.log_every_n_steps)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = trainer.current_epoch

    # -- log intervals -----------------------------------------------------------------
    def _convert_cuda_boundaries(self, wait: bool = False) -> None:
        clock, accountant = self._cuda_clock, self.accountant
        if clock is None or accountant is None:
            return
        remaining = []
        for step, epoch, start, end, samples in self._pending_cuda:
            if wait:
                end.synchronize()
            end_s = clock.to_host_s(end)
            start_s = clock.to_host_s(start)
            if end_s is None or start_s is None:
                remaining.append((step, epoch, start, end, samples))
            else:
                accountant.record_step(step, epoch, start_s, end_s, samples)
        self._pending_cuda = remaining

    def _on_resolved_steps(self, steps: list[StepEnergy]) -> None:
        for s in steps:
            self._window_energy_j += s.energy_j
            self._window_duration_s += s.duration_s
        if self._trace_writer is not None:
            self._trace_writer.write(steps)

    def _flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accountant = self.accountant
        if accountant is None:
            return
        self._last_flush_s = time.monotonic()
        self._convert_cuda_boundaries()
        accountant.resolve()
        if self._window_duration_s > 0:
            window_power_w = self._window_energy_j / self._window_duration_s
        else:  # no step resolved in this window yet: the curves' last second instead
            window_power_w = self._recent_power_w()
        local = accountant.totals["train"]
        # one small all-reduce per log interval (a no-op on a single device)
        cluster = self._reduce(
            trainer,
            {
                "train_energy_j": local.energy_j,
                "power_w": window_power_w,
                "window_energy_j": self._window_energy_j,
                "samples": float(local.samples),
            },
        )
        self._window_energy_j = 0.0
        self._window_duration_s = 0.0
        train_j = cluster["train_energy_j"] + self._prior["train"].energy_j
        self._last_cluster = cluster
        metrics = {
            f"{_METRIC_PREFIX}train_energy_kwh": joules_to_kwh(train_j),
            f"{_METRIC_PREFIX}train_co2e_g": co2e_g(train_j, self.carbon, self.pue),
            f"{_METRIC_PREFIX}power_w": cluster["power_w"],
            f"{_METRIC_PREFIX}step_energy_j": cluster["window_energy_j"]
            / max(1, len(accountant.last_resolved)),
        }
        if self.meter is not None and trainer.world_size == 1:
            labels = device_labels(self.meter.device_infos)
            for device_id, power in self.meter.power_w().items():
                if power is not None:
                    metrics[f"{_METRIC_PREFIX}{labels[device_id]}_power_w"] = power
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)
        if self.progress_bar:
            # Written into the progress bar's metrics directly: `pl_module.log` would add
            # two entries that Lightning then processes on every later step.
            trainer.progress_bar_metrics.update(
                {"power_W": round(cluster["power_w"], 1), "energy_Wh": train_j / 3600.0}
            )

    def _recent_power_w(self, span_s: float = 1.0) -> float:
        if self.meter is None:
            return 0.0
        total = 0.0
        for stream in self.meter.streams:
            latest = stream.latest_time_s
            if latest is None:
                continue
            first = stream.first_time_s or latest
            start = max(first, latest - span_s)
            power = stream.mean_power_w(start, latest)
            total += power or 0.0
        return total

    @staticmethod
    def _reduce(trainer: pl.Trainer, values: dict[str, float]) -> dict[str, float]:
        if trainer.world_size <= 1:
            return dict(values)
        keys = list(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        tensor = tensor.to(trainer.strategy.root_device)
        reduced = trainer.strategy.reduce(tensor, reduce_op="sum")
        return {k: float(v) for k, v in zip(keys, reduced.cpu().tolist(), strict=True)}

    # -- end of run ----------------------------------------------------------------------
    def _finish_run(self, trainer: pl.Trainer, status: str, gather: bool = True) -> None:
        accountant = self.accountant
        if accountant is None or self._t0_s is None:
            return
        for phase in list(self._phase_start):
            self._end_phase(phase)
        self._convert_cuda_boundaries(wait=True)
        accountant.resolve(wait=True)
        self._resolve_metric_history()
        local = self._local_summary(trainer)
        ranks = self._gather(trainer, local) if gather else [local]
        summary = self._build_summary(trainer, ranks, status)
        self._summary = summary
        if self.progress_bar and gather:
            train = summary["phases"]["train"]
            trainer.progress_bar_metrics.update(
                {
                    "energy_Wh": train["energy_j"] / 3600.0,
                    "power_W": round(train["energy_j"] / train["duration_s"], 1)
                    if train["duration_s"] > 0
                    else 0.0,
                }
            )
        if trainer.is_global_zero and self._output_path is not None:
            path = write_summary(self._output_path / SUMMARY_FILENAME, summary)
            totals = summary["totals"]
            logger.info(
                "Energy: %.4g kWh (%s), %.4g g CO2e over %.1f s; summary in %s",
                totals["energy_kwh"],
                summary["provenance"],
                totals["co2e_g"],
                totals["duration_s"],
                path,
            )
        if self._trace_writer is not None:
            self._trace_writer.close()
            self._trace_writer = None
        if self.report and status == "completed" and trainer.is_global_zero:
            self._write_report()
        self._t0_s = None

    def _resolve_metric_history(self) -> None:
        accountant = self.accountant
        if accountant is None or self._fit_start_mark is None:
            return
        start = accountant.energy_at_mark(self._fit_start_mark)
        start_t = accountant.time_of_mark(self._fit_start_mark)
        if start is None or start_t is None:
            return
        prior_j = self._prior["fit"].energy_j
        prior_s = self._prior["fit"].duration_s
        for mark, payload in self._metric_marks:
            at = accountant.energy_at_mark(mark)
            t_s = accountant.time_of_mark(mark)
            if at is None or t_s is None:
                continue
            energy_j = prior_j + sum(at[d] - start.get(d, 0.0) for d in at)
            self._metric_history.append(
                dict(
                    payload,
                    energy_j=energy_j,
                    co2e_g=co2e_g(energy_j, self.carbon, self.pue),
                    elapsed_s=prior_s + t_s - start_t,
                )
            )
        self._metric_marks = []

    def _write_report(self) -> None:
        if self._output_path is None:
            return
        try:
            from lightning_sustain.report.builder import build_report

            result = build_report(self._output_path)
            logger.info("Sustainability report: %s", result.markdown_path)
        except Exception as exc:  # the report must never fail a finished training run
            logger.warning("EnergyMonitor could not write the report: %s", exc)

    def _local_summary(self, trainer: pl.Trainer) -> dict[str, Any]:
        assert self.accountant is not None and self.meter is not None
        infos = self.meter.device_infos
        totals = self.accountant.totals
        return {
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "hostname": os.uname().nodename if hasattr(os, "uname") else "",
            "devices": [
                {
                    "device_id": i.device_id,
                    "name": i.name,
                    "kind": i.kind,
                    "provenance": i.provenance_label,
                    "simulated": i.simulated,
                    "fit_energy_j": totals["fit"].device_energy_j.get(i.device_id, 0.0),
                    "train_energy_j": totals["train"].device_energy_j.get(i.device_id, 0.0),
                }
                for i in infos
            ],
            "phases": totals_to_dict(totals),
            "failures": self.meter.failures(),
            "metric_history": list(self._metric_history),
        }

    @staticmethod
    def _gather(trainer: pl.Trainer, local: dict[str, Any]) -> list[dict[str, Any]]:
        if trainer.world_size <= 1 or not torch.distributed.is_available():
            return [local]
        if not torch.distributed.is_initialized():
            return [local]
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
        return sorted(gathered, key=lambda r: r["global_rank"])

    def _build_summary(
        self, trainer: pl.Trainer, ranks: list[dict[str, Any]], status: str
    ) -> dict[str, Any]:
        phases: dict[str, PhaseTotals] = empty_totals()
        for phase, prior in self._prior.items():
            phases[phase].merge(prior)
        for rank in ranks:
            for phase, value in totals_from_dict(rank["phases"]).items():
                merged = phases.setdefault(phase, PhaseTotals())
                # durations are wall-clock: take the longest rank, not the sum
                duration = max(merged.duration_s, value.duration_s)
                merged.merge(value)
                merged.duration_s = duration
        devices = [dict(d, rank=r["global_rank"]) for r in ranks for d in r["devices"]]
        provenances = sorted({d["provenance"] for d in devices})
        fit = phases["fit"]
        train = phases["train"]
        if fit.duration_s > 0:
            total_j, duration_s = fit.energy_j, fit.duration_s
        else:  # validate/test-only runs
            total_j = sum(phases[p].energy_j for p in ("train", "validation", "test", "predict"))
            duration_s = max((p.duration_s for p in phases.values()), default=0.0)
        failures = {
            f"rank{r['global_rank']}:{k}": v for r in ranks for k, v in r["failures"].items()
        }
        return {
            "schema": SUMMARY_SCHEMA,
            "status": status,
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "provenance": "+".join(provenances) if provenances else "none",
            "simulated": any(d["simulated"] for d in devices),
            "incomplete": bool(failures),
            "failures": failures,
            "resumed": self._resumed,
            "totals": {
                "energy_j": total_j,
                "energy_kwh": joules_to_kwh(total_j),
                "facility_energy_kwh": joules_to_kwh(total_j) * self.pue,
                "co2e_g": co2e_g(total_j, self.carbon, self.pue),
                "duration_s": duration_s,
                "train_energy_j": train.energy_j,
                "validation_energy_j": phases["validation"].energy_j,
                "test_energy_j": phases["test"].energy_j,
                "other_energy_j": max(
                    0.0, fit.energy_j - train.energy_j - phases["validation"].energy_j
                )
                if fit.duration_s > 0
                else 0.0,
                "steps": train.steps,
                "samples": train.samples,
                "energy_per_sample_j": train.energy_j / train.samples if train.samples else None,
                "energy_per_step_j": train.energy_j / train.steps if train.steps else None,
            },
            "carbon": {
                "g_co2e_per_kwh": self.carbon.g_co2e_per_kwh,
                "source": self.carbon.source,
                "region": self.carbon.region,
                "pue": self.pue,
            },
            "phases": totals_to_dict(phases),
            "devices": devices,
            "ranks": [
                {
                    "global_rank": r["global_rank"],
                    "local_rank": r["local_rank"],
                    "node_rank": r["node_rank"],
                    "hostname": r["hostname"],
                    "energy_j": PhaseTotals.from_dict(r["phases"]["fit"]).energy_j,
                    "train_energy_j": PhaseTotals.from_dict(r["phases"]["train"]).energy_j,
                }
                for r in ranks
            ],
            "world_size": trainer.world_size,
            # energy (this rank, plus checkpointed totals) when each validation finished;
            # used for energy-to-target in the report
            "metric_history": _sum_histories([r.get("metric_history", []) for r in ranks]),
        }

    @property
    def summary(self) -> dict[str, Any] | None:
        """The last summary written (also on ranks other than zero), or None."""
        return self._summary

    def total_energy_j(self, phase: str = "train") -> float:
        """Energy of this process in a phase so far, plus any checkpointed total, in joules.

        Only steps already resolved at a log interval are included.
        """
        local = self.accountant.totals[phase].energy_j if self.accountant is not None else 0.0
        return local + self._prior[phase].energy_j

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Cluster-wide totals so far (every rank's, summed), so a resume keeps counting.

        Under DDP this gathers the ranks' totals once per checkpoint (Lightning builds the
        checkpoint on every rank).
        """
        phases = empty_totals()
        for phase, prior in self._prior.items():
            phases[phase].merge(prior)
        local = empty_totals()
        if self.accountant is not None:
            # a checkpoint must hold every finished step: wait for the curves to cover them
            self._convert_cuda_boundaries(wait=True)
            self.accountant.resolve(wait=True, timeout_s=1.0)
            local = self.accountant.totals
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, totals_to_dict(local))
            per_rank = [totals_from_dict(g) for g in gathered]
        else:
            per_rank = [local]
        for rank_totals in per_rank:
            for phase, value in rank_totals.items():
                phases.setdefault(phase, PhaseTotals()).merge(value)
        return {"version": 1, "totals": totals_to_dict(phases)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != 1 or "totals" not in state_dict:
            raise ValueError(
                "The checkpoint's EnergyMonitor state is not in a known format; start a new "
                "run or remove the callback state from the checkpoint."
            )
        self._prior = empty_totals()
        for phase, value in totals_from_dict(state_dict["totals"]).items():
            self._prior.setdefault(phase, PhaseTotals()).merge(value)
        self._resumed = True
