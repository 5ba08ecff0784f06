"""EnergyMonitor's per-rank accounting under every DDP-family strategy (docs/strategies.md).

Two real ranks on CPU (gloo), each driving its own simulated GPU through the real pynvml.
The same script trains under ``ddp`` (popen launcher), ``ddp_spawn`` (multiprocessing
launcher), ``sustain_ddp`` (our subclass) and, on CPU where torch allows it, ``fsdp``.
Only the public fields of ``energy_summary.json`` are asserted (world size, the cluster
total, which devices were measured), so the test holds for any implementation behind
the callback.

Lightning's popen launcher re-runs ``sys.argv`` for the other rank (under pytest it would
re-run pytest), so each run is a script in ``tmp_path`` started with ``subprocess.run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_sustain.testing import SimulatedDeviceSpec

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    '''
    import json, os, sys
    import torch
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_sustain
    from lightning_sustain import EnergyMonitor
    from lightning_sustain.testing import SimulatedNVML

    CFG = json.loads(open(os.environ["STRATEGY_TEST_CONFIG"]).read())
    OUT = CFG["out"]


    class BusyModel(pl.LightningModule):
        """Keeps the simulated GPU of its local rank busy for busy_s per step."""

        def __init__(self, busy_s: float):
            super().__init__()
            self.layer = torch.nn.Linear(8, 2)
            self.busy_s = busy_s
            self._sim = None

        def training_step(self, batch, batch_idx):
            if self._sim is None:
                self._sim = SimulatedNVML.attach()
            self._sim.busy(self.trainer.local_rank, self.busy_s)
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(4096, 8, generator=g)
            return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4)


    class TrainWindow(pl.Callback):
        """Exact joules of this rank's simulated device between train start and end."""

        def on_train_start(self, trainer, pl_module):
            self.sim = SimulatedNVML.attach()
            self.start = self.sim.ground_truth_sample(trainer.local_rank)[1]

        def on_train_end(self, trainer, pl_module):
            end = self.sim.ground_truth_sample(trainer.local_rank)[1]
            record = {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "train_energy_j": end - self.start,
            }
            with open(os.path.join(OUT, "rank%d.json" % trainer.global_rank), "w") as f:
                json.dump(record, f)


    def main():
        monitor = EnergyMonitor(cpu="none", trace=False, progress_bar=False)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=CFG["strategy"],
            max_steps=CFG["max_steps"],
            log_every_n_steps=4,
            logger=pl.loggers.CSVLogger(OUT, name="logs", version=0),
            callbacks=[monitor, TrainWindow()],
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=OUT,
        )
        sim = SimulatedNVML.attach()
        before = [sim.ground_truth_sample(i)[1] for i in (0, 1)]
        trainer.fit(BusyModel(CFG["busy_s"]))
        if trainer.global_rank == 0:
            after = [sim.ground_truth_sample(i)[1] for i in (0, 1)]
            record = {
                # both devices, from before fit() to after it, in the launching process
                "outer_energy_j": sum(a - b for a, b in zip(after, before)),
                "main_monitor_summary": monitor.summary is not None,
            }
            with open(os.path.join(OUT, "launcher.json"), "w") as f:
                json.dump(record, f)


    if __name__ == "__main__":
        main()
    '''
)


def run_two_ranks(tmp_path: Path, strategy: str, *, max_steps: int = 12, busy_s: float = 0.03):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    config = {"out": str(out), "strategy": strategy, "max_steps": max_steps, "busy_s": busy_s}
    (tmp_path / "config.json").write_text(json.dumps(config))
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env["STRATEGY_TEST_CONFIG"] = str(tmp_path / "config.json")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["LIGHTNING_SUSTAIN_LIMIT_JOURNAL"] = str(tmp_path / "journal.json")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, (
        f"{strategy} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return out


@pytest.fixture
def two_gpus(simulated_nvml):
    """Two simulated GPUs; the ranks attach to them through the environment."""
    return simulated_nvml(
        [SimulatedDeviceSpec(speed=1.0), SimulatedDeviceSpec(speed=1.0)], counter_period_s=0.02
    )


STRATEGIES = {
    "ddp": "DDPStrategy",
    "ddp_spawn": "DDPStrategy",
    "sustain_ddp": "SustainDDPStrategy",
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_per_rank_accounting_is_the_same_under_every_ddp_strategy(tmp_path, two_gpus, strategy):
    out = run_two_ranks(tmp_path, strategy)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["strategy"] for r in ranks] == [STRATEGIES[strategy]] * 2
    assert all(r["world_size"] == 2 for r in ranks)
    launcher = json.loads((out / "launcher.json").read_text())
    summary = json.loads((out / "logs" / "version_0" / "energy_summary.json").read_text())

    assert summary["world_size"] == 2
    assert summary["simulated"] is True
    # each rank measured exactly its own device, each device once (no double counting)
    measured = sorted(d["device_id"] for d in summary["devices"])
    assert measured == sorted(f"gpu:{two_gpus.uuid(i)}" for i in (0, 1))
    # the cluster total is both devices' energy: at least what they drew while training
    # (on train start/end of every rank), at most what they drew around the whole fit()
    total_j = summary["totals"]["energy_j"]
    train_truth_j = sum(r["train_energy_j"] for r in ranks)
    assert train_truth_j * 0.97 <= total_j <= launcher["outer_energy_j"] * 1.03, (
        train_truth_j,
        total_j,
        launcher["outer_energy_j"],
    )
    # the train phase is the sum of both ranks' train energy, not one rank's, not doubled
    assert summary["totals"]["train_energy_j"] == pytest.approx(train_truth_j, rel=0.1)
    # under ddp_spawn the ranks are children: the launching process's callback object never
    # ran, so its summary is empty there; the file above is what the user reads. Under the
    # popen launchers the launching process is rank 0 and holds the summary.
    assert launcher["main_monitor_summary"] is (strategy != "ddp_spawn")
