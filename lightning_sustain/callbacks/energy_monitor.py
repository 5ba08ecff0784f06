"""EnergyMonitor: the Trainer front end of :class:`~lightning_sustain.run.EnergyRun`.

Thin glue: every figure, file and collective belongs to the run object; this module only
maps Lightning hooks onto it (stages, phases, step boundaries) and hands its log-interval
metrics to the Trainer's loggers, ``callback_metrics`` and progress bar under one key
scheme (``energy/...``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size

from lightning_sustain._deprecation import renamed_argument
from lightning_sustain.energy.efficiency import StepFlops
from lightning_sustain.energy.estimate import DEFAULT_WATTS_PER_CORE, validate_positive_int
from lightning_sustain.energy.meter import EnergyMeter
from lightning_sustain.run.devices import CpuSelection, GpuSelection
from lightning_sustain.run.distributed import RankInfo
from lightning_sustain.run.energy_run import METRIC_PREFIX, PROGRESS_BAR_KEYS, EnergyRun

logger = logging.getLogger(__name__)


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


_FLOPS_COUNTED = (
    "matrix multiplications, convolutions and attention (2 FLOPs per multiply-accumulate); "
    "elementwise, normalisation, loss and optimizer FLOPs are not counted"
)


class _StepFlopCounter:
    """``FlopCounterMode`` open around one real batch of the Trainer (no copy, no extra pass).

    Entered in ``on_*_batch_start`` and left in ``on_*_batch_end``, so it counts exactly
    what the Trainer ran for that batch (``training_step``, the backward pass, hooks),
    whatever the module's ``forward`` signature.
    """

    def __init__(self, phase: str) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self.phase = phase
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()

    def close(self) -> int:
        self._mode.__exit__(None, None, None)
        return int(self._mode.get_total_flops())


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class EnergyMonitor(Callback):
    r"""Measure energy, power and CO2e of every fit, validate, test and predict stage.

    Energy comes from the GPUs this process computes on (NVML energy counter, or power
    samples integrated over time) and from the CPU (RAPL counters, or an estimate from CPU
    time). Every figure carries its provenance: ``counter``, ``integrated`` or
    ``estimated``, with ``(simulated)`` when it comes from the simulated NVML device.

    One summary per run directory accumulates every stage this callback sees (fit,
    validate, test, predict, a second fit) and, after a resume, the totals stored in the
    checkpoint: nothing is overwritten. ``steps`` are optimizer steps
    (``trainer.global_step``), ``batches`` training batches, both per rank.

    Metrics (``energy/energy_kwh``, ``energy/co2e_g``, ``energy/train_energy_kwh``,
    ``energy/power_w``, ...) reach the loggers, ``trainer.callback_metrics`` (so
    ``EarlyStopping(monitor="energy/energy_kwh")`` works) and the progress bar under the same
    names, at log intervals, at each epoch end and before each validation: never per step.

    Under ``fast_dev_run`` the callback measures but writes no trace, summary or report.

    Example::

        trainer = Trainer(callbacks=[EnergyMonitor(country="DE")])

    Args:
        nvml_devices: GPUs to measure: ``"auto"`` (the GPU this process trains on; on CPU
            with the simulated NVML device, the simulated device of the local rank),
            ``"local_rank"``, ``"none"`` or a list of NVML indices.
        cpu: ``"auto"`` (RAPL where readable, else estimated), ``"rapl"``,
            ``"estimate"`` or ``"none"``. RAPL is read by local rank 0 only.
        watts_per_core: power of one fully busy CPU core for the CPU estimate, in watts.
        carbon_intensity_g_per_kwh: grid carbon intensity in gCO2e/kWh. Exclusive with
            ``country``; when neither is given, the world average is used.
        country: ISO 3166 country code looked up in the shipped table (Ember 2023).
        pue: the data centre's power usage effectiveness (>= 1.0).
        interval_s: sampling interval; ``None`` uses each device's preferred interval.
        log_every_n_steps: logging interval in batches; ``None`` follows the Trainer's.
        progress_bar: show ``energy/power_w`` and ``energy/energy_kwh`` in the progress bar.
        trace: stream the per-step CSV trace.
        dirpath: where the trace and summary go; ``None`` means ``trainer.log_dir``.
        report: write ``report.md``/``report.html``/``emissions.csv`` after each stage.
        flops: FLOPs per batch for the efficiency figures (J per TFLOP, TFLOP/s per W):
            ``True`` counts them once with ``torch.utils.flop_counter.FlopCounterMode``
            around the first training batch (and the first predict batch) exactly as the
            Trainer runs it (forward and backward, any ``forward`` signature; that one
            batch runs slower); an ``int`` gives the FLOPs of one training batch on one
            rank yourself; ``False`` counts nothing. A count that fails or finds no FLOPs
            is a warning and the figures are left out, never an error.
        tokens_per_sample: tokens in one sample (sequence length), so tokens are counted
            as ``samples x tokens_per_sample`` in every stage (energy per token, tokens per
            J, SCI per token). A LightningModule method ``count_tokens(batch, outputs,
            stage) -> int`` takes precedence (e.g. generated tokens in ``predict``).
        intensity_file: a carbon-intensity time series (CSV/JSON; docs/carbon.md): the
            summary adds time-resolved CO2e next to the location-based yearly figure. A
            file that cannot be used is a warning and the yearly intensity is used (stated
            in the summary's ``carbon_time_resolved.status``).
        intensity_timezone: IANA zone of naive timestamps in ``intensity_file``.
        gpus: deprecated name of ``nvml_devices``.
        output_dir: deprecated name of ``dirpath``.

    Raises:
        ValueError: a setting is not valid; the message names it.
    """

    def __init__(
        self,
        nvml_devices: GpuSelection = "auto",
        cpu: CpuSelection = "auto",
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
        carbon_intensity_g_per_kwh: float | None = None,
        country: str | None = None,
        pue: float = 1.0,
        interval_s: float | None = None,
        log_every_n_steps: int | None = None,
        progress_bar: bool = True,
        trace: bool = True,
        dirpath: str | None = None,
        report: bool = True,
        gpus: GpuSelection | None = None,
        output_dir: str | None = None,
        flops: bool | int = True,
        tokens_per_sample: int | None = None,
        intensity_file: str | None = None,
        intensity_timezone: str = "UTC",
    ) -> None:
        super().__init__()
        nvml_devices = renamed_argument("EnergyMonitor", "gpus", gpus, "nvml_devices", nvml_devices)
        dirpath = renamed_argument("EnergyMonitor", "output_dir", output_dir, "dirpath", dirpath)
        self.log_every_n_steps = validate_positive_int("log_every_n_steps", log_every_n_steps)
        self.run = EnergyRun(
            dirpath=None,
            nvml_devices=nvml_devices,
            cpu=cpu,
            watts_per_core=watts_per_core,
            carbon_intensity_g_per_kwh=carbon_intensity_g_per_kwh,
            country=country,
            pue=pue,
            interval_s=interval_s,
            trace=trace,
            report=report,
            intensity_file=intensity_file,
            intensity_timezone=intensity_timezone,
        )
        if not isinstance(flops, (bool, int)) or (not isinstance(flops, bool) and flops < 0):
            raise ValueError(
                f"flops must be True, False or the FLOPs of one training batch (an int >= 0), "
                f"got {flops!r}."
            )
        if not isinstance(flops, bool):
            self.run.set_flops_per_step(
                int(flops), method="given by the user (EnergyMonitor(flops=...)), per rank"
            )
        self.flops = flops
        # phases whose first batch is still to be counted (checked per batch: a set lookup)
        self._to_count: set[str] = {"train", "predict"} if flops is True else set()
        self.tokens_per_sample = (
            None
            if tokens_per_sample is None
            else validate_positive_int("tokens_per_sample", tokens_per_sample)
        )
        self._flop_counter: _StepFlopCounter | None = None
        self._count_tokens: Any = None
        self.nvml_devices = self.run.nvml_devices
        self.cpu = self.run.cpu
        self.dirpath = dirpath
        self.progress_bar = progress_bar
        self._global_step0 = 0
        self._batch_offset = 0
        self._steps_seen = 0
        self._trainer: pl.Trainer | None = None
        self._state_key_cache: tuple[Any, str] | None = None

    # -- compatibility names ------------------------------------------------------------
    @property
    def gpus(self) -> GpuSelection:
        """Deprecated alias of :attr:`nvml_devices`."""
        return self.nvml_devices

    @property
    def output_dir(self) -> str | None:
        """Deprecated alias of :attr:`dirpath`."""
        return self.dirpath

    @property
    def meter(self) -> EnergyMeter | None:
        """The run's meter while a Trainer stage is set up (shared with other callbacks)."""
        return self.run.meter

    @property
    def accountant(self) -> Any:
        """The run's accountant while a stage is set up."""
        return self.run.accountant

    @property
    def carbon(self) -> Any:
        """The carbon intensity applied."""
        return self.run.carbon

    @property
    def pue(self) -> float:
        """The power usage effectiveness applied."""
        return self.run.pue

    @property
    def state_key(self) -> str:
        # Lightning formats every callback's state_key for each hook it calls (several per
        # training step): built once per setting, not per call (~1.6 us each)
        basis = (
            tuple(self.nvml_devices) if isinstance(self.nvml_devices, list) else self.nvml_devices,
            self.cpu,
        )
        cached = self._state_key_cache
        if cached is None or cached[0] != basis:
            # "gpus" kept in the key so checkpoints written before the rename still load
            cached = (basis, self._generate_state_key(gpus=self.nvml_devices, cpu=self.cpu))
            self._state_key_cache = cached
        return cached[1]

    # -- set-up and tear-down ----------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        run = self.run
        run.ranks = RankInfo(
            trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size
        )
        run.root_device = trainer.strategy.root_device
        run.write_files = not trainer.fast_dev_run
        run.log_every_n_steps = self.log_every_n_steps or max(1, trainer.log_every_n_steps)
        hook = getattr(pl_module, "count_tokens", None)
        self._count_tokens = hook if callable(hook) else None
        run.open()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._drop_flop_counter()
        if self.run.current_stage is not None:  # a stage whose end hook never ran
            self.run.end_stage(status="interrupted: stage did not finish", gather=False)
        self.run.close()
        self._trainer = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # No collective here: under DDP the other ranks may never reach one, so each rank
        # keeps what it measured and the summary adds the other ranks' last records.
        self._drop_flop_counter()
        if self.run.current_stage == "fit":
            self.run.set_optimizer_steps(trainer.global_step - self._global_step0)
        self.run.fail(exception)

    def _start(self, trainer: pl.Trainer, stage: str) -> None:
        dirpath = self.dirpath or trainer.log_dir or trainer.default_root_dir
        self.run.dirpath = Path(dirpath)
        self.run.start_stage(stage)

    def _end(self, trainer: pl.Trainer) -> None:
        summary = self.run.end_stage("completed")
        self._publish(trainer, self.run.metrics, log=False)
        if summary is not None and self.progress_bar:
            trainer.progress_bar_metrics.update(
                {k: self.run.metrics[k] for k in PROGRESS_BAR_KEYS if k in self.run.metrics}
            )

    # -- fit -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._global_step0 = trainer.global_step
        self._start(trainer, "fit")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # read once here, not per step (trainer properties walk the loop objects), and not
        # in on_fit_start: a checkpoint's loop state is restored between the two hooks
        self._global_step0 = trainer.global_step
        self._batch_offset = trainer.fit_loop.epoch_loop.batch_progress.total.completed
        self._steps_seen = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run.set_epoch(trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.run.begin_step()
        if self._to_count and "train" in self._to_count:
            self._start_flop_counter("train")

    # -- FLOPs and tokens ----------------------------------------------------------------
    def _start_flop_counter(self, phase: str) -> None:
        if self._flop_counter is not None:
            return
        self._to_count.discard(phase)  # one try per phase, whatever happens
        try:
            self._flop_counter = _StepFlopCounter(phase)
        except Exception as exc:  # counting must never break training
            self._to_count.clear()
            self.run.flops_note = f"FLOPs not counted: {type(exc).__name__}: {exc}"
            logger.warning("EnergyMonitor: %s; efficiency figures left out.", self.run.flops_note)

    def _finish_flop_counter(self, phase: str, samples: int, tokens: int) -> None:
        counter = self._flop_counter
        if counter is None or counter.phase != phase:
            return
        self._flop_counter = None
        try:
            total = counter.close()
        except Exception as exc:
            self._to_count.clear()
            self.run.flops_note = f"FLOPs not counted: {type(exc).__name__}: {exc}"
            logger.warning("EnergyMonitor: %s; efficiency figures left out.", self.run.flops_note)
            return
        if total <= 0:
            if phase == "train":
                self.run.flops_note = (
                    "FLOPs not counted: FlopCounterMode found no countable operation in the "
                    "first training batch"
                )
                logger.warning(
                    "EnergyMonitor: %s; pass flops=<FLOPs per batch> to give them.",
                    self.run.flops_note,
                )
            return
        passes = (
            "training_step, backward and optimizer step as the Trainer ran them"
            if phase == "train"
            else "predict_step (forward) as the Trainer ran it"
        )
        method = (
            f"torch.utils.flop_counter.FlopCounterMode (torch {torch.__version__}) around the "
            f"first {phase} batch ({samples} samples) on every rank: {passes}; counts "
            f"{_FLOPS_COUNTED}"
        )
        self.run.set_flops_per_step(
            StepFlops(total, phase == "train", samples or None, tokens or None, method),
            phase=phase,
        )

    def _drop_flop_counter(self) -> None:
        counter, self._flop_counter = self._flop_counter, None
        if counter is not None:
            try:
                counter.close()
            except Exception:
                pass

    def _tokens(
        self, pl_module: pl.LightningModule, batch: Any, outputs: Any, stage: str, samples: int
    ) -> int:
        hook = self._count_tokens
        if hook is not None:
            try:
                return int(hook(batch, outputs, stage))
            except Exception as exc:  # a user hook must not stop training either
                self._count_tokens = None
                logger.warning(
                    "EnergyMonitor: %s.count_tokens failed (%s: %s); tokens are no longer "
                    "counted from it.",
                    type(pl_module).__name__,
                    type(exc).__name__,
                    exc,
                )
        if self.tokens_per_sample is not None:
            return samples * self.tokens_per_sample
        return 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        index = self._batch_offset + self._steps_seen
        self._steps_seen += 1
        samples = _batch_size(batch)
        tokens = 0
        if self._count_tokens is not None or self.tokens_per_sample is not None:
            tokens = self._tokens(pl_module, batch, outputs, "train", samples)
        if self._flop_counter is not None:
            self._finish_flop_counter("train", samples, tokens)
        metrics = self.run.step(samples, tokens, optimizer_step=False, index=index)
        if metrics is not None:
            self._publish(trainer, metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every rank reaches this hook: a safe place for the interval's small collective
        self.run.set_optimizer_steps(trainer.global_step - self._global_step0)
        self._publish(trainer, self.run.flush())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run.set_optimizer_steps(trainer.global_step - self._global_step0)
        self._end(trainer)

    @contextlib.contextmanager
    def energy_phase(self, phase: str = "explain") -> Iterator[None]:
        """Measure a block inside fit as its own phase (``explain`` for ShapSummary).

        Other callbacks call it without importing this class (``ShapSummary`` looks for an
        ``energy_phase`` method on the Trainer's callbacks), so the explanation's energy is
        a line of its own in the summary (``explain_energy_j``) and the report, not "other".
        Outside fit it measures nothing; measurement never fails the block.
        """
        entered = False
        try:
            if self.run.current_stage == "fit":
                self.run.begin_phase(phase)
                entered = True
        except Exception as err:  # measurement never stops the caller
            logger.warning("EnergyMonitor: could not start phase %r: %s", phase, err)
        try:
            yield
        finally:
            if entered:
                try:
                    self.run.end_phase()
                except Exception as err:
                    logger.warning("EnergyMonitor: could not end phase %r: %s", phase, err)

    # -- validation, test, predict ------------------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run.current_stage is None:
            self._start(trainer, "validate")
            return
        if not trainer.sanity_checking and self.run.current_stage == "fit":
            # fresh figures for callbacks monitoring energy/... at validation end
            self._publish(trainer, self.run.flush())
        self.run.begin_phase("validation")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self._count_batch(pl_module, batch, outputs, "validation")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run.current_stage == "validate":
            self._end(trainer)
            return
        self.run.end_phase()
        if not trainer.sanity_checking:
            values = {
                name: float(value)
                for name, value in trainer.callback_metrics.items()
                if _is_scalar(value) and not name.startswith(METRIC_PREFIX)
            }
            self.run.record_metrics(values, epoch=trainer.current_epoch, step=trainer.global_step)

    def _count_batch(
        self, pl_module: pl.LightningModule, batch: Any, outputs: Any, stage: str
    ) -> None:
        """One evaluation batch: its samples and (when counted) tokens, as a step boundary."""
        samples = _batch_size(batch)
        tokens = 0
        if self._count_tokens is not None or self.tokens_per_sample is not None:
            tokens = self._tokens(pl_module, batch, outputs, stage, samples)
        self.run.step(samples, tokens)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, "test")

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self._count_batch(pl_module, batch, outputs, "test")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, "predict")

    def on_predict_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if self._to_count and "predict" in self._to_count:
            self._start_flop_counter("predict")

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        samples = _batch_size(batch)
        tokens = 0
        if self._count_tokens is not None or self.tokens_per_sample is not None:
            tokens = self._tokens(pl_module, batch, outputs, "predict", samples)
        if self._flop_counter is not None:
            self._finish_flop_counter("predict", samples, tokens)
        self.run.step(samples, tokens)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer)

    # -- metrics -------------------------------------------------------------------------
    def _publish(self, trainer: pl.Trainer, metrics: dict[str, float], log: bool = True) -> None:
        if not metrics:
            return
        if log and trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if self.progress_bar:
            # written into the progress bar's metrics directly: `pl_module.log` would add
            # entries that Lightning then processes on every later step
            trainer.progress_bar_metrics.update(
                {k: metrics[k] for k in PROGRESS_BAR_KEYS if k in metrics}
            )

    @property
    def summary(self) -> dict[str, Any] | None:
        """The last summary written (also on ranks other than zero), or None."""
        return self.run.summary

    def total_energy_j(self, phase: str = "train") -> float:
        """Energy of this process in a phase so far, plus any checkpointed total, joules."""
        return self.run.total_energy_j(phase)

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Job-wide totals so far, the running fit included, so a resume keeps counting.

        Lightning builds the checkpoint on every rank; under DDP this gathers the ranks'
        records once per checkpoint.
        """
        trainer = self._trainer
        if self.run.current_stage == "fit" and trainer is not None:
            self.run.set_optimizer_steps(trainer.global_step - self._global_step0)
        return self.run.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run.load_state_dict(state_dict)
