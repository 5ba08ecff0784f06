"""Model handling for explanations: a hook-free copy in eval mode, and an output adapter.

Explaining puts a model in eval mode, registers hooks on its leaves and needs gradients
with respect to the *input*. All of that happens on a deep copy made here, so the trained
model keeps its parameters, buffers, train/eval flags, ``requires_grad`` flags, hooks and
attributes exactly as they were.

The copy carries none of the user's hooks: forward, forward-pre, backward, backward-pre,
state-dict and load-state-dict hooks are left out of the copy (the original keeps them),
and the process-wide module hooks (``torch.nn.modules.module.register_module_forward_hook``
and friends) are suspended while an explanation runs (:func:`suspended_global_hooks`), so a
hook that counts calls or collects activations sees exactly what it would see without
the explanation. Hooks that are part of what the model computes and come from the
frameworks (``torch.nn.utils.weight_norm``/``spectral_norm``, Lightning's own) are kept.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

__all__ = [
    "HOOK_DICTS",
    "SEQUENCE_REDUCTIONS",
    "ModuleSnapshot",
    "OutputAdapter",
    "detached_copy",
    "model_device_dtype",
    "is_framework_hook",
    "snapshot_module",
    "suspended_global_hooks",
]

# every per-module hook registry of torch.nn.Module (torch 2.x)
HOOK_DICTS: tuple[str, ...] = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# flag registries keyed by the same handle ids as the hook dicts above
_HOOK_FLAG_DICTS: tuple[str, ...] = (
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)
# process-wide module hooks: suspended while an explanation runs
_GLOBAL_HOOK_DICTS: tuple[str, ...] = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
)
# hooks defined in these packages implement the model (weight_norm) or belong to Lightning
_FRAMEWORK_PACKAGES = ("torch", "lightning", "lightning_fabric", "pytorch_lightning")


def _hook_origin(hook: Any) -> str:
    """The module name where a hook's code lives (through partials and bound methods)."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    func = getattr(hook, "__func__", hook)
    origin = getattr(func, "__module__", None)
    if origin is None:  # a callable object: its class
        origin = type(hook).__module__
    return str(origin or "")


def is_framework_hook(hook: Any) -> bool:
    """True for hooks that come from torch or Lightning (kept on the explained copy)."""
    root = _hook_origin(hook).split(".", 1)[0]
    return root in _FRAMEWORK_PACKAGES


def _hook_free_memo(module: nn.Module, memo: dict[int, Any]) -> None:
    """Pre-fill a deepcopy memo so that every user hook registry copies as an empty one.

    The original's registries are never modified: the memo maps each of them to the
    registry the copy gets (framework hooks only, in order).
    """
    for sub in module.modules():
        kept_ids: set[int] = set()
        for name in HOOK_DICTS:
            registry = getattr(sub, name, None)
            if not isinstance(registry, dict):
                continue
            kept = OrderedDict(
                (hid, hook) for hid, hook in registry.items() if is_framework_hook(hook)
            )
            kept_ids |= set(kept)
            memo[id(registry)] = kept
        for name in _HOOK_FLAG_DICTS:
            flags = getattr(sub, name, None)
            if isinstance(flags, dict):
                memo[id(flags)] = OrderedDict(
                    (hid, flag) for hid, flag in flags.items() if hid in kept_ids
                )


@contextmanager
def suspended_global_hooks() -> Iterator[None]:
    """Suspend torch's process-wide module hooks for the body, then put them back.

    ``torch.nn.modules.module.register_module_forward_hook`` (and the pre/backward
    variants) apply to *every* module, including the copy being explained; a user's
    global hook must not see the explanation's forward passes.
    """
    saved: dict[str, Any] = {}
    for name in _GLOBAL_HOOK_DICTS:
        registry = getattr(_torch_module, name, None)
        if isinstance(registry, dict):
            saved[name] = OrderedDict(registry)
            registry.clear()
    flag = getattr(_torch_module, "_global_is_full_backward_hook", None)
    try:
        yield
    finally:
        for name, content in saved.items():
            registry = getattr(_torch_module, name)
            registry.clear()
            registry.update(content)
        if hasattr(_torch_module, "_global_is_full_backward_hook"):
            _torch_module._global_is_full_backward_hook = flag


logger = logging.getLogger(__name__)


def detached_copy(module: nn.Module, detach: Iterable[object] = ()) -> nn.Module:
    """Deep-copy ``module`` for explanation: eval mode, parameters frozen, no user hooks.

    Args:
        module: the model to copy. It is not modified.
        detach: objects the module refers to that must not be copied along (for a
            LightningModule: its Trainer, which owns dataloaders, loggers and process
            groups). References to them become ``None`` in the copy.

    Returns:
        An independent copy in eval mode whose parameters do not require gradients (the
        explainers differentiate with respect to the input only) and that carries none of
        the user's module hooks (framework hooks, see :func:`is_framework_hook`, are kept).

    Raises:
        TypeError: when the module cannot be deep-copied (it holds a lock, an open file, a
            C handle...). The message names the module class and the original error.
    """
    memo: dict[int, Any] = {id(obj): None for obj in detach if obj is not None}
    _hook_free_memo(module, memo)
    try:
        clone = copy.deepcopy(module, memo)
    except Exception as err:  # deepcopy raises whatever the offending __reduce__ raises
        raise TypeError(
            f"Cannot deep-copy {type(module).__name__} for explanation ({type(err).__name__}: "
            f"{err}). SHAP needs a private copy so that the trained model is not modified; "
            "make the module copyable (keep locks, open files and clients out of its "
            "attributes) or explain a copyable submodule instead."
        ) from err
    clone.eval()
    for param in clone.parameters():
        param.requires_grad_(False)
    return clone


def model_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """Return the device of the module's first parameter or buffer and its float dtype.

    Returns:
        ``(device, dtype)``; the dtype is ``None`` when the module has no floating-point
        tensors. A module without tensors is taken to live on the CPU.
    """
    device = torch.device("cpu")
    dtype: torch.dtype | None = None
    for tensor in (*module.parameters(), *module.buffers()):
        device = tensor.device
        if tensor.is_floating_point():
            dtype = tensor.dtype
            break
    return device, dtype


SEQUENCE_REDUCTIONS: tuple[str, ...] = ("last", "mean")


class OutputAdapter(nn.Module):
    """Call a model on one or several input tensors and present its output as ``(N, K)``.

    A single-output model returning shape ``(N,)`` becomes ``(N, 1)``; ``(N, K)`` passes
    through. Sequence outputs, ``(N, T, K)`` or the flattened ``(N * T, K)`` of language
    models such as ``lightning.pytorch.demos.Transformer``, are reduced over positions:
    ``"last"`` (the prediction at the last position, the next-token prediction of a causal
    model) or ``"mean"``. Any other output (a tuple, a dict, ``(N, K, L, M)``) raises a
    ``TypeError`` that says what was returned. The adapter has the wrapped model as its
    only child, so hooks placed on the model's leaves still see every call.

    Args:
        model: the model.
        input_names: with several inputs, their names; used as keyword arguments when
            ``keyword`` is True (dict batches), else the inputs are passed positionally.
        keyword: call ``model(**{name: tensor})`` instead of ``model(*tensors)``.
        sequence_reduction: ``"last"`` or ``"mean"`` for sequence outputs.
    """

    def __init__(
        self,
        model: nn.Module,
        input_names: Sequence[str] | None = None,
        keyword: bool = False,
        sequence_reduction: str = "last",
    ) -> None:
        super().__init__()
        if sequence_reduction not in SEQUENCE_REDUCTIONS:
            raise ValueError(
                f"sequence_reduction={sequence_reduction!r} must be one of {SEQUENCE_REDUCTIONS}."
            )
        self.model = model
        self.input_names = list(input_names) if input_names is not None else None
        self.keyword = keyword
        self.sequence_reduction = sequence_reduction

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Run the wrapped model and reshape its output to ``(N, K)``."""
        if self.keyword:
            assert self.input_names is not None
            out = self.model(**dict(zip(self.input_names, inputs, strict=True)))
        else:
            out = self.model(*inputs)
        n = int(inputs[0].shape[0])
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"The explained model must return a tensor of shape (N,) or (N, K); its forward "
                f"returned {type(out).__name__}. Explain a module whose forward returns the "
                "prediction tensor (ShapSummary(submodule=...)) or make forward return it."
            )
        if out.dim() == 1 and out.shape[0] == n:
            return out.unsqueeze(1)
        if out.dim() == 2 and out.shape[0] == n:
            return out
        if out.dim() == 2 and n > 0 and out.shape[0] % n == 0:
            out = out.reshape(n, out.shape[0] // n, out.shape[1])
        if out.dim() == 3 and out.shape[0] == n:
            return out[:, -1] if self.sequence_reduction == "last" else out.mean(dim=1)
        raise TypeError(
            f"The explained model returned a tensor of shape {tuple(out.shape)} for {n} "
            "input rows; SHAP summaries need one value per row and output, i.e. shape (N,) "
            "or (N, K), or a sequence output (N, T, K) / (N * T, K) reduced over positions "
            "(sequence_reduction). Reduce the output in a wrapper module."
        )


@dataclass(frozen=True)
class ModuleSnapshot:
    """What an explanation must not change on a model: weights, modes, flags, hooks."""

    state: dict[str, torch.Tensor]
    training: dict[str, bool]
    requires_grad: dict[str, bool]
    attributes: dict[str, frozenset[str]]
    hook_counts: dict[str, int]

    def differences(self, other: ModuleSnapshot) -> list[str]:
        """List, in words, every way ``other`` differs from this snapshot."""
        diffs: list[str] = []
        if self.state.keys() != other.state.keys():
            changed = sorted(self.state.keys() ^ other.state.keys())
            diffs.append(f"state_dict keys differ: {changed}")
        for key in self.state.keys() & other.state.keys():
            if not torch.equal(self.state[key], other.state[key]):
                diffs.append(f"state_dict[{key!r}] changed")
        for name in ("training", "requires_grad", "attributes", "hook_counts"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for key in sorted(mine.keys() | theirs.keys()):
                if mine.get(key) != theirs.get(key):
                    diffs.append(f"{name}[{key!r}]: {mine.get(key)!r} -> {theirs.get(key)!r}")
        return diffs


def snapshot_module(module: nn.Module) -> ModuleSnapshot:
    """Record a module's weights, train/eval flags, requires_grad flags, attributes, hooks."""
    return ModuleSnapshot(
        state={k: v.detach().clone() for k, v in module.state_dict().items()},
        training={name or "<root>": m.training for name, m in module.named_modules()},
        requires_grad={name: p.requires_grad for name, p in module.named_parameters()},
        attributes={name or "<root>": frozenset(vars(m)) for name, m in module.named_modules()},
        hook_counts={
            **{
                name or "<root>": sum(len(getattr(m, d, ())) for d in HOOK_DICTS)
                for name, m in module.named_modules()
            },
            **{
                f"tensor:{name}": len(getattr(t, "_backward_hooks", None) or ())
                + len(getattr(t, "_post_accumulate_grad_hooks", None) or ())
                for name, t in (*module.named_parameters(), *module.named_buffers())
            },
        },
    )
