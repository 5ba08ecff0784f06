"""SustainDDPStrategy: Lightning's DDP with per-rank energy, wait measurement and power shifting.

The strategy is a :class:`~lightning.pytorch.strategies.DDPStrategy` subclass, so every
launcher, cluster environment and process-group backend Lightning supports keeps working.
On top it:

- binds an energy meter to exactly this rank's devices (the same devices and curves as an
  :class:`~lightning_sustain.EnergyMonitor` in the Trainer, when there is one);
- measures, per rank, the fraction of step time spent waiting in gradient synchronisation
  with a DDP communication hook that timestamps each bucket when it is ready and when its
  all-reduce completed (CUDA events on GPU, ``time.monotonic()`` on CPU);
- gathers per-rank energy, power and wait once per log interval (one ``all_gather`` of a
  small tensor, never per step), logs them per rank, and writes an end-of-fit summary
  ``ddp_summary.json`` listing every rank and the total (the sum of the ranks);
- optionally shifts power: every ``shift_every_n_steps`` steps, ranks that mostly wait get
  a lower power limit and the rank on the critical path more, inside each device's range
  and never above the job budget (:mod:`lightning_sustain.budget.shifting`). Hardware
  limits go through :class:`~lightning_sustain.budget.limits.PowerLimitGuard`, which
  restores them at the end, on an exception, on SIGTERM and at exit; a rank whose driver
  refuses limit changes is throttled in software
  (:class:`~lightning_sustain.budget.throttle.SoftwareThrottle`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn.parallel.distributed import DistributedDataParallel

from lightning_sustain._compat import ChildProcessObserver as _ChildProcessObserver
from lightning_sustain._compat import MultiProcessingLauncher as _MultiProcessingLauncher
from lightning_sustain._compat import StrategyRegistryType as _StrategyRegistry
from lightning_sustain._compat import SubprocessScriptLauncher as _SubprocessScriptLauncher
from lightning_sustain._compat import register_ddp_comm_hook as _register_ddp_comm_hook
from lightning_sustain._compat import set_num_threads_if_needed as _set_num_threads_if_needed
from lightning_sustain._deprecation import renamed_argument
from lightning_sustain.budget.limits import (
    PowerLimitGuard,
    ensure_sigterm_handler,
    reap_dead_owners,
    restore_orphaned_limits,
)
from lightning_sustain.budget.shifting import PowerShiftingPolicy, RankPowerState
from lightning_sustain.energy.discovery import warn_once
from lightning_sustain.energy.errors import (
    EnergyMeasurementError,
    PowerLimitError,
)
from lightning_sustain.energy.estimate import as_number, validate_positive, validate_positive_int
from lightning_sustain.energy.meter import EnergyMeter
from lightning_sustain.energy.nvml import NvmlGpu, nvml_init, nvml_shutdown

logger = logging.getLogger(__name__)

CommHookName = Literal["fp16", "bf16", "powersgd"]
COMM_HOOKS: tuple[str, ...] = ("fp16", "bf16", "powersgd")
SUMMARY_FILENAME = "ddp_summary.json"
SUMMARY_SCHEMA = "lightning_sustain.ddp_summary/1"
_METRIC_PREFIX = "ddp/"

# limit modes exchanged between ranks
_MODE_NONE, _MODE_HARDWARE, _MODE_SOFTWARE = 0.0, 1.0, 2.0
# layout of the per-rank vector gathered at log intervals
_FIELDS = (
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


def _builtin_comm_hook(name: str) -> tuple[Callable[..., Any], Any]:
    """The torch hook and state for a ``comm_hook`` name."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    if name == "fp16":
        return default_hooks.fp16_compress_hook, None
    if name == "bf16":
        return default_hooks.bf16_compress_hook, None
    state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=1)
    return powersgd.powerSGD_hook, state


def restore_node_limits() -> list[str]:
    """Restore every limit on this node's GPUs that a process which no longer runs left.

    The launcher of a failed job calls it after its ranks are gone: a rank killed with
    SIGKILL (Lightning's process observer kills the whole job when one rank fails) cannot
    restore its own limit, but :class:`PowerLimitGuard` journaled it.

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


@contextlib.contextmanager
def _summary_lock(path: Path) -> Any:
    """An exclusive lock next to ``path`` while surviving ranks merge a failure summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class _RestoringProcessObserver(_ChildProcessObserver):
    """Lightning's child-process observer, restoring power limits before it kills the job.

    When a rank dies, Lightning's observer SIGKILLs every other rank and the launching
    process (a rank blocked in a collective would never see a gentler signal). Here the
    launching rank first restores its own limits, then kills and reaps the other ranks and
    restores the limits they journaled, and only then kills itself.
    """

    def _terminate_all(self) -> None:
        from lightning_sustain.budget import limits as _limits

        try:
            _limits._restore_all_guards()
        except Exception as exc:  # pragma: no cover - best effort before SIGKILL
            logger.warning("Restoring power limits before terminating failed: %s", exc)
        for proc in self._child_processes:
            proc.send_signal(self._termination_signal)
        for proc in self._child_processes:
            try:
                proc.wait(timeout=10)
            except Exception:  # pragma: no cover - a process that will not die
                continue
        restore_node_limits()
        os.kill(self._main_pid, self._termination_signal)


class _SustainScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher with :class:`_RestoringProcessObserver`."""

    def launch(
        self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any
    ) -> Any:
        self.cluster_environment.validate_settings(
            num_devices=self.num_processes, num_nodes=self.num_nodes
        )
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            _RestoringProcessObserver(child_processes=self.procs, main_pid=os.getpid()).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class _SustainSpawnLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher; after a failure, restores limits the dead ranks left."""

    def launch(
        self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any
    ) -> Any:
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except BaseException:
            for proc in getattr(self, "procs", []) or []:
                if proc.is_alive():
                    proc.kill()
                proc.join(timeout=10)
            restore_node_limits()
            raise

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        # In a spawned rank Lightning runs the fit without its exception handling (that
        # runs in the launching process, where this rank's state does not exist), so the
        # strategy's on_exception (restore, ddp_summary.json after a failure) never ran
        # here; call it before the exception leaves the rank.
        try:
            super()._wrapping_function(*args, **kwargs)
        except BaseException as exc:
            # torch's spawn SIGTERMs the surviving ranks as soon as one dies: let this
            # rank finish restoring and writing its summary first (it exits right after)
            try:
                previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
            except (ValueError, OSError):  # not the main thread
                previous = None
            try:
                self._strategy.on_exception(exc)
            except BaseException as inner:  # never mask the training error
                logger.warning("After a failure in a spawned rank: %s", inner)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
            raise


class _WaitClock:
    """Timestamps of gradient buckets: ready (hook called) and synchronised (future done).

    The hook runs on the training thread, the completion callback on the process group's
    thread; both only append to lists. Per step, the exposed wait is the time from the
    last bucket becoming ready (this rank's backward is done) to the last all-reduce
    completing (every rank arrived): ``max(done) - max(ready)``.
    """

    def __init__(self, cuda_device: torch.device | None) -> None:
        self.cuda_device = cuda_device
        self.ready: list[Any] = []
        self.done: list[Any] = []
        # CUDA: (ready events, done events) of finished steps, resolved at log intervals
        self._pending: list[tuple[list[Any], list[Any]]] = []

    def stamp(self) -> Any:
        if self.cuda_device is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.monotonic()

    def wrap(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def timed_hook(state: Any, bucket: Any) -> Any:
            self.ready.append(self.stamp())
            future = inner(state, bucket)

            def synchronised(fut: Any) -> Any:
                self.done.append(self.stamp())
                return fut.value()

            return future.then(synchronised)

        timed_hook.__qualname__ = f"timed({getattr(inner, '__qualname__', repr(inner))})"
        # DDP checks the signature; string annotations (postponed evaluation) would fail it
        timed_hook.__annotations__ = {
            "state": object,
            "bucket": dist.GradBucket,
            "return": torch.futures.Future[torch.Tensor],
        }
        return timed_hook

    def timed_allreduce(self, process_group: Any, bucket: dist.GradBucket) -> Any:
        """PyTorch's default all-reduce hook (mean over the group) with the timestamps fused in.

        Same arithmetic as ``default_hooks.allreduce_hook``, with one future callback instead
        of two chained ones (the Python hook costs about 0.1 ms per step less this way).
        """
        self.ready.append(self.stamp())
        group = process_group if process_group is not None else dist.group.WORLD
        tensor = bucket.buffer()
        tensor.div_(group.size())
        future = dist.all_reduce(tensor, group=group, async_op=True).get_future()
        done = self.done
        stamp = self.stamp

        def synchronised(fut: Any) -> Any:
            done.append(stamp())
            return fut.value()[0]

        return future.then(synchronised)

    def close_step(self) -> float | None:
        """Wait of the step that just ended, in seconds (None on CUDA: resolved later)."""
        ready, done = self.ready, self.done
        if not ready:
            return 0.0
        self.ready, self.done = [], []
        if self.cuda_device is None:
            if not done:
                return 0.0
            return max(0.0, max(done) - max(ready))
        self._pending.append((ready, done))
        return None

    def resolve_cuda(self, wait: bool = False) -> float:
        """Sum of the waits of finished CUDA steps whose events completed, in seconds."""
        total_s = 0.0
        remaining = []
        for ready, done in self._pending:
            events = ready + done
            if wait:
                for event in events:
                    event.synchronize()
            if not done or not all(event.query() for event in events):
                if done:
                    remaining.append((ready, done))
                continue
            first = ready[0]
            last_ready_ms = max(first.elapsed_time(e) for e in ready)
            last_done_ms = max(first.elapsed_time(e) for e in done)
            total_s += max(0.0, last_done_ms - last_ready_ms) / 1000.0
        self._pending = remaining
        return total_s


# DDP checks a hook's signature; postponed (string) annotations would fail that check
_WaitClock.timed_allreduce.__annotations__ = {
    "process_group": object,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


class SustainDDPStrategy(DDPStrategy):
    r"""DDP with per-rank energy accounting, wait measurement and power shifting.

    Use it by name (``Trainer(strategy="sustain_ddp")`` or ``"sustain_ddp_spawn"``, both
    registered by ``import lightning_sustain``) or as an object. Every
    :class:`~lightning.pytorch.strategies.DDPStrategy` argument works unchanged; extra
    keyword arguments go to :class:`torch.nn.parallel.DistributedDataParallel`.

    Example::

        trainer = Trainer(
            accelerator="gpu", devices=8, num_nodes=2,
            strategy=SustainDDPStrategy(job_power_budget_w=4000),
            callbacks=[EnergyMonitor()],
        )

    Args:
        accelerator: see ``DDPStrategy``.
        parallel_devices: see ``DDPStrategy``.
        cluster_environment: see ``DDPStrategy``.
        checkpoint_io: see ``DDPStrategy``.
        precision_plugin: see ``DDPStrategy``.
        ddp_comm_state: see ``DDPStrategy`` (CUDA only, like there).
        ddp_comm_hook: see ``DDPStrategy`` (CUDA only, like there).
        ddp_comm_wrapper: see ``DDPStrategy``.
        model_averaging_period: see ``DDPStrategy``.
        process_group_backend: see ``DDPStrategy``.
        timeout: see ``DDPStrategy``.
        start_method: see ``DDPStrategy``.
        comm_hook: gradient compression by name on CUDA: ``"fp16"``, ``"bf16"`` or
            ``"powersgd"`` (rank-1 PowerSGD after 1000 steps of plain all-reduce);
            ``None`` for plain all-reduce. Exclusive with ``ddp_comm_hook``.
        shift_power: move power from ranks that wait to the rank on the critical path.
            Implied by ``job_power_budget_w`` or a ``PowerBudget(per="job")`` callback.
        job_power_budget_w: the job's power budget: the per-rank GPU power limits never
            sum above it, in watts.
        shift_every_n_steps: steps between two re-balancing rounds.
        target_slack: wait fraction kept as a margin on every rank when shifting.
        log_every_n_steps: steps between two gathers of the per-rank figures; ``None``
            follows the Trainer's ``log_every_n_steps``.
        measure_wait: time gradient synchronisation with a communication hook.
        summary: write ``ddp_summary.json`` and log the per-rank table at the end of fit.
        dirpath: where the summary goes; ``None`` means ``trainer.log_dir``.
        output_dir: deprecated name of ``dirpath``.
        \**kwargs: passed to ``DistributedDataParallel`` (``find_unused_parameters``,
            ``static_graph``, ``bucket_cap_mb``, ...).

    Raises:
        ValueError: an unknown ``comm_hook``, ``comm_hook`` together with
            ``ddp_comm_hook``, or an invalid number; the message names the setting.
    """

    strategy_name = "sustain_ddp"

    def __init__(
        self,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        ddp_comm_state: Optional[object] = None,
        ddp_comm_hook: Optional[Callable] = None,
        ddp_comm_wrapper: Optional[Callable] = None,
        model_averaging_period: Optional[int] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        comm_hook: Optional[CommHookName] = None,
        shift_power: bool = False,
        job_power_budget_w: Optional[float] = None,
        shift_every_n_steps: int = 20,
        target_slack: float = 0.05,
        log_every_n_steps: Optional[int] = None,
        measure_wait: bool = True,
        summary: bool = True,
        dirpath: Optional[str] = None,
        output_dir: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        output_dir = renamed_argument(
            "SustainDDPStrategy", "output_dir", output_dir, "dirpath", dirpath
        )
        if comm_hook is not None and comm_hook not in COMM_HOOKS:
            raise ValueError(
                f"comm_hook={comm_hook!r} is not known: use one of "
                f"{', '.join(repr(n) for n in COMM_HOOKS)} or None (plain all-reduce)."
            )
        if comm_hook is not None and ddp_comm_hook is not None:
            raise ValueError(
                "comm_hook and ddp_comm_hook are exclusive: pass a hook by name "
                "(comm_hook='fp16') or as a callable (ddp_comm_hook=...), not both."
            )
        shift_every_n_steps = validate_positive_int("shift_every_n_steps", shift_every_n_steps)
        log_every_n_steps = validate_positive_int("log_every_n_steps", log_every_n_steps)
        if job_power_budget_w is not None:
            job_power_budget_w = validate_positive("job_power_budget_w", job_power_budget_w)
        target_slack = as_number("target_slack", target_slack)
        if (shift_power or job_power_budget_w is not None) and not measure_wait:
            raise ValueError(
                "Power shifting decides from the measured wait, so it needs measure_wait=True "
                "(set measure_wait=True, or drop shift_power/job_power_budget_w)."
            )
        self._policy = PowerShiftingPolicy(target_slack=target_slack)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            ddp_comm_state=ddp_comm_state,
            ddp_comm_hook=ddp_comm_hook,
            ddp_comm_wrapper=ddp_comm_wrapper,
            model_averaging_period=model_averaging_period,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **kwargs,
        )
        self.comm_hook = comm_hook
        self.shift_power = bool(shift_power) or job_power_budget_w is not None
        self.job_power_budget_w = None if job_power_budget_w is None else float(job_power_budget_w)
        self.shift_every_n_steps = shift_every_n_steps
        self.target_slack = target_slack
        self.log_every_n_steps = log_every_n_steps
        self.measure_wait = measure_wait
        self.summary = summary
        self.output_dir = output_dir
        self._reset_state()

    def _reset_state(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._meter: EnergyMeter | None = None
        self._gpu: NvmlGpu | None = None
        self._guard: PowerLimitGuard | None = None
        self._throttle: Any = None
        self._budget_callback: Any = None
        self._mode = _MODE_NONE
        self._range_w: tuple[float, float] = (0.0, 0.0)
        self._limit_w = 0.0
        self._budget_w: float | None = None
        self._clock: _WaitClock | None = None
        self._train_start_s: float | None = None
        self._train_end_s: float | None = None
        self._step_start_s: float | None = None
        self._steps = 0
        self._window = {"wait_s": 0.0, "step_s": 0.0, "steps": 0.0}
        self._totals = {"wait_s": 0.0, "step_s": 0.0, "steps": 0.0}
        self._mark_s: float | None = None
        self._throttle_mark_s: float | None = None
        self._history: list[dict[str, Any]] = []
        self._last_summary: dict[str, Any] | None = None
        self._decisions = 0
        self._summary_dir: Path | None = None
        self._run_id = ""
        self._known_ranks: list[dict[str, float]] = []
        self._known_step = 0

    # -- registration ---------------------------------------------------------------------
    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Register ``sustain_ddp`` (subprocess launcher) and ``sustain_ddp_spawn``."""
        for name, start_method in (("sustain_ddp", "popen"), ("sustain_ddp_spawn", "spawn")):
            if name in strategy_registry:
                continue
            strategy_registry.register(
                name,
                cls,
                description=(
                    f"DDP with per-rank energy, wait measurement and power shifting "
                    f"(start_method '{start_method}')"
                ),
                start_method=start_method,
            )

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = _SustainScriptLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )
        else:
            self._launcher = _SustainSpawnLauncher(self, start_method=self._start_method)

    # -- public views -----------------------------------------------------------------------
    @property
    def meter(self) -> EnergyMeter | None:
        """This rank's energy meter (None outside ``fit``)."""
        return self._meter

    @property
    def cluster_history(self) -> list[dict[str, Any]]:
        """Every gathered window: per-rank energy, power, wait and limits (all ranks)."""
        return list(self._history)

    @property
    def ddp_summary(self) -> dict[str, Any] | None:
        """The end-of-fit summary (on every rank), or None before the end of fit."""
        return self._last_summary

    @property
    def power_limit_w(self) -> float | None:
        """The power limit this rank's device runs under now (hardware or software)."""
        return self._limit_w if self._mode != _MODE_NONE else None

    # -- set-up -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer) -> None:
        if self.comm_hook is not None and self.root_device.type != "cuda":
            raise ValueError(
                f"comm_hook={self.comm_hook!r} compresses gradients for NCCL on CUDA devices; "
                f"this run trains on {self.root_device.type}. Remove comm_hook (or set it to "
                "None) for CPU runs."
            )
        self._trainer = trainer
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._open_meter(trainer)

    def _register_ddp_hooks(self) -> None:
        model = self.model
        assert isinstance(model, DistributedDataParallel)
        cuda = self.root_device.type == "cuda"
        inner: Callable[..., Any] | None = None
        state: Any = None
        if cuda and self.comm_hook is not None:
            inner, state = _builtin_comm_hook(self.comm_hook)
        elif cuda and self._ddp_comm_hook is not None:
            inner, state = self._ddp_comm_hook, self._ddp_comm_state
            if self._ddp_comm_wrapper is not None:
                inner = self._ddp_comm_wrapper(inner)
        if not self.measure_wait:
            if inner is not None:
                _register_ddp_comm_hook(model=model, ddp_comm_state=state, ddp_comm_hook=inner)
            return
        self._clock = _WaitClock(self.root_device if cuda else None)
        if inner is None:
            hook = self._clock.timed_allreduce
        else:
            hook = self._clock.wrap(inner)
        model.register_comm_hook(state=state, hook=hook)

    def _open_meter(self, trainer: pl.Trainer) -> None:
        from lightning_sustain.callbacks._devices import open_process_devices
        from lightning_sustain.callbacks.energy_monitor import EnergyMonitor

        monitor = next((cb for cb in trainer.callbacks if isinstance(cb, EnergyMonitor)), None)
        try:
            if monitor is not None and monitor.meter is not None:
                # the same devices and the same sampled curves as the monitor
                devices = [stream.device for stream in monitor.meter.streams]
            else:
                devices = open_process_devices(trainer, "auto", "none", 10.0)
            self._meter = EnergyMeter(devices)
        except Exception as exc:  # measurement must never stop training
            warn_once("ddp-meter", "SustainDDPStrategy measures no energy on this rank: %s", exc)
            self._meter = EnergyMeter([])
        gpus = [s.device for s in self._meter.streams if isinstance(s.device, NvmlGpu)]
        self._gpu = gpus[0] if gpus else None
        if len(gpus) > 1:
            warn_once(
                "ddp-many-gpus",
                "Rank %d measures %d GPUs; power shifting limits only the first (%s).",
                trainer.global_rank,
                len(gpus),
                gpus[0].info.name,
            )

    # -- power limits -----------------------------------------------------------------------
    def _probe_limits(self) -> None:
        """Find whether this rank can set hardware limits, else whether it can throttle."""
        gpu = self._gpu
        self._mode = _MODE_NONE
        if gpu is None:
            return
        try:
            self._range_w = gpu.power_limit_range_w()
            self._limit_w = gpu.power_limit_w()
        except PowerLimitError as exc:
            warn_once(
                "ddp-limits-unreadable", "Power limits of %s are unreadable: %s", gpu.uuid, exc
            )
            return
        callback = self._budget_callback
        if callback is not None:
            # PowerBudget(per="job") owns the limits (and their restoration); the strategy
            # only hands each rank its share through set_rank_budget_w()
            report_mode = getattr(getattr(callback, "report", None), "mode", None)
            self._mode = _MODE_HARDWARE if report_mode == "hardware" else _MODE_SOFTWARE
            share_w = getattr(callback, "rank_budget_w", None)
            if isinstance(share_w, (int, float)) and share_w > 0:
                self._limit_w = float(share_w)
            return
        if self._guard is None:
            self._guard = PowerLimitGuard([gpu])
        try:
            if self._guard.can_set_limits(gpu):  # sets the limit to itself: nothing journaled
                self._mode = _MODE_HARDWARE
                ensure_sigterm_handler()
            else:
                logger.info(
                    "Rank power limits cannot be set on %s (NVML NO_PERMISSION; needs root): "
                    "this rank is throttled in software when power is shifted.",
                    gpu.uuid,
                )
                self._mode = _MODE_SOFTWARE
        except PowerLimitError as exc:
            warn_once("ddp-limit-failed", "Cannot set the power limit of %s: %s", gpu.uuid, exc)
            self._mode = _MODE_SOFTWARE

    def _apply_limit(self, limit_w: float) -> None:
        if self._budget_callback is not None:
            try:
                self._budget_callback.set_rank_budget_w(limit_w)
                self._limit_w = float(limit_w)
            except (RuntimeError, ValueError, PowerLimitError) as exc:
                warn_once("ddp-budget-callback", "PowerBudget refused the new share: %s", exc)
            return
        if self._mode == _MODE_HARDWARE and self._guard is not None and self._gpu is not None:
            try:
                self._limit_w = self._guard.set_limit_w(self._gpu, limit_w)
            except PowerLimitError as exc:
                warn_once(
                    "ddp-limit-set",
                    "Setting the power limit failed (%s); this rank is throttled in software.",
                    exc,
                )
                self._mode = _MODE_SOFTWARE
        if self._mode == _MODE_SOFTWARE:
            self._limit_w = float(limit_w)
            if self._throttle is None:
                from lightning_sustain.budget.throttle import SoftwareThrottle

                self._throttle = SoftwareThrottle(target_power_w=self._limit_w)
            else:
                self._throttle.set_target_w(self._limit_w)

    def _restore_limits(self) -> None:
        if self._guard is not None:
            failed = self._guard.restore()
            self._guard.close()
            self._guard = None
            if not failed and self._mode == _MODE_HARDWARE:
                logger.info("Power limits restored.")
        self._throttle = None

    def _find_budget_callback(self, trainer: pl.Trainer) -> None:
        """A PowerBudget callback: per="job" turns shifting on, per="device" rules it out."""
        try:
            from lightning_sustain.callbacks.power_budget import PowerBudget
        except ImportError:  # pragma: no cover - the callback ships with the package
            return
        budget = next((cb for cb in trainer.callbacks if isinstance(cb, PowerBudget)), None)
        if budget is None:
            return
        if budget.per == "job" and not self.measure_wait:
            if trainer.is_global_zero:
                logger.warning(
                    "PowerBudget(per='job') is split equally between ranks: power shifting "
                    "needs measure_wait=True on SustainDDPStrategy."
                )
        elif budget.per == "job":
            self._budget_callback = budget
            self.shift_power = True
        elif self.shift_power:
            if trainer.is_global_zero:
                logger.warning(
                    "PowerBudget(per='device') fixes every device's limit at %.0f W, so power "
                    "shifting is off. Use PowerBudget(per='job') to let the strategy move "
                    "power between ranks inside the job's budget.",
                    budget.watts,
                )
            self.shift_power = False

    def _job_budget_w(self, trainer: pl.Trainer, ranks: list[dict[str, float]]) -> float:
        """The job budget: the argument, a PowerBudget(per="job") callback, or the current sum."""
        candidates: list[tuple[float, str]] = []
        if self.job_power_budget_w is not None:
            candidates.append((self.job_power_budget_w, "job_power_budget_w"))
        if self._budget_callback is not None:
            candidates.append((float(self._budget_callback.watts), "PowerBudget(per='job')"))
        if candidates:
            budget_w, source = min(candidates)
            if len({round(c[0], 3) for c in candidates}) > 1 and trainer.is_global_zero:
                logger.warning(
                    "Two job power budgets were given (%s); the lower one, %.0f W from %s, "
                    "is used.",
                    ", ".join(f"{w:.0f} W from {s}" for w, s in candidates),
                    budget_w,
                    source,
                )
            return budget_w
        budget_w = sum(r["limit_w"] for r in ranks)
        if trainer.is_global_zero:
            logger.warning(
                "Power shifting was requested (shift_power=True) without a job power budget "
                "(job_power_budget_w or PowerBudget(per='job')). The budget is the sum of the "
                "devices' current limits, %.0f W: power moves between ranks, the job never "
                "draws more than before. Set job_power_budget_w to cap the job.",
                budget_w,
            )
        return budget_w

    def _states(self, ranks: list[dict[str, float]]) -> list[RankPowerState]:
        states = []
        for rank, r in enumerate(ranks):
            step_s = r["step_s"]
            wait = min(1.0, r["wait_s"] / step_s) if step_s > 0 else 0.0
            window_s = r["window_s"]
            power = r["gpu_window_energy_j"] / window_s if window_s > 0 else None
            adjustable = r["mode"] != _MODE_NONE
            states.append(
                RankPowerState(
                    rank=rank,
                    wait_fraction=wait,
                    limit_w=r["limit_w"] if adjustable else 0.0,
                    min_limit_w=r["min_limit_w"] if adjustable else 0.0,
                    max_limit_w=r["max_limit_w"] if adjustable else 0.0,
                    power_w=power,
                    adjustable=adjustable,
                )
            )
        return states

    def _start_shifting(self, trainer: pl.Trainer) -> None:
        self._probe_limits()
        ranks = self._gather(self._vector(reset=False))
        modes = [r["mode"] for r in ranks]
        if all(m == _MODE_NONE for m in modes):
            if trainer.is_global_zero:
                logger.warning(
                    "Power shifting is off: no rank has a GPU whose power limit can be read "
                    "(NVML unavailable or no GPU). Training continues without shifting."
                )
            self.shift_power = False
            return
        if trainer.is_global_zero:
            soft = [i for i, m in enumerate(modes) if m == _MODE_SOFTWARE]
            if soft and any(m == _MODE_HARDWARE for m in modes):
                logger.warning(
                    "Rank(s) %s cannot set hardware power limits (NVML refused: run as root or "
                    "`nvidia-smi -acp UNRESTRICTED`) while the others can; those ranks are "
                    "throttled in software to their share of the budget instead.",
                    soft,
                )
            elif soft:
                logger.warning(
                    "No rank may set hardware power limits; every rank is throttled in "
                    "software to its share of the budget."
                )
            without = [i for i, m in enumerate(modes) if m == _MODE_NONE]
            if without:
                logger.warning(
                    "Rank(s) %s have no GPU power limit to shift; they keep running as they are.",
                    without,
                )
            ranges = {
                (r["min_limit_w"], r["max_limit_w"]) for r in ranks if r["mode"] != _MODE_NONE
            }
            if len(ranges) > 1:
                logger.warning(
                    "The devices have different power-limit ranges (%s): each rank's limit stays "
                    "inside its own device's range, and a budget too small for every maximum is "
                    "shared in proportion to each device's maximum limit.",
                    ", ".join(f"[{lo:.0f}, {hi:.0f}] W" for lo, hi in sorted(ranges)),
                )
        self._budget_w = self._job_budget_w(trainer, ranks)
        states = self._states(ranks)
        limits = self._policy.initial_limits(states, self._budget_w)
        self._apply_in_order(trainer, limits, states)
        if trainer.is_global_zero:
            logger.info(
                "Power shifting on: job budget %.0f W, initial limits %s W.",
                self._budget_w,
                [round(v) for v in limits],
            )

    def _apply_in_order(
        self, trainer: pl.Trainer, limits_w: list[float], states: list[RankPowerState]
    ) -> None:
        """Apply this rank's new limit: every decrease happens before any increase.

        Every rank computes the same decision, so all know whether some rank raises its
        limit; if one does, a barrier separates the decreases from the increases and the
        sum of the limits in force never exceeds the budget, even for a moment.
        """
        mine = limits_w[trainer.global_rank]
        active = self._mode != _MODE_NONE
        if active and mine < self._limit_w - 0.5:
            self._apply_limit(mine)
        raising = any(
            s.adjustable and new > s.limit_w + 0.5 for new, s in zip(limits_w, states, strict=True)
        )
        if raising:
            self.barrier("sustain_ddp_power_shift")
            if active and mine > self._limit_w + 0.5:
                self._apply_limit(mine)
        if self._mode == _MODE_SOFTWARE and self._throttle is None:
            self._apply_limit(mine)

    def _rebalance(self, trainer: pl.Trainer, ranks: list[dict[str, float]]) -> None:
        if self._budget_w is None:
            return
        decision = self._policy.rebalance(self._states(ranks), self._budget_w)
        self._decisions += 1
        self._apply_in_order(trainer, list(decision.limits_w), self._states(ranks))
        if decision.changed and trainer.is_global_zero:
            logger.info(
                "Power shifted (critical rank %d): limits %s W, total %.0f W of %.0f W.",
                decision.critical_rank,
                [round(v) for v in decision.limits_w],
                decision.total_w,
                decision.budget_w,
            )

    # -- hooks ------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        trainer = self._trainer
        if trainer is None or self._meter is None:
            return
        self._find_budget_callback(trainer)
        if self.shift_power:
            self._start_shifting(trainer)
        if self.summary:
            # resolved now, with every rank present: after a failure no collective is possible
            self._summary_dir = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
            self._run_id = str(self.broadcast(f"{os.getpid()}-{time.time_ns()}"))
        now = time.monotonic()
        self._train_start_s = now
        self._mark_s = now
        self._throttle_mark_s = now
        self._step_start_s = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._train_start_s is None:
            return
        now = time.monotonic()
        if self._step_start_s is not None:
            self._close_step(now)
            trainer = self._trainer
            assert trainer is not None
            every = self.log_every_n_steps or max(1, trainer.log_every_n_steps)
            log_now = self._steps % every == 0
            shift_now = self.shift_power and self._steps % self.shift_every_n_steps == 0
            if log_now or shift_now:
                ranks = self._gather(self._vector(reset=True))
                if log_now:
                    self._log_window(trainer, ranks)
                if shift_now:
                    self._rebalance(trainer, ranks)
            if self._throttle is not None:
                self._software_throttle()
        self._step_start_s = time.monotonic()

    def _close_step(self, now: float) -> None:
        assert self._step_start_s is not None
        wait_s = self._clock.close_step() if self._clock is not None else 0.0
        step_s = now - self._step_start_s
        self._steps += 1
        self._window["step_s"] += step_s
        self._window["steps"] += 1
        if wait_s is not None:
            self._window["wait_s"] += wait_s

    def _software_throttle(self) -> None:
        meter, gpu, throttle = self._meter, self._gpu, self._throttle
        if meter is None or gpu is None or throttle is None or self._throttle_mark_s is None:
            return
        latest = meter.latest_time_s()
        if latest is None or latest <= self._throttle_mark_s:
            return
        energy_j = meter.energy_between(self._throttle_mark_s, latest).get(gpu.info.device_id, 0.0)
        now = time.monotonic()
        sleep_s = throttle.update(
            energy_j, latest - self._throttle_mark_s, pending_s=max(0.0, now - latest), now_s=now
        )
        self._throttle_mark_s = latest
        if sleep_s > 0:
            time.sleep(sleep_s)

    def on_train_end(self) -> None:
        trainer = self._trainer
        try:
            if trainer is not None and self._train_start_s is not None:
                end = time.monotonic()
                if self._step_start_s is not None:
                    self._close_step(end)
                    self._step_start_s = None
                self._train_end_s = end
                ranks = self._gather(self._vector(reset=True, final=True))
                self._log_window(trainer, ranks)
                if self.summary:
                    self._write_summary(trainer, ranks)
        finally:
            self._restore_limits()
            super().on_train_end()

    def on_exception(self, exception: BaseException) -> None:
        try:
            self._restore_limits()
            # a peer that died (SIGKILL, OOM killer) cannot release its caps: this rank
            # does, now, without waiting for Lightning's process observer
            reap_dead_owners()
            if self.summary:
                try:
                    self._write_failure_summary(exception)
                except Exception as exc:  # never mask the training error
                    logger.warning("Could not write the DDP summary after a failure: %s", exc)
        finally:
            super().on_exception(exception)

    def teardown(self) -> None:
        self._restore_limits()
        if self._meter is not None:
            self._meter.close()
            self._meter = None
        self._clock = None
        super().teardown()

    # -- gathering --------------------------------------------------------------------------
    def _vector(self, reset: bool, final: bool = False) -> list[float]:
        """This rank's figures since the last gather (and its totals)."""
        window = dict(self._window)
        if self._clock is not None and self._clock.cuda_device is not None:
            window["wait_s"] += self._clock.resolve_cuda(wait=final)
        energy_j = gpu_energy_j = window_s = total_j = 0.0
        meter = self._meter
        if meter is not None and self._mark_s is not None:
            end = time.monotonic()
            if final:
                meter.wait_until_covered(end, timeout_s=0.5)
            latest = meter.latest_time_s()
            end = min(end, latest) if latest is not None else self._mark_s
            if end > self._mark_s:
                per_device = meter.energy_between(self._mark_s, end)
                energy_j = sum(per_device.values())
                if self._gpu is not None:
                    gpu_energy_j = per_device.get(self._gpu.info.device_id, 0.0)
                window_s = end - self._mark_s
            if reset:
                self._mark_s = max(self._mark_s, end)
            if self._train_start_s is not None:
                total_end = self._train_end_s if final and self._train_end_s else end
                total_end = min(total_end, latest) if latest is not None else total_end
                total_j = sum(meter.energy_between(self._train_start_s, total_end).values())
        if reset:
            for key in self._totals:
                self._totals[key] += window[key]
            self._window = {"wait_s": 0.0, "step_s": 0.0, "steps": 0.0}
        low_w, high_w = self._range_w
        values = {
            "wait_s": window["wait_s"],
            "step_s": window["step_s"],
            "steps": window["steps"],
            "window_energy_j": energy_j,
            "window_s": window_s,
            "gpu_window_energy_j": gpu_energy_j,
            "limit_w": self._limit_w if self._mode != _MODE_NONE else 0.0,
            "min_limit_w": low_w,
            "max_limit_w": high_w,
            "mode": self._mode,
            "energy_j": total_j,
        }
        return [float(values[k]) for k in _FIELDS]

    def _gather(self, vector: list[float]) -> list[dict[str, float]]:
        """One all-gather of every rank's vector (a no-op for one process)."""
        tensor = torch.tensor(vector, dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = self.all_gather(tensor.to(self.root_device)).cpu()
            rows = gathered.reshape(-1, len(_FIELDS)).tolist()
        else:
            rows = [vector]
        return [dict(zip(_FIELDS, row, strict=True)) for row in rows]

    def _log_window(self, trainer: pl.Trainer, ranks: list[dict[str, float]]) -> None:
        metrics: dict[str, float] = {}
        entry_ranks = []
        for rank, r in enumerate(ranks):
            wait = r["wait_s"] / r["step_s"] if r["step_s"] > 0 else 0.0
            power = r["window_energy_j"] / r["window_s"] if r["window_s"] > 0 else 0.0
            metrics[f"{_METRIC_PREFIX}wait_fraction_rank{rank}"] = wait
            metrics[f"{_METRIC_PREFIX}power_w_rank{rank}"] = power
            metrics[f"{_METRIC_PREFIX}energy_j_rank{rank}"] = r["energy_j"]
            if r["steps"]:
                metrics[f"{_METRIC_PREFIX}step_time_s_rank{rank}"] = r["step_s"] / r["steps"]
            if r["mode"] != _MODE_NONE:
                metrics[f"{_METRIC_PREFIX}power_limit_w_rank{rank}"] = r["limit_w"]
            entry_ranks.append(
                {
                    "rank": rank,
                    "wait_fraction": wait,
                    "power_w": power,
                    "energy_j": r["energy_j"],
                    "limit_w": r["limit_w"] if r["mode"] != _MODE_NONE else None,
                    "steps": int(r["steps"]),
                    "step_time_s": r["step_s"] / r["steps"] if r["steps"] else None,
                }
            )
        metrics[f"{_METRIC_PREFIX}power_w_total"] = sum(
            metrics[f"{_METRIC_PREFIX}power_w_rank{i}"] for i in range(len(ranks))
        )
        metrics[f"{_METRIC_PREFIX}energy_j_total"] = sum(r["energy_j"] for r in ranks)
        self._history.append({"step": trainer.global_step, "ranks": entry_ranks})
        self._known_ranks = [dict(r) for r in ranks]
        self._known_step = trainer.global_step
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)

    # -- summary ----------------------------------------------------------------------------
    def _write_summary(self, trainer: pl.Trainer, ranks: list[dict[str, float]]) -> None:
        meter = self._meter
        devices = [
            {"device_id": i.device_id, "name": i.name, "provenance": i.provenance_label}
            for i in (meter.device_infos if meter is not None else [])
        ]
        duration_s = (self._train_end_s or time.monotonic()) - (self._train_start_s or 0.0)
        local = {
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
            "hostname": os.uname().nodename if hasattr(os, "uname") else "",
            "devices": devices,
            "duration_s": duration_s,
            "failures": meter.failures() if meter is not None else {},
        }
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            infos: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(infos, local)  # once, at the end of fit
        else:
            infos = [local]
        rows = []
        for info, r, total in zip(infos, ranks, self._gathered_totals(ranks), strict=True):
            energy_j = r["energy_j"]
            d = info["duration_s"]
            rows.append(
                {
                    "global_rank": info["global_rank"],
                    "node_rank": info["node_rank"],
                    "local_rank": info["local_rank"],
                    "hostname": info["hostname"],
                    "device": " + ".join(x["name"] for x in info["devices"]) or "none",
                    "devices": info["devices"],
                    "energy_j": energy_j,
                    "mean_power_w": energy_j / d if d > 0 else 0.0,
                    "wait_fraction": total["wait_s"] / total["step_s"] if total["step_s"] else 0.0,
                    "wait_s": total["wait_s"],
                    "step_time_s": total["step_s"] / total["steps"] if total["steps"] else None,
                    "steps": int(total["steps"]),
                    "final_power_limit_w": r["limit_w"] if r["mode"] != _MODE_NONE else None,
                    "limit_mode": {_MODE_HARDWARE: "hardware", _MODE_SOFTWARE: "software"}.get(
                        r["mode"], "none"
                    ),
                    "failures": info["failures"],
                }
            )
        total_j = float(sum(row["energy_j"] for row in rows))
        duration = max((i["duration_s"] for i in infos), default=0.0)
        provenances = sorted({d["provenance"] for i in infos for d in i["devices"]})
        summary = {
            "schema": SUMMARY_SCHEMA,
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "provenance": "+".join(provenances) if provenances else "none",
            "ranks": rows,
            "total": {
                "energy_j": total_j,
                "mean_power_w": total_j / duration if duration > 0 else 0.0,
                "duration_s": duration,
            },
            "power_shifting": {
                "enabled": self.shift_power,
                "job_budget_w": self._budget_w,
                "rounds": self._decisions,
            },
        }
        self._last_summary = summary
        # trainer.log_dir broadcasts from rank 0: every rank must ask
        out_dir = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / SUMMARY_FILENAME
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("Could not write the DDP summary to %s: %s", out_dir, exc)
            path = None
        # through Lightning's console logger, so that the table is seen like Lightning's own
        rank_zero_info(format_summary_table(summary) + (f"\nsummary: {path}" if path else ""))

    def _write_failure_summary(self, exception: BaseException) -> None:
        """Write ``ddp_summary.json`` after a failure, without any collective.

        Every rank that sees the failure writes: its own figures measured now, the other
        ranks' from the last gather (``final: false``, ``as_of_step``), and the ranks of
        which nothing is known in ``missing_ranks``. A rank that finds the summary another
        rank of this run already wrote keeps that rank's final figures.
        """
        trainer = self._trainer
        if trainer is None or self._summary_dir is None or self._train_start_s is None:
            return
        world = max(1, trainer.world_size)
        rank = trainer.global_rank
        mine = dict(zip(_FIELDS, self._vector(reset=False), strict=True))
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
            "steps": self._steps,
            "final": True,
            "as_of_step": trainer.global_step,
            "hostname": os.uname().nodename if hasattr(os, "uname") else "",
        }
        path = self._summary_dir / SUMMARY_FILENAME
        with _summary_lock(path):
            try:
                previous = json.loads(path.read_text())
            except (OSError, ValueError):
                previous = None
            if isinstance(previous, dict) and previous.get("run_id") == self._run_id:
                for row in previous.get("ranks", []):
                    r = int(row.get("global_rank", -1))
                    if row.get("final") and not rows.get(r, {}).get("final"):
                        rows[r] = row
            ordered = [rows[r] for r in sorted(rows)]
            total_j = float(sum(row["energy_j"] for row in ordered))
            duration_s = time.monotonic() - self._train_start_s
            provenances = sorted(
                {i.provenance_label for i in (self._meter.device_infos if self._meter else [])}
            )
            summary = {
                "schema": SUMMARY_SCHEMA,
                "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "run_id": self._run_id,
                "status": (
                    "interrupted"
                    if isinstance(exception, (SystemExit, KeyboardInterrupt))
                    else "failed"
                ),
                "complete": False,
                "error": type(exception).__name__,
                "world_size": world,
                "num_nodes": trainer.num_nodes,
                "provenance": "+".join(provenances) if provenances else "none",
                "ranks": ordered,
                "missing_ranks": [r for r in range(world) if r not in rows],
                "total": {
                    "energy_j": total_j,
                    "mean_power_w": total_j / duration_s if duration_s > 0 else 0.0,
                    "duration_s": duration_s,
                    "note": "sum of the ranks' figures known at the failure (rows with "
                    "final=false are from the last gather; missing_ranks are not counted)",
                },
                "power_shifting": {
                    "enabled": self.shift_power,
                    "job_budget_w": self._budget_w,
                    "rounds": self._decisions,
                },
            }
            self._summary_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, path)
        self._last_summary = summary
        logger.info(
            "DDP summary after %s on rank %d: %.1f J known, missing ranks %s: %s",
            type(exception).__name__,
            rank,
            total_j,
            summary["missing_ranks"] or "none",
            path,
        )

    def _gathered_totals(self, ranks: list[dict[str, float]]) -> list[dict[str, float]]:
        """Per-rank wait/step totals over the whole fit (gathered with the last window)."""
        local = dict(self._totals)
        vector = torch.tensor(
            [local["wait_s"], local["step_s"], local["steps"]], dtype=torch.float64
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rows = self.all_gather(vector.to(self.root_device)).cpu().reshape(-1, 3).tolist()
        else:
            rows = [vector.tolist()]
        return [{"wait_s": a, "step_s": b, "steps": c} for a, b, c in rows]


def format_summary_table(summary: dict[str, Any]) -> str:
    """The per-rank table of a ``ddp_summary.json`` as text (what the strategy logs)."""
    header = (
        f"{'rank':>4} {'node':>4} {'local':>5}  {'device':<34} {'energy_J':>10} "
        f"{'power_W':>8} {'wait':>6} {'limit_W':>8}"
    )
    lines = ["Per-rank energy (SustainDDPStrategy)", header]
    for r in summary["ranks"]:
        limit = r["final_power_limit_w"]
        lines.append(
            f"{r['global_rank']:>4} {r['node_rank']:>4} {r['local_rank']:>5}  "
            f"{r['device'][:34]:<34} {r['energy_j']:>10.1f} {r['mean_power_w']:>8.1f} "
            f"{r['wait_fraction']:>6.1%} {('-' if limit is None else f'{limit:.0f}'):>8}"
        )
    total = summary["total"]
    lines.append(
        f"{'all':>4} {'':>4} {'':>5}  {'':<34} {total['energy_j']:>10.1f} "
        f"{total['mean_power_w']:>8.1f}"
    )
    return "\n".join(lines)
