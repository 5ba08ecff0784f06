"""Helpers of the front-end tests and benchmarks (no test functions here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# -- one workload through Trainer, Fabric and a plain loop (in-process) ---------------------
class Pace:
    """Deadline-paced steps: step k ends at ``t0 + (k + 1) * step_s`` in every loop.

    Every loop then spends the same wall time per step whatever its own overhead, so the
    energy of its training steps compares with the others' (what a user means by "the same
    workload"). Ground truth is sampled at the first step's start and at each step's end,
    right after the front end recorded its boundary.

    Args:
        sim: the simulated NVML controller (device 0 is measured).
        step_s: wall time of every step.
        busy_s: simulated GPU work per step (0 with a power profile: power then follows
            wall time only).
    """

    def __init__(self, sim: Any, step_s: float, busy_s: float) -> None:
        self.sim, self.step_s, self.busy_s = sim, step_s, busy_s
        self.k = 0
        self.t0: float | None = None
        self.first: tuple[float, float] | None = None
        self.last: tuple[float, float] | None = None

    def begin(self) -> None:
        if self.t0 is None:
            self.t0 = time.monotonic()

    def work(self) -> None:
        if self.busy_s:
            self.sim.busy(0, self.busy_s)

    def wait(self) -> None:
        self.k += 1
        deadline = self.t0 + self.k * self.step_s
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(left if left > 0.002 else 0)

    def truth_start(self) -> None:
        if self.first is None:
            self.first = self.sim.ground_truth_sample(0)

    def truth_end(self) -> None:
        self.last = self.sim.ground_truth_sample(0)

    @property
    def steps_truth_j(self) -> float:
        """Ground truth from the first step's start to the last step's end."""
        return self.last[1] - self.first[1]

    @property
    def steps_duration_s(self) -> float:
        return self.last[0] - self.first[0]


class _StageTruth:
    """Ground truth right after each EnergyRun stage opens and before it closes."""

    def __init__(self, sim: Any) -> None:
        from lightning_sustain import EnergyRun

        self.sim, self.events = sim, []
        start, end = EnergyRun.start_stage, EnergyRun.end_stage
        truth = self

        def start_stage(run, stage="fit"):
            start(run, stage)
            truth.events.append([stage, truth.sim.ground_truth_energy_j(0)])

        def end_stage(run, *a, **k):
            if run.current_stage is not None:
                truth.events[-1].append(truth.sim.ground_truth_energy_j(0))
            return end(run, *a, **k)

        EnergyRun.start_stage, EnergyRun.end_stage = start_stage, end_stage
        self._restore = (EnergyRun, start, end)

    def total_j(self) -> float:
        return sum(e[2] - e[1] for e in self.events if len(e) == 3)

    def close(self) -> None:
        cls, start, end = self._restore
        cls.start_stage, cls.end_stage = start, end


def _net() -> Any:
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(64, 160), torch.nn.ReLU(), torch.nn.Linear(160, 160),
        torch.nn.ReLU(), torch.nn.Linear(160, 2),
    )  # fmt: skip


def _batches(n: int, batch: int = 64) -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(n * batch, 64)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=batch)


def _paced_trainer(pace: Pace, steps: int, root: str) -> dict:
    import lightning.pytorch as pl
    import torch

    from lightning_sustain import EnergyMonitor

    class Before(pl.Callback):  # runs before EnergyMonitor's hooks
        def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
            pace.begin()

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            pace.wait()

    class After(pl.Callback):  # runs after them: truth at the boundaries it recorded
        def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
            pace.truth_start()

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            pace.truth_end()

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            pace.work()
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    monitor = EnergyMonitor(cpu="none", dirpath=root, report=False, flops=False)
    trainer = pl.Trainer(
        max_steps=steps, callbacks=[Before(), monitor, After()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, log_every_n_steps=10,
    )  # fmt: skip
    trainer.fit(Module(), _batches(steps))
    return monitor.summary


def _paced_fabric(pace: Pace, steps: int, root: str) -> dict:
    import torch
    from lightning.fabric import Fabric

    from lightning_sustain import FabricEnergyMonitor

    monitor = FabricEnergyMonitor(root, cpu="none", log_every_n_steps=10, report=False)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[monitor])
    net = _net()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.01))
    fabric.call("on_train_start")
    for i, (x, y) in enumerate(_batches(steps)):
        pace.begin()
        fabric.call("on_train_batch_start")
        pace.truth_start()
        pace.work()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        pace.wait()
        fabric.call("on_train_batch_end", samples=x.shape[0], step=i)
        pace.truth_end()
    fabric.call("on_train_end")
    monitor.close()
    return monitor.summary


def _paced_plain(pace: Pace, steps: int, root: str) -> dict:
    import torch

    from lightning_sustain import EnergyRun

    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    run = EnergyRun(root, cpu="none", log_every_n_steps=10, report=False)
    with run:
        for x, y in _batches(steps):
            pace.begin()
            run.begin_step()
            pace.truth_start()
            pace.work()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pace.wait()
            run.step(samples=x.shape[0])
            pace.truth_end()
    run.close()
    return run.summary


PACED_LOOPS = {"trainer": _paced_trainer, "fabric": _paced_fabric, "plain": _paced_plain}


@dataclass
class PacedResult:
    """One paced run: its summary and the ground truth of its steps and stages."""

    summary: dict
    pace: Pace
    run_truth_j: float


def run_paced(loop: str, sim: Any, steps: int, step_s: float, busy_s: float, root: str):
    """Drive ``steps`` deadline-paced steps through ``loop`` (trainer, fabric or plain)."""
    truth = _StageTruth(sim)
    pace = Pace(sim, step_s, busy_s)
    try:
        summary = PACED_LOOPS[loop](pace, steps, root)
    finally:
        truth.close()
    return PacedResult(summary, pace, truth.total_j())
