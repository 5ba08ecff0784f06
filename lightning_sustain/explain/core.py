"""Explain a PyTorch model with SHAP: selection, batched computation, budget, result.

Three explainers, all estimating SHAP values of ``model(x)[:, k]`` against a background
set:

``deep``
    SHAP's DeepExplainer (DeepLIFT rescale rules). The forward/backward hooks and the
    per-module rules are SHAP's own (``shap.explainers._deep.deep_pytorch``); this module
    only batches SHAP's per-sample loop: each explained row is paired with every background
    row in the same ``[x rows; background rows]`` layout SHAP uses, several explained rows
    per pass. Results equal ``shap.DeepExplainer(...).shap_values(...)``.
``gradient``
    Expected gradients, the estimator of SHAP's GradientExplainer:
    ``phi = E[grad f(r + t (x - r)) * (x - r)]`` over background rows ``r`` and
    ``t ~ U(0, 1)``, ``nsamples`` draws per explained row, computed in large batches.
``permutation``
    SHAP's PermutationExplainer with an independent masker over the background, called on
    the model through a NumPy wrapper. Model-agnostic; needs no gradients.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_sustain.explain.model import OutputAdapter, detached_copy, model_device_dtype
from lightning_sustain.explain.rng import preserved_rng_state
from lightning_sustain.explain.selection import EXPLAINER_NAMES, ExplainerChoice, select_explainer

__all__ = ["ShapResult", "explain_model", "input_kind"]

logger = logging.getLogger(__name__)

# DeepExplainer must be exact; shap's own check uses an absolute tolerance of 1e-2.
_DEEP_ADDITIVITY_TOL = 1e-2


@dataclass
class ShapResult:
    """SHAP values for a set of explained rows, with everything needed to report them.

    Attributes:
        values: SHAP values, shape ``(N, *input_shape, n_outputs)``.
        base_values: expected model output over the background, shape ``(n_outputs,)``.
        model_output: model output for the explained rows, shape ``(N, n_outputs)``.
        data: the explained inputs, shape ``(N, *input_shape)``. Kept in memory only; the
            artefact writer decides whether it may be written.
        output_indices: which model outputs (columns of ``model(x)``) were explained.
        output_names: their names.
        feature_names: one name per input element (flattened), or ``None`` for images.
        input_kind: ``"tabular"`` ``(N, F)``, ``"image"`` ``(N, C<=4, H, W)`` or
            ``"tensor"`` (anything else, flattened for summaries).
        explainer: the explainer that produced the values.
        requested_explainer: what was asked for.
        selection_reasons: why this explainer.
        deep_unsupported: DeepExplainer's blockers, when it was considered and rejected.
        n_background: background rows used.
        n_requested: explained rows requested (``N`` is smaller when the budget ran out).
        elapsed_s: wall time of the explanation (selection + SHAP values).
        time_budget_s: the time budget (``None``: unbounded).
        budget_exhausted: the budget stopped the run before all requested rows.
        seed: seed of the explainer's random draws.
        additivity_max_abs_error: per output, ``max |sum(phi) - (f(x) - base)|``.
        settings: explainer settings (nsamples, npermutations, batch_size).
    """

    values: np.ndarray
    base_values: np.ndarray
    model_output: np.ndarray
    data: np.ndarray
    output_indices: list[int]
    output_names: list[str]
    feature_names: list[str] | None
    input_kind: str
    explainer: str
    requested_explainer: str
    selection_reasons: list[str]
    deep_unsupported: list[str]
    n_background: int
    n_requested: int
    elapsed_s: float
    time_budget_s: float | None
    budget_exhausted: bool
    seed: int
    additivity_max_abs_error: list[float]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_explained(self) -> int:
        """Number of rows explained."""
        return int(self.values.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input row."""
        return tuple(self.data.shape[1:])

    def mean_abs(self) -> np.ndarray:
        """Mean absolute SHAP value per flattened input element and output, ``(D, K)``."""
        flat = self.values.reshape(self.values.shape[0], -1, self.values.shape[-1])
        return np.abs(flat).mean(axis=0)


def input_kind(shape: Sequence[int]) -> str:
    """Classify one input row's shape: ``tabular``, ``image`` or ``tensor``."""
    if len(shape) == 1:
        return "tabular"
    if len(shape) == 3 and shape[0] <= 4:
        return "image"
    return "tensor"


def _default_feature_names(shape: Sequence[int]) -> list[str]:
    if len(shape) == 1:
        return [f"feature_{i}" for i in range(shape[0])]
    return ["x[" + ",".join(map(str, idx)) + "]" for idx in np.ndindex(*shape)]


def _choose_outputs(
    out: torch.Tensor, outputs: Sequence[int] | None, top_k: int | None
) -> list[int]:
    n_out = out.shape[1]
    if outputs is not None:
        chosen = [int(i) for i in outputs]
        bad = [i for i in chosen if not 0 <= i < n_out]
        if bad or not chosen:
            raise ValueError(
                f"outputs={list(outputs)} must be non-empty indices in [0, {n_out}) for a "
                f"model with {n_out} outputs."
            )
        return chosen
    if top_k is None or n_out <= top_k:
        return list(range(n_out))
    # the classes predicted most often among the explained rows, then the highest mean
    wins = torch.bincount(out.argmax(dim=1), minlength=n_out).double()
    mean = out.double().mean(dim=0)
    order = sorted(range(n_out), key=lambda k: (-float(wins[k]), -float(mean[k])))
    return order[:top_k]


def _chunks(n: int, chunk: int, deadline: float | None) -> Iterable[tuple[int, int]]:
    """Yield ``(start, stop)`` row ranges; stop early when the next one would miss the deadline.

    The first chunk is small so that the time per row is known before committing to a
    full chunk.
    """
    start, size = 0, max(1, min(chunk, 8))
    while start < n:
        stop = min(n, start + size)
        t0 = time.perf_counter()
        yield start, stop
        per_row = (time.perf_counter() - t0) / (stop - start)
        start, size = stop, max(1, chunk)
        if deadline is not None and start < n:
            if time.perf_counter() + per_row * min(size, n - start) > deadline:
                return


def _run_chunked(
    n: int,
    chunk: int,
    deadline: float | None,
    compute: Callable[[int, int], np.ndarray],
) -> tuple[np.ndarray, bool]:
    parts = []
    done = 0
    for start, stop in _chunks(n, chunk, deadline):
        parts.append(compute(start, stop))
        done = stop
    return np.concatenate(parts, axis=0), done < n


def _gradient_values(
    model: nn.Module,
    bg: torch.Tensor,
    x: torch.Tensor,
    out_idx: list[int],
    *,
    nsamples: int,
    batch_size: int,
    seed: int,
    deadline: float | None,
) -> tuple[np.ndarray, bool]:
    generator = torch.Generator().manual_seed(seed)
    n, shape = len(x), tuple(x.shape[1:])
    ref_idx = torch.randint(len(bg), (n, nsamples), generator=generator).to(x.device)
    alphas = torch.rand((n, nsamples), generator=generator).to(x.device, x.dtype)
    view = (-1,) + (1,) * len(shape)

    def compute(start: int, stop: int) -> np.ndarray:
        rows = stop - start
        phis = torch.zeros((len(out_idx), rows, *shape), dtype=torch.float64, device=x.device)
        owner = torch.arange(rows, device=x.device).repeat_interleave(nsamples)
        refs_all = ref_idx[start:stop].reshape(-1)
        t_all = alphas[start:stop].reshape(-1)
        for b in range(0, rows * nsamples, batch_size):
            sl = slice(b, min(b + batch_size, rows * nsamples))
            xs = x[start:stop][owner[sl]]
            refs = bg[refs_all[sl]]
            delta = xs - refs
            points = (refs + t_all[sl].view(view) * delta).requires_grad_(True)
            out = model(points)
            for j, k in enumerate(out_idx):
                (grad,) = torch.autograd.grad(
                    out[:, k].sum(), points, retain_graph=j + 1 < len(out_idx)
                )
                phis[j].index_add_(0, owner[sl], (grad * delta).double())
        phis /= nsamples
        return phis.movedim(0, -1).cpu().numpy()

    chunk = max(1, batch_size // nsamples)
    return _run_chunked(n, chunk, deadline, compute)


def _deep_values(
    model: nn.Module,
    bg: torch.Tensor,
    x: torch.Tensor,
    out_idx: list[int],
    *,
    batch_size: int,
    deadline: float | None,
) -> tuple[np.ndarray, bool]:
    from lightning_sustain._compat import add_interim_values, deeplift_grad

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    n_bg, shape = len(bg), tuple(x.shape[1:])
    reps = (1,) * len(shape)

    def compute(start: int, stop: int) -> np.ndarray:
        rows = stop - start
        tiled_x = x[start:stop].repeat_interleave(n_bg, dim=0)
        tiled_bg = bg.repeat(rows, *reps)
        # SHAP's layout: first half inputs, second half the paired references
        joint = torch.cat([tiled_x, tiled_bg]).requires_grad_(True)
        half = len(tiled_x)
        handles = []
        for leaf in leaves:
            handles.append(leaf.register_forward_hook(add_interim_values))
            handles.append(leaf.register_full_backward_hook(deeplift_grad))
        try:
            out = model(joint)
            phis = []
            for j, k in enumerate(out_idx):
                (grad,) = torch.autograd.grad(
                    out[:, k].sum(), joint, retain_graph=j + 1 < len(out_idx)
                )
                contrib = grad[half:] * (tiled_x - tiled_bg)
                phis.append(contrib.double().reshape(rows, n_bg, *shape).mean(dim=1))
        finally:
            for handle in handles:
                handle.remove()
            for leaf in leaves:
                # shap's forward hook stores these as parameters on each leaf
                leaf._parameters.pop("x", None)
                leaf._parameters.pop("y", None)
        return torch.stack(phis, dim=-1).cpu().numpy()

    chunk = max(1, batch_size // (2 * n_bg))
    return _run_chunked(len(x), chunk, deadline, compute)


def _permutation_values(
    model: nn.Module,
    bg: torch.Tensor,
    x: torch.Tensor,
    out_idx: list[int],
    *,
    npermutations: int,
    batch_size: int,
    seed: int,
    deadline: float | None,
) -> tuple[np.ndarray, bool]:
    import shap

    shape = tuple(x.shape[1:])
    n_features = int(np.prod(shape))
    device, dtype = x.device, x.dtype
    cols = list(out_idx)

    def f(arr: np.ndarray) -> np.ndarray:
        batch = torch.as_tensor(np.asarray(arr), device=device).to(dtype).reshape(-1, *shape)
        with torch.no_grad():
            return model(batch)[:, cols].double().cpu().numpy()

    bg_np = bg.reshape(len(bg), -1).cpu().numpy()
    x_np = x.reshape(len(x), -1).cpu().numpy()
    masker = shap.maskers.Independent(bg_np, max_samples=len(bg_np))
    explainer = shap.explainers.Permutation(f, masker, seed=seed)
    max_evals = npermutations * (2 * n_features + 1)
    # at least one full antithetic permutation per model call
    masks_per_call = max(2 * n_features + 1, batch_size // len(bg_np))

    def compute(start: int, stop: int) -> np.ndarray:
        exp = explainer(
            x_np[start:stop], max_evals=max_evals, batch_size=masks_per_call, silent=True
        )
        values = np.asarray(exp.values, dtype=np.float64)
        if values.ndim == 2:
            values = values[..., None]
        return values.reshape(stop - start, *shape, len(cols))

    return _run_chunked(len(x), 16, deadline, compute)


def _as_model_input(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> Any:
    # clone() outside inference mode turns inference tensors into normal ones
    t = t.detach().to(device).clone()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t


def explain_model(
    model: nn.Module,
    background: torch.Tensor,
    inputs: torch.Tensor,
    *,
    explainer: str = "auto",
    outputs: Sequence[int] | None = None,
    top_k_outputs: int | None = 3,
    nsamples: int = 200,
    npermutations: int = 10,
    permutation_max_features: int = 10,
    batch_size: int = 1024,
    time_budget_s: float | None = 300.0,
    seed: int = 0,
    feature_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    strict_output_names: bool = True,
    detach: Iterable[object] = (),
) -> ShapResult:
    """Compute SHAP values of ``model`` for ``inputs`` against ``background``.

    The model is deep-copied, put in eval mode and explained with gradients enabled
    (also when called under ``torch.inference_mode`` or ``torch.no_grad``); the global
    Python, NumPy and torch random states are restored afterwards. The model passed in
    is not modified in any way.

    Args:
        model: a module mapping a batch ``(N, ...)`` to ``(N,)`` or ``(N, K)``.
        background: background rows, same per-row shape as ``inputs``.
        inputs: rows to explain.
        explainer: ``"auto"``, ``"gradient"``, ``"deep"`` or ``"permutation"``; see
            :func:`~lightning_sustain.explain.select_explainer`.
        outputs: model output indices to explain; default: all, or ``top_k_outputs``.
        top_k_outputs: with more outputs than this, explain the ``top_k_outputs`` classes
            predicted most often among ``inputs``. ``None``: all outputs.
        nsamples: expected-gradients draws per explained row (``gradient``).
        npermutations: permutations per row (``permutation``).
        permutation_max_features: ``auto`` uses permutation for tabular inputs with at most
            this many features.
        batch_size: rows per forward/backward pass; bounds memory.
        time_budget_s: stop starting new chunks of rows when the next one would end past
            this budget (at least one chunk always runs). ``None``: no limit.
        seed: seed of the explainer's random draws.
        feature_names: one name per feature (tabular) or per flattened input element.
        output_names: one name per model output (all ``K`` of them).
        strict_output_names: raise when ``output_names`` has the wrong length; when False,
            warn and use generic names (for names that come from a DataModule).
        detach: objects referenced by the model that must not be copied with it.

    Returns:
        A :class:`ShapResult`.

    Raises:
        ValueError: for inconsistent shapes, names or settings.
        TypeError: when the model's output is not ``(N,)``/``(N, K)`` or it cannot be copied.
    """
    if explainer not in EXPLAINER_NAMES:
        raise ValueError(
            f"Unknown explainer {explainer!r}; choose one of {', '.join(EXPLAINER_NAMES)}."
        )
    for name, value in (
        ("nsamples", nsamples),
        ("npermutations", npermutations),
        ("batch_size", batch_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if top_k_outputs is not None and top_k_outputs < 1:
        raise ValueError(f"top_k_outputs must be >= 1 or None, got {top_k_outputs}.")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ValueError(f"time_budget_s must be > 0 or None, got {time_budget_s}.")
    if len(background) < 1 or len(inputs) < 1:
        raise ValueError(
            f"Need at least one background and one explained row, got {len(background)} "
            f"and {len(inputs)}."
        )
    if tuple(background.shape[1:]) != tuple(inputs.shape[1:]):
        raise ValueError(
            f"Background rows have shape {tuple(background.shape[1:])} but explained rows "
            f"have shape {tuple(inputs.shape[1:])}; both must come from the same data."
        )
    shape = tuple(int(s) for s in inputs.shape[1:])
    kind = input_kind(shape)
    n_elements = int(np.prod(shape)) if shape else 1
    if feature_names is not None:
        feature_names = [str(f) for f in feature_names]
        if len(feature_names) != n_elements:
            raise ValueError(
                f"Got {len(feature_names)} feature names for inputs with {n_elements} "
                f"elements per row (shape {shape}); pass one name per feature."
            )
    elif kind != "image":
        feature_names = _default_feature_names(shape)

    start = time.perf_counter()
    deadline = None if time_budget_s is None else start + time_budget_s
    with preserved_rng_state(), torch.inference_mode(False), torch.enable_grad():
        copy = detached_copy(model, detach)
        adapted = OutputAdapter(copy)
        device, dtype = model_device_dtype(copy)
        bg = _as_model_input(background, device, dtype)
        x = _as_model_input(inputs, device, dtype)
        with torch.no_grad():
            out_x = adapted(x)
            out_bg = adapted(bg)
        n_out = out_x.shape[1]
        if output_names is not None and len(output_names) != n_out:
            msg = f"Got {len(output_names)} output names for a model with {n_out} outputs."
            if strict_output_names:
                raise ValueError(msg)
            logger.warning("%s Using generic output names.", msg)
            output_names = None
        if output_names is not None:
            output_names = [str(o) for o in output_names]
        else:
            output_names = ["output"] if n_out == 1 else [f"output_{k}" for k in range(n_out)]
        out_idx = _choose_outputs(out_x, outputs, top_k_outputs)
        choice: ExplainerChoice = select_explainer(
            adapted, bg, explainer, permutation_max_features=permutation_max_features
        )
        reasons = list(choice.reasons)
        name = choice.name
        base = out_bg.double().mean(dim=0)[out_idx].cpu().numpy()

        def run(which: str) -> tuple[np.ndarray, bool]:
            if which == "deep":
                return _deep_values(
                    adapted, bg, x, out_idx, batch_size=batch_size, deadline=deadline
                )
            if which == "gradient":
                return _gradient_values(
                    adapted,
                    bg,
                    x,
                    out_idx,
                    nsamples=nsamples,
                    batch_size=batch_size,
                    seed=seed,
                    deadline=deadline,
                )
            return _permutation_values(
                adapted,
                bg,
                x,
                out_idx,
                npermutations=npermutations,
                batch_size=batch_size,
                seed=seed,
                deadline=deadline,
            )

        values, exhausted = run(name)
        errors = _additivity(values, out_x, base, out_idx)
        if name == "deep" and max(errors) > _DEEP_ADDITIVITY_TOL * max(
            1.0, float(np.abs(out_x.double().cpu().numpy()).max())
        ):
            msg = (
                f"DeepExplainer's attributions do not sum to the model output (max error "
                f"{max(errors):.3g}): the model uses an operation its rules do not cover"
            )
            logger.warning("%s; switching to expected gradients.", msg)
            reasons.append(msg + "; switched to expected gradients")
            name = "gradient"
            values, exhausted = run(name)
            errors = _additivity(values, out_x, base, out_idx)
        n_done = values.shape[0]
        model_output = out_x[:n_done].double().cpu().numpy()[:, out_idx]
        data = inputs[:n_done].detach().cpu().numpy()
    elapsed = time.perf_counter() - start
    if exhausted:
        logger.warning(
            "SHAP time budget of %.1f s reached: explained %d of %d rows.",
            time_budget_s,
            n_done,
            len(inputs),
        )
    logger.info(
        "SHAP (%s) explained %d rows x %d outputs in %.2f s.", name, n_done, len(out_idx), elapsed
    )
    return ShapResult(
        values=values.astype(np.float32),
        base_values=base,
        model_output=model_output,
        data=data,
        output_indices=out_idx,
        output_names=[output_names[k] for k in out_idx],
        feature_names=list(feature_names) if feature_names is not None else None,
        input_kind=kind,
        explainer=name,
        requested_explainer=explainer,
        selection_reasons=reasons,
        deep_unsupported=list(choice.deep_unsupported),
        n_background=len(background),
        n_requested=len(inputs),
        elapsed_s=elapsed,
        time_budget_s=time_budget_s,
        budget_exhausted=exhausted,
        seed=seed,
        additivity_max_abs_error=errors,
        settings={
            "nsamples": nsamples,
            "npermutations": npermutations,
            "batch_size": batch_size,
            "top_k_outputs": top_k_outputs,
        },
    )


def _additivity(
    values: np.ndarray, out_x: torch.Tensor, base: np.ndarray, out_idx: list[int]
) -> list[float]:
    n = values.shape[0]
    sums = values.reshape(n, -1, values.shape[-1]).astype(np.float64).sum(axis=1)
    target = out_x[:n].double().cpu().numpy()[:, out_idx] - base
    if n == 0:
        return [0.0] * len(out_idx)
    return [float(v) for v in np.abs(sums - target).max(axis=0)]
