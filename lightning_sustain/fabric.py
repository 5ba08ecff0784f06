"""Energy measurement in a Lightning Fabric loop: a Fabric callback over :class:`EnergyRun`.

Fabric calls a callback's methods by name (``fabric.call("on_train_batch_end", ...)``),
passing only the keyword arguments each method accepts, and calls
``on_after_setup(fabric=..., module=...)`` and ``on_after_optimizer_step(...)`` itself. So::

    from lightning.fabric import Fabric
    from lightning_sustain import FabricEnergyMonitor

    monitor = FabricEnergyMonitor(dirpath="out/energy")
    fabric = Fabric(accelerator="cuda", devices=8, strategy="ddp", callbacks=[monitor])
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)   # monitor learns ranks and device
    fabric.call("on_train_start")
    for step, batch in enumerate(loader):
        ...; optimizer.step()                            # optimizer steps counted
        fabric.call("on_train_batch_end", samples=len(batch), tokens=batch.numel(), step=step)
    fabric.call("on_train_end")
    fabric.call("on_predict_start")                      # inference: energy per sample/token
    ...; fabric.call("on_predict_batch_end", samples=n, tokens=t)
    fabric.call("on_predict_end")

Efficiency figures: ``monitor.set_flops_per_step(count_step_flops(model, x))`` once (J per
TFLOP, TFLOP/s per W, tokens per J in the summary and at log intervals). Time-resolved
CO2e: ``FabricEnergyMonitor(dirpath, intensity_file="grid.csv")``.

``state = {"model": model, "energy": monitor}`` in ``fabric.save`` / ``fabric.load`` keeps
the totals across a resume. Metrics go to ``fabric.log_dict`` at log intervals.
"""

from __future__ import annotations

from typing import Any

from lightning_sustain.energy.efficiency import StepFlops
from lightning_sustain.run.distributed import RankInfo
from lightning_sustain.run.energy_run import EnergyRun


class FabricEnergyMonitor:
    """A Fabric callback measuring energy per step, per stage and per rank.

    Args:
        dirpath: where the trace, summary and report go (``None``: nothing written).
        log_every_n_steps: training steps between log intervals.
        **run_kwargs: any other :class:`~lightning_sustain.run.EnergyRun` setting
            (``nvml_devices``, ``cpu``, ``country``, ``pue``, ``trace``, ``report``...).
    """

    def __init__(
        self, dirpath: str | None = None, *, log_every_n_steps: int = 50, **run_kwargs: Any
    ) -> None:
        self.run = EnergyRun(dirpath, log_every_n_steps=log_every_n_steps, **run_kwargs)
        self._fabric: Any = None
        self._optimizer_steps = 0
        self._optimizer_steps0 = 0
        self._counts_optimizer = False

    # -- called by Fabric itself ----------------------------------------------------------
    def on_after_setup(self, fabric: Any = None, module: Any = None) -> None:
        """Learn the process's ranks and device (Fabric calls this in ``fabric.setup``)."""
        self._attach(fabric)

    def on_after_optimizer_step(self, strategy: Any = None, optimizer: Any = None) -> None:
        """Count an optimizer step (Fabric calls this after each ``optimizer.step()``)."""
        self._optimizer_steps += 1
        self._counts_optimizer = True

    def _attach(self, fabric: Any) -> None:
        if fabric is None or self.run.meter is not None:
            return
        self._fabric = fabric
        self.run.ranks = RankInfo(
            fabric.global_rank, fabric.local_rank, fabric.node_rank, fabric.world_size
        )
        self.run.root_device = fabric.device

    # -- training -----------------------------------------------------------------------
    def on_train_start(self, fabric: Any = None) -> None:
        """Open the ``fit`` stage."""
        self._attach(fabric)
        self._optimizer_steps0 = self._optimizer_steps
        self.run.start_stage("fit")

    on_fit_start = on_train_start

    def on_train_batch_start(self) -> None:
        """Mark where a step starts (optional: steps are contiguous otherwise)."""
        self.run.begin_step()

    def on_train_batch_end(
        self, samples: int = 0, tokens: int = 0, step: int | None = None, fabric: Any = None
    ) -> dict[str, float] | None:
        """Record a training step's end; at log intervals, log through ``fabric.log_dict``.

        Args:
            samples: samples in the batch.
            tokens: tokens in the batch.
            step: the step's index (trace rows, logger step); ``None`` numbers from 0.
            fabric: the Fabric to log through (default: the one seen at set-up).
        """
        counted = self._counts_optimizer
        if counted:
            self.run.set_optimizer_steps(self._optimizer_steps - self._optimizer_steps0)
        metrics = self.run.step(samples, tokens, optimizer_step=not counted, index=step)
        if metrics is not None:
            self._log(metrics, fabric, step)
        return metrics

    def on_train_end(self, fabric: Any = None) -> None:
        """Close the ``fit`` stage and write the summary."""
        self._end(fabric)

    on_fit_end = on_train_end

    # -- validation, test, predict --------------------------------------------------------
    def on_validation_start(self) -> None:
        """Enter validation (inside fit), or open a ``validate`` stage."""
        self.run.begin_phase("validation")

    def on_validation_batch_end(self, samples: int = 0, tokens: int = 0) -> None:
        """Count a validation batch."""
        self.run.step(samples, tokens)

    def on_validation_end(self, fabric: Any = None) -> None:
        """Leave validation."""
        if self.run.current_stage == "validate":
            self._end(fabric)
        else:
            self.run.end_phase()

    def on_test_start(self, fabric: Any = None) -> None:
        """Open a ``test`` stage."""
        self._attach(fabric)
        self.run.start_stage("test")

    def on_test_batch_end(self, samples: int = 0, tokens: int = 0) -> None:
        """Count a test batch."""
        self.run.step(samples, tokens)

    def on_test_end(self, fabric: Any = None) -> None:
        """Close the ``test`` stage."""
        self._end(fabric)

    def on_predict_start(self, fabric: Any = None) -> None:
        """Open a ``predict`` stage (inference: energy per sample, per token, SCI)."""
        self._attach(fabric)
        self.run.start_stage("predict")

    def on_predict_batch_end(self, samples: int = 0, tokens: int = 0) -> None:
        """Count an inference batch."""
        self.run.step(samples, tokens)

    def on_predict_end(self, fabric: Any = None) -> None:
        """Close the ``predict`` stage."""
        self._end(fabric)

    def on_exception(self, exception: BaseException | None = None) -> None:
        """Keep what was measured after an error (no collective); call it in ``except``."""
        self.run.fail(exception if exception is not None else "exception")

    # -- helpers -------------------------------------------------------------------------
    def _end(self, fabric: Any) -> None:
        if self.run.current_stage == "fit" and self._counts_optimizer:
            self.run.set_optimizer_steps(self._optimizer_steps - self._optimizer_steps0)
        self.run.end_stage()
        self._log(self.run.metrics, fabric, None)

    def _log(self, metrics: dict[str, float], fabric: Any, step: int | None) -> None:
        fabric = fabric if fabric is not None else self._fabric
        if fabric is not None and metrics:
            fabric.log_dict(metrics, step=step)

    def compute_and_log(self, fabric: Any = None, step: int | None = None) -> dict[str, float]:
        """Log-interval figures now (every rank must call it: one small collective)."""
        metrics = self.run.flush()
        self._log(metrics, fabric, step)
        return metrics

    def set_flops_per_step(
        self, flops: StepFlops | int, *, method: str | None = None, phase: str = "train"
    ) -> None:
        """FLOPs of one batch on one rank, for J per TFLOP and TFLOP/s per W in the summary.

        Count them once on a sample batch (``count_step_flops(model, x)`` from
        :mod:`lightning_sustain.energy.efficiency`, best on the module before
        ``fabric.setup``) or pass a number with ``method=``; see
        :meth:`EnergyRun.set_flops_per_step`.
        """
        self.run.set_flops_per_step(flops, method=method, phase=phase)

    def close(self) -> None:
        """Stop sampling (an open stage ends as completed)."""
        self.run.close()

    @property
    def summary(self) -> dict[str, Any] | None:
        """The last job summary, or None."""
        return self.run.summary

    def state_dict(self) -> dict[str, Any]:
        """Totals so far for ``fabric.save`` (every rank must save together under DDP)."""
        return self.run.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue counting from ``fabric.load``."""
        self.run.load_state_dict(state)
