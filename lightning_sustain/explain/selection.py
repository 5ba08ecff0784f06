"""Choosing a SHAP explainer for a PyTorch model, and saying why.

SHAP's ``DeepExplainer`` (DeepLIFT rescale rules) is exact-additive and deterministic, but
only for models built from the ``nn.Module`` types in its ``op_handler`` table. Anything
else is silently treated as identity ("unrecognized nn.Module" warning) and additivity
breaks; a module that is *called twice* overwrites the input/output DeepExplainer stores on
it; in-place operations break its full backward hooks; and functional nonlinearities
(``F.relu``, ``F.silu``, ``x * x``) executed in a ``forward`` are invisible to it. The
probe here runs one small forward pass and reports each of those cases by name.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_sustain.explain.model import OutputAdapter

__all__ = [
    "DeepSupport",
    "ExplainerChoice",
    "ExplainerName",
    "check_deep_support",
    "check_gradients",
    "deep_op_handler",
    "select_explainer",
]

logger = logging.getLogger(__name__)

ExplainerName = Literal["auto", "gradient", "deep", "permutation"]
EXPLAINER_NAMES: tuple[str, ...] = ("auto", "gradient", "deep", "permutation")

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
# shap's handlers that store the module's input and output (module.x / module.y)
_STATEFUL_HANDLERS = frozenset({"nonlinear_1d", "maxpool"})


def deep_op_handler() -> dict[str, Any]:
    """Return SHAP's DeepExplainer table ``{nn.Module class name: handler}`` for PyTorch."""
    from lightning_sustain._compat import op_handler

    return dict(op_handler)


@dataclass(frozen=True)
class DeepSupport:
    """Whether SHAP's DeepExplainer can explain a model exactly, and if not, why not.

    Attributes:
        supported: ``True`` when every executed leaf module is in DeepExplainer's table,
            none is reused or in-place, and no nonlinear functional op runs outside them.
        reasons: one sentence per problem found, naming the module path or op.
    """

    supported: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExplainerChoice:
    """The explainer that will run and the reasons for choosing it.

    Attributes:
        name: ``"gradient"``, ``"deep"`` or ``"permutation"``.
        requested: what the user asked for (``"auto"`` or a forced name).
        reasons: why this explainer (and not another) was chosen, in words.
        deep_unsupported: DeepExplainer's blockers found by :func:`check_deep_support`.
    """

    name: str
    requested: str
    reasons: tuple[str, ...] = ()
    deep_unsupported: tuple[str, ...] = field(default_factory=tuple)


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


def check_deep_support(model: nn.Module, example: torch.Tensor) -> DeepSupport:
    """Probe whether SHAP's DeepExplainer supports every part of ``model``.

    Runs one forward pass on ``example`` (two rows are enough) with hooks that count leaf
    module calls and a :class:`~torch.overrides.TorchFunctionMode` that records torch
    functions executed outside leaf modules. The model's ``requires_grad`` flags are
    restored afterwards and its parameters are not changed.

    Args:
        model: the model as it will be explained (eval mode).
        example: a small input batch.

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
        probe = example.detach().clone()
        if probe.is_floating_point():
            probe.requires_grad_(True)
        with torch.enable_grad(), recorder:
            model(probe)
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
        handler = handlers.get(cls)
        if handler is None:
            reasons.append(
                f"`{name}` is nn.{cls}, which DeepExplainer does not support (not in shap's "
                "op_handler; it would pass gradients through unchanged and break additivity)"
            )
            continue
        if getattr(module, "inplace", False):
            reasons.append(
                f"`{name}` ({cls}) runs in place (inplace=True), which breaks DeepExplainer's "
                "full backward hooks"
            )
        if calls[name] > 1 and handler.__name__ in _STATEFUL_HANDLERS:
            reasons.append(
                f"`{name}` ({cls}) is called {calls[name]} times per forward; DeepExplainer "
                "stores one input/output per module, so a reused activation gets wrong "
                "multipliers"
            )
    for problem, count in recorder.problems.items():
        reasons.append(problem + (f" [x{count}]" if count > 1 else ""))
    return DeepSupport(supported=not reasons, reasons=tuple(reasons))


def check_gradients(model: nn.Module, example: torch.Tensor) -> tuple[bool, str]:
    """Check that the model's outputs have usable gradients with respect to its input.

    Args:
        model: the model as it will be explained (eval mode, returning ``(N, K)``).
        example: a few input rows (more rows make a false "all zero" less likely).

    Returns:
        ``(available, reason)``; ``reason`` says why not when ``available`` is False.
    """
    if not example.is_floating_point():
        return False, f"the input dtype is {example.dtype}, not floating point"
    probe = example.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = model(probe)
            if not out.requires_grad:
                return False, "the output does not depend on the input through autograd"
            (grad,) = torch.autograd.grad(out.sum(), probe, allow_unused=True)
    except Exception as err:
        return False, f"backpropagating to the input failed: {type(err).__name__}: {err}"
    if grad is None:
        return False, "the output does not depend on the input through autograd"
    if not torch.isfinite(grad).all():
        return False, "the input gradient has NaN/inf values"
    if not bool(grad.abs().sum() > 0):
        return False, (
            "the input gradient is zero everywhere on the probe batch (piecewise-constant "
            "ops such as round, argmax or comparisons)"
        )
    return True, ""


def select_explainer(
    model: nn.Module,
    background: torch.Tensor,
    requested: str = "auto",
    *,
    permutation_max_features: int = 10,
) -> ExplainerChoice:
    """Pick the explainer for ``model`` and record why.

    ``auto`` resolves as follows:

    1. input gradients unavailable (integer inputs, non-differentiable ops) -> permutation;
    2. tabular input ``(N, F)`` with ``F <= permutation_max_features`` -> permutation
       (antithetic permutation sampling is exact for models with up to second-order
       interactions and always additive, and few features keep it cheap);
    3. otherwise -> gradient (expected gradients, SHAP's GradientExplainer estimator).
       DeepExplainer's support is still probed and reported, so the summary says whether
       ``explainer="deep"`` would work for this model and, if not, why not.

    ``deep`` runs DeepExplainer only when every module of the model is one it supports;
    otherwise it falls back to ``gradient`` with a warning that lists the blockers.
    ``deep``/``gradient`` without input gradients fall back to ``permutation``, also with a
    warning. ``permutation`` is always honoured.

    Args:
        model: the model in eval mode, returning ``(N, K)``.
        background: background input rows (a few are used for probing).
        requested: ``"auto"``, ``"gradient"``, ``"deep"`` or ``"permutation"``.
        permutation_max_features: the "small tabular" threshold of rule 2.

    Returns:
        The :class:`ExplainerChoice`.

    Raises:
        ValueError: for an unknown explainer name.
    """
    if requested not in EXPLAINER_NAMES:
        raise ValueError(
            f"Unknown explainer {requested!r}; choose one of {', '.join(EXPLAINER_NAMES)}."
        )
    probe = background[: min(8, len(background))]
    if requested == "permutation":
        return ExplainerChoice("permutation", requested, ("forced by the user",))

    grads_ok, why_no_grads = check_gradients(model, probe)
    if not grads_ok:
        reason = f"input gradients are unavailable ({why_no_grads}); using permutation"
        if requested != "auto":
            logger.warning("explainer=%r cannot run: %s", requested, reason)
        return ExplainerChoice("permutation", requested, (reason,))

    n_features = int(background[0].numel())
    if requested == "auto" and background.dim() == 2 and n_features <= permutation_max_features:
        return ExplainerChoice(
            "permutation",
            requested,
            (
                f"tabular input with {n_features} <= {permutation_max_features} features: "
                "permutation sampling is exact for up to second-order interactions and "
                "additive",
            ),
        )
    support = check_deep_support(model, background[: min(2, len(background))])
    if requested == "gradient":
        return ExplainerChoice("gradient", requested, ("forced by the user",), support.reasons)
    if requested == "deep":
        if support.supported:
            return ExplainerChoice(
                "deep",
                requested,
                ("requested, and every module of the model is supported by DeepExplainer",),
            )
        reason = "DeepExplainer cannot be used: " + "; ".join(support.reasons)
        logger.warning("explainer='deep' falls back to 'gradient'. %s", reason)
        return ExplainerChoice(
            "gradient",
            requested,
            (reason, "using expected gradients (GradientExplainer's estimator) instead"),
            support.reasons,
        )
    if support.supported:
        note = (
            "DeepExplainer would also support this model (explainer='deep' gives exactly "
            "additive, deterministic values)"
        )
    else:
        note = "DeepExplainer would not be exact here: " + "; ".join(support.reasons)
    return ExplainerChoice(
        "gradient",
        requested,
        ("default: expected gradients (GradientExplainer's estimator)", note),
        support.reasons,
    )
