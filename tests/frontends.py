"""Helpers of the multi-process front-end tests (no test functions here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "truth_driver.py"
#: Interpolating a 20 ms counter at a stage boundary right after a busy step can misplace up
#: to (busy - idle power of the simulated GPU) x one counter period, per boundary and rank.
BOUNDARY_J = (350.0 - 70.0) * 0.02


def run_driven(
    script: Path, args: list[str], tmp_path: Path, *, torchrun: int = 0, timeout_s: float = 300.0
) -> subprocess.CompletedProcess:
    """Run ``script`` under the truth driver (optionally through torchrun)."""
    truth = tmp_path / "truth"
    truth.mkdir(exist_ok=True)
    env = dict(
        os.environ,
        DRIVEN_SCRIPT=str(script),
        TRUTH_DIR=str(truth),
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    for key in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={torchrun}",
            "--standalone",
            str(DRIVER),
            *args,
        ]
    else:
        cmd = [sys.executable, str(DRIVER), *args]
    return subprocess.run(
        cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout_s
    )


def truth_events(tmp_path: Path) -> list[dict]:
    """Every process's ground-truth samples (stage, rank, start_j, end_j)."""
    events = []
    for path in sorted((tmp_path / "truth").glob("truth_*.json")):
        events.extend(json.loads(path.read_text()))
    return events


def truth_j(events: list[dict], stage: str, rank: int | None = None) -> float:
    """Ground-truth joules of a stage, over every rank or one."""
    return sum(
        e["end_j"] - e["start_j"]
        for e in events
        if e["stage"] == stage and "end_j" in e and (rank is None or e["rank"] == rank)
    )
