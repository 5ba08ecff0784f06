"""``Fabric(strategy="sustain_ddp")``: Fabric's DDP with per-rank energy, wait and power shifting.

The Fabric counterpart of :class:`~lightning_sustain.SustainDDPStrategy`, over the same
Lightning-free core (:class:`~lightning_sustain.run.ddp_accounting.DDPAccounting`,
:class:`~lightning_sustain.run.wait_clock.WaitClock`). Fabric has no training hooks on a
strategy, so the step boundary is the optimizer step (``optimizer.step()`` of a
Fabric-wrapped optimizer calls :meth:`FabricSustainDDPStrategy.optimizer_step`), and the
end of training is an explicit call::

    import lightning_sustain  # registers "sustain_ddp" for the Trainer and for Fabric
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cuda", devices=8, strategy="sustain_ddp")
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)   # DDP + timed comm hook + meter
    for batch in loader:
        fabric.backward(loss_fn(model, batch))
        optimizer.step()                                # a step boundary (per-rank figures)
        optimizer.zero_grad()
        fabric.log_dict(fabric.strategy.metrics)        # ddp/... at log intervals
    fabric.strategy.finish()                            # every rank: ddp_summary.json

After an exception, ``fabric.strategy.on_exception(exc)`` restores this rank's limits and
writes the failure summary without any collective (limits are restored at exit and on
SIGTERM regardless). Only the subprocess launcher (``start_method="popen"``, Fabric's
default for DDP) is registered; its process observer restores the limits of ranks that
died before it kills the job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, Precision
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import DDPStrategy
from torch.nn import Module
from torch.nn.parallel.distributed import DistributedDataParallel
from torch.optim import Optimizer

from lightning_sustain._compat import FabricSubprocessScriptLauncher as _FabricScriptLauncher
from lightning_sustain._compat import StrategyRegistryType as _StrategyRegistry
from lightning_sustain._compat import set_num_threads_if_needed as _set_num_threads_if_needed
from lightning_sustain.energy.discovery import warn_once
from lightning_sustain.energy.estimate import DEFAULT_WATTS_PER_CORE, validate_positive
from lightning_sustain.run.ddp_accounting import (
    DDPAccounting,
    format_summary_table,
)
from lightning_sustain.run.devices import (
    CpuSelection,
    GpuSelection,
    open_rank_devices,
    validate_cpu_selection,
    validate_gpu_selection,
)
from lightning_sustain.run.distributed import RankInfo
from lightning_sustain.run.wait_clock import (
    check_comm_hook_device,
    install_comm_hook,
)
from lightning_sustain.strategies._shared import SustainDDPViews, sustain_settings
from lightning_sustain.strategies.observer import RestoringProcessObserver

logger = logging.getLogger(__name__)

CommHookName = Literal["fp16", "bf16", "powersgd"]


class _SustainFabricScriptLauncher(_FabricScriptLauncher):
    """Fabric's subprocess launcher with :class:`RestoringProcessObserver`."""

    def launch(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(
            num_devices=self.num_processes, num_nodes=self.num_nodes
        )
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            RestoringProcessObserver(child_processes=self.procs, main_pid=os.getpid()).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class FabricSustainDDPStrategy(SustainDDPViews, DDPStrategy):
    r"""Fabric's DDP with per-rank energy accounting, wait measurement and power shifting.

    Use it by name (``Fabric(strategy="sustain_ddp")``, registered by
    ``import lightning_sustain``) or as an object. Every Fabric
    :class:`~lightning.fabric.strategies.DDPStrategy` argument works unchanged; extra
    keyword arguments go to :class:`torch.nn.parallel.DistributedDataParallel`.

    Args:
        accelerator: see Fabric's ``DDPStrategy``.
        parallel_devices: see Fabric's ``DDPStrategy``.
        cluster_environment: see Fabric's ``DDPStrategy``.
        checkpoint_io: see Fabric's ``DDPStrategy``.
        precision: see Fabric's ``DDPStrategy``.
        process_group_backend: see Fabric's ``DDPStrategy``.
        timeout: see Fabric's ``DDPStrategy``.
        start_method: see Fabric's ``DDPStrategy`` (``"popen"``: limits of a rank that
            dies are restored by the launcher's observer).
        comm_hook: gradient compression by name on CUDA (``"fp16"``, ``"bf16"``,
            ``"powersgd"``); ``None`` for plain all-reduce.
        ddp_comm_hook: a DDP communication hook of yours (CUDA), exclusive with
            ``comm_hook``; timed like the built-in ones.
        ddp_comm_state: its state.
        shift_power: move power from ranks that wait to the rank on the critical path.
        job_power_budget_w: the job's power budget in watts (implies ``shift_power``).
        shift_every_n_steps: optimizer steps between two re-balancing rounds.
        target_slack: wait fraction kept as a margin on every rank when shifting.
        log_every_n_steps: optimizer steps between two gathers of the per-rank figures.
        measure_wait: time gradient synchronisation with a communication hook.
        summary: write ``ddp_summary.json`` in :meth:`finish`.
        dirpath: where the summary goes (``None``: the working directory).
        nvml_devices: GPUs this rank measures (``"auto"``: the one it computes on; on CPU
            with the simulated NVML device, the local rank's).
        cpu: CPU measurement (``"none"`` by default, as the Trainer strategy).
        watts_per_core: power of one busy core for the CPU estimate, in watts.
        \**kwargs: passed to ``DistributedDataParallel``.

    Raises:
        ValueError: a setting is not valid; the message names it.
    """

    strategy_name = "sustain_ddp"

    def __init__(
        self,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        comm_hook: Optional[CommHookName] = None,
        ddp_comm_hook: Optional[Callable] = None,
        ddp_comm_state: Optional[object] = None,
        shift_power: bool = False,
        job_power_budget_w: Optional[float] = None,
        shift_every_n_steps: int = 20,
        target_slack: float = 0.05,
        log_every_n_steps: int = 50,
        measure_wait: bool = True,
        summary: bool = True,
        dirpath: Optional[str] = None,
        nvml_devices: GpuSelection = "auto",
        cpu: CpuSelection = "none",
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
        **kwargs: Any,
    ) -> None:
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
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **kwargs,
        )
        for name, value in settings.items():
            setattr(self, name, value)
        self.log_every_n_steps = self.log_every_n_steps or 50
        self.ddp_comm_hook = ddp_comm_hook
        self.ddp_comm_state = ddp_comm_state
        self.dirpath = dirpath
        self.nvml_devices = validate_gpu_selection(nvml_devices)
        self.cpu = validate_cpu_selection(cpu)
        self.watts_per_core = validate_positive("watts_per_core", watts_per_core)
        #: this process's accounting once a module is set up (kept after finish, closed)
        self.accounting: DDPAccounting | None = None
        self._metrics: dict[str, float] = {}
        self._finished = False

    # -- registration -----------------------------------------------------------------------
    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Register ``sustain_ddp`` in Fabric's strategy registry (idempotent)."""
        if "sustain_ddp" in strategy_registry:
            return
        strategy_registry.register(
            "sustain_ddp",
            cls,
            description="DDP with per-rank energy, wait measurement and power shifting",
            start_method="popen",
        )

    def _configure_launcher(self) -> None:
        if self._start_method == "popen":
            assert self.cluster_environment is not None
            self._launcher = _SustainFabricScriptLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )
        else:
            super()._configure_launcher()

    # -- public views -----------------------------------------------------------------------
    @property
    def metrics(self) -> dict[str, float]:
        """The last log interval's per-rank figures (``ddp/...``), for ``fabric.log_dict``."""
        return dict(self._metrics)

    # -- set-up -----------------------------------------------------------------------------
    def setup_module(self, module: Module) -> DistributedDataParallel:
        """Wrap in DDP, time its gradient synchronisation and start this rank's accounting."""
        check_comm_hook_device(self.comm_hook, self.root_device.type)
        ddp = super().setup_module(module)
        first = self.accounting is None
        if first:
            self.accounting = self._open_accounting()
        inner, state = self._inner_hook(self.root_device, self.ddp_comm_hook, self.ddp_comm_state)
        install_comm_hook(ddp, self.accounting.clock if self.accounting else None, inner, state)
        if first and self.accounting is not None:
            summary_dir = Path(self.dirpath or os.getcwd()) if self.summary else None
            self.accounting.start(summary_dir)
            self.accounting.step_boundary()  # the first step starts now
        return ddp

    def _open_accounting(self) -> DDPAccounting:
        try:
            devices = open_rank_devices(
                self.nvml_devices, self.cpu, self.watts_per_core, self.root_device, self.local_rank
            )
        except Exception as exc:  # measurement must never stop training
            warn_once("ddp-meter", "FabricSustainDDPStrategy measures no energy: %s", exc)
            devices = []
        return self._new_accounting(
            RankInfo(self.global_rank, self.local_rank, self.node_rank, self.world_size),
            devices,
            self.root_device,
            self.log_every_n_steps,
        )

    # -- steps ------------------------------------------------------------------------------
    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        """Fabric's optimizer step, then a step boundary (a gather at log intervals)."""
        output = super().optimizer_step(optimizer, **kwargs)
        accounting = self.accounting
        if accounting is not None and not self._finished:
            ranks = accounting.step_boundary()
            if ranks is not None:
                self._metrics = accounting.metrics_for(ranks, accounting.steps)
        return output

    # -- end --------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any] | None:
        """End of training, on every rank together: last gather, summary, limits restored.

        Returns:
            The job summary (every rank), or None when no module was set up.
        """
        accounting = self.accounting
        if accounting is None or self._finished:
            return self.ddp_summary
        self._finished = True
        metrics, summary, path = accounting.finish(
            accounting.steps, self.num_nodes, close_open_step=False
        )
        self._metrics = metrics
        if summary is not None and self.global_rank == 0 and self.summary:
            logger.info(format_summary_table(summary) + (f"\nsummary: {path}" if path else ""))
        return summary

    def on_exception(self, exception: BaseException) -> None:
        """After a failure on this rank (no collective): restore limits, write what is known."""
        accounting = self.accounting
        if accounting is None:
            return
        self._finished = True
        accounting.fail(exception, accounting.steps, self.num_nodes)

    def teardown(self) -> None:
        """Restore limits and stop measuring."""
        if self.accounting is not None:
            self.accounting.close()
        super().teardown()
