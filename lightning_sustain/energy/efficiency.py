"""Efficiency figures: FLOPs per step, joules per TFLOP, TFLOP/s per watt, tokens per joule.

The FLOPs of one step are counted once, on a sample batch, with
:class:`torch.utils.flop_counter.FlopCounterMode` (forward and backward for training,
forward only for inference). They are then combined with measured energy and time:

- ``j_per_tflop``: joules per 10^12 floating-point operations;
- ``tflops_per_s_per_w``: achieved TFLOP/s per watt of mean power, which is the same as
  TFLOP per joule (the reciprocal of ``j_per_tflop``);
- ``tokens_per_j`` and ``samples_per_j``.

Every result states how its FLOPs were counted (``method``) and where its energy came from
(``energy_provenance``). No Lightning import: usable from any loop.

Example::

    flops = count_step_flops(model, x, train=True, samples=x.shape[0])
    # ... train `steps` steps, measure `energy_j` over `duration_s` ...
    figures = efficiency_figures(flops, steps=steps, energy_j=energy_j, duration_s=duration_s,
                                 samples=steps * 32, energy_provenance="counter")
    figures.to_dict()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

TERA = 1e12

_COUNTED = (
    "matrix multiplications, convolutions and attention (2 FLOPs per multiply-accumulate); "
    "elementwise, normalisation, loss and optimizer FLOPs are not counted"
)


@dataclass(frozen=True)
class StepFlops:
    """The FLOPs of one step, counted once on a sample batch.

    Attributes:
        flops_per_step: floating-point operations of one step on the sample batch.
        train: True when forward and backward were counted, False for forward only.
        samples_per_step: samples in the sample batch (None when unknown).
        tokens_per_step: tokens in the sample batch (None when not given).
        method: how the FLOPs were counted, in words.
    """

    flops_per_step: int
    train: bool
    samples_per_step: Optional[int]
    tokens_per_step: Optional[int]
    method: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class EfficiencyFigures:
    """Measured energy and time against counted FLOPs.

    Attributes:
        flops_per_step: FLOPs of one step (see :class:`StepFlops`).
        steps: steps the energy covers (under DDP, summed over ranks: rank-steps).
        total_tflop: ``flops_per_step * steps / 1e12``.
        energy_j: energy of those steps, in joules.
        duration_s: wall-clock time of those steps, in seconds.
        mean_power_w: ``energy_j / duration_s`` (None without a duration).
        achieved_tflops_per_s: ``total_tflop / duration_s`` (None without a duration).
        j_per_tflop: ``energy_j / total_tflop`` (None without FLOPs).
        tflops_per_s_per_w: achieved TFLOP/s per watt of mean power, which equals
            ``total_tflop / energy_j`` (None without energy).
        samples: samples the energy covers (None when unknown).
        tokens: tokens the energy covers (None when unknown).
        samples_per_j: ``samples / energy_j``.
        tokens_per_j: ``tokens / energy_j``.
        method: how the FLOPs were counted.
        energy_provenance: where the energy came from (``counter``, ``integrated``,
            ``estimated``, possibly ``(simulated)``), or None when not stated.
    """

    flops_per_step: int
    steps: int
    total_tflop: float
    energy_j: float
    duration_s: Optional[float]
    mean_power_w: Optional[float]
    achieved_tflops_per_s: Optional[float]
    j_per_tflop: Optional[float]
    tflops_per_s_per_w: Optional[float]
    samples: Optional[int]
    tokens: Optional[int]
    samples_per_j: Optional[float]
    tokens_per_j: Optional[float]
    method: str
    energy_provenance: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (None for a figure that cannot be computed)."""
        return asdict(self)


def _leading_dim(example: Any) -> Optional[int]:
    if isinstance(example, torch.Tensor):
        return int(example.shape[0]) if example.dim() > 0 else None
    if isinstance(example, Mapping):
        example = list(example.values())
    if isinstance(example, Sequence) and not isinstance(example, (str, bytes)):
        for item in example:
            found = _leading_dim(item)
            if found is not None:
                return found
    return None


def _leaf_inputs_requiring_grad(example: Any) -> list[torch.Tensor]:
    if isinstance(example, torch.Tensor):
        return [example] if example.requires_grad and example.is_leaf else []
    if isinstance(example, Mapping):
        example = list(example.values())
    if isinstance(example, (tuple, list)):
        return [t for item in example for t in _leaf_inputs_requiring_grad(item)]
    return []


def _call(model: torch.nn.Module, example: Any) -> Any:
    if isinstance(example, Mapping):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(example)


def _default_loss(output: Any) -> torch.Tensor:
    """The sum of every floating-point tensor in the output (its FLOPs are not counted)."""
    tensors: list[torch.Tensor] = []

    def collect(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.requires_grad:
                tensors.append(value)
        elif isinstance(value, Mapping):
            for item in value.values():
                collect(item)
        elif isinstance(value, (tuple, list)):
            for item in value:
                collect(item)

    collect(output)
    if not tensors:
        raise ValueError(
            "count_step_flops(train=True) found no floating-point output that requires a "
            "gradient; pass loss_fn=... that returns the training loss, or train=False."
        )
    return sum(t.float().sum() for t in tensors)  # type: ignore[return-value]


def _check_count(name: str, value: Optional[int]) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}.")
    return value


def count_step_flops(
    model: torch.nn.Module,
    example_input: Any,
    *,
    train: bool = True,
    loss_fn: Optional[Callable[[Any], torch.Tensor]] = None,
    samples: Optional[int] = None,
    tokens: Optional[int] = None,
) -> StepFlops:
    """Count the FLOPs of one step once, on a sample batch, with ``FlopCounterMode``.

    The model is called as ``model(x)`` for a tensor, ``model(*x)`` for a tuple or list
    and ``model(**x)`` for a mapping. For training, ``loss.backward()`` is counted, as a
    real step runs it (inputs that require a gradient get one). The ``.grad`` fields of
    the parameters and inputs, the model's buffers (BatchNorm statistics), its train/eval
    mode and the random-number state are left as they were. A model on the ``meta``
    device is counted without allocating memory.

    Args:
        model: the module a step runs.
        example_input: one batch, as the model takes it (not the targets).
        train: count forward and backward (True) or forward only under ``no_grad``.
        loss_fn: maps the model's output to the scalar that is back-propagated; by
            default the sum of the output's floating-point tensors (only the backward
            pass through the model matters for the count).
        samples: samples in the batch; by default the leading dimension of the first
            tensor in ``example_input``.
        tokens: tokens in the batch (e.g. ``input_ids.numel()``); None when not a token
            model.

    Returns:
        The FLOPs of one step and the method used.

    Raises:
        ValueError: ``samples``/``tokens`` not a non-negative int, or ``train=True`` with
            nothing to differentiate (no trainable parameter or no differentiable output).
    """
    from torch.utils.flop_counter import FlopCounterMode

    samples = _check_count("samples", samples)
    tokens = _check_count("tokens", tokens)
    if samples is None:
        samples = _leading_dim(example_input)
    params = [p for p in model.parameters() if p.requires_grad]
    if train and not params:
        raise ValueError(
            "count_step_flops(train=True): the model has no trainable parameter; use "
            "train=False to count inference FLOPs."
        )
    was_training = model.training
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    cuda_devices = [
        d.index or 0 for d in {p.device for p in model.parameters()} if d.type == "cuda"
    ]
    # backward accumulates into .grad: keep what was there (an input that requires a
    # gradient gets one too, as in a real step) and put it back afterwards
    leaves = params + _leaf_inputs_requiring_grad(example_input) if train else []
    grads = [leaf.grad for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            counter = FlopCounterMode(display=False)
            with counter:
                if train:
                    output = _call(model, example_input)
                    loss = (loss_fn or _default_loss)(output)
                    loss.backward()
                else:
                    with torch.no_grad():
                        _call(model, example_input)
    finally:
        for leaf, grad in zip(leaves, grads, strict=True):
            leaf.grad = grad
        model.train(was_training)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                saved = buffers.get(name)
                if saved is not None and saved.shape == buf.shape:
                    buf.copy_(saved)
    passes = "forward and backward" if train else "forward only (no_grad)"
    method = (
        f"torch.utils.flop_counter.FlopCounterMode (torch {torch.__version__}), counted once "
        f"on a sample batch of {samples if samples is not None else 'unknown'} samples, "
        f"{passes}; counts {_COUNTED}"
    )
    return StepFlops(
        flops_per_step=int(counter.get_total_flops()),
        train=train,
        samples_per_step=samples,
        tokens_per_step=tokens,
        method=method,
    )


def _check_number(name: str, value: float, *, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")
    return float(value)


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def efficiency_figures(
    step_flops: StepFlops | int,
    *,
    steps: int,
    energy_j: float,
    duration_s: Optional[float] = None,
    samples: Optional[int] = None,
    tokens: Optional[int] = None,
    energy_provenance: Optional[str] = None,
    method: Optional[str] = None,
) -> EfficiencyFigures:
    """Combine FLOPs per step with measured energy and time.

    Args:
        step_flops: a :class:`StepFlops` from :func:`count_step_flops`, or FLOPs per step
            counted some other way (then say how in ``method``).
        steps: steps the energy covers; under DDP with energy summed over ranks, the steps
            summed over ranks (each rank ran ``flops_per_step`` per step).
        energy_j: energy of those steps, in joules.
        duration_s: wall-clock time of those steps, in seconds (for TFLOP/s and power).
        samples: samples the energy covers; by default ``steps * samples_per_step``.
        tokens: tokens the energy covers; by default ``steps * tokens_per_step``.
        energy_provenance: where ``energy_j`` came from, carried into the result.
        method: how the FLOPs were counted; required when ``step_flops`` is a number.

    Returns:
        The figures; a figure whose denominator is zero or unknown is None, never inf.

    Raises:
        ValueError: a negative or non-finite input, or a bare FLOP count without
            ``method``; the message names the argument.
    """
    if isinstance(step_flops, StepFlops):
        flops, method = step_flops.flops_per_step, method or step_flops.method
        if samples is None and step_flops.samples_per_step is not None:
            samples = steps * step_flops.samples_per_step if isinstance(steps, int) else None
        if tokens is None and step_flops.tokens_per_step is not None:
            tokens = steps * step_flops.tokens_per_step if isinstance(steps, int) else None
    else:
        flops = step_flops
        if not method:
            raise ValueError(
                "efficiency_figures() with a bare FLOP count needs method=... saying how it "
                "was counted (or pass the StepFlops from count_step_flops())."
            )
    if isinstance(flops, bool) or not isinstance(flops, int) or flops < 0:
        raise ValueError(f"flops per step must be a non-negative integer, got {flops!r}.")
    _check_count("steps", steps)
    _check_count("samples", samples)
    _check_count("tokens", tokens)
    energy = _check_number("energy_j", energy_j)
    duration = _check_number("duration_s", duration_s, allow_none=True)
    total_tflop = flops * steps / TERA
    return EfficiencyFigures(
        flops_per_step=flops,
        steps=steps,
        total_tflop=total_tflop,
        energy_j=energy,  # type: ignore[arg-type]
        duration_s=duration,
        mean_power_w=_ratio(energy, duration),
        achieved_tflops_per_s=_ratio(total_tflop, duration),
        j_per_tflop=_ratio(energy, total_tflop),
        tflops_per_s_per_w=_ratio(total_tflop, energy),
        samples=samples,
        tokens=tokens,
        samples_per_j=_ratio(samples, energy),
        tokens_per_j=_ratio(tokens, energy),
        method=method,
        energy_provenance=energy_provenance,
    )
