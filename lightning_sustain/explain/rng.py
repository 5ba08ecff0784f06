"""Save and restore every global random number generator an explainer may touch.

SHAP's explainers and plots reseed and draw from the global ``numpy.random`` state
(``np.random.seed(rseed)`` in ``GradientExplainer``, ``np.random.seed(seed)`` in
``PermutationExplainer``, ``np.random.shuffle`` in the beeswarm plot). Explaining a model at
the end of training must not change what a seeded training script does next, so every
explanation runs inside :func:`preserved_rng_state`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["RngState", "capture_rng_state", "preserved_rng_state", "restore_rng_state"]


@dataclass(frozen=True)
class RngState:
    """A snapshot of the global generators of Python, NumPy and torch (CPU and CUDA)."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None


def capture_rng_state() -> RngState:
    """Return a snapshot of the global random states.

    CUDA generators are captured only when CUDA is already initialised, so this never
    initialises a GPU context as a side effect.
    """
    cuda_states: list[torch.Tensor] | None = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
    return RngState(
        python=random.getstate(),
        numpy=np.random.get_state(),
        torch_cpu=torch.get_rng_state(),
        torch_cuda=cuda_states,
    )


def restore_rng_state(state: RngState) -> None:
    """Restore the global random states captured by :func:`capture_rng_state`."""
    random.setstate(state.python)
    np.random.set_state(state.numpy)
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda is not None:
        torch.cuda.set_rng_state_all(state.torch_cuda)


@contextmanager
def preserved_rng_state() -> Iterator[RngState]:
    """Run the body and put the Python, NumPy and torch global random states back afterwards.

    Yields:
        The snapshot taken on entry.
    """
    state = capture_rng_state()
    try:
        yield state
    finally:
        restore_rng_state(state)
