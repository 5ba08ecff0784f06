"""SustainDDPStrategy with real 2-process DDP on CPU (gloo) and two simulated GPUs.

Lightning's popen launcher re-runs ``sys.argv`` for the other ranks (under pytest it would
re-run pytest), so each run is a small script written into ``tmp_path`` and started with
``subprocess.run``. The simulated NVML state is installed by the test process; the script's
ranks inherit its environment and drive their own simulated device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lightning_sustain.testing import SimulatedDeviceSpec

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    '''
    import json, os, sys, time
    import torch
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_sustain
    from lightning_sustain.strategies import register_strategies

    register_strategies()  # idempotent; `import lightning_sustain` does it once wired
    from lightning_sustain.callbacks.energy_monitor import EnergyMonitor
    from lightning_sustain.strategies.sustain_ddp import SustainDDPStrategy
    from lightning_sustain.testing import SimulatedNVML

    CFG = json.loads(open(os.environ["DDP_TEST_CONFIG"]).read())
    OUT = CFG["out"]


    class BusyModel(pl.LightningModule):
        """Keeps the simulated GPU of its local rank busy for busy_s per step."""

        def __init__(self, busy_s: float = 0.02, fail_rank: int = -1, fail_step: int = -1):
            super().__init__()
            self.layer = torch.nn.Linear(8, 2)
            self.busy_s = busy_s
            self.fail_rank = fail_rank
            self.fail_step = fail_step
            self._sim = None

        def training_step(self, batch, batch_idx):
            if self._sim is None:
                self._sim = SimulatedNVML.attach()
            if self.global_rank == self.fail_rank and self.global_step == self.fail_step:
                raise RuntimeError("injected failure on rank %d" % self.global_rank)
            if self.busy_s > 0:
                self._sim.busy(self.trainer.local_rank, self.busy_s)
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(4096, 8, generator=g)
            return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4)


    class GroundTruth(pl.Callback):
        """Exact joules of this rank's simulated device between train start and end."""

        def on_train_start(self, trainer, pl_module):
            self.sim = SimulatedNVML.attach()
            self.start = self.sim.ground_truth_sample(trainer.local_rank)

        def on_train_end(self, trainer, pl_module):
            end = self.sim.ground_truth_sample(trainer.local_rank)
            strategy = trainer.strategy
            record = {
                "rank": trainer.global_rank,
                "energy_j": end[1] - self.start[1],
                "strategy": type(strategy).__name__,
                "start_method": getattr(strategy, "_start_method", None),
                "comm_hook_timed": getattr(getattr(strategy, "accounting", None), "clock", None)
                is not None,
                "history": getattr(strategy, "cluster_history", []),
            }
            path = os.path.join(OUT, "rank%d.json" % trainer.global_rank)
            with open(path, "w") as f:
                json.dump(record, f)


    def main():
        if "cli_args" in CFG:
            from lightning.pytorch.cli import LightningCLI

            LightningCLI(
                BusyModel,
                args=CFG["cli_args"],
                trainer_defaults={"callbacks": [GroundTruth()], "default_root_dir": OUT},
                save_config_kwargs={"overwrite": True},
            )
            return
        strategy = CFG["strategy"]
        if isinstance(strategy, dict):
            strategy = SustainDDPStrategy(**strategy)
        model = BusyModel(
            CFG.get("busy_s", 0.02), CFG.get("fail_rank", -1), CFG.get("fail_step", -1)
        )
        callbacks = [GroundTruth()]
        if CFG.get("monitor", True):
            callbacks.insert(0, EnergyMonitor(cpu="none", trace=False, progress_bar=False))
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_steps=CFG.get("max_steps", 12),
            log_every_n_steps=CFG.get("log_every_n_steps", 4),
            logger=pl.loggers.CSVLogger(OUT, name="logs", version=0),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=OUT,
        )
        trainer.fit(model)


    if __name__ == "__main__":
        main()
    '''
)


def run_ddp(
    tmp_path: Path, config: dict, *, timeout_s: float = 120.0, script: str = SCRIPT
) -> subprocess.CompletedProcess:
    """Write the script and its config into tmp_path and run it (2 DDP ranks)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    config = dict(config, out=str(out))
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    script_path = tmp_path / "train_ddp.py"
    script_path.write_text(script)
    env = dict(os.environ)
    env["DDP_TEST_CONFIG"] = str(config_path)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["LIGHTNING_SUSTAIN_LIMIT_JOURNAL"] = str(tmp_path / "journal.json")
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, str(script_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"DDP run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


class LimitWatcher:
    """Samples the sum of both simulated limits from the test process while a run goes on."""

    def __init__(self, sim, interval_s: float = 0.005) -> None:
        self.sim = sim
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((self.sim.power_limit_w(0), self.sim.power_limit_w(1)))
            time.sleep(self.interval_s)

    def __enter__(self) -> LimitWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def hetero_sim(simulated_nvml):
    """A fast and a slow simulated GPU (speeds 1.0 and 0.5)."""
    return simulated_nvml(
        [SimulatedDeviceSpec(speed=1.0), SimulatedDeviceSpec(speed=0.5)], counter_period_s=0.02
    )


@pytest.mark.slow
def test_registered_name_trains_two_ranks_with_per_rank_accounting(tmp_path, hetero_sim):
    # (sustain_ddp_spawn trains 2 ranks in tests/test_ddp_cli.py, selected by LightningCLI)
    name = "sustain_ddp"
    proc = run_ddp(tmp_path, {"strategy": name, "busy_s": 0.03, "max_steps": 12})
    check_ok(proc)
    out = tmp_path / "out"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["strategy"] == "SustainDDPStrategy" for r in ranks)
    assert all(r["start_method"] == "popen" for r in ranks)
    assert all(r["comm_hook_timed"] for r in ranks)

    summary = json.loads((out / "logs" / "version_0" / "ddp_summary.json").read_text())
    rows = summary["ranks"]
    assert [r["global_rank"] for r in rows] == [0, 1]
    assert [r["local_rank"] for r in rows] == [0, 1]
    assert all(r["node_rank"] == 0 for r in rows)
    # each rank measures exactly its own device
    ids = [[d["device_id"] for d in r["devices"]] for r in rows]
    assert ids == [[f"gpu:{hetero_sim.uuid(0)}"], [f"gpu:{hetero_sim.uuid(1)}"]]
    assert all("Simulated" in r["device"] for r in rows)
    # per-rank energy matches that device's ground truth, not the sum of both
    for row, truth in zip(rows, ranks, strict=True):
        assert row["energy_j"] == pytest.approx(truth["energy_j"], rel=0.15)
        assert row["mean_power_w"] > 0
    total = summary["total"]["energy_j"]
    assert total == pytest.approx(sum(r["energy_j"] for r in rows), rel=1e-9)
    truth_total = sum(r["energy_j"] for r in ranks)
    assert total == pytest.approx(truth_total, rel=0.15)  # not doubled
    # the slow device is on the critical path; the fast one waits for it
    assert rows[0]["wait_fraction"] > rows[1]["wait_fraction"] + 0.15
    assert 0.0 <= rows[1]["wait_fraction"] < 0.2
    assert all(r["steps"] == 12 for r in rows)

    # EnergyMonitor (per-rank devices too) agrees on who measured what
    energy = json.loads((out / "logs" / "version_0" / "energy_summary.json").read_text())
    monitor_ids = sorted(d["device_id"] for d in energy["devices"])
    assert monitor_ids == sorted(i[0] for i in ids)

    # per-rank metrics reached the logger at log intervals (not per step)
    header = (out / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("wait_fraction_rank0", "wait_fraction_rank1", "power_w_rank1", "energy_j_total"):
        assert f"ddp/{key}" in header
    history = ranks[0]["history"]
    # recorded in a callback's on_train_end, before the strategy's final gather: the
    # windows closed after steps 4 and 8 (log_every_n_steps=4), one gather each
    assert [h["step"] for h in history] == [4, 8]
    assert history == ranks[1]["history"]  # every rank holds the same cluster view


@pytest.mark.slow
def test_power_shifting_lowers_fast_rank_within_budget_and_restores(tmp_path, hetero_sim):
    budget_w = 600.0
    strategy = {
        "job_power_budget_w": budget_w,
        "shift_every_n_steps": 3,
        "log_every_n_steps": 3,
        "target_slack": 0.05,
    }
    with LimitWatcher(hetero_sim) as watcher:
        proc = run_ddp(tmp_path, {"strategy": strategy, "busy_s": 0.03, "max_steps": 24})
    check_ok(proc)
    summary = json.loads((tmp_path / "out" / "logs" / "version_0" / "ddp_summary.json").read_text())
    rows = summary["ranks"]
    assert summary["power_shifting"]["enabled"] is True
    assert summary["power_shifting"]["job_budget_w"] == budget_w
    assert all(r["limit_mode"] == "hardware" for r in rows)
    fast, slow = rows[0]["final_power_limit_w"], rows[1]["final_power_limit_w"]
    assert fast < slow
    assert fast < 300.0  # below an even split of the budget
    assert fast + slow <= budget_w + 1e-6
    # seen from outside: once within the budget, the limits never exceeded it
    sums = [a + b for a, b in watcher.samples]
    within = [i for i, s in enumerate(sums) if s <= budget_w + 1e-6]
    assert within, "the limits never came within the budget"
    # from the first sample within the budget to the restoration at the end
    assert max(sums[within[0] : within[-1] + 1]) <= budget_w + 1e-6
    assert min(a for a, _ in watcher.samples) < 300.0
    # hardware limits were really changed, then restored
    assert hetero_sim.limit_set_count(0) >= 3
    assert hetero_sim.power_limit_w(0) == 400.0
    assert hetero_sim.power_limit_w(1) == 400.0
    # a journal entry exists only while a cap is in force: none is left
    journal = tmp_path / "journal.json"
    assert not journal.exists() or not json.loads(journal.read_text())["gpus"]


@pytest.mark.slow
def test_rank_raising_mid_step_other_rank_exits_and_limits_restored(tmp_path, hetero_sim):
    strategy = {"job_power_budget_w": 500.0, "shift_every_n_steps": 2, "log_every_n_steps": 2}
    with LimitWatcher(hetero_sim) as watcher:
        proc = run_ddp(
            tmp_path,
            # EnergyMonitor off: its on_exception gathers across ranks (see the DDP docs)
            {
                "strategy": strategy,
                "busy_s": 0.02,
                "max_steps": 40,
                "fail_rank": 1,
                "fail_step": 9,
                "monitor": False,
            },
            timeout_s=90,
        )
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    # both ranks ran with changed limits before the failure ...
    assert any(a < 400.0 and b < 400.0 for a, b in watcher.samples)
    # ... and both devices are back at their original limits
    assert hetero_sim.power_limit_w(0) == 400.0
    assert hetero_sim.power_limit_w(1) == 400.0
    # the whole job is gone: no rank left hanging in a collective (run() returned)
