"""``ShapSummary``: SHAP explanations of the trained model, written at the end of fit.

The callback is glue only: it draws samples from the Trainer's dataloaders and hands them
to :mod:`lightning_sustain.explain`, which does the explaining and the writing.

Hook choice: ``on_train_end``. It runs once, after the last training epoch and its
validation, while the model is still on its training device, the process group is still
up (so other ranks can wait at a barrier), the dataloaders are still attached and the
loggers are still open. ``on_fit_end`` runs after the strategy's teardown, which has moved
the model to the CPU and closed the data fetchers, and Lightning finalises the loggers right
after it.

Energy: the callback records the wall-clock window of its work (``time.monotonic()``, the
clock the energy accountant marks with) in :attr:`ShapSummary.window` and in
``summary.json`` (``context.window``), and lists it through
:meth:`ShapSummary.energy_phase_windows` as ``("shap", start_s, end_s)``. An energy front
end that finds callbacks with that method attributes the window's energy to its own
``shap`` line instead of "other".
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_sustain.data.masking import masked_feature_labels
from lightning_sustain.explain import (
    SUMMARY_SCHEMA,
    ArtefactIndex,
    draw_samples,
    explain_model,
    first_loader,
    load_summary,
    preserved_rng_state,
    write_artefacts,
)
from lightning_sustain.explain.selection import EXPLAINER_NAMES

__all__ = ["ShapSummary"]

logger = logging.getLogger(__name__)

# strategies whose LightningModule holds only a shard of the parameters on each rank
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


class ShapSummary(Callback):
    """Explain the trained model with SHAP once, at the end of ``trainer.fit``.

    Runs on global rank zero on a deep copy of the model without the user's hooks, with
    gradients enabled (other ranks wait at a barrier), restores the global random state
    afterwards, and writes to
    ``<trainer.log_dir>/<dirname>/`` (``default_root_dir`` without a logger): beeswarm and
    bar plots per output (image inputs: attribution overlays instead of beeswarms),
    ``shap_values.npz``, ``summary.json`` and ``summary.md``. Plots also go to TensorBoard
    when a ``TensorBoardLogger`` is in use. Token models get per-token attributions at
    the embedding layer, ``tokens_<output>.png`` and ``tokens.md``. A failure is reported as
    a warning; it never fails the fit. Nothing runs under ``fast_dev_run``; shap and the
    plotting code are imported only when an explanation runs.

    Args:
        explainer: ``"auto"`` prefers exactly additive methods: DeepExplainer's rules when
            every module of the model has one, permutation for tabular inputs with at most
            ``permutation_max_features`` features or without input gradients, expected
            gradients at the embedding layer for token ids, and otherwise expected
            gradients by quadrature over every background row (refined until the
            additivity error is below ``additivity_target`` x std(f)).
            ``"deep"``, ``"gradient"``, ``"embedding_gradient"`` and ``"permutation"``
            force those (with a recorded fallback when impossible).
        num_background: background rows drawn from the training data.
        num_samples: rows explained, drawn from the validation data (training data, disjoint
            from the background, when there is no validation loader).
        nsamples: quadrature points per (row, background row) path for the gradient
            explainers; ``None`` (default): adaptive, 8 to 256 points.
        npermutations: permutations per explained row for the permutation explainer.
        permutation_max_features: see ``explainer``.
        top_k_outputs: explain at most this many outputs of a multi-output model (the
            classes predicted most often). ``None``: all.
        outputs: explicit output indices to explain (overrides ``top_k_outputs``).
        feature_names: one name per input feature; default: the DataModule's
            ``feature_names`` attribute, else ``feature_0``...
        output_names: one name per model output; default: the DataModule's
            ``output_names`` or ``class_names`` attribute, else ``output_0``...
        input_key: which element of a batch is the model input (index or dict key);
            default: the batch itself, element 0, or ``x``/``input``/``features``/... .
        input_keys: several batch entries for a model whose forward takes several tensors:
            indices of a tuple batch (passed positionally, in this order) or keys of a dict
            batch (passed as keyword arguments named by the keys). One attribution array
            per input.
        embedding_layer: dotted path (relative to the explained module) of the embedding
            layer for token inputs; default: the first ``nn.Embedding`` that runs.
        token_names: vocabulary (id -> text) for token renderings; default: the
            DataModule's ``token_names``/``vocab`` attribute, else ``tok<id>``.
        sequence_reduction: for sequence outputs ``(N, T, K)`` / ``(N * T, K)``: explain
            the ``"last"`` position (next-token prediction) or the ``"mean"``.
        additivity_target: additivity error aimed for, relative to std(f); a larger one is
            warned about and recorded.
        submodule: dotted attribute path of the module to explain (e.g. ``"model"``)
            instead of the LightningModule's own ``forward``.
        time_budget_s: counted from the start of the hook (drawing rows included): no new
            chunk of rows is started once the next one would end past it; ``None`` for no
            limit. The time taken is logged and recorded.
        batch_size: rows per forward/backward pass of the explainer (bounds memory);
            ``None``: about 2**18 input elements per pass, 64 to 16384 rows.
        seed: seed for drawing rows and for the explainer's random draws.
        dirname: sub-directory of the log directory for the artefacts.
        write_feature_values: write raw feature values even when the DataModule marks its
            data sensitive (``sensitive_data = True``, e.g. encrypted shards).
        write_values: write the per-row ``shap_values.npz``.
        log_to_tensorboard: log figures and the Markdown summary to a TensorBoardLogger.
        max_display: features shown per beeswarm/bar plot.
        top_n: features per output listed in the JSON and Markdown summaries.
    """

    def __init__(
        self,
        explainer: Literal[
            "auto", "gradient", "deep", "permutation", "embedding_gradient"
        ] = "auto",
        num_background: int = 100,
        num_samples: int = 200,
        nsamples: int | None = None,
        npermutations: int = 10,
        permutation_max_features: int = 10,
        top_k_outputs: int | None = 3,
        outputs: list[int] | None = None,
        feature_names: list[str] | None = None,
        output_names: list[str] | None = None,
        input_key: int | str | None = None,
        input_keys: list[int | str] | None = None,
        embedding_layer: str | None = None,
        token_names: list[str] | None = None,
        sequence_reduction: Literal["last", "mean"] = "last",
        additivity_target: float = 0.01,
        submodule: str | None = None,
        time_budget_s: float | None = 300.0,
        batch_size: int | None = None,
        seed: int = 0,
        dirname: str = "shap",
        write_feature_values: bool = False,
        write_values: bool = True,
        log_to_tensorboard: bool = True,
        max_display: int = 20,
        top_n: int = 10,
    ) -> None:
        super().__init__()
        if explainer not in EXPLAINER_NAMES:
            raise ValueError(
                f"ShapSummary(explainer={explainer!r}) is not one of "
                f"{', '.join(map(repr, EXPLAINER_NAMES))}."
            )
        if nsamples is not None and not (isinstance(nsamples, int) and 1 <= nsamples <= 256):
            raise ValueError(f"ShapSummary(nsamples={nsamples!r}) must be in [1, 256] or None.")
        if input_key is not None and input_keys is not None:
            raise ValueError(
                "ShapSummary: set input_key (one model input) or input_keys (several), not both."
            )
        if input_keys is not None and not input_keys:
            raise ValueError("ShapSummary(input_keys=[]) must name at least one batch entry.")
        if sequence_reduction not in ("last", "mean"):
            raise ValueError(
                f"ShapSummary(sequence_reduction={sequence_reduction!r}) must be 'last' or 'mean'."
            )
        if not additivity_target > 0:
            raise ValueError(f"ShapSummary(additivity_target={additivity_target!r}) must be > 0.")
        for name, value in (
            ("num_background", num_background),
            ("num_samples", num_samples),
            ("npermutations", npermutations),
            ("batch_size", 1 if batch_size is None else batch_size),
            ("max_display", max_display),
            ("top_n", top_n),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ShapSummary({name}={value!r}) must be an integer >= 1.")
        if top_k_outputs is not None and top_k_outputs < 1:
            raise ValueError(f"ShapSummary(top_k_outputs={top_k_outputs!r}) must be >= 1 or None.")
        if time_budget_s is not None and not time_budget_s > 0:
            raise ValueError(f"ShapSummary(time_budget_s={time_budget_s!r}) must be > 0 or None.")
        if not dirname or Path(dirname).is_absolute() or ".." in Path(dirname).parts:
            raise ValueError(
                f"ShapSummary(dirname={dirname!r}) must be a relative sub-directory name."
            )
        self.explainer = explainer
        self.num_background = num_background
        self.num_samples = num_samples
        self.nsamples = nsamples
        self.npermutations = npermutations
        self.permutation_max_features = permutation_max_features
        self.top_k_outputs = top_k_outputs
        self.outputs = list(outputs) if outputs is not None else None
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.output_names = list(output_names) if output_names is not None else None
        self.input_key = input_key
        self.input_keys = list(input_keys) if input_keys is not None else None
        self.embedding_layer = embedding_layer
        self.token_names = list(token_names) if token_names is not None else None
        self.sequence_reduction = sequence_reduction
        self.additivity_target = additivity_target
        self.submodule = submodule
        self.time_budget_s = time_budget_s
        self.batch_size = batch_size
        self.seed = seed
        self.dirname = dirname
        self.write_feature_values = write_feature_values
        self.write_values = write_values
        self.log_to_tensorboard = log_to_tensorboard
        self.max_display = max_display
        self.top_n = top_n
        self.artefacts: ArtefactIndex | None = None
        self.last_dir: str | None = None
        self.window: dict[str, float] | None = None

    def energy_phase_windows(self) -> list[tuple[str, float, float]]:
        """The windows of this callback's work, for energy attribution.

        Returns:
            ``[("shap", start_s, end_s)]`` in ``time.monotonic()`` seconds for the last
            explanation on this process (empty before one ran, and on ranks that only
            waited).
        """
        if self.window is None:
            return []
        return [("shap", self.window["start_monotonic_s"], self.window["end_monotonic_s"])]

    @property
    def state_key(self) -> str:
        """Identifier for this instance's state (several instances may coexist)."""
        return self._generate_state_key(
            dirname=self.dirname, explainer=self.explainer, submodule=self.submodule
        )

    def state_dict(self) -> dict[str, Any]:
        """Where the last summary was written (``None`` before the first one)."""
        return {"last_dir": self.last_dir}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.last_dir = state_dict.get("last_dir")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Explain the trained model on rank zero; other ranks wait at a barrier."""
        if trainer.fast_dev_run:
            return  # a smoke test: nothing is written (Lightning's convention)
        # trainer.log_dir broadcasts from rank zero: every rank must call it
        base = trainer.log_dir or trainer.default_root_dir
        out_dir = Path(base) / self.dirname
        strategy_name = type(trainer.strategy).__name__
        if strategy_name in _SHARDED_STRATEGIES:
            rank_zero_warn(
                f"ShapSummary skipped: {strategy_name} shards the model across ranks, and "
                "explaining needs the whole model on one process."
            )
            return
        if trainer.is_global_zero:
            started = time.monotonic()
            started_unix = time.time()
            try:
                with contextlib.ExitStack() as phases:
                    # energy monitors measure the explanation as its own phase ("explain")
                    for callback in trainer.callbacks:
                        energy_phase = getattr(callback, "energy_phase", None)
                        if callable(energy_phase):
                            phases.enter_context(energy_phase("explain"))
                    with preserved_rng_state(), torch.inference_mode(False), torch.enable_grad():
                        self.artefacts = self._explain(trainer, pl_module, out_dir, started)
                self.last_dir = str(out_dir)
                logger.info("ShapSummary wrote %s in %.2f s.", out_dir, time.monotonic() - started)
            except Exception as err:
                rank_zero_warn(
                    f"ShapSummary could not explain the model ({type(err).__name__}: {err}). "
                    "Training results are unaffected; see the message for what to change."
                )
                _write_failure(out_dir, err)
            self.window = {
                "start_monotonic_s": started,
                "end_monotonic_s": time.monotonic(),
                "start_unix_s": started_unix,
                "end_unix_s": time.time(),
            }
            _record_window(out_dir, self.window)
        trainer.strategy.barrier("ShapSummary.on_train_end")

    def _target(self, pl_module: LightningModule) -> nn.Module:
        if not self.submodule:
            return pl_module
        target: Any = pl_module
        for part in self.submodule.split("."):
            if not hasattr(target, part):
                raise AttributeError(
                    f"ShapSummary(submodule={self.submodule!r}): {type(target).__name__} has "
                    f"no attribute {part!r}."
                )
            target = getattr(target, part)
        if not isinstance(target, nn.Module):
            raise TypeError(
                f"ShapSummary(submodule={self.submodule!r}) is a {type(target).__name__}, "
                "not an nn.Module."
            )
        return target

    def _explain(
        self, trainer: Trainer, pl_module: LightningModule, out_dir: Path, started: float
    ) -> Any:
        datamodule = trainer.datamodule
        sensitive = bool(getattr(datamodule, "sensitive_data", False))
        feature_names = self.feature_names or _names(datamodule, ("feature_names",))
        if feature_names is not None and self.feature_names is None:
            # name fields masked at encryption time as such (e.g. "age [generalised]")
            feature_names = masked_feature_labels(feature_names, getattr(datamodule, "masking",
                                                                         None))
        output_names = self.output_names or _names(datamodule, ("output_names", "class_names"))

        train = first_loader(trainer.train_dataloader)
        val = first_loader(trainer.val_dataloaders)
        if train is None:
            raise RuntimeError("the Trainer has no training dataloader to draw background from")
        keys = {"input_key": self.input_key, "input_keys": self.input_keys}
        background, bg_idx = draw_samples(train, self.num_background, seed=self.seed, **keys)
        if val is not None:
            source = "validation"
            inputs, _ = draw_samples(val, self.num_samples, seed=self.seed + 1, **keys)
        else:
            source = "train (no validation dataloader)"
            inputs, _ = draw_samples(
                train, self.num_samples, seed=self.seed + 1, exclude=bg_idx, **keys
            )
        if feature_names is not None and self.feature_names is None:
            n_el = sum(
                int(t[0].numel())
                for t in (
                    [inputs]
                    if isinstance(inputs, torch.Tensor)
                    else list(inputs.values() if isinstance(inputs, dict) else inputs)
                )
                if t.is_floating_point()
            )
            if len(feature_names) != n_el:
                rank_zero_warn(
                    f"The DataModule's feature_names has {len(feature_names)} names but inputs "
                    f"have {n_el} features per row; using generic names instead."
                )
                feature_names = None
        budget = None
        if self.time_budget_s is not None:
            budget = max(1e-3, self.time_budget_s - (time.monotonic() - started))
        input_names = None
        if isinstance(inputs, tuple) and self.input_keys is not None:
            input_names = [f"input_{k}" for k in self.input_keys]
        result = explain_model(
            self._target(pl_module),
            background,
            inputs,
            explainer=self.explainer,
            outputs=self.outputs,
            top_k_outputs=self.top_k_outputs,
            nsamples=self.nsamples,
            npermutations=self.npermutations,
            permutation_max_features=self.permutation_max_features,
            additivity_target=self.additivity_target,
            batch_size=self.batch_size,
            time_budget_s=budget,
            seed=self.seed,
            feature_names=feature_names,
            output_names=output_names,
            strict_output_names=self.output_names is not None,
            input_names=input_names,
            embedding_layer=self.embedding_layer,
            sequence_reduction=self.sequence_reduction,
            background_indices=bg_idx.tolist() if bg_idx is not None else None,
            detach=(trainer,),
        )
        worst = max(result.additivity_relative_error, default=0.0)
        if worst > self.additivity_target:
            rank_zero_warn(
                f"ShapSummary: SHAP values miss f(x) - E[f(x)] by up to {100 * worst:.2g} % of "
                f"std(f) (target {100 * self.additivity_target:.2g} %); see "
                "summary.json['additivity']. Raise time_budget_s, or explain fewer rows or "
                "against fewer background rows."
            )
        token_names = self.token_names or _names(datamodule, ("token_names", "vocab"))
        tensorboard = next(
            (lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None
        )
        on_figure = None
        if tensorboard is not None and self.log_to_tensorboard:
            writer = tensorboard.experiment

            def on_figure(tag: str, fig: Any) -> None:
                writer.add_figure(tag, fig, global_step=trainer.global_step, close=False)

        index = write_artefacts(
            result,
            out_dir,
            sensitive_data=sensitive,
            write_feature_values=self.write_feature_values,
            write_values=self.write_values,
            top_n=self.top_n,
            max_display=self.max_display,
            token_names=token_names,
            context={
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "model": type(pl_module).__qualname__,
                "submodule": self.submodule,
                "explained_rows_from": source,
                "background_rows_from": "train",
                "time_budget_s": self.time_budget_s,
            },
            on_figure=on_figure,
        )
        if on_figure is not None:
            writer.add_text("shap/summary", index.summary_md.read_text(), trainer.global_step)
            writer.flush()
        return index


def _names(datamodule: Any, attrs: tuple[str, ...]) -> list[str] | None:
    for attr in attrs:
        names = getattr(datamodule, attr, None)
        if names is not None:
            return [str(n) for n in names]
    return None


def _record_window(out_dir: Path, window: dict[str, float]) -> None:
    """Add the hook's wall-clock window and total time to summary.json."""
    path = out_dir / "summary.json"
    try:
        summary = load_summary(path)
        summary.setdefault("context", {})["window"] = window
        summary["total_s"] = window["end_monotonic_s"] - window["start_monotonic_s"]
        path.write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    except (OSError, ValueError) as err:
        logger.warning("Could not record the ShapSummary window in %s: %s", path, err)


def _write_failure(out_dir: Path, err: BaseException) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(
            json.dumps(
                {
                    "schema": SUMMARY_SCHEMA,
                    "status": "failed",
                    "error": f"{type(err).__name__}: {err}",
                    "outputs": [],
                },
                indent=2,
            )
            + "\n"
        )
    except OSError as write_err:
        logger.warning("Could not record the ShapSummary failure in %s: %s", out_dir, write_err)
