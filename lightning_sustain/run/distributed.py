"""Who is this process in the job, and cross-rank sums through plain ``torch.distributed``.

No Lightning here: the Trainer, Fabric and a ``torchrun`` loop all initialise the default
process group, and that is all these helpers need. They are called at log intervals and
at the end of a stage, never per step and never on an exception path (a peer that failed
would never join the collective).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RankInfo:
    """The process's place in the job.

    Attributes:
        global_rank: rank in the whole job.
        local_rank: rank on this node.
        node_rank: index of this node.
        world_size: number of processes in the job.
    """

    global_rank: int = 0
    local_rank: int = 0
    node_rank: int = 0
    world_size: int = 1

    @classmethod
    def detect(cls) -> RankInfo:
        """From ``torch.distributed`` when initialised, else the launcher's variables.

        ``torchrun``, Lightning's launchers and SLURM-style launchers set ``RANK``,
        ``LOCAL_RANK``, ``WORLD_SIZE`` (and ``NODE_RANK`` / ``GROUP_RANK``).
        """
        env = os.environ
        local_rank = int(env.get("LOCAL_RANK", "0") or 0)
        node_rank = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")) or 0)
        if process_group_ready():
            dist = torch.distributed
            return cls(dist.get_rank(), local_rank, node_rank, dist.get_world_size())
        return cls(
            int(env.get("RANK", "0") or 0),
            local_rank,
            node_rank,
            int(env.get("WORLD_SIZE", "1") or 1),
        )

    @property
    def is_global_zero(self) -> bool:
        """True on the process that writes the job's files."""
        return self.global_rank == 0


def process_group_ready() -> bool:
    """True when the default process group exists and holds more than one process."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _collective_device() -> torch.device:
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum each value over every rank (one small collective; identity on one process)."""
    if not process_group_ready():
        return dict(values)
    keys = list(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    tensor = tensor.to(_collective_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, tensor.cpu().tolist(), strict=True)}


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order (``[obj]`` on one process)."""
    if not process_group_ready():
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
