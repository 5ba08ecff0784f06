"""Choosing a SHAP explainer for a PyTorch model, and saying why.

DeepLIFT (SHAP's ``DeepExplainer`` rules, :mod:`~lightning_sustain.explain.deeplift`) is
exactly additive and deterministic, but only for models built from the ``nn.Module`` types
it has a rule for. Anything else would be treated as identity and additivity would break;
in-place operations break its rules; and functional nonlinearities (``F.relu``, ``x * x``)
executed in a ``forward`` are invisible to it. The probe here runs one small forward pass
and reports each of those cases by name.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_sustain.explain.deeplift import RULES
from lightning_sustain.explain.model import OutputAdapter

__all__ = [
    "DeepSupport",
    "ExplainerChoice",
    "ExplainerName",
    "check_deep_support",
    "check_gradients",
    "deep_op_handler",
    "find_embedding_layer",
    "select_explainer",
]

logger = logging.getLogger(__name__)

ExplainerName = Literal["auto", "gradient", "deep", "permutation", "embedding_gradient"]
EXPLAINER_NAMES: tuple[str, ...] = (
    "auto",
    "gradient",
    "deep",
    "permutation",
    "embedding_gradient",
)

# Ops that act linearly on the input-dependent tensor (or only reshape / index it), so
# DeepLIFT's chain rule through them is exact. `mul`/`matmul`-like ops are linear only
# while at most one operand depends on the input; that is checked separately.
_LINEAR_OPS = frozenset(
    {
        "add", "radd", "sub", "rsub", "neg", "cat", "concat", "concatenate", "stack",
        "hstack", "vstack", "reshape", "view", "view_as", "flatten", "unflatten", "permute",
        "transpose", "t", "squeeze", "unsqueeze", "getitem", "narrow", "select",
        "index_select", "split", "split_with_sizes", "tensor_split", "chunk", "unbind",
        "expand", "expand_as", "repeat", "contiguous", "clone", "to", "float", "double",
        "type", "type_as", "mean", "sum", "movedim", "moveaxis", "swapaxes", "roll", "flip",
        "pad", "dropout", "identity", "size", "dim", "numel", "get", "len", "mT",
    }
)  # fmt: skip
_BILINEAR_OPS = frozenset(
    {"mul", "rmul", "div", "truediv", "matmul", "rmatmul", "mm", "bmm", "linear",
     "einsum", "conv1d", "conv2d", "conv3d"}
)  # fmt: skip


def deep_op_handler() -> dict[str, str]:
    """Return the DeepLIFT table ``{nn.Module class name: rule name}``."""
    return dict(RULES)


@dataclass(frozen=True)
class DeepSupport:
    """Whether SHAP's DeepExplainer can explain a model exactly, and if not, why not.

    Attributes:
        supported: ``True`` when every executed leaf module has a DeepLIFT rule, none
            runs in place, and no nonlinear functional op runs outside them.
        reasons: one sentence per problem found, naming the module path or op.
    """

    supported: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExplainerChoice:
    """The explainer that will run and the reasons for choosing it.

    Attributes:
        name: ``"gradient"``, ``"deep"``, ``"permutation"`` or ``"embedding_gradient"``.
        requested: what the user asked for (``"auto"`` or a forced name).
        reasons: why this explainer (and not another) was chosen, in words.
        deep_unsupported: DeepExplainer's blockers found by :func:`check_deep_support`.
    """

    name: str
    requested: str
    reasons: tuple[str, ...] = ()
    deep_unsupported: tuple[str, ...] = field(default_factory=tuple)
    embedding_layer: str | None = None


def _leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    # the same modules shap's PyTorchDeep.add_handles hooks: those without children
    for name, module in model.named_modules():
        if not any(True for _ in module.children()):
            yield name or "<root>", module


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name.strip("_") if name.startswith("__") else name


def _depends(args: Any) -> int:
    """Count input-dependent tensors among (nested) arguments."""
    if isinstance(args, torch.Tensor):
        return int(args.requires_grad)
    if isinstance(args, (list, tuple)):
        return sum(_depends(a) for a in args)
    if isinstance(args, dict):
        return sum(_depends(a) for a in args.values())
    return 0


class _TopLevelOps(TorchFunctionMode):
    """Record torch functions called on input-dependent tensors outside leaf modules."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.problems: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if self.depth == 0:
            name = _op_name(func)
            n_dep = _depends(args) + _depends(kwargs)
            if n_dep and name not in ("get", "size", "dim", "numel"):
                if name.endswith("_") or kwargs.get("inplace") is True:
                    self.problems[
                        f"in-place op `{name}` on an input-dependent tensor in a forward "
                        "(breaks DeepExplainer's backward hooks)"
                    ] += 1
                elif name in _BILINEAR_OPS:
                    if n_dep > 1:
                        self.problems[
                            f"`{name}` of two input-dependent tensors in a forward (a "
                            "product is nonlinear; DeepExplainer has no rule for it)"
                        ] += 1
                elif name not in _LINEAR_OPS:
                    self.problems[
                        f"functional op `{name}` called in a forward outside any nn.Module "
                        "(DeepExplainer only sees nn.Module leaves, so it would treat it as "
                        "identity)"
                    ] += 1
        return func(*args, **kwargs)


def check_deep_support(
    model: nn.Module, example: torch.Tensor | Sequence[torch.Tensor]
) -> DeepSupport:
    """Probe whether SHAP's DeepExplainer supports every part of ``model``.

    Runs one forward pass on ``example`` (two rows are enough) with hooks that count leaf
    module calls and a :class:`~torch.overrides.TorchFunctionMode` that records torch
    functions executed outside leaf modules. The model's ``requires_grad`` flags are
    restored afterwards and its parameters are not changed.

    Args:
        model: the model as it will be explained (eval mode).
        example: a small input batch (a sequence of tensors for several inputs).

    Returns:
        A :class:`DeepSupport` listing every blocker found.
    """
    handlers = deep_op_handler()
    reasons: list[str] = []
    calls: Counter[str] = Counter()
    recorder = _TopLevelOps()
    hooks = []
    # name modules relative to the user's model, not to the (N, K) output adapter
    named_root = model.model if isinstance(model, OutputAdapter) else model
    leaves = dict(_leaves(named_root))

    def pre_hook(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            calls[name] += 1
            recorder.depth += 1

        return hook

    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        recorder.depth -= 1

    for name, module in leaves.items():
        hooks.append(module.register_forward_pre_hook(pre_hook(name)))
        hooks.append(module.register_forward_hook(post_hook))
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        probes = [t.detach().clone() for t in _as_list(example)]
        for probe in probes:
            if probe.is_floating_point():
                probe.requires_grad_(True)
        with torch.enable_grad(), recorder:
            model(*probes)
    except Exception as err:
        reasons.append(f"the probe forward pass failed: {type(err).__name__}: {err}")
    finally:
        for handle in hooks:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)

    for name, module in leaves.items():
        if calls[name] == 0:
            continue  # not part of the forward (a loss module, an unused head)
        cls = type(module).__name__
        if cls not in handlers:
            reasons.append(
                f"`{name}` is nn.{cls}, which DeepExplainer does not support (no DeepLIFT "
                "rule; passing gradients through unchanged would break additivity)"
            )
            continue
        if getattr(module, "inplace", False):
            reasons.append(
                f"`{name}` ({cls}) runs in place (inplace=True), which breaks DeepExplainer's "
                "rules (the module's input is overwritten)"
            )
    for problem, count in recorder.problems.items():
        reasons.append(problem + (f" [x{count}]" if count > 1 else ""))
    return DeepSupport(supported=not reasons, reasons=tuple(reasons))


def _as_list(example: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [example] if isinstance(example, torch.Tensor) else list(example)


def check_gradients(
    model: nn.Module, example: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[bool, str]:
    """Check that the model's outputs have usable gradients with respect to its inputs.

    Args:
        model: the model as it will be explained (eval mode, returning ``(N, K)``).
        example: a few input rows (more rows make a false "all zero" less likely); a
            sequence of tensors for several inputs.

    Returns:
        ``(available, reason)``; ``reason`` says why not when ``available`` is False.
    """
    tensors = _as_list(example)
    bad = [str(t.dtype) for t in tensors if not t.is_floating_point()]
    if bad:
        return False, f"the input dtype is {', '.join(bad)}, not floating point"
    probes = [t.detach().clone().requires_grad_(True) for t in tensors]
    try:
        with torch.enable_grad():
            out = model(*probes)
            if not out.requires_grad:
                return False, "the output does not depend on the input through autograd"
            grads = torch.autograd.grad(out.sum(), probes, allow_unused=True)
    except Exception as err:
        return False, f"backpropagating to the input failed: {type(err).__name__}: {err}"
    if all(g is None for g in grads):
        return False, "the output does not depend on the input through autograd"
    used = [g for g in grads if g is not None]
    if not all(bool(torch.isfinite(g).all()) for g in used):
        return False, "the input gradient has NaN/inf values"
    if not any(bool(g.abs().sum() > 0) for g in used):
        return False, (
            "the input gradient is zero everywhere on the probe batch (piecewise-constant "
            "ops such as round, argmax or comparisons)"
        )
    return True, ""


def find_embedding_layer(
    model: nn.Module, example: Sequence[torch.Tensor], name: str | None = None
) -> tuple[str, nn.Module] | None:
    """Find the embedding layer whose outputs token attributions are computed at.

    Args:
        model: the model as it will be explained.
        example: a small input batch (one tensor per model input).
        name: dotted path of the layer relative to the explained model (e.g.
            ``"model.embedding"``); ``None``: the ``nn.Embedding``/``nn.EmbeddingBag``
            modules called in one forward pass, the first one called.

    Returns:
        ``(path, module)``, or ``None`` when no embedding layer runs.

    Raises:
        ValueError: when ``name`` does not name a module of the model.
    """
    root = model.model if isinstance(model, OutputAdapter) else model
    if name is not None:
        try:
            return name, root.get_submodule(name)
        except AttributeError as err:
            raise ValueError(
                f"embedding_layer={name!r} is not a submodule of {type(root).__name__} "
                f"({err}); give the dotted path of the layer whose output is the token "
                "embedding, e.g. 'model.embedding'."
            ) from err
    order: list[tuple[str, nn.Module]] = []
    hooks = []
    for path, module in root.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):

            def hook(mod: nn.Module, args: Any, out: Any, path: str = path) -> None:
                if all(p != path for p, _ in order):
                    order.append((path, mod))

            hooks.append(module.register_forward_hook(hook))
    if not hooks:
        return None
    try:
        with torch.no_grad():
            model(*[t.detach() for t in example])
    finally:
        for handle in hooks:
            handle.remove()
    return order[0] if order else None


def select_explainer(
    model: nn.Module,
    background: torch.Tensor | Sequence[torch.Tensor],
    requested: str = "auto",
    *,
    permutation_max_features: int = 10,
    embedding_layer: str | None = None,
) -> ExplainerChoice:
    """Pick the explainer for ``model`` and record why.

    ``auto`` prefers the methods whose values add up exactly to ``f(x) - E[f(x)]``:

    1. integer inputs (token ids) and an embedding layer -> ``embedding_gradient``
       (expected gradients at the embedding output, summed over the embedding dimension);
       integer inputs without one, or no usable input gradients -> ``permutation``;
    2. every module has a DeepLIFT rule -> ``deep`` (exactly additive, deterministic, and
       exact SHAP values for linear models);
    3. one tabular input ``(N, F)`` with ``F <= permutation_max_features`` -> permutation
       (antithetic permutation sampling: exactly additive, exact up to second-order
       interactions);
    4. otherwise -> ``gradient``: expected gradients integrated by quadrature along the path
       to *every* background row (exact for linear models; the additivity error is measured
       and the quadrature refined until it is below the target, see ``explain_model``).

    Forced ``deep`` falls back to ``gradient`` with a warning listing the blockers;
    ``deep``/``gradient`` without input gradients fall back to ``embedding_gradient`` or
    ``permutation``, also with a warning. ``permutation`` is always honoured.

    Args:
        model: the model in eval mode, returning ``(N, K)``.
        background: background input rows (a few are used for probing); a sequence of
            tensors for several inputs.
        requested: one of ``EXPLAINER_NAMES``.
        permutation_max_features: the "small tabular" threshold of rule 3.
        embedding_layer: dotted path of the embedding layer for token inputs.

    Returns:
        The :class:`ExplainerChoice`.

    Raises:
        ValueError: for an unknown explainer name.
    """
    if requested not in EXPLAINER_NAMES:
        raise ValueError(
            f"Unknown explainer {requested!r}; choose one of {', '.join(EXPLAINER_NAMES)}."
        )
    tensors = _as_list(background)
    probe = [t[: min(8, len(t))] for t in tensors]
    if requested == "permutation":
        return ExplainerChoice("permutation", requested, ("forced by the user",))

    if any(not t.is_floating_point() for t in tensors) or requested == "embedding_gradient":
        found = find_embedding_layer(model, probe, embedding_layer)
        if found is not None:
            reason = (
                f"token inputs: expected gradients at the output of the embedding layer "
                f"`{found[0]}`, summed over the embedding dimension"
            )
            if requested not in ("auto", "embedding_gradient"):
                logger.warning("explainer=%r cannot run on token ids: %s", requested, reason)
            return ExplainerChoice("embedding_gradient", requested, (reason,), (), found[0])
        reason = "integer inputs and no embedding layer ran; using permutation"
        if requested != "auto":
            logger.warning("explainer=%r cannot run: %s", requested, reason)
        return ExplainerChoice("permutation", requested, (reason,))

    grads_ok, why_no_grads = check_gradients(model, probe)
    if not grads_ok:
        reason = f"input gradients are unavailable ({why_no_grads}); using permutation"
        if requested != "auto":
            logger.warning("explainer=%r cannot run: %s", requested, reason)
        return ExplainerChoice("permutation", requested, (reason,))

    support = check_deep_support(model, [t[: min(2, len(t))] for t in tensors])
    if requested == "gradient":
        return ExplainerChoice("gradient", requested, ("forced by the user",), support.reasons)
    if support.supported:
        why = "every module of the model has a DeepLIFT rule"
        return ExplainerChoice(
            "deep",
            requested,
            (
                ("requested, and " if requested == "deep" else "")
                + why
                + ": DeepExplainer's values add up exactly and are exact for linear models",
            ),
        )
    if requested == "deep":
        reason = "DeepExplainer cannot be used: " + "; ".join(support.reasons)
        logger.warning("explainer='deep' falls back to 'gradient'. %s", reason)
        return ExplainerChoice(
            "gradient",
            requested,
            (reason, "using expected gradients (GradientExplainer's estimand) instead"),
            support.reasons,
        )
    n_features = int(tensors[0][0].numel())
    if len(tensors) == 1 and tensors[0].dim() == 2 and n_features <= permutation_max_features:
        return ExplainerChoice(
            "permutation",
            requested,
            (
                f"tabular input with {n_features} <= {permutation_max_features} features and "
                "DeepExplainer not exact here: permutation sampling is exactly additive and "
                "exact for up to second-order interactions",
            ),
            support.reasons,
        )
    return ExplainerChoice(
        "gradient",
        requested,
        (
            "expected gradients (GradientExplainer's estimand) by quadrature over every "
            "background row: DeepExplainer would not be exact here: " + "; ".join(support.reasons),
        ),
        support.reasons,
    )
