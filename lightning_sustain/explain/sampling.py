"""Seeded drawing of background and explained samples from dataloaders."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["draw_samples", "extract_input", "extract_inputs", "first_loader"]

Drawn = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]

logger = logging.getLogger(__name__)

_DICT_KEYS = ("x", "input", "inputs", "features", "image", "images", "pixel_values")


def extract_input(batch: Any, key: int | str | None = None) -> torch.Tensor:
    """Return the model input tensor of a batch.

    Args:
        batch: a tensor, a tuple/list ``(x, y, ...)`` or a mapping.
        key: index (tuple/list) or key (mapping) of the input. ``None`` picks the tensor
            itself, element 0 of a sequence, or the first of ``x``, ``input``, ``inputs``,
            ``features``, ``image``, ``images``, ``pixel_values`` in a mapping.

    Returns:
        The input tensor (first dimension: samples).

    Raises:
        TypeError: when no input tensor can be found; the message says what the batch
            looked like and which argument selects the input.
    """
    if key is not None:
        try:
            value = batch[key]
        except (KeyError, IndexError, TypeError) as err:
            raise TypeError(
                f"input_key={key!r} does not select anything in a batch of type "
                f"{type(batch).__name__}: {err}"
            ) from err
    elif isinstance(batch, torch.Tensor):
        value = batch
    elif isinstance(batch, Mapping):
        found = [k for k in _DICT_KEYS if k in batch]
        if not found:
            raise TypeError(
                f"Cannot tell which entry of the batch dict is the model input (keys: "
                f"{sorted(map(str, batch))}); set input_key to the right key."
            )
        value = batch[found[0]]
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        value = batch[0]
    else:
        raise TypeError(
            f"Cannot find the model input in a batch of type {type(batch).__name__}; "
            "batches must be a tensor, a (x, y, ...) sequence or a dict (set input_key)."
        )
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"The selected batch entry is a {type(value).__name__}, not a tensor; SHAP "
            "summaries explain tensor inputs (set input_key, or input_keys for several)."
        )
    return value


def extract_inputs(
    batch: Any, input_key: int | str | None = None, input_keys: Sequence[int | str] | None = None
) -> Drawn:
    """Return the model input(s) of a batch: one tensor, or several for multi-input models.

    Args:
        batch: a tensor, a tuple/list ``(x, y, ...)`` or a mapping.
        input_key: see :func:`extract_input` (single input).
        input_keys: several indices (tuple/list batches: the model is called with them as
            positional arguments, in this order) or keys (dict batches: the model is
            called with them as keyword arguments).

    Returns:
        A tensor, a tuple of tensors or a dict ``{key: tensor}``.

    Raises:
        TypeError: when an entry is missing or not a tensor.
        ValueError: when both ``input_key`` and ``input_keys`` are given.
    """
    if input_keys is None:
        return extract_input(batch, input_key)
    if input_key is not None:
        raise ValueError("Set input_key (one input) or input_keys (several), not both.")
    if not input_keys:
        raise ValueError("input_keys must name at least one batch entry.")
    values = [extract_input(batch, key) for key in input_keys]
    if isinstance(batch, Mapping):
        return {str(k): v for k, v in zip(input_keys, values, strict=True)}
    return tuple(values)


def _rows(drawn: Drawn) -> int:
    if isinstance(drawn, torch.Tensor):
        return len(drawn)
    first = next(iter(drawn.values())) if isinstance(drawn, dict) else drawn[0]
    return len(first)


def _map(drawn: Drawn, fn: Any) -> Drawn:
    if isinstance(drawn, torch.Tensor):
        return fn(drawn)
    if isinstance(drawn, dict):
        return {k: fn(v) for k, v in drawn.items()}
    return tuple(fn(v) for v in drawn)


def _cat(parts: list[Drawn]) -> Drawn:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)  # type: ignore[arg-type]
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts]) for k in first}  # type: ignore[index]
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))  # type: ignore[index]


def first_loader(loaders: Any) -> Any:
    """Return the first dataloader of Lightning's ``train_dataloader``/``val_dataloaders``.

    Those are a loader, or a list/tuple/dict of loaders; ``None`` passes through.
    """
    if loaders is None or isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _map_style(loader: Any) -> bool:
    if not isinstance(loader, DataLoader):
        return False
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or loader.batch_sampler is None:
        return False
    try:
        return len(dataset) > 0  # type: ignore[arg-type]
    except TypeError:
        return False


def draw_samples(
    loader: Iterable[Any] | DataLoader,
    n: int,
    *,
    seed: int,
    input_key: int | str | None = None,
    exclude: torch.Tensor | None = None,
    max_batches: int = 64,
    input_keys: Sequence[int | str] | None = None,
) -> tuple[Drawn, torch.Tensor | None]:
    """Draw ``n`` input rows from a dataloader, reproducibly, without touching global RNG.

    For a map-style ``DataLoader`` the rows are drawn uniformly without replacement from
    the whole dataset (bypassing any ``DistributedSampler``, so every rank would see the
    same rows) and collated with the loader's ``collate_fn``. For iterable loaders the
    first batches are read (at most ``max_batches``, and only as many as needed for ``4n``
    rows) and ``n`` rows are drawn from them.

    Args:
        loader: a ``DataLoader`` or any iterable of batches.
        n: how many rows to draw; fewer are returned when the data has fewer.
        seed: seed of the private ``torch.Generator`` used for drawing.
        input_key: see :func:`extract_input`.
        exclude: dataset indices not to draw (map-style only), e.g. the background rows
            when explained rows come from the same loader.
        max_batches: bound on batches read from an iterable loader.
        input_keys: several inputs, see :func:`extract_inputs`.

    Returns:
        ``(inputs, indices)``: the rows (on CPU; a tuple or dict for several inputs) and,
        for map-style loaders, the dataset indices drawn (``None`` otherwise).

    Raises:
        ValueError: when ``n < 1`` or the loader yields no rows.
    """
    if n < 1:
        raise ValueError(f"The number of samples to draw must be >= 1, got {n}.")
    generator = torch.Generator().manual_seed(seed)
    if _map_style(loader):
        assert isinstance(loader, DataLoader)
        size = len(loader.dataset)  # type: ignore[arg-type]
        candidates = torch.arange(size)
        if exclude is not None and len(exclude) < size:
            keep = torch.ones(size, dtype=torch.bool)
            keep[exclude] = False
            candidates = candidates[keep]
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:n]]
        items = [loader.dataset[int(i)] for i in chosen]
        batch = loader.collate_fn(items)
        drawn = extract_inputs(batch, input_key, input_keys)
        return _map(drawn, lambda t: t.detach().cpu()), chosen

    rows: list[Drawn] = []
    total = 0
    batch_size = getattr(loader, "batch_size", None) or 1
    wanted_batches = min(max_batches, max(1, math.ceil(4 * n / batch_size)))
    for i, batch in enumerate(loader):
        x = _map(extract_inputs(batch, input_key, input_keys), lambda t: t.detach().cpu())
        rows.append(x)
        total += _rows(x)
        if i + 1 >= wanted_batches and total >= n:
            break
        if i + 1 >= max_batches:
            break
    if total == 0:
        raise ValueError("The dataloader yielded no samples to explain.")
    pool = _cat(rows)
    chosen = torch.randperm(_rows(pool), generator=generator)[:n]
    return _map(pool, lambda t: t[chosen]), None
