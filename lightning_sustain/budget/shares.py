"""Splitting one power budget between ranks and devices (plain Python).

``PowerBudget(per="job")`` splits equally; the DDP power-shifting strategy replaces the
equal split by a demand-aware one and hands each rank its share through
:meth:`~lightning_sustain.callbacks.PowerBudget.set_rank_budget_w`.
"""

from __future__ import annotations

import math

__all__ = ["device_share_w", "equal_shares_w"]


def equal_shares_w(total_w: float, ranks: int) -> list[float]:
    """Split a job's power budget equally between ranks.

    Args:
        total_w: the whole job's budget, in watts (> 0).
        ranks: the number of ranks (>= 1).

    Returns:
        One share per rank, in watts; the shares sum to ``total_w``.

    Raises:
        ValueError: a non-positive budget or rank count.
    """
    if isinstance(total_w, bool) or not isinstance(total_w, (int, float)):
        raise ValueError(f"total_w must be a number of watts, got {total_w!r}.")
    if not math.isfinite(total_w) or total_w <= 0:
        raise ValueError(f"total_w must be a finite number of watts > 0, got {total_w!r}.")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be an integer >= 1, got {ranks!r}.")
    return [float(total_w) / ranks] * ranks


def device_share_w(watts: float, per: str, world_size: int, devices_in_rank: int) -> float:
    """The budget of one device of this rank.

    Args:
        watts: the configured budget.
        per: ``"device"`` (``watts`` is each device's budget) or ``"job"`` (``watts`` is
            the whole job's, split equally between ranks, then between a rank's devices).
        world_size: the number of ranks.
        devices_in_rank: the devices this rank trains on (>= 1).

    Raises:
        ValueError: an unknown ``per`` or a bad count.
    """
    if per == "device":
        return float(watts)
    if per != "job":
        raise ValueError(f"per={per!r} is not valid: use 'device' or 'job'.")
    if isinstance(devices_in_rank, bool) or not isinstance(devices_in_rank, int):
        raise ValueError(f"devices_in_rank must be an integer >= 1, got {devices_in_rank!r}.")
    if devices_in_rank < 1:
        raise ValueError(f"devices_in_rank must be an integer >= 1, got {devices_in_rank!r}.")
    return equal_shares_w(watts, world_size)[0] / devices_in_rank
