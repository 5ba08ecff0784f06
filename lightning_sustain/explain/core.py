"""Explain a PyTorch model with SHAP: selection, batched computation, budget, result.

Four explainers, all estimating SHAP values of ``model(*inputs)[:, k]`` against a
background set (``E[f]`` over the background is the base value):

``deep``
    DeepLIFT with the rules of SHAP's DeepExplainer (:mod:`.deeplift`): each explained row
    is paired with every background row in SHAP's ``[x rows; background rows]`` layout,
    several rows per pass. Exactly additive; exact SHAP values for linear models. Results
    equal ``shap.DeepExplainer(...).shap_values(...)`` (checked by the tests).
``gradient``
    Expected gradients (the estimand of SHAP's GradientExplainer),
    ``phi = E_r[ integral_0^1 grad f(r + t (x - r)) dt * (x - r) ]``, computed without
    sampling: the expectation runs over *every* background row ``r`` and the path integral
    by Gauss-Legendre quadrature. For a linear model this is exactly ``w * (x - E[x])``.
    Each path integral adds up to ``f(x) - f(r)`` up to the quadrature error, which is
    measured per row (the additivity error) and driven below ``additivity_target`` x
    ``std(f)`` by doubling the quadrature points of the rows that miss it.
``embedding_gradient``
    The same path integral at the output of the embedding layer, for token inputs:
    embeddings are interpolated from a background sequence's to the explained sequence's,
    the rest of the model runs unchanged, and attributions are summed over the embedding
    dimension (one value per token). SHAP's ``GradientExplainer((model, layer))`` cannot do
    this: it interpolates the *model input* (token ids) and multiplies the gradients by the
    layer input instead of its difference, so its values do not add up.
``permutation``
    SHAP's PermutationExplainer with an independent masker over the background, called on
    the model through a NumPy wrapper. Model-agnostic; exactly additive; needs no gradients.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_sustain.explain.deeplift import deeplift_rules
from lightning_sustain.explain.model import (
    OutputAdapter,
    detached_copy,
    model_device_dtype,
    suspended_global_hooks,
)
from lightning_sustain.explain.rng import preserved_rng_state
from lightning_sustain.explain.selection import EXPLAINER_NAMES, ExplainerChoice, select_explainer

__all__ = ["Inputs", "ShapResult", "explain_model", "input_kind"]

logger = logging.getLogger(__name__)

#: one tensor, a tuple/list of tensors (positional arguments) or a dict (keyword arguments)
Inputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]

_MAX_POINTS = 256  # quadrature points per path, at most
# automatic batch size: about this many input elements per forward/backward pass
_AUTO_BATCH_ELEMENTS = 2**18
_AUTO_BATCH_ROWS = (64, 16384)


def _auto_batch(elements_per_row: int) -> int:
    lo, hi = _AUTO_BATCH_ROWS
    return int(min(hi, max(lo, _AUTO_BATCH_ELEMENTS // max(1, elements_per_row))))


@dataclass
class ShapResult:
    """SHAP values for a set of explained rows, with everything needed to report them.

    Attributes:
        values_list: SHAP values per attributed input, each ``(N, *shape_i, n_outputs)``;
            for token inputs ``(N, T, n_outputs)`` (summed over the embedding dimension).
        base_values: expected model output over the background, shape ``(n_outputs,)``.
        model_output: model output for the explained rows, shape ``(N, n_outputs)``.
        data_list: the explained inputs per attributed input (token ids for token inputs).
            Kept in memory only; the artefact writer decides whether it may be written.
        input_names: one name per attributed input.
        output_indices: which model outputs (columns of ``model(x)``) were explained.
        output_names: their names.
        feature_names: one name per attributed element (all inputs, flattened), or
            ``None`` for images.
        input_kind: ``"tabular"`` ``(N, F)``, ``"image"`` ``(N, C<=4, H, W)``,
            ``"tokens"`` (token attributions), ``"multi"`` (several inputs) or
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
        seed: seed of the explainer's random draws (permutation only; the others are
            deterministic).
        additivity_max_abs_error: per output, ``max |sum(phi) - (f(x) - base)|``.
        output_std: per output, the standard deviation of ``f`` over background and
            explained rows, the scale additivity errors are judged against.
        additivity_target: the relative additivity error aimed for.
        settings: explainer settings (nsamples, npermutations, batch_size...).
        embedding_layer: the layer token attributions were computed at.
        background_indices: dataset indices of the background rows, when known.
    """

    values_list: list[np.ndarray]
    base_values: np.ndarray
    model_output: np.ndarray
    data_list: list[np.ndarray]
    input_names: list[str]
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
    output_std: list[float] = field(default_factory=list)
    additivity_target: float = 0.01
    settings: dict[str, Any] = field(default_factory=dict)
    embedding_layer: str | None = None
    background_indices: list[int] | None = None

    @property
    def n_explained(self) -> int:
        """Number of rows explained."""
        return int(self.values_list[0].shape[0])

    @property
    def values(self) -> np.ndarray:
        """SHAP values: ``(N, *input_shape, K)`` for one input, else ``(N, D, K)`` flattened."""
        if len(self.values_list) == 1:
            return self.values_list[0]
        n, k = self.n_explained, self.values_list[0].shape[-1]
        return np.concatenate([v.reshape(n, -1, k) for v in self.values_list], axis=1)

    @property
    def data(self) -> np.ndarray:
        """The explained inputs, shaped like :attr:`values` without the output axis."""
        if len(self.data_list) == 1:
            return self.data_list[0]
        n = self.n_explained
        return np.concatenate([d.reshape(n, -1).astype(np.float64) for d in self.data_list], axis=1)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one (flattened, for several inputs) attributed row."""
        return tuple(self.values.shape[1:-1])

    @property
    def additivity_relative_error(self) -> list[float]:
        """Per output, the additivity error divided by ``std(f)``."""
        return [
            err / std if std > 0 else (0.0 if err == 0 else float("inf"))
            for err, std in zip(self.additivity_max_abs_error, self.output_std, strict=True)
        ]

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


def _default_feature_names(shape: Sequence[int], prefix: str = "") -> list[str]:
    if len(shape) == 1 and not prefix:
        return [f"feature_{i}" for i in range(shape[0])]
    if len(shape) == 1:
        return [f"{prefix}[{i}]" for i in range(shape[0])]
    return [f"{prefix or 'x'}[" + ",".join(map(str, idx)) + "]" for idx in np.ndindex(*shape)]


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
    compute: Callable[[int, int], list[np.ndarray]],
) -> tuple[list[np.ndarray], bool]:
    parts: list[list[np.ndarray]] = []
    done = 0
    for start, stop in _chunks(n, chunk, deadline):
        parts.append(compute(start, stop))
        done = stop
    joined = [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0]))]
    return joined, done < n


def _deep_values(
    model: nn.Module,
    bg: list[torch.Tensor],
    x: list[torch.Tensor],
    out_idx: list[int],
    *,
    batch_size: int,
    deadline: float | None,
) -> tuple[list[np.ndarray], bool]:
    n_bg = len(bg[0])

    def compute(start: int, stop: int) -> list[np.ndarray]:
        rows = stop - start
        tiled_x = [xi[start:stop].repeat_interleave(n_bg, dim=0) for xi in x]
        tiled_bg = [b.repeat(rows, *([1] * (b.dim() - 1))) for b in bg]
        # SHAP's layout: first half inputs, second half the paired references
        joint = [
            torch.cat([a, b]).requires_grad_(True) for a, b in zip(tiled_x, tiled_bg, strict=True)
        ]
        half = len(tiled_x[0])
        with deeplift_rules(model):
            out = model(*joint)
        phis: list[list[torch.Tensor]] = [[] for _ in x]
        for j, k in enumerate(out_idx):
            grads = torch.autograd.grad(
                out[:, k].sum(), joint, retain_graph=j + 1 < len(out_idx), allow_unused=True
            )
            for i, grad in enumerate(grads):
                delta = tiled_x[i] - tiled_bg[i]
                contrib = torch.zeros_like(delta) if grad is None else grad[half:] * delta
                shape = tuple(x[i].shape[1:])
                phis[i].append(contrib.double().reshape(rows, n_bg, *shape).mean(dim=1))
        return [torch.stack(p, dim=-1).cpu().numpy() for p in phis]

    chunk = max(1, batch_size // (2 * n_bg))
    return _run_chunked(len(x[0]), chunk, deadline, compute)


def _gauss_legendre(n_points: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = np.polynomial.legendre.leggauss(n_points)
    t = torch.tensor((nodes + 1.0) / 2.0, device=device)
    w = torch.tensor(weights / 2.0, device=device, dtype=torch.float64)
    return t, w


Evaluate = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]


def _path_integral(
    evaluate: Evaluate,
    ends: list[torch.Tensor],
    refs: list[torch.Tensor],
    rows: torch.Tensor,
    out_idx: list[int],
    n_points: int,
    batch_size: int,
) -> list[torch.Tensor]:
    """Expected gradients of the given rows by quadrature over every reference.

    Returns one ``(len(rows), *shape_i, K)`` float64 tensor per attributed input.
    """
    device = ends[0].device
    n_rows, n_ref = len(rows), len(refs[0])
    t_nodes, w_nodes = _gauss_legendre(n_points, device)
    total = n_rows * n_ref * n_points
    flat = torch.arange(total, device=device)
    owner = flat // (n_ref * n_points)
    ref_of = (flat // n_points) % n_ref
    node_of = flat % n_points
    phis = [
        torch.zeros((len(out_idx), n_rows, *e.shape[1:]), dtype=torch.float64, device=device)
        for e in ends
    ]
    for b in range(0, total, batch_size):
        sl = slice(b, min(b + batch_size, total))
        o, r, q = owner[sl], ref_of[sl], node_of[sl]
        global_rows = rows.to(device)[o]
        points, deltas = [], []
        for e, ref in zip(ends, refs, strict=True):
            delta = e[global_rows] - ref[r]
            view = (-1,) + (1,) * (delta.dim() - 1)
            points.append((ref[r] + t_nodes[q].to(delta.dtype).view(view) * delta).requires_grad_())
            deltas.append(delta)
        out = evaluate(points, global_rows)
        weight = w_nodes[q]
        for j, k in enumerate(out_idx):
            grads = torch.autograd.grad(
                out[:, k].sum(), points, retain_graph=j + 1 < len(out_idx), allow_unused=True
            )
            for i, grad in enumerate(grads):
                if grad is None:
                    continue
                view = (-1,) + (1,) * (grad.dim() - 1)
                phis[i][j].index_add_(0, o, (grad * deltas[i]).double() * weight.view(view))
    return [(p / n_ref).movedim(0, -1) for p in phis]


def _adaptive_paths(
    evaluate: Evaluate,
    ends: list[torch.Tensor],
    refs: list[torch.Tensor],
    out_idx: list[int],
    target: torch.Tensor,
    tolerance: torch.Tensor,
    *,
    n_points: int,
    adaptive: bool,
    batch_size: int,
    deadline: float | None,
    reduce_dims: Sequence[tuple[int, ...]] | None = None,
) -> tuple[list[np.ndarray], bool, np.ndarray]:
    """Path integrals for all rows, doubling the points of rows whose sums miss the target.

    Args:
        evaluate: ``(points per input, explained row of each point) -> (B, K_all)``.
        ends: explained rows per attributed input.
        refs: background rows per attributed input.
        out_idx: output columns explained.
        target: ``(N, K)`` ``f(x) - base``.
        tolerance: ``(K,)`` allowed additivity error.
        n_points: quadrature points to start with.
        adaptive: double the points of rows that miss the tolerance (up to 256).
        batch_size: points per forward/backward pass.
        deadline: ``time.perf_counter()`` value after which no new work starts.
        reduce_dims: per input, dimensions of the attribution to sum (embedding dim).

    Returns:
        ``(values per input, budget exhausted, points used per row)``.
    """
    n = len(ends[0])
    n_ref = len(refs[0])
    points_used = np.zeros(n, dtype=np.int64)

    def reduce(phis: list[torch.Tensor]) -> list[torch.Tensor]:
        if reduce_dims is None:
            return phis
        return [p.sum(dim=d) if d else p for p, d in zip(phis, reduce_dims, strict=True)]

    def row_error(phis: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        sums = sum(p.reshape(len(rows), -1, p.shape[-1]).sum(dim=1) for p in phis)
        return ((sums - target[rows]).abs() - tolerance).max(dim=1).values  # > 0: missed

    def compute(start: int, stop: int) -> list[np.ndarray]:
        rows = torch.arange(start, stop)
        m = n_points
        phis = reduce(_path_integral(evaluate, ends, refs, rows, out_idx, m, batch_size))
        points_used[start:stop] = m
        missed = row_error(phis, rows) > 0
        while adaptive and bool(missed.any()) and m * 2 <= _MAX_POINTS:
            if deadline is not None and time.perf_counter() > deadline:
                break
            m *= 2
            redo = rows[missed]
            better = reduce(_path_integral(evaluate, ends, refs, redo, out_idx, m, batch_size))
            local = missed.nonzero().squeeze(1)
            for p, q in zip(phis, better, strict=True):
                p[local] = q
            points_used[redo.numpy()] = m
            missed[local] = row_error(better, redo) > 0
        return [p.cpu().numpy() for p in phis]

    chunk = max(1, batch_size // max(1, n_ref * n_points))
    values, exhausted = _run_chunked(n, chunk, deadline, compute)
    return values, exhausted, points_used[: len(values[0])]


class _EmbeddingSwap:
    """Forward hook that records or replaces an embedding layer's output, call by call."""

    def __init__(self) -> None:
        self.replace: list[torch.Tensor] | None = None
        self.recorded: list[torch.Tensor] = []
        self.calls = 0

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> Any:
        call = self.calls
        self.calls += 1
        if self.replace is None:
            self.recorded.append(output.detach())
            return None
        if call >= len(self.replace):
            raise RuntimeError(
                f"The embedding layer ran {call + 1} times in one forward pass but "
                f"{len(self.replace)} times when its outputs were recorded."
            )
        return self.replace[call]


def _permutation_values(
    model: nn.Module,
    bg: list[torch.Tensor],
    x: list[torch.Tensor],
    out_idx: list[int],
    *,
    npermutations: int,
    batch_size: int,
    seed: int,
    deadline: float | None,
) -> tuple[list[np.ndarray], bool]:
    import shap

    shapes = [tuple(t.shape[1:]) for t in x]
    sizes = [int(np.prod(s)) if s else 1 for s in shapes]
    cuts = np.cumsum([0, *sizes])
    dtypes = [t.dtype for t in x]
    device = x[0].device
    cols = list(out_idx)
    n_features = int(cuts[-1])

    def split(arr: np.ndarray) -> list[torch.Tensor]:
        arr = np.asarray(arr)
        return [
            torch.as_tensor(arr[:, cuts[i] : cuts[i + 1]], device=device)
            .to(dtypes[i])
            .reshape(-1, *shapes[i])
            for i in range(len(shapes))
        ]

    def f(arr: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(*split(arr))[:, cols].double().cpu().numpy()

    def flat(ts: list[torch.Tensor]) -> np.ndarray:
        return np.concatenate([t.reshape(len(t), -1).double().cpu().numpy() for t in ts], axis=1)

    bg_np, x_np = flat(bg), flat(x)
    masker = shap.maskers.Independent(bg_np, max_samples=len(bg_np))
    explainer = shap.explainers.Permutation(f, masker, seed=seed)
    max_evals = npermutations * (2 * n_features + 1)
    # at least one full antithetic permutation per model call
    masks_per_call = max(2 * n_features + 1, batch_size // len(bg_np))

    def compute(start: int, stop: int) -> list[np.ndarray]:
        exp = explainer(
            x_np[start:stop], max_evals=max_evals, batch_size=masks_per_call, silent=True
        )
        values = np.asarray(exp.values, dtype=np.float64)
        if values.ndim == 2:
            values = values[..., None]
        return [
            values[:, cuts[i] : cuts[i + 1]].reshape(stop - start, *shapes[i], len(cols))
            for i in range(len(shapes))
        ]

    return _run_chunked(len(x[0]), 16, deadline, compute)


def _as_model_input(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> Any:
    # clone() outside inference mode turns inference tensors into normal ones
    t = t.detach().to(device).clone()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t


def _structure(
    background: Inputs, inputs: Inputs, input_names: Sequence[str] | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str], bool]:
    """Normalise single, tuple and dict inputs into lists, with names and calling style."""
    if isinstance(inputs, torch.Tensor) != isinstance(background, torch.Tensor) or isinstance(
        inputs, Mapping
    ) != isinstance(background, Mapping):
        raise ValueError(
            "background and inputs must have the same structure (both a tensor, both a "
            f"tuple/list or both a dict), got {type(background).__name__} and "
            f"{type(inputs).__name__}."
        )
    if isinstance(inputs, torch.Tensor):
        assert isinstance(background, torch.Tensor)
        return [background], [inputs], ["input"], False
    if isinstance(inputs, Mapping):
        assert isinstance(background, Mapping)
        if list(background) != list(inputs):
            raise ValueError(
                f"background keys {list(background)} differ from input keys {list(inputs)}."
            )
        names = [str(k) for k in inputs]
        return [background[k] for k in inputs], [inputs[k] for k in inputs], names, True
    bg_list, x_list = list(background), list(inputs)  # type: ignore[arg-type]
    if len(bg_list) != len(x_list) or not x_list:
        raise ValueError(
            f"background has {len(bg_list)} inputs and inputs has {len(x_list)}; pass the "
            "same non-empty tuple of tensors for both."
        )
    names = (
        [str(n) for n in input_names]
        if input_names is not None
        else [f"input_{i}" for i in range(len(x_list))]
    )
    if len(names) != len(x_list):
        raise ValueError(f"Got {len(names)} input names for {len(x_list)} inputs.")
    return bg_list, x_list, names, False


def explain_model(
    model: nn.Module,
    background: Inputs,
    inputs: Inputs,
    *,
    explainer: str = "auto",
    outputs: Sequence[int] | None = None,
    top_k_outputs: int | None = 3,
    nsamples: int | None = None,
    npermutations: int = 10,
    permutation_max_features: int = 10,
    additivity_target: float = 0.01,
    batch_size: int | None = None,
    time_budget_s: float | None = 300.0,
    seed: int = 0,
    feature_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    strict_output_names: bool = True,
    input_names: Sequence[str] | None = None,
    embedding_layer: str | None = None,
    sequence_reduction: str = "last",
    background_indices: Sequence[int] | None = None,
    detach: Iterable[object] = (),
) -> ShapResult:
    """Compute SHAP values of ``model`` for ``inputs`` against ``background``.

    The model is deep-copied without the user's hooks (:func:`.detached_copy`), put in
    eval mode and explained with gradients enabled (also when called under
    ``torch.inference_mode`` or ``torch.no_grad``); process-wide module hooks are
    suspended and the global Python, NumPy, torch (and CUDA) random states are restored
    afterwards. The model passed in is not modified in any way.

    Args:
        model: a module mapping a batch to ``(N,)``, ``(N, K)`` or a sequence output
            ``(N, T, K)`` / ``(N * T, K)`` (reduced by ``sequence_reduction``).
        background: background rows: a tensor, a tuple/list of tensors (passed to the
            model positionally) or a dict of tensors (passed as keyword arguments).
        inputs: rows to explain, with the same structure as ``background``.
        explainer: ``"auto"``, ``"deep"``, ``"gradient"``, ``"embedding_gradient"`` or
            ``"permutation"``; see :func:`~lightning_sustain.explain.select_explainer`.
        outputs: model output indices to explain; default: all, or ``top_k_outputs``.
        top_k_outputs: with more outputs than this, explain the ``top_k_outputs`` classes
            predicted most often among ``inputs``. ``None``: all outputs.
        nsamples: quadrature points per (row, background row) path for ``gradient`` and
            ``embedding_gradient``. ``None``: start at 8 and double (up to 256) for the
            rows whose additivity error exceeds ``additivity_target`` x ``std(f)``; an
            integer fixes the number of points.
        npermutations: permutations per row (``permutation``).
        permutation_max_features: ``auto`` uses permutation for tabular inputs with at most
            this many features when DeepExplainer does not support the model.
        additivity_target: the additivity error aimed for, relative to the standard
            deviation of the model output; a larger error is logged as a warning.
        batch_size: rows per forward/backward pass; bounds memory. ``None``: about 2**18
            input elements per pass (embedding elements for token models), between 64 and
            16384 rows (fewer, larger passes are much faster for small models).
        time_budget_s: stop starting new chunks of rows when the next one would end past
            this budget (at least one chunk always runs). ``None``: no limit.
        seed: seed of the permutation explainer's random draws.
        feature_names: one name per attributed element (all inputs, flattened).
        output_names: one name per model output (all ``K`` of them).
        strict_output_names: raise when ``output_names`` has the wrong length; when False,
            warn and use generic names (for names that come from a DataModule).
        input_names: names of tuple inputs (dict inputs are named by their keys).
        embedding_layer: dotted path (relative to ``model``) of the embedding layer for
            token inputs; default: the first ``nn.Embedding`` that runs.
        sequence_reduction: ``"last"`` or ``"mean"`` position of sequence outputs.
        background_indices: dataset indices of the background rows, recorded in the result.
        detach: objects referenced by the model that must not be copied with it.

    Returns:
        A :class:`ShapResult`.

    Raises:
        ValueError: for inconsistent shapes, names or settings.
        TypeError: when the model's output has an unsupported shape or it cannot be copied.
    """
    if explainer not in EXPLAINER_NAMES:
        raise ValueError(
            f"Unknown explainer {explainer!r}; choose one of {', '.join(EXPLAINER_NAMES)}."
        )
    for name, value in (("npermutations", npermutations), ("batch_size", batch_size or 1)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if nsamples is not None and not 1 <= nsamples <= _MAX_POINTS:
        raise ValueError(f"nsamples must be in [1, {_MAX_POINTS}] or None, got {nsamples}.")
    if not additivity_target > 0:
        raise ValueError(f"additivity_target must be > 0, got {additivity_target}.")
    if top_k_outputs is not None and top_k_outputs < 1:
        raise ValueError(f"top_k_outputs must be >= 1 or None, got {top_k_outputs}.")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ValueError(f"time_budget_s must be > 0 or None, got {time_budget_s}.")
    bg_list, x_list, names, keyword = _structure(background, inputs, input_names)
    n_bg, n_x = len(bg_list[0]), len(x_list[0])
    if n_bg < 1 or n_x < 1:
        raise ValueError(
            f"Need at least one background and one explained row, got {n_bg} and {n_x}."
        )
    for name, b, xi in zip(names, bg_list, x_list, strict=True):
        if len(b) != n_bg or len(xi) != n_x:
            raise ValueError(f"Input {name!r} has a different number of rows than the others.")
        if tuple(b.shape[1:]) != tuple(xi.shape[1:]):
            raise ValueError(
                f"Background rows have shape {tuple(b.shape[1:])} but explained rows "
                f"have shape {tuple(xi.shape[1:])}; both must come from the same data."
            )

    start = time.perf_counter()
    deadline = None if time_budget_s is None else start + time_budget_s
    with (
        preserved_rng_state(),
        suspended_global_hooks(),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        copy = detached_copy(model, detach)
        adapted = OutputAdapter(copy, names, keyword, sequence_reduction)
        device, dtype = model_device_dtype(copy)
        bg = [_as_model_input(t, device, dtype) for t in bg_list]
        x = [_as_model_input(t, device, dtype) for t in x_list]
        with torch.no_grad():
            out_x = adapted(*x)
            out_bg = adapted(*bg)
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
            adapted,
            bg,
            explainer,
            permutation_max_features=permutation_max_features,
            embedding_layer=embedding_layer,
        )
        reasons = list(choice.reasons)
        name = choice.name
        base_t = out_bg.double().mean(dim=0)[out_idx]
        base = base_t.cpu().numpy()
        std_t = torch.cat([out_bg, out_x]).double()[:, out_idx].std(dim=0, unbiased=False)
        std = std_t.cpu().numpy()
        target = out_x.double()[:, out_idx] - base_t
        tolerance = additivity_target * std_t.clamp_min(1e-12)
        points_used: np.ndarray | None = None
        rows_per_pass_given = batch_size
        rows_per_pass = batch_size or _auto_batch(sum(int(t[0].numel()) for t in x))
        attributed_names = names
        data_list = [t.detach().cpu().numpy() for t in x_list]

        def run(which: str) -> tuple[list[np.ndarray], bool]:
            nonlocal points_used, attributed_names, data_list, rows_per_pass
            batch_size = rows_per_pass
            if which == "deep":
                return _deep_values(
                    adapted, bg, x, out_idx, batch_size=batch_size, deadline=deadline
                )
            if which == "gradient":

                def evaluate(points: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
                    return adapted(*points)

                values, exhausted, points_used = _adaptive_paths(
                    evaluate, x, bg, out_idx, target, tolerance,
                    n_points=nsamples or 8, adaptive=nsamples is None,
                    batch_size=batch_size, deadline=deadline,
                )  # fmt: skip
                return values, exhausted
            if which == "embedding_gradient":
                assert choice.embedding_layer is not None
                layer = copy.get_submodule(choice.embedding_layer)
                swap = _EmbeddingSwap()
                handle = layer.register_forward_hook(swap)
                try:
                    with torch.no_grad():
                        adapted(*x)
                        ends, swap.recorded, swap.calls = swap.recorded, [], 0
                        adapted(*bg)
                        refs, swap.recorded = swap.recorded, []
                    if rows_per_pass_given is None:
                        rows_per_pass = _auto_batch(sum(int(e[0].numel()) for e in ends))
                        batch_size = rows_per_pass

                    def evaluate(points: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
                        swap.replace, swap.calls = points, 0
                        return adapted(*[xi[rows] for xi in x])

                    values, exhausted, points_used = _adaptive_paths(
                        evaluate, ends, refs, out_idx, target, tolerance,
                        n_points=nsamples or 8, adaptive=nsamples is None,
                        batch_size=batch_size, deadline=deadline,
                        reduce_dims=[(e.dim() - 1,) for e in ends],
                    )  # fmt: skip
                finally:
                    handle.remove()
                token_inputs = [i for i, t in enumerate(x_list) if not t.is_floating_point()]
                if len(token_inputs) == len(ends):
                    attributed_names = [names[i] for i in token_inputs]
                    data_list = [x_list[i].detach().cpu().numpy() for i in token_inputs]
                else:
                    attributed_names = [f"embedding_call_{c}" for c in range(len(ends))]
                    data_list = [np.full(v.shape[:-1], -1, dtype=np.int64) for v in values]
                return values, exhausted
            return _permutation_values(
                adapted, bg, x, out_idx,
                npermutations=npermutations, batch_size=batch_size, seed=seed,
                deadline=deadline,
            )  # fmt: skip

        values, exhausted = run(name)
        errors = _additivity(values, target)
        if name == "deep" and max(
            e / max(s, 1e-12) for e, s in zip(errors, std, strict=True)
        ) > max(additivity_target, 1e-3):
            msg = (
                f"DeepExplainer's attributions do not sum to the model output (max error "
                f"{max(errors):.3g}): the model uses an operation its rules do not cover"
            )
            logger.warning("%s; switching to expected gradients.", msg)
            reasons.append(msg + "; switched to expected gradients")
            name = "gradient"
            values, exhausted = run(name)
            errors = _additivity(values, target)
        n_done = values[0].shape[0]
        model_output = out_x[:n_done].double().cpu().numpy()[:, out_idx]
        data_list = [d[:n_done] for d in data_list]
    elapsed = time.perf_counter() - start
    if exhausted:
        logger.warning(
            "SHAP time budget of %.1f s reached: explained %d of %d rows.",
            time_budget_s,
            n_done,
            n_x,
        )
    rel = [e / s if s > 0 else 0.0 for e, s in zip(errors, std, strict=True)]
    if max(rel) > additivity_target:
        logger.warning(
            "SHAP (%s): the attributions miss f(x) - E[f(x)] by up to %.2g %% of std(f) "
            "(target %.2g %%)%s.",
            name,
            100 * max(rel),
            100 * additivity_target,
            "; the time budget stopped the refinement" if exhausted else "",
        )
    kind = _result_kind(name, values)
    if feature_names is not None:
        feature_names = [str(f) for f in feature_names]
        n_elements = sum(int(np.prod(v.shape[1:-1])) for v in values)
        if len(feature_names) != n_elements:
            raise ValueError(
                f"Got {len(feature_names)} feature names for inputs with {n_elements} "
                f"elements per row; pass one name per feature."
            )
    elif kind != "image":
        if len(values) == 1 and kind != "tokens":
            feature_names = _default_feature_names(values[0].shape[1:-1])
        else:
            pairs = zip(attributed_names, values, strict=True)
            feature_names = [f for n, v in pairs for f in _default_feature_names(v.shape[1:-1], n)]
    logger.info(
        "SHAP (%s) explained %d rows x %d outputs in %.2f s.", name, n_done, len(out_idx), elapsed
    )
    return ShapResult(
        values_list=[v.astype(np.float32) for v in values],
        base_values=base,
        model_output=model_output,
        data_list=data_list,
        input_names=list(attributed_names),
        output_indices=out_idx,
        output_names=[output_names[k] for k in out_idx],
        feature_names=list(feature_names) if feature_names is not None else None,
        input_kind=kind,
        explainer=name,
        requested_explainer=explainer,
        selection_reasons=reasons,
        deep_unsupported=list(choice.deep_unsupported),
        n_background=n_bg,
        n_requested=n_x,
        elapsed_s=elapsed,
        time_budget_s=time_budget_s,
        budget_exhausted=exhausted,
        seed=seed,
        additivity_max_abs_error=errors,
        output_std=[float(s) for s in std],
        additivity_target=additivity_target,
        settings={
            "nsamples": _points_summary(points_used, nsamples, n_bg),
            "npermutations": npermutations if name == "permutation" else None,
            "batch_size": rows_per_pass,
            "top_k_outputs": top_k_outputs,
            "sequence_reduction": sequence_reduction,
            "input_names": names,
            "keyword_inputs": keyword,
        },
        embedding_layer=choice.embedding_layer if name == "embedding_gradient" else None,
        background_indices=[int(i) for i in background_indices]
        if background_indices is not None
        else None,
    )


def _points_summary(points: np.ndarray | None, fixed: int | None, n_bg: int) -> Any:
    if points is None or len(points) == 0:
        return None
    return {
        "quadrature_points_per_path": {
            "min": int(points.min()),
            "max": int(points.max()),
            "mean": float(points.mean()),
        },
        "adaptive": fixed is None,
        "references_per_row": n_bg,
        "model_evaluations": int(points.sum()) * n_bg,
    }


def _result_kind(name: str, values: list[np.ndarray]) -> str:
    if name == "embedding_gradient":
        return "tokens"
    if len(values) > 1:
        return "multi"
    return input_kind(values[0].shape[1:-1])


def _additivity(values: list[np.ndarray], target: torch.Tensor) -> list[float]:
    n = values[0].shape[0]
    k = values[0].shape[-1]
    if n == 0:
        return [0.0] * k
    sums = sum(v.reshape(n, -1, k).astype(np.float64).sum(axis=1) for v in values)
    return [float(e) for e in np.abs(sums - target[:n].cpu().numpy()).max(axis=0)]
