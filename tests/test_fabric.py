"""Fabric front end: Fabric(callbacks=[FabricEnergyMonitor()]) and fabric.call(...)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric

from lightning_sustain import FabricEnergyMonitor
from lightning_sustain.report.trace import read_summary
from tests.frontends import BOUNDARY_J, REPO, run_driven, truth_events, truth_j


def _loop(fabric, model, optimizer, sim, steps, accumulate=1, busy_s=0.01):
    for step in range(steps):
        x = torch.randn(16, 8)
        loss = model(x).pow(2).mean()
        fabric.backward(loss)
        if (step + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
        sim.busy(0, busy_s)
        fabric.call("on_train_batch_end", samples=16, tokens=16 * 8, step=step)


def test_fabric_callbacks_measure_fit_and_predict(tmp_path: Path, simulated_nvml) -> None:
    sim = simulated_nvml(1, counter_period_s=0.02)
    monitor = FabricEnergyMonitor(str(tmp_path / "run"), log_every_n_steps=4, cpu="none",
                                  report=False)  # fmt: skip
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[monitor])
    model, optimizer = fabric.setup(torch.nn.Linear(8, 1), torch.optim.SGD(
        torch.nn.Linear(8, 1).parameters(), lr=0.1))  # fmt: skip
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))

    fabric.call("on_train_start")
    t0 = sim.ground_truth_energy_j(0)
    _loop(fabric, model, optimizer, sim, steps=12, accumulate=3)
    t1 = sim.ground_truth_energy_j(0)
    fabric.call("on_train_end")
    fabric.call("on_predict_start")
    p0 = sim.ground_truth_energy_j(0)
    for _ in range(5):
        sim.busy(0, 0.01)
        fabric.call("on_predict_batch_end", samples=4, tokens=40)
    p1 = sim.ground_truth_energy_j(0)
    fabric.call("on_predict_end")
    monitor.close()

    summary = read_summary(tmp_path / "run" / "energy_summary.json")
    totals = summary["totals"]
    assert summary["provenance"] == "counter (simulated)"
    assert totals["steps"] == 4, "optimizer steps counted through Fabric's own hook"
    assert totals["batches"] == 12 and totals["tokens"] == 12 * 128
    assert totals["fit_energy_j"] == pytest.approx(t1 - t0, rel=0.05)
    # a 0.05 s stage: its two boundaries dominate the error
    assert totals["predict_energy_j"] == pytest.approx(p1 - p0, abs=2 * BOUNDARY_J)
    assert totals["predict_tokens"] == 200
    assert totals["predict_energy_per_token_j"] == pytest.approx(totals["predict_energy_j"] / 200)
    assert totals["sci_per_token_g"] > 0
    assert [s["stage"] for s in summary["stages"]] == ["fit", "predict"]


def test_fabric_save_and_load_keep_counting(tmp_path: Path, simulated_nvml) -> None:
    sim = simulated_nvml(1, counter_period_s=0.02)
    first = FabricEnergyMonitor(str(tmp_path / "a"), cpu="none", report=False)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[first])
    model = fabric.setup_module(torch.nn.Linear(8, 1))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    fabric.call("on_train_start")
    _loop(fabric, model, optimizer, sim, steps=6)
    fabric.save(tmp_path / "ckpt.pt", {"model": model, "energy": first})
    fabric.call("on_train_end")
    first.close()
    at_end = first.summary["totals"]

    second = FabricEnergyMonitor(str(tmp_path / "b"), cpu="none", report=False)
    fabric2 = Fabric(accelerator="cpu", devices=1, callbacks=[second])
    model2 = fabric2.setup_module(torch.nn.Linear(8, 1))
    optimizer2 = fabric2.setup_optimizers(torch.optim.SGD(model2.parameters(), lr=0.1))
    fabric2.load(tmp_path / "ckpt.pt", {"model": model2, "energy": second})
    fabric2.call("on_train_start")
    _loop(fabric2, model2, optimizer2, sim, steps=4)
    fabric2.call("on_train_end")
    second.close()
    totals = read_summary(tmp_path / "b" / "energy_summary.json")["totals"]
    assert totals["steps"] == 10 and totals["batches"] == 10
    # the resumed totals hold the first run's energy up to the save plus the second run's
    own = second.run.local_record()["phases"]["fit"]
    prior_fit = torch.load(tmp_path / "ckpt.pt", weights_only=False)["energy"]["phases"]["fit"]
    assert totals["fit_energy_j"] == pytest.approx(
        sum(own["device_energy_j"].values()) + sum(prior_fit["device_energy_j"].values())
    )
    assert 0 < sum(prior_fit["device_energy_j"].values()) <= at_end["fit_energy_j"]


@pytest.mark.slow
def test_fabric_ddp_two_ranks_per_rank_accounting(tmp_path: Path, simulated_nvml) -> None:
    simulated_nvml(2, counter_period_s=0.02)
    out = tmp_path / "run"
    proc = run_driven(
        REPO / "examples" / "fabric_gpt.py",
        ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--steps", "12",
         "--batch-size", "2", "--block", "16", "--generate-batches", "3", "--new-tokens", "4",
         "--log-every", "4", "--cpu", "none", "--dirpath", str(out),
         "--simulate-gpu-load", "0.02"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(out / "energy_summary.json")
    events = truth_events(tmp_path)
    totals = summary["totals"]
    assert summary["world_size"] == 2
    assert totals["steps"] == 12 and totals["batches"] == 12
    assert totals["tokens"] == 2 * 12 * 2 * 16
    assert totals["predict_tokens"] == 2 * 3 * 2 * 4
    for rank in (0, 1):
        expected = truth_j(events, "fit", rank) + truth_j(events, "predict", rank)
        assert summary["ranks"][rank]["energy_j"] == pytest.approx(
            expected, rel=0.05, abs=4 * BOUNDARY_J
        )
    assert totals["energy_j"] == pytest.approx(
        truth_j(events, "fit") + truth_j(events, "predict"), rel=0.05
    )
