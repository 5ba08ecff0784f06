"""Power limits are restored on every node of a multi-node ``sustain_ddp`` job.

Two "nodes" run on this machine as separate hosts would: each is started with
``NODE_RANK`` / ``MASTER_ADDR=127.0.0.1`` / ``MASTER_PORT`` like a cluster launcher does,
and each has its own simulated devices (its own NVML state file, distinct UUIDs) and its
own limit journal, so no node can see or restore another node's caps except through the
job itself. Ranks talk over gloo on CPU. One rank on one node fails at a random step
(SIGKILL or an exception); afterwards every GPU of every node must be back at its
original limit, with an empty journal. A SIGKILLed rank's GPU is restored within 10 s of
its death while any process of its node lives; where the dead rank was its node's only
process, nothing on that node can act, and ``restore-limits`` there (what the next run
also does) restores it.

NCCL is not available here (no GPU); the design assumes what is tested with gloo: a
collective on a surviving rank fails (or times out after the strategy's ``timeout``)
once a peer is gone, so the survivor reaches ``on_exception``; each node's live
processes watch that node's journal once a second regardless.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lightning_sustain.testing import SimulatedDeviceSpec
from lightning_sustain.testing.simulated_nvml import STATE_ENV_VAR
from tests.test_ddp_faults import _pid_alive

REPO = Path(__file__).resolve().parents[1]
NODES = 2
DEFAULT_W = 400.0

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from datetime import timedelta
    import torch
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_sustain
    from lightning_sustain.callbacks.power_budget import PowerBudget
    from lightning_sustain.strategies.sustain_ddp import SustainDDPStrategy
    from lightning_sustain.testing import SimulatedNVML

    CFG = json.loads(open(os.environ["FAULT_CONFIG"]).read())
    OUT = CFG["out"]


    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)
            self._sim = None

        def on_train_start(self):
            with open(os.path.join(OUT, "pid%d" % self.global_rank), "w") as f:
                f.write(str(os.getpid()))

        def training_step(self, batch, batch_idx):
            if self._sim is None:
                self._sim = SimulatedNVML.attach()
            if self.global_rank == CFG["rank"] and self.global_step == CFG["step"]:
                if CFG["mode"] == "exception":
                    raise RuntimeError("injected failure on rank %d" % self.global_rank)
                os.kill(os.getpid(), signal.SIGKILL)
            self._sim.busy(self.trainer.local_rank, 0.01)
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
            return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4)


    if __name__ == "__main__":
        trainer = pl.Trainer(
            accelerator="cpu", devices=CFG["devices"], num_nodes=CFG["nodes"],
            max_steps=CFG["max_steps"],
            strategy=SustainDDPStrategy(timeout=timedelta(seconds=20)),
            log_every_n_steps=2, logger=False,
            callbacks=[PowerBudget(watts=200.0, mode="hardware")],
            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
            default_root_dir=OUT,
        )
        trainer.fit(Model())
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_sims(simulated_nvml, tmp_path: Path, devices: int) -> list:
    """One simulated host per node: its own state file and GPU UUIDs."""
    sims = []
    for node in range(NODES):
        specs = [
            SimulatedDeviceSpec(uuid=f"GPU-00000000-0000-0000-{node + 1:04d}-{i + 1:012d}")
            for i in range(devices)
        ]
        path = tmp_path / f"node{node}" / "simnvml.bin"
        sims.append(simulated_nvml(specs, counter_period_s=0.05, state_path=path))
    return sims


def _node_env(tmp_path: Path, sim, node: int, port: int, config: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "GLOBAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT")
    }
    env.update(
        NODE_RANK=str(node),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        FAULT_CONFIG=str(config),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        LIGHTNING_SUSTAIN_LIMIT_JOURNAL=str(tmp_path / f"node{node}" / "journal.json"),
    )
    env[STATE_ENV_VAR] = str(sim.state_path)
    return env


def run_multinode_job(
    simulated_nvml, tmp_path: Path, devices: int, mode: str, rank: int, step: int
) -> dict:
    """Run a 2-node job (``devices`` ranks per node) with one fault; return what was seen."""
    sims = _node_sims(simulated_nvml, tmp_path, devices)
    out = tmp_path / "out"
    out.mkdir()
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "out": str(out),
                "mode": mode,
                "rank": rank,
                "step": step,
                "devices": devices,
                "nodes": NODES,
                "max_steps": step + 3,
            }
        )
    )
    (tmp_path / "job.py").write_text(SCRIPT)
    port = _free_port()
    envs = [_node_env(tmp_path, sims[n], n, port, config) for n in range(NODES)]
    world = NODES * devices
    # (time, node -> [limit of each local GPU], global rank -> alive / None before start)
    samples: list[tuple[float, list[list[float]], list[bool | None]]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            alive: list[bool | None] = []
            for r in range(world):
                p = out / f"pid{r}"
                text = p.read_text() if p.exists() else ""
                alive.append(_pid_alive(int(text)) if text else None)
            limits = [[s.power_limit_w(i) for i in range(devices)] for s in sims]
            samples.append((time.monotonic(), limits, alive))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "job.py")],
            cwd=tmp_path,
            env=envs[n],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for n in range(NODES)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=180)[0])
        pids = [int(p.read_text()) for p in out.glob("pid*") if p.read_text()]
        deadline = time.monotonic() + 60
        while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)
    finally:
        stop.set()
        watcher.join()
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    assert not any(_pid_alive(p) for p in pids), "a rank outlived its job by 60 s"
    log = "\n".join(f"--- node {n} rc={p.returncode}\n{o[-2500:]}" for n, (p, o) in
                    enumerate(zip(procs, outputs, strict=True)))  # fmt: skip
    return {"sims": sims, "envs": envs, "samples": samples, "log": log}


def check_every_node_restored(result: dict, devices: int, mode: str, rank: int) -> None:
    sims, samples = result["sims"], result["samples"]
    where = f"devices/node={devices} mode={mode} rank={rank}\n{result['log']}"
    node, local = divmod(rank, devices)
    for n in range(NODES):  # every GPU of every node was capped by the job
        for i in range(devices):
            assert any(s[1][n][i] < DEFAULT_W for s in samples), f"node {n} GPU {i}; {where}"
    lone_kill = mode == "sigkill" and devices == 1
    if mode == "sigkill":
        died = next((s for s in samples if s[2][rank] is False), None)
        assert died is not None, where
        peers_alive = [r for r in range(node * devices, (node + 1) * devices) if r != rank]
        if any(died[2][r] for r in peers_alive):
            # a process of the dead rank's node lives: it restores the GPU within 10 s
            after = [s for s in samples if s[0] >= died[0]]
            back = next((s[0] for s in after if s[1][node][local] == DEFAULT_W), None)
            assert back is not None and back - died[0] < 10.0, where
    for n in range(NODES):
        if lone_kill and n == node:
            # nothing of that node is left to act: the next run (restore-limits) does it
            assert sims[n].power_limit_w(0) < DEFAULT_W, f"who restored it? {where}"
            cli = subprocess.run(
                [sys.executable, "-m", "lightning_sustain", "restore-limits"],
                env=result["envs"][n],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert cli.returncode == 0, cli.stdout + cli.stderr
            assert "which no longer runs" in cli.stdout, cli.stdout
        limits = [sims[n].power_limit_w(i) for i in range(devices)]
        assert limits == [DEFAULT_W] * devices, f"node {n} limits {limits}; {where}"
        journal = Path(result["envs"][n]["LIGHTNING_SUSTAIN_LIMIT_JOURNAL"])
        text = journal.read_text() if journal.exists() else "{}"
        assert not json.loads(text).get("gpus"), f"node {n} journal left: {text}; {where}"


def test_random_fault_on_a_random_node_restores_every_node(simulated_nvml, tmp_path):
    rng = random.Random()
    devices, mode = rng.choice([1, 2]), rng.choice(["sigkill", "exception"])
    rank, step = rng.randrange(NODES * devices), rng.randrange(2, 6)
    result = run_multinode_job(simulated_nvml, tmp_path, devices, mode, rank, step)
    check_every_node_restored(result, devices, mode, rank)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sigkill", "exception"])
@pytest.mark.parametrize(("devices", "rank"), [(d, r) for d in (1, 2) for r in range(NODES * d)])
def test_every_fault_on_every_node_restores_every_node(
    simulated_nvml, tmp_path, devices, mode, rank
):
    step = random.Random(f"{devices}-{mode}-{rank}").randrange(2, 6)
    result = run_multinode_job(simulated_nvml, tmp_path, devices, mode, rank, step)
    check_every_node_restored(result, devices, mode, rank)
