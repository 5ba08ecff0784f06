"""CarbonAwareController under real 2-process DDP (gloo on CPU, two simulated GPUs).

Ranks must decide at the same steps (a pause is a collective decision) and only rank zero
writes files. The script runs as a subprocess (Lightning's launcher re-runs sys.argv).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset
    from lightning_sustain.callbacks.carbon_aware import CarbonAwareController
    from lightning_sustain.testing import SimulatedNVML

    CFG = json.loads(open(os.environ["CARBON_DDP_CONFIG"]).read())

    class Busy(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 2)
            self._sim = None

        def training_step(self, batch, batch_idx):
            if self._sim is None:
                self._sim = SimulatedNVML.attach()
            self._sim.busy(self.trainer.local_rank, 0.01)
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            x = torch.randn(2048, 8)
            return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4)

    controller = CarbonAwareController(**CFG["controller"])
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=CFG["max_steps"],
        logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=CFG["out"], callbacks=[controller],
    )
    trainer.fit(Busy())
    with open(os.path.join(CFG["out"], "rank%d.json" % trainer.global_rank), "w") as f:
        json.dump({"step": trainer.global_step, "status": controller.status["status"],
                   "decisions": [[d.step, d.action] for d in controller.log.decisions]}, f)
    """
)


def test_two_ranks_pause_together_and_only_rank_zero_writes(simulated_nvml, tmp_path):
    sim = simulated_nvml(2, counter_period_s=0.02)
    now = time.time()
    grid = tmp_path / "grid.csv"
    grid.write_text(
        f"timestamp,g_co2e_per_kwh\n{now - 10:.3f},600\n{now + 3600:.3f},100\n"
        f"{now + 7200:.3f},100\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    config = {
        "out": str(out),
        "max_steps": 40,
        "controller": {
            "mode": "pause",
            "intensity_file": str(grid),
            "pause_above_g_per_kwh": 300,
            "deadline_s": 86400,
            "warmup_steps": 3,
            "decide_every_s": 0.05,
            "dirpath": str(out / "carbon"),
        },
    }
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    (tmp_path / "train.py").write_text(SCRIPT)
    env = dict(os.environ)
    env["CARBON_DDP_CONFIG"] = str(tmp_path / "cfg.json")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["LIGHTNING_SUSTAIN_LIMIT_JOURNAL"] = str(tmp_path / "journal.json")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "train.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] < 40, "both ranks stop at the same step"
    assert ranks[0]["status"] == ranks[1]["status"] == "paused_for_carbon"
    assert [d[0] for d in ranks[0]["decisions"]] == [d[0] for d in ranks[1]["decisions"]]
    status = json.loads((out / "carbon" / "carbon_status.json").read_text())
    assert status["status"] == "paused_for_carbon" and Path(status["checkpoint"]).is_file()
    lines = (out / "carbon" / "carbon_decisions.jsonl").read_text().splitlines()
    assert len(lines) == len(ranks[0]["decisions"]), "one log, written by rank zero"
    assert sim.power_limit_w(0) == sim.power_limit_w(1) == 400.0
