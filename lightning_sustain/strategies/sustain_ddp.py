"""SustainDDPStrategy: Lightning's DDP with per-rank energy, wait measurement and power shifting.

The strategy is a :class:`~lightning.pytorch.strategies.DDPStrategy` subclass, so every
launcher, cluster environment and process-group backend Lightning supports keeps working.
This module holds only what is specific to the Trainer's DDP: the communication hook
(timed by :class:`~lightning_sustain.run.wait_clock.WaitClock`), the launchers that restore
power limits when a rank dies, and the translation of Trainer hooks into calls on
:class:`~lightning_sustain.run.ddp_accounting.DDPAccounting`, which owns the per-rank
energy, wait and limits, power shifting (:mod:`lightning_sustain.budget.shifting`), the
log-interval gathers and ``ddp_summary.json`` (also after a failure).

It imports no callback: it measures the same devices as an
:class:`~lightning_sustain.EnergyMonitor` by finding a callback whose ``run`` is an
:class:`~lightning_sustain.run.EnergyRun`, and takes a ``PowerBudget(per="job")`` by
finding a callback whose ``power_cap`` is a
:class:`~lightning_sustain.budget.power_cap.PowerCapController`.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn.parallel.distributed import DistributedDataParallel

from lightning_sustain._compat import MultiProcessingLauncher as _MultiProcessingLauncher
from lightning_sustain._compat import StrategyRegistryType as _StrategyRegistry
from lightning_sustain._compat import SubprocessScriptLauncher as _SubprocessScriptLauncher
from lightning_sustain._compat import set_num_threads_if_needed as _set_num_threads_if_needed
from lightning_sustain._deprecation import renamed_argument
from lightning_sustain.budget.limits import reap_dead_owners
from lightning_sustain.budget.power_cap import PowerCapController
from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.energy.discovery import warn_once
from lightning_sustain.energy.meter import EnergyMeter
from lightning_sustain.run.ddp_accounting import (
    SUMMARY_FILENAME,
    SUMMARY_SCHEMA,
    DDPAccounting,
    format_summary_table,
    restore_node_limits,
)
from lightning_sustain.run.devices import open_rank_devices
from lightning_sustain.run.distributed import RankInfo
from lightning_sustain.run.energy_run import EnergyRun
from lightning_sustain.run.wait_clock import (
    COMM_HOOKS,
    WaitClock,
    builtin_comm_hook,
    check_comm_hook_device,
    install_comm_hook,
)
from lightning_sustain.strategies._shared import SustainDDPViews, sustain_settings
from lightning_sustain.strategies.observer import RestoringProcessObserver

logger = logging.getLogger(__name__)

CommHookName = Literal["fp16", "bf16", "powersgd"]

__all__ = [
    "COMM_HOOKS",
    "SUMMARY_FILENAME",
    "SUMMARY_SCHEMA",
    "SustainDDPStrategy",
    "format_summary_table",
    "restore_node_limits",
]

# older names, kept for benchmarks and users' code
_WaitClock = WaitClock
_builtin_comm_hook = builtin_comm_hook


def trainer_devices(trainer: pl.Trainer) -> list[EnergyDevice]:
    """This Trainer process's devices: an EnergyRun's (e.g. EnergyMonitor's), else opened.

    Any callback whose ``run`` is an open :class:`EnergyRun` lends its devices, so the
    strategy and the monitor read the same sampled curves.
    """
    for callback in trainer.callbacks:
        run = getattr(callback, "run", None)
        if isinstance(run, EnergyRun) and run.meter is not None:
            return [stream.device for stream in run.meter.streams]
    return open_rank_devices("auto", "none", 10.0, trainer.strategy.root_device, trainer.local_rank)


def trainer_power_cap(trainer: pl.Trainer) -> PowerCapController | None:
    """The power cap a callback put in force (``PowerBudget`` sets ``power_cap``), or None."""
    for callback in trainer.callbacks:
        cap = getattr(callback, "power_cap", None)
        if isinstance(cap, PowerCapController):
            return cap
    return None


class _SustainScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher with :class:`RestoringProcessObserver`."""

    def launch(
        self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any
    ) -> Any:
        self.cluster_environment.validate_settings(
            num_devices=self.num_processes, num_nodes=self.num_nodes
        )
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            RestoringProcessObserver(child_processes=self.procs, main_pid=os.getpid()).start()
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


class SustainDDPStrategy(SustainDDPViews, DDPStrategy):
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
        settings = sustain_settings(
            comm_hook,
            ddp_comm_hook,
            shift_power,
            job_power_budget_w,
            shift_every_n_steps,
            target_slack,
            log_every_n_steps,
            measure_wait,
            summary,
        )
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
        for name, value in settings.items():
            setattr(self, name, value)
        self.output_dir = output_dir
        self._trainer: pl.Trainer | None = None
        #: this process's accounting during fit (kept after it ends, closed)
        self.accounting: DDPAccounting | None = None

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
        return self.accounting.meter if self.accounting is not None else None

    # -- set-up -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer) -> None:
        check_comm_hook_device(self.comm_hook, self.root_device.type)
        self._trainer = trainer
        if trainer.state.fn == TrainerFn.FITTING:
            self._open_accounting(trainer)  # before DDP wraps the model: its clock is hooked
        super().setup(trainer)

    def _open_accounting(self, trainer: pl.Trainer) -> None:
        try:
            devices = trainer_devices(trainer)
        except Exception as exc:  # measurement must never stop training
            warn_once("ddp-meter", "SustainDDPStrategy measures no energy on this rank: %s", exc)
            devices = []
        self.accounting = self._new_accounting(
            RankInfo(
                trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size
            ),
            devices,
            self.root_device,
            self.log_every_n_steps or max(1, trainer.log_every_n_steps),
        )

    def _register_ddp_hooks(self) -> None:
        model = self.model
        assert isinstance(model, DistributedDataParallel)
        hook = self._ddp_comm_hook
        if hook is not None and self._ddp_comm_wrapper is not None:
            hook = self._ddp_comm_wrapper(hook)
        inner, state = self._inner_hook(self.root_device, hook, self._ddp_comm_state)
        clock = self.accounting.clock if self.accounting is not None else None
        install_comm_hook(model, clock, inner, state)

    # -- hooks ------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        trainer, accounting = self._trainer, self.accounting
        if trainer is None or accounting is None:
            return
        accounting.attach_power_cap(trainer_power_cap(trainer))
        summary_dir = None
        if self.summary:
            summary_dir = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        accounting.start(summary_dir)
        self.shift_power = accounting.shift_power

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        trainer, accounting = self._trainer, self.accounting
        if trainer is None or accounting is None:
            return
        ranks = accounting.step_boundary()
        if ranks is not None:
            self._log(trainer, accounting.metrics_for(ranks, trainer.global_step))

    def on_train_end(self) -> None:
        trainer, accounting = self._trainer, self.accounting
        try:
            if trainer is not None and accounting is not None:
                ended = accounting.end_training(trainer.global_step)
                if ended is not None:
                    ranks, metrics = ended
                    self._log(trainer, metrics)
                    if self.summary:
                        summary, path = accounting.write_summary(ranks, trainer.num_nodes)
                        # through Lightning's console logger, seen like Lightning's own
                        rank_zero_info(
                            format_summary_table(summary) + (f"\nsummary: {path}" if path else "")
                        )
        finally:
            if accounting is not None:
                accounting.restore_limits()
            super().on_train_end()

    def on_exception(self, exception: BaseException) -> None:
        try:
            accounting, trainer = self.accounting, self._trainer
            if accounting is not None:
                step = trainer.global_step if trainer is not None else 0
                accounting.fail(exception, step, trainer.num_nodes if trainer else 1)
            else:
                reap_dead_owners()  # a peer that died cannot release its caps
        finally:
            super().on_exception(exception)

    def teardown(self) -> None:
        if self.accounting is not None:
            self.accounting.close()
        super().teardown()

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)
