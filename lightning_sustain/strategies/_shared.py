"""What the Trainer's and Fabric's ``sustain_ddp`` strategies share (settings, views, hooks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_sustain.run.ddp_accounting import MODE_NONE, DDPAccounting, validate_shifting
from lightning_sustain.run.distributed import RankInfo
from lightning_sustain.run.wait_clock import builtin_comm_hook, check_comm_hook


def sustain_settings(
    comm_hook: str | None,
    ddp_comm_hook: Callable[..., Any] | None,
    shift_power: bool,
    job_power_budget_w: float | None,
    shift_every_n_steps: int,
    target_slack: float,
    log_every_n_steps: int | None,
    measure_wait: bool,
    summary: bool,
) -> dict[str, Any]:
    """The checked ``sustain_ddp`` settings, as the attributes both strategies hold.

    Raises:
        ValueError: a setting is not valid; the message names it.
    """
    check_comm_hook(comm_hook, ddp_comm_hook)
    job_power_budget_w, shift_every_n_steps, target_slack, log_every_n_steps = validate_shifting(
        shift_power,
        job_power_budget_w,
        shift_every_n_steps,
        target_slack,
        log_every_n_steps,
        measure_wait,
    )
    return {
        "comm_hook": comm_hook,
        "shift_power": bool(shift_power) or job_power_budget_w is not None,
        "job_power_budget_w": job_power_budget_w,
        "shift_every_n_steps": shift_every_n_steps,
        "target_slack": target_slack,
        "log_every_n_steps": log_every_n_steps,
        "measure_wait": measure_wait,
        "summary": summary,
    }


class SustainDDPViews:
    """The public views both strategies give of their :class:`DDPAccounting`."""

    accounting: DDPAccounting | None
    comm_hook: str | None
    shift_power: bool
    job_power_budget_w: float | None
    shift_every_n_steps: int
    target_slack: float
    measure_wait: bool

    @property
    def cluster_history(self) -> list[dict[str, Any]]:
        """Every gathered window: per-rank energy, power, wait and limits (all ranks)."""
        return list(self.accounting.history) if self.accounting is not None else []

    @property
    def ddp_summary(self) -> dict[str, Any] | None:
        """The job summary (on every rank), or None before the end of training."""
        return self.accounting.last_summary if self.accounting is not None else None

    @property
    def power_limit_w(self) -> float | None:
        """The power limit this rank's device runs under now (hardware or software)."""
        a = self.accounting
        return a.limit_w if a is not None and a.mode != MODE_NONE else None

    def _new_accounting(
        self, ranks: RankInfo, devices: list[Any], root_device: torch.device, log_every: int
    ) -> DDPAccounting:
        cuda = root_device.type == "cuda"
        return DDPAccounting(
            ranks,
            devices,
            shift_power=self.shift_power,
            job_power_budget_w=self.job_power_budget_w,
            shift_every_n_steps=self.shift_every_n_steps,
            target_slack=self.target_slack,
            log_every_n_steps=log_every,
            measure_wait=self.measure_wait,
            cuda_device=root_device if cuda else None,
        )

    def _inner_hook(
        self, root_device: torch.device, user_hook: Callable[..., Any] | None, user_state: Any
    ) -> tuple[Callable[..., Any] | None, Any]:
        """The hook the wait clock wraps: ``comm_hook`` by name, the user's, or none (CUDA)."""
        if root_device.type != "cuda":
            return None, None
        if self.comm_hook is not None:
            return builtin_comm_hook(self.comm_hook)
        return user_hook, user_state
