"""Per-rank accounting of one DDP process (no Lightning): energy, wait, limits, summary.

:class:`DDPAccounting` is what the DDP front ends share (the Trainer's
:class:`~lightning_sustain.SustainDDPStrategy`, Fabric's
:class:`~lightning_sustain.strategies.fabric_sustain_ddp.FabricSustainDDPStrategy`, a plain
``torch.distributed`` loop). For one process of the job it

- measures this rank's devices (its own :class:`~lightning_sustain.energy.meter.EnergyMeter`
  over the devices it is given, e.g. the ones an :class:`~lightning_sustain.run.EnergyRun`
  samples);
- records step boundaries (:meth:`DDPAccounting.step_boundary`: a timestamp and the wait
  the :class:`~lightning_sustain.run.wait_clock.WaitClock` measured, nothing else);
- gathers one small per-rank vector at log intervals (one ``all_gather``, never per step)
  into per-rank metrics and a history (:meth:`DDPAccounting.metrics_for`);
- takes part in power shifting through :class:`~lightning_sustain.budget.rank_power.RankPowerLimit`
  (hardware limits, software throttle, or a ``PowerBudget(per="job")`` share);
- writes ``ddp_summary.json`` (:mod:`lightning_sustain.run.ddp_summary`) at the end
  (:meth:`DDPAccounting.finish`, one collective) and after a failure without any
  collective (:meth:`DDPAccounting.fail`).

Every rank calls :meth:`start`, :meth:`step_boundary` and :meth:`finish` together (as DDP
loops do); :meth:`fail`, :meth:`restore_limits` and :meth:`close` are local.

Example (a plain ``torchrun`` loop)::

    acct = DDPAccounting(RankInfo.detect(), open_rank_devices("auto", "none", 10.0))
    install_comm_hook(ddp_model, acct.clock)
    acct.start(Path("out"))
    for step, batch in enumerate(loader):
        acct.step_boundary()
        train_step(ddp_model, batch)
    acct.finish(step)
    acct.close()
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightning_sustain.budget.limits import reap_dead_owners, restore_orphaned_limits
from lightning_sustain.budget.power_cap import PowerCapController
from lightning_sustain.budget.rank_power import MODE_NONE, RankPowerLimit
from lightning_sustain.budget.shifting import PowerShiftingPolicy
from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.energy.discovery import warn_once
from lightning_sustain.energy.errors import EnergyMeasurementError
from lightning_sustain.energy.estimate import as_number, validate_positive, validate_positive_int
from lightning_sustain.energy.meter import EnergyMeter
from lightning_sustain.energy.nvml import NvmlGpu, nvml_init, nvml_shutdown
from lightning_sustain.run.ddp_summary import (
    SUMMARY_FILENAME,
    SUMMARY_SCHEMA,
    build_job_summary,
    format_summary_table,
    hostname,
    merge_failure_summary,
    write_job_summary,
)
from lightning_sustain.run.distributed import RankInfo, process_group_ready
from lightning_sustain.run.wait_clock import WaitClock

logger = logging.getLogger(__name__)

__all__ = [
    "FIELDS",
    "METRIC_PREFIX",
    "SUMMARY_FILENAME",
    "SUMMARY_SCHEMA",
    "DDPAccounting",
    "format_summary_table",
    "gather_rows",
    "restore_node_limits",
    "validate_shifting",
]

METRIC_PREFIX = "ddp/"
# layout of the per-rank vector gathered at log intervals
FIELDS = (
    "wait_s",
    "step_s",
    "steps",
    "window_energy_j",
    "window_s",
    "gpu_window_energy_j",
    "limit_w",
    "min_limit_w",
    "max_limit_w",
    "mode",
    "energy_j",
)


def restore_node_limits() -> list[str]:
    """Restore every limit on this node's GPUs that a process which no longer runs left.

    The launcher of a failed job calls it after its ranks are gone: a rank killed with
    SIGKILL cannot restore its own limit, but :class:`PowerLimitGuard` journaled it.

    Returns:
        The UUIDs whose limits were restored.
    """
    try:
        pynvml = nvml_init()
    except EnergyMeasurementError:
        return []
    gpus: list[NvmlGpu] = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                gpus.append(NvmlGpu(index))
            except EnergyMeasurementError:
                continue
        return restore_orphaned_limits(gpus)
    except Exception as exc:  # a safety net must not raise
        logger.warning("Could not check this node's GPUs for limits left behind: %s", exc)
        return []
    finally:
        for gpu in gpus:
            gpu.close()
        nvml_shutdown()


def _collective_device() -> torch.device:
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(vector: Sequence[float]) -> list[list[float]]:
    """Every rank's vector, in rank order (one ``all_gather``; ``[vector]`` alone)."""
    if not process_group_ready():
        return [list(vector)]
    tensor = torch.tensor(list(vector), dtype=torch.float64, device=_collective_device())
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return [row.cpu().tolist() for row in out]


class DDPAccounting:
    """One DDP process's energy, wait, power limit and share of the job summary.

    Args:
        ranks: this process's place in the job.
        devices: the devices this rank measures (opened by the caller; the first NVML
            GPU among them is the one power shifting limits).
        interval_s: sampling interval of the meter; None: each device's preferred.
        shift_power: move power from ranks that wait to the rank on the critical path.
        job_power_budget_w: the job's budget in watts (None: a job-wide power cap's
            watts, else the sum of the limits in force when shifting starts).
        shift_every_n_steps: steps between two re-balancing rounds.
        target_slack: wait fraction kept as a margin on every rank when shifting.
        log_every_n_steps: steps between two gathers of the per-rank figures.
        measure_wait: whether a :class:`WaitClock` times gradient synchronisation
            (power shifting needs it).
        cuda_device: the CUDA device the rank computes on (None: CPU).
    """

    def __init__(
        self,
        ranks: RankInfo,
        devices: Sequence[EnergyDevice],
        *,
        interval_s: float | None = None,
        shift_power: bool = False,
        job_power_budget_w: float | None = None,
        shift_every_n_steps: int = 20,
        target_slack: float = 0.05,
        log_every_n_steps: int = 50,
        measure_wait: bool = True,
        cuda_device: torch.device | None = None,
    ) -> None:
        self.ranks = ranks
        self.shift_every_n_steps = shift_every_n_steps
        self.log_every_n_steps = max(1, int(log_every_n_steps))
        self.meter: EnergyMeter | None = EnergyMeter(list(devices), interval_s=interval_s)
        gpus = [s.device for s in self.meter.streams if isinstance(s.device, NvmlGpu)]
        if len(gpus) > 1:
            warn_once(
                "ddp-many-gpus",
                "Rank %d measures %d GPUs; power shifting limits only the first (%s).",
                ranks.global_rank,
                len(gpus),
                gpus[0].info.name,
            )
        self.gpu: NvmlGpu | None = gpus[0] if gpus else None
        self.limits = RankPowerLimit(
            ranks.global_rank,
            self.gpu,
            shift_power=shift_power,
            job_power_budget_w=job_power_budget_w,
            target_slack=target_slack,
            measure_wait=measure_wait,
        )
        self.clock: WaitClock | None = WaitClock(cuda_device) if measure_wait else None
        self.history: list[dict[str, Any]] = []
        self.last_summary: dict[str, Any] | None = None
        self.summary_dir: Path | None = None
        self.run_id = ""
        self.train_start_s: float | None = None
        self.train_end_s: float | None = None
        self.steps = 0
        self._step_start_s: float | None = None
        self._window = {"wait_s": 0.0, "step_s": 0.0, "steps": 0.0}
        self._totals = {"wait_s": 0.0, "step_s": 0.0, "steps": 0.0}
        self._mark_s: float | None = None
        self._known_ranks: list[dict[str, float]] = []
        self._known_step = 0

    # -- views ------------------------------------------------------------------------------
    @property
    def shift_power(self) -> bool:
        """Whether power shifting is on (after :meth:`start`: whether it could start)."""
        return self.limits.shift_power

    @property
    def mode(self) -> float:
        """This rank's limit mode (none, hardware, software)."""
        return self.limits.mode

    @property
    def limit_w(self) -> float:
        """This rank's limit or throttle target in force, watts (0 with no limit)."""
        return self.limits.limit_w

    @property
    def guard(self) -> Any:
        """The guard of this rank's own hardware limit (None when none is held)."""
        return self.limits.guard

    def attach_power_cap(self, cap: PowerCapController | None) -> None:
        """A job-wide cap (``PowerBudget``): ``per="job"`` shifts its shares."""
        self.limits.attach_power_cap(cap)

    # -- start ------------------------------------------------------------------------------
    def start(self, summary_dir: Path | None, run_id: str | None = None) -> None:
        """Training starts (every rank together): shifting set-up, summary dir, clocks.

        Args:
            summary_dir: where ``ddp_summary.json`` goes (None: nothing written).
            run_id: one id for the job's ranks (None: broadcast from rank 0 now).
        """
        if self.limits.shift_power:
            self.limits.start(lambda: self.gather(reset=False), self._barrier)
        self.summary_dir = summary_dir
        if summary_dir is not None:
            # resolved now, with every rank present: after a failure no collective is possible
            self.run_id = run_id if run_id is not None else self._broadcast_run_id()
        now = time.monotonic()
        self.train_start_s = now
        self._mark_s = now
        self._step_start_s = None

    @staticmethod
    def _barrier() -> None:
        if process_group_ready():
            dist.barrier()

    @staticmethod
    def _broadcast_run_id() -> str:
        box = [f"{os.getpid()}-{time.time_ns()}"]
        if process_group_ready():
            dist.broadcast_object_list(box, src=0)
        return str(box[0])

    # -- steps ------------------------------------------------------------------------------
    def step_boundary(self, now: float | None = None) -> list[dict[str, float]] | None:
        """A step starts (and the previous one ended); every rank calls it together.

        Returns:
            The gathered per-rank rows when this boundary is a log interval (for
            :meth:`metrics_for`), else None.
        """
        if self.train_start_s is None:
            return None
        now = time.monotonic() if now is None else now
        logged: list[dict[str, float]] | None = None
        if self._step_start_s is not None:
            self._close_step(now)
            log_now = self.steps % self.log_every_n_steps == 0
            shift_now = self.limits.shift_power and self.steps % self.shift_every_n_steps == 0
            if log_now or shift_now:
                ranks = self.gather(reset=True)
                if log_now:
                    logged = ranks
                if shift_now:
                    self.limits.rebalance(ranks, self._barrier)
            if self.limits.throttle is not None:
                self.limits.throttle_after_step(self.meter)
        self._step_start_s = time.monotonic()
        return logged

    def _close_step(self, now: float) -> None:
        assert self._step_start_s is not None
        wait_s = self.clock.close_step() if self.clock is not None else 0.0
        self.steps += 1
        self._window["step_s"] += now - self._step_start_s
        self._window["steps"] += 1
        if wait_s is not None:
            self._window["wait_s"] += wait_s

    # -- gathering --------------------------------------------------------------------------
    def vector(self, reset: bool, final: bool = False) -> list[float]:
        """This rank's figures since the last gather (and its total energy)."""
        window = dict(self._window)
        if self.clock is not None and self.clock.cuda_device is not None:
            window["wait_s"] += self.clock.resolve_cuda(wait=final)
        energy_j = gpu_energy_j = window_s = total_j = 0.0
        meter = self.meter
        if meter is not None and self._mark_s is not None:
            end = time.monotonic()
            if final:
                meter.wait_until_covered(end, timeout_s=0.5)
            latest = meter.latest_time_s()
            end = min(end, latest) if latest is not None else self._mark_s
            if end > self._mark_s:
                per_device = meter.energy_between(self._mark_s, end)
                energy_j = sum(per_device.values())
                if self.gpu is not None:
                    gpu_energy_j = per_device.get(self.gpu.info.device_id, 0.0)
                window_s = end - self._mark_s
            if reset:
                self._mark_s = max(self._mark_s, end)
            if self.train_start_s is not None:
                total_end = self.train_end_s if final and self.train_end_s else end
                total_end = min(total_end, latest) if latest is not None else total_end
                total_j = sum(meter.energy_between(self.train_start_s, total_end).values())
        if reset:
            for key in self._totals:
                self._totals[key] += window[key]
            self._window = {"wait_s": 0.0, "step_s": 0.0, "steps": 0.0}
        values = {
            "wait_s": window["wait_s"],
            "step_s": window["step_s"],
            "steps": window["steps"],
            "window_energy_j": energy_j,
            "window_s": window_s,
            "gpu_window_energy_j": gpu_energy_j,
            **self.limits.fields(),
            "energy_j": total_j,
        }
        return [float(values[k]) for k in FIELDS]

    def gather(self, reset: bool, final: bool = False) -> list[dict[str, float]]:
        """Every rank's :meth:`vector` (one all-gather; a no-op for one process)."""
        rows = gather_rows(self.vector(reset=reset, final=final))
        return [dict(zip(FIELDS, row, strict=True)) for row in rows]

    def metrics_for(self, ranks: list[dict[str, float]], step: int) -> dict[str, float]:
        """Per-rank and total metrics of a gathered window (kept in :attr:`history`)."""
        metrics: dict[str, float] = {}
        entry_ranks = []
        for rank, r in enumerate(ranks):
            wait = r["wait_s"] / r["step_s"] if r["step_s"] > 0 else 0.0
            power = r["window_energy_j"] / r["window_s"] if r["window_s"] > 0 else 0.0
            metrics[f"{METRIC_PREFIX}wait_fraction_rank{rank}"] = wait
            metrics[f"{METRIC_PREFIX}power_w_rank{rank}"] = power
            metrics[f"{METRIC_PREFIX}energy_j_rank{rank}"] = r["energy_j"]
            if r["steps"]:
                metrics[f"{METRIC_PREFIX}step_time_s_rank{rank}"] = r["step_s"] / r["steps"]
            if r["mode"] != MODE_NONE:
                metrics[f"{METRIC_PREFIX}power_limit_w_rank{rank}"] = r["limit_w"]
            entry_ranks.append(
                {
                    "rank": rank,
                    "wait_fraction": wait,
                    "power_w": power,
                    "energy_j": r["energy_j"],
                    "limit_w": r["limit_w"] if r["mode"] != MODE_NONE else None,
                    "steps": int(r["steps"]),
                    "step_time_s": r["step_s"] / r["steps"] if r["steps"] else None,
                }
            )
        metrics[f"{METRIC_PREFIX}power_w_total"] = sum(
            metrics[f"{METRIC_PREFIX}power_w_rank{i}"] for i in range(len(ranks))
        )
        metrics[f"{METRIC_PREFIX}energy_j_total"] = sum(r["energy_j"] for r in ranks)
        self.history.append({"step": step, "ranks": entry_ranks})
        self._known_ranks = [dict(r) for r in ranks]
        self._known_step = step
        return metrics

    # -- end --------------------------------------------------------------------------------
    def restore_limits(self) -> None:
        """Put back every limit this rank set (idempotent; a job-wide cap restores its own)."""
        self.limits.restore()

    def end_training(
        self, step: int, close_open_step: bool = True
    ) -> tuple[list[dict[str, float]], dict[str, float]] | None:
        """Training ends (every rank together): the last window, gathered.

        Args:
            step: the step the metrics are logged at.
            close_open_step: count the step open since the last boundary (a front end
                whose boundaries are step *ends*, e.g. optimizer steps, passes False).

        Returns:
            The gathered rows and their metrics, or None when training never started.
        """
        if self.train_start_s is None:
            return None
        end = time.monotonic()
        if self._step_start_s is not None:
            if close_open_step:
                self._close_step(end)
            elif self.clock is not None:
                self.clock.close_step()  # drop timestamps of a step that never ended
            self._step_start_s = None
        self.train_end_s = end
        ranks = self.gather(reset=True, final=True)
        return ranks, self.metrics_for(ranks, step)

    def write_summary(
        self, ranks: list[dict[str, float]], num_nodes: int = 1
    ) -> tuple[dict[str, Any], Path | None]:
        """Build ``ddp_summary.json`` (every rank, one collective) and write it on rank 0.

        Returns:
            The summary (on every rank) and the path written (rank 0; None elsewhere or
            when writing failed).
        """
        meter = self.meter
        devices = [
            {"device_id": i.device_id, "name": i.name, "provenance": i.provenance_label}
            for i in (meter.device_infos if meter is not None else [])
        ]
        local = {
            "global_rank": self.ranks.global_rank,
            "node_rank": self.ranks.node_rank,
            "local_rank": self.ranks.local_rank,
            "hostname": hostname(),
            "devices": devices,
            "duration_s": (self.train_end_s or time.monotonic()) - (self.train_start_s or 0.0),
            "failures": meter.failures() if meter is not None else {},
            "totals": [self._totals["wait_s"], self._totals["step_s"], self._totals["steps"]],
        }
        if process_group_ready():
            infos: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(infos, local)  # once, at the end of training
        else:
            infos = [local]
        summary = build_job_summary(
            infos,
            ranks,
            world_size=self.ranks.world_size,
            num_nodes=num_nodes,
            power_shifting=self.limits.summary(),
        )
        self.last_summary = summary
        if not self.ranks.is_global_zero or self.summary_dir is None:
            return summary, None
        return summary, write_job_summary(self.summary_dir, summary)

    def finish(
        self, step: int, num_nodes: int = 1, close_open_step: bool = True
    ) -> tuple[dict[str, float], dict[str, Any] | None, Path | None]:
        """End training (every rank): last gather, summary, limits restored.

        Returns:
            The last window's metrics, the summary (every rank; None when training never
            started) and the path written (rank 0 with a summary directory, else None).
        """
        try:
            ended = self.end_training(step, close_open_step)
            if ended is None:
                return {}, None, None
            ranks, metrics = ended
            summary, path = self.write_summary(ranks, num_nodes)
            return metrics, summary, path
        finally:
            self.restore_limits()

    def fail(self, exception: BaseException, step: int, num_nodes: int = 1) -> None:
        """After a failure (no collective): restore limits, release dead peers', write.

        Writes ``ddp_summary.json``: this rank's figures measured now, the other ranks'
        from the last gather (``final: false``, ``as_of_step``), and the ranks of which
        nothing is known in ``missing_ranks``. A rank that finds the summary another rank
        of this run already wrote keeps that rank's final figures.
        """
        self.restore_limits()
        # a peer that died (SIGKILL, OOM killer) cannot release its caps: this rank
        # does, now, without waiting for a launcher's process observer
        reap_dead_owners()
        if self.summary_dir is None or self.train_start_s is None:
            return
        try:
            self._write_failure_summary(exception, step, num_nodes)
        except Exception as exc:  # never mask the training error
            logger.warning("Could not write the DDP summary after a failure: %s", exc)

    def _write_failure_summary(self, exception: BaseException, step: int, num_nodes: int) -> None:
        assert self.summary_dir is not None and self.train_start_s is not None
        rank = self.ranks.global_rank
        mine = dict(zip(FIELDS, self.vector(reset=False), strict=True))
        rows: dict[int, dict[str, Any]] = {}
        for r, known in enumerate(self._known_ranks):
            rows[r] = {
                "global_rank": r,
                "energy_j": known["energy_j"],
                "steps": None,
                "final": False,
                "as_of_step": self._known_step,
            }
        rows[rank] = {
            "global_rank": rank,
            "energy_j": mine["energy_j"],
            "steps": self.steps,
            "final": True,
            "as_of_step": step,
            "hostname": hostname(),
        }
        devices = self.meter.device_infos if self.meter is not None else []
        summary = merge_failure_summary(
            self.summary_dir,
            rows,
            run_id=self.run_id,
            exception=exception,
            world_size=max(1, self.ranks.world_size),
            num_nodes=num_nodes,
            duration_s=time.monotonic() - self.train_start_s,
            provenances=[i.provenance_label for i in devices],
            power_shifting=self.limits.summary(),
        )
        self.last_summary = summary
        logger.info(
            "DDP summary after %s on rank %d: %.1f J known, missing ranks %s: %s",
            type(exception).__name__,
            rank,
            summary["total"]["energy_j"],
            summary["missing_ranks"] or "none",
            self.summary_dir / SUMMARY_FILENAME,
        )

    def close(self) -> None:
        """Restore limits and stop measuring (idempotent)."""
        self.restore_limits()
        if self.meter is not None:
            self.meter.close()
            self.meter = None


def validate_shifting(
    shift_power: bool,
    job_power_budget_w: float | None,
    shift_every_n_steps: int,
    target_slack: float,
    log_every_n_steps: int | None,
    measure_wait: bool,
) -> tuple[float | None, int, float, int | None]:
    """Check a DDP front end's shifting settings (numpy/torch scalars accepted).

    Returns:
        ``job_power_budget_w``, ``shift_every_n_steps``, ``target_slack`` and
        ``log_every_n_steps`` as plain numbers.

    Raises:
        ValueError: a setting is not valid; the message names it.
    """
    shift_every_n_steps = validate_positive_int("shift_every_n_steps", shift_every_n_steps)
    if log_every_n_steps is not None:
        log_every_n_steps = validate_positive_int("log_every_n_steps", log_every_n_steps)
    if job_power_budget_w is not None:
        job_power_budget_w = float(validate_positive("job_power_budget_w", job_power_budget_w))
    target_slack = as_number("target_slack", target_slack)
    if (shift_power or job_power_budget_w is not None) and not measure_wait:
        raise ValueError(
            "Power shifting decides from the measured wait, so it needs measure_wait=True "
            "(set measure_wait=True, or drop shift_power/job_power_budget_w)."
        )
    PowerShiftingPolicy(target_slack=target_slack)  # checks its range
    return job_power_budget_w, shift_every_n_steps, target_slack, log_every_n_steps
