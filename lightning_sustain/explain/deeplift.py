"""DeepLIFT rescale rules on PyTorch modules: SHAP's DeepExplainer rules without importing shap.

SHAP's ``DeepExplainer`` for PyTorch (``shap/explainers/_deep/deep_pytorch.py``) runs the
model on ``[x rows; reference rows]`` and replaces the gradient of each nonlinear leaf
module by a DeepLIFT multiplier through full backward hooks, storing the module's input
and output as ``nn.Parameter`` attributes in between. Linear modules keep their gradient;
elementwise nonlinearities use the rescale rule ``(y - y_ref) / (x - x_ref)`` (their plain
gradient where ``|x - x_ref| < 1e-6``); max pooling distributes ``max(y, y_ref)`` between
the pair. Averaging ``multiplier * (x - reference)`` over the background gives SHAP values
that add up exactly to ``f(x) - E[f(reference)]``.

This module applies the same rules, with two changes that do not change the values:

* the rule is attached in a *forward* hook that returns ``y.detach() + rule(x)``, where
  ``rule`` is zero in the forward pass and has the multiplier as its gradient; nothing is
  stored on the module between passes, so an activation module called several times per
  forward gets the right multiplier at each call (SHAP's stored ``x``/``y`` would be
  overwritten), and no attribute is left behind;
* importing it costs nothing (``import shap`` takes seconds: it loads scikit-learn,
  pandas and numba), which matters for a callback that runs once per fit.

The tests check the values against ``shap.DeepExplainer(...).shap_values(...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RULES", "deeplift_rules"]

# modules that act linearly on their input (or only reshape it): the gradient is the rule
_LINEAR = (
    "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
    "ConvTranspose3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "Flatten", "Unflatten", "Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
    "AlphaDropout",
)  # fmt: skip
# elementwise nonlinearities: the rescale rule
_ELEMENTWISE = (
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish",
    "Sigmoid", "Tanh", "Softplus", "Softsign", "Hardtanh", "Hardsigmoid", "Hardswish",
    "LogSigmoid", "Tanhshrink",
)  # fmt: skip
_MAXPOOL = ("MaxPool1d", "MaxPool2d", "MaxPool3d")

#: nn.Module class name -> rule name ("linear", "rescale" or "maxpool")
RULES: dict[str, str] = {
    **dict.fromkeys(_LINEAR, "linear"),
    **dict.fromkeys(_ELEMENTWISE, "rescale"),
    **dict.fromkeys(_MAXPOOL, "maxpool"),
}


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = t.shape[0] // 2
    return t[:half], t[half:]


def _rescale(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
    inp = args[0]
    if not isinstance(inp, torch.Tensor) or not inp.requires_grad:
        return None
    x, ref = _halves(inp.detach())
    y, y_ref = _halves(output.detach())
    delta_in = x - ref
    small = delta_in.abs() < 1e-6
    ratio = (y - y_ref) / torch.where(small, torch.ones_like(delta_in), delta_in)
    multiplier = torch.cat([ratio, ratio])
    if bool(small.any()):
        # SHAP keeps the plain gradient where the pair barely differs
        with torch.enable_grad():
            z = inp.detach().requires_grad_(True)
            (local,) = torch.autograd.grad(module.forward(z).sum(), z)
        multiplier = torch.where(torch.cat([small, small]), local, multiplier)
    return output.detach() + multiplier * (inp - inp.detach())


class _MaxPoolRule(torch.autograd.Function):
    """Zero in the forward pass; SHAP's ``maxpool`` multiplier in the backward pass."""

    @staticmethod
    def forward(ctx: Any, inp: torch.Tensor, out: torch.Tensor, module: nn.Module) -> Any:
        ctx.save_for_backward(inp.detach(), out.detach())
        ctx.module = module
        return torch.zeros_like(out)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        x, y_all = ctx.saved_tensors
        module = ctx.module
        dim = type(module).__name__[-2:]  # "1d", "2d", "3d"
        pool: Callable[..., Any] = getattr(F, f"max_pool{dim}")
        unpool: Callable[..., Any] = getattr(F, f"max_unpool{dim}")
        x_in, x_ref = _halves(x)
        delta_in = x_in - x_ref
        y, y_ref = _halves(y_all)
        cross = torch.max(y, y_ref)
        diffs = torch.cat([cross - y_ref, y - cross])
        with torch.no_grad():
            _, indices = pool(
                x, module.kernel_size, module.stride, module.padding, module.dilation,
                module.ceil_mode, True,
            )  # fmt: skip
            spread = unpool(
                grad_output * diffs, indices, module.kernel_size, module.stride,
                module.padding, list(x.shape),
            )  # fmt: skip
        a, b = _halves(spread)
        small = delta_in.abs() < 1e-7
        grad = torch.where(
            small, torch.zeros_like(delta_in), (a + b) / torch.where(small, 1.0, delta_in)
        )
        return torch.cat([grad, grad]), None, None


def _maxpool(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
    inp = args[0]
    if not isinstance(inp, torch.Tensor) or not inp.requires_grad:
        return None
    return output.detach() + _MaxPoolRule.apply(inp, output, module)


_HOOKS = {"rescale": _rescale, "maxpool": _maxpool}


def _leaves(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        if not any(True for _ in module.children()):
            yield module


@contextmanager
def deeplift_rules(model: nn.Module) -> Iterator[None]:
    """Attach the DeepLIFT rules to every nonlinear leaf of ``model`` for the body.

    Inside, a forward pass on ``torch.cat([x_rows, reference_rows])`` (same length) followed
    by ``autograd.grad`` gives the DeepLIFT multipliers in the reference half. The hooks
    are removed on exit; nothing else on the model changes.
    """
    handles = []
    try:
        for leaf in _leaves(model):
            hook = _HOOKS.get(RULES.get(type(leaf).__name__, ""))
            if hook is not None:
                handles.append(leaf.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
