"""Fabric(strategy="sustain_ddp"): real Fabric, 2 gloo processes, the simulated NVML device."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lightning.fabric import Fabric

from lightning_sustain.strategies import FabricSustainDDPStrategy
from lightning_sustain.testing import SimulatedDeviceSpec
from tests.test_ddp_strategy import LimitWatcher

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from lightning.fabric import Fabric

    import lightning_sustain  # registers "sustain_ddp" for Fabric
    from lightning_sustain.testing import SimulatedNVML

    CFG = json.loads(open(os.environ["FABRIC_TEST_CONFIG"]).read())
    OUT = CFG["out"]


    def main():
        strategy = CFG["strategy"]
        if isinstance(strategy, dict):
            from lightning_sustain.strategies import FabricSustainDDPStrategy

            strategy = FabricSustainDDPStrategy(**strategy)
        fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
        fabric.launch()
        sim = SimulatedNVML.attach()
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = fabric.setup(model, optimizer)
        rank, local = fabric.global_rank, fabric.local_rank
        start = sim.ground_truth_sample(local)
        logged = []
        try:
            for step in range(CFG["steps"]):
                if rank == CFG.get("fail_rank", -1) and step == CFG.get("fail_step", -1):
                    raise RuntimeError("injected failure on rank %d" % rank)
                if rank == CFG.get("kill_rank", -1) and step == CFG.get("kill_step", -1):
                    os.kill(os.getpid(), signal.SIGKILL)
                x = torch.randn(4, 8)
                loss = torch.nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
                sim.busy(local, CFG["busy_s"])
                fabric.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                metrics = fabric.strategy.metrics
                if metrics and (not logged or logged[-1] != metrics):
                    logged.append(metrics)
        except Exception as exc:
            fabric.strategy.on_exception(exc)
            limit_w = sim.power_limit_w(local)
            record = {"rank": rank, "failed": True, "limits_after_failure": limit_w}
            with open(os.path.join(OUT, "rank%d.json" % rank), "w") as f:
                json.dump(record, f)
            raise
        end = sim.ground_truth_sample(local)
        summary = fabric.strategy.finish()
        record = {
            "rank": rank,
            "strategy": type(fabric.strategy).__name__,
            "timed": fabric.strategy.accounting.clock is not None,
            "energy_j": end[1] - start[1],
            "history": fabric.strategy.cluster_history,
            "logged": logged,
            "summary_total": summary["total"]["energy_j"],
        }
        with open(os.path.join(OUT, "rank%d.json" % rank), "w") as f:
            json.dump(record, f)


    if __name__ == "__main__":
        main()
    """
)


def run_fabric(
    tmp_path: Path, config: dict, timeout_s: float = 180.0
) -> subprocess.CompletedProcess:
    """Run the Fabric script with 2 ranks (Fabric's own subprocess launcher)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(dict(config, out=str(out))))
    script = tmp_path / "train_fabric.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    for key in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)
    env["FABRIC_TEST_CONFIG"] = str(config_path)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["LIGHTNING_SUSTAIN_LIMIT_JOURNAL"] = str(tmp_path / "journal.json")
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"Fabric run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture
def hetero_sim(simulated_nvml):
    """A fast and a slow simulated GPU (speeds 1.0 and 0.5), 20 ms counters."""
    return simulated_nvml(
        [SimulatedDeviceSpec(speed=1.0), SimulatedDeviceSpec(speed=0.5)], counter_period_s=0.02
    )


def test_fabric_resolves_sustain_ddp_to_the_fabric_strategy():
    import lightning_sustain  # noqa: F401  (registration)

    fabric = Fabric(accelerator="cpu", devices=2, strategy="sustain_ddp")
    assert isinstance(fabric.strategy, FabricSustainDDPStrategy)
    with pytest.raises(ValueError, match="needs measure_wait=True"):
        FabricSustainDDPStrategy(job_power_budget_w=500, measure_wait=False)
    with pytest.raises(ValueError, match="comm_hook='fp8' is not known"):
        FabricSustainDDPStrategy(comm_hook="fp8")


@pytest.mark.slow
def test_fabric_two_ranks_per_rank_accounting_and_summary(tmp_path, hetero_sim):
    steps = 12
    proc = run_fabric(
        tmp_path,
        {"strategy": "sustain_ddp", "steps": steps, "busy_s": 0.03},
    )  # fmt: skip
    _check_ok(proc)
    out = tmp_path / "out"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["strategy"] == "FabricSustainDDPStrategy" and r["timed"] for r in ranks)
    summary = json.loads((tmp_path / "ddp_summary.json").read_text())  # dirpath: the cwd
    rows = summary["ranks"]
    assert summary["world_size"] == 2 and [r["global_rank"] for r in rows] == [0, 1]
    ids = [[d["device_id"] for d in r["devices"]] for r in rows]
    assert ids == [[f"gpu:{hetero_sim.uuid(0)}"], [f"gpu:{hetero_sim.uuid(1)}"]]
    for row, truth in zip(rows, ranks, strict=True):
        # each rank measures its own device, between set-up and finish()
        assert row["energy_j"] == pytest.approx(truth["energy_j"], rel=0.15)
        assert row["steps"] == steps  # one step per optimizer step
    assert summary["total"]["energy_j"] == pytest.approx(sum(r["energy_j"] for r in rows))
    assert ranks[0]["summary_total"] == ranks[1]["summary_total"] == summary["total"]["energy_j"]
    # the slow device is on the critical path; the fast one waits for it
    assert rows[0]["wait_fraction"] > rows[1]["wait_fraction"] + 0.15
    # gathers at log intervals only (Fabric default log_every_n_steps=50 > 12 steps here:
    # nothing before finish), then the final window: the same view on every rank
    assert ranks[0]["history"] == ranks[1]["history"]
    assert [h["step"] for h in ranks[0]["history"]] == [steps]


@pytest.mark.slow
def test_fabric_power_shifting_stays_in_budget_and_restores(tmp_path, hetero_sim):
    budget_w = 600.0
    with LimitWatcher(hetero_sim) as watcher:
        proc = run_fabric(
            tmp_path,
            {"strategy": {"job_power_budget_w": budget_w, "shift_every_n_steps": 3,
                          "log_every_n_steps": 3},
             "steps": 15, "busy_s": 0.03},
        )  # fmt: skip
    _check_ok(proc)
    summary = json.loads((tmp_path / "ddp_summary.json").read_text())
    assert summary["power_shifting"]["enabled"] is True
    assert summary["power_shifting"]["job_budget_w"] == budget_w
    assert summary["power_shifting"]["rounds"] >= 3
    limits = [r["final_power_limit_w"] for r in summary["ranks"]]
    assert sum(limits) <= budget_w + 1e-6
    assert limits[0] < limits[1], "the waiting (fast) rank gives power to the slow one"
    # seen from outside: from the first sample within the budget (the caps going on one
    # rank after the other) to the last (restoration at the end), never above it
    sums = [a + b for a, b in watcher.samples]
    within = [i for i, total in enumerate(sums) if total <= budget_w + 1e-6]
    assert within, "the limits never came within the budget"
    assert max(sums[within[0] : within[-1] + 1]) <= budget_w + 1e-6
    assert min(a for a, _ in watcher.samples) < 400.0, "a limit was in force during the run"
    # metrics reached the script at log intervals (for fabric.log_dict)
    logged = json.loads((tmp_path / "out" / "rank0.json").read_text())["logged"]
    assert logged and all("ddp/power_limit_w_rank0" in m for m in logged)
    assert hetero_sim.power_limit_w(0) == hetero_sim.power_limit_w(1) == 400.0
    assert not (tmp_path / "journal.json").exists(), "no journal entry outlives the job's limits"


@pytest.mark.slow
def test_fabric_rank_failure_restores_limits_and_writes_what_is_known(tmp_path, hetero_sim):
    fail_rank = random.choice([0, 1])
    fail_step = random.randint(5, 10)
    proc = run_fabric(
        tmp_path,
        {"strategy": {"job_power_budget_w": 600.0, "shift_every_n_steps": 2,
                      "log_every_n_steps": 2},
         "steps": 14, "busy_s": 0.02, "fail_rank": fail_rank, "fail_step": fail_step},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "injected failure" in proc.stderr
    record = json.loads((tmp_path / "out" / f"rank{fail_rank}.json").read_text())
    assert record["limits_after_failure"] == 400.0, "the failing rank restored its own limit"
    assert hetero_sim.power_limit_w(0) == hetero_sim.power_limit_w(1) == 400.0
    assert not (tmp_path / "journal.json").exists()
    summary = json.loads((tmp_path / "ddp_summary.json").read_text())
    assert summary["complete"] is False and summary["status"] == "failed"
    assert summary["error"] == "RuntimeError"
    rows = {r["global_rank"]: r for r in summary["ranks"]}
    assert rows[fail_rank]["final"] is True and rows[fail_rank]["energy_j"] > 0
    known = set(rows) | set(summary["missing_ranks"])
    assert known == {0, 1}


@pytest.mark.slow
def test_fabric_sigkilled_rank_leaves_no_gpu_capped(tmp_path, hetero_sim):
    kill_rank = random.choice([0, 1])
    kill_step = random.randint(5, 10)
    proc = run_fabric(
        tmp_path,
        {"strategy": {"job_power_budget_w": 600.0, "shift_every_n_steps": 2,
                      "log_every_n_steps": 2},
         "steps": 60, "busy_s": 0.02, "kill_rank": kill_rank, "kill_step": kill_step},
    )  # fmt: skip
    assert proc.returncode != 0
    # when rank 0 (the launching process) dies, rank 1 may still be ending: the surviving
    # rank releases the dead rank's cap within 10 s (issue 11), whoever died
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and not (
        hetero_sim.power_limit_w(0) == hetero_sim.power_limit_w(1) == 400.0
        and not (tmp_path / "journal.json").exists()
    ):
        time.sleep(0.05)
    assert hetero_sim.power_limit_w(0) == hetero_sim.power_limit_w(1) == 400.0, (
        kill_rank,
        kill_step,
        proc.stderr[-3000:],
    )
    assert not (tmp_path / "journal.json").exists()
