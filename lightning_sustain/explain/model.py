"""Model handling for explanations: a detached copy in eval mode, and an output adapter.

SHAP's PyTorch explainers call ``model.eval()`` and never switch the model back,
DeepExplainer registers hooks and leaves ``x``/``y`` parameters on nested leaf modules, and
both need gradients with respect to the *input*. All of that happens on a deep copy made
here, so the trained model keeps its parameters, buffers, train/eval flags,
``requires_grad`` flags, hooks and attributes exactly as they were.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ModuleSnapshot",
    "OutputAdapter",
    "detached_copy",
    "model_device_dtype",
    "snapshot_module",
]

logger = logging.getLogger(__name__)


def detached_copy(module: nn.Module, detach: Iterable[object] = ()) -> nn.Module:
    """Deep-copy ``module`` for explanation: eval mode, parameters frozen.

    Args:
        module: the model to copy. It is not modified.
        detach: objects the module refers to that must not be copied along (for a
            LightningModule: its Trainer, which owns dataloaders, loggers and process
            groups). References to them become ``None`` in the copy.

    Returns:
        An independent copy in eval mode whose parameters do not require gradients (the
        explainers differentiate with respect to the input only).

    Raises:
        TypeError: when the module cannot be deep-copied (it holds a lock, an open file, a
            C handle...). The message names the module class and the original error.
    """
    memo: dict[int, object] = {id(obj): None for obj in detach if obj is not None}
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


class OutputAdapter(nn.Module):
    """Present a model's output as a 2-D ``(N, K)`` tensor, as SHAP's explainers expect.

    A single-output model returning shape ``(N,)`` becomes ``(N, 1)``; ``(N, K)`` passes
    through. Any other output (a tuple, a dict, ``(N, K, L)``) raises a ``TypeError`` that
    says what was returned. The adapter has the wrapped model as its only child, so
    DeepExplainer's hooks still land on the model's own leaf modules.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the wrapped model and reshape its output to ``(N, K)``."""
        out = self.model(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"The explained model must return a tensor of shape (N,) or (N, K); its forward "
                f"returned {type(out).__name__}. Explain a module whose forward returns the "
                "prediction tensor (ShapSummary(submodule=...)) or make forward return it."
            )
        if out.dim() == 1:
            return out.unsqueeze(1)
        if out.dim() == 2:
            return out
        raise TypeError(
            f"The explained model returned a tensor of shape {tuple(out.shape)}; SHAP "
            "summaries need one value per sample and output, i.e. shape (N,) or (N, K). "
            "Reduce the output (e.g. pool a sequence or segmentation map) in a wrapper module."
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
            name or "<root>": len(m._forward_hooks)
            + len(m._forward_pre_hooks)
            + len(m._backward_hooks)
            + len(m._backward_pre_hooks)
            for name, m in module.named_modules()
        },
    )
