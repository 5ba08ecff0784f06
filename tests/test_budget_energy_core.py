"""The energy budget through the measuring core: Fabric and plain PyTorch loops.

``EnergyRun.attach_budget`` / ``EnergyRun.should_stop`` drive the same Lightning-free
``EnergyBudgetCore`` the Trainer callback uses; real Fabric, real ``EnergyRun``, the
simulated NVML device through the real ``pynvml``. Ground truth is the simulated device's
exact energy from the stage's start to the end (the stop checkpoint included).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric

from lightning_sustain import FabricEnergyMonitor
from lightning_sustain.budget.energy_budget import BudgetExceeded, EnergyBudgetCore
from lightning_sustain.run import EnergyRun
from lightning_sustain.testing import SimulatedDeviceSpec

BUSY_S = 0.01


@pytest.fixture
def sim(simulated_nvml):
    return simulated_nvml([SimulatedDeviceSpec(idle_power_w=5.0)], counter_period_s=0.05)


def test_fabric_loop_stops_before_the_budget_with_a_checkpoint(tmp_path: Path, sim) -> None:
    monitor = FabricEnergyMonitor(str(tmp_path / "energy"), log_every_n_steps=5, cpu="none",
                                  report=False)  # fmt: skip
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[monitor])
    model = fabric.setup_module(torch.nn.Linear(8, 1))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    ckpt = tmp_path / "budget.ckpt"

    def save() -> str:
        fabric.save(ckpt, {"model": model, "optimizer": optimizer, "energy": monitor})
        return str(ckpt)

    budget_j = 60.0
    core = monitor.run.attach_budget(budget_j, save_checkpoint=save)
    fabric.call("on_train_start")
    start_j = sim.ground_truth_energy_j(0)
    steps = 0
    for step in range(200):
        loss = model(torch.randn(16, 8)).pow(2).mean()
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        sim.busy(0, BUSY_S)
        fabric.call("on_train_batch_end", samples=16, step=step)
        steps += 1
        if monitor.run.should_stop():
            break
    end_j = sim.ground_truth_energy_j(0)  # after the stop checkpoint
    fabric.call("on_train_end")
    monitor.close()

    assert 2 < steps < 200, "stopped by the budget, after some steps"
    assert end_j - start_j <= budget_j, "never above the budget, the checkpoint included"
    assert core.exceeded and core.checkpoint_path == str(ckpt) and ckpt.exists()
    assert "energy" in torch.load(ckpt, weights_only=False)
    # "spent" is the measured energy of the same curve (the tail at the last check estimated)
    step_j = sim.specs[0].busy_power_w * BUSY_S
    assert core.spent_j == pytest.approx(end_j - start_j, abs=2 * step_j)


def test_plain_loop_raise_mode_raises_before_the_budget(tmp_path: Path, sim) -> None:
    run = EnergyRun(tmp_path / "energy", cpu="none", report=False, log_every_n_steps=10)
    saved = []
    budget_j = 45.0
    run.attach_budget(budget_j, action="raise", save_checkpoint=lambda: saved.append(1) or "mem")
    start_j = None
    with pytest.raises(BudgetExceeded) as info:
        with run:  # stage "fit"
            start_j = sim.ground_truth_energy_j(0)
            for _ in range(200):
                sim.busy(0, BUSY_S)
                run.step(samples=8)
                run.should_stop()
    end_j = sim.ground_truth_energy_j(0)
    run.close()
    assert start_j is not None and end_j - start_j <= budget_j
    assert saved == [1] and info.value.checkpoint_path == "mem"
    assert info.value.budget_j == budget_j and info.value.spent_j <= budget_j
    # the run object itself recorded the interrupted fit
    assert run.summary is not None and run.summary["stages"][0]["status"].startswith("interrupted")


def test_core_counts_across_a_resume_and_refuses_bad_settings(tmp_path: Path, sim) -> None:
    run = EnergyRun(None, cpu="none")
    core = run.attach_budget(1e6, action="warn")
    with run:
        for _ in range(6):
            sim.busy(0, BUSY_S)
            run.step()
            assert not run.should_stop()
    state = core.state_dict()
    run.close()
    assert state["spent_j"] > 0 and state["budget_j"] == 1e6
    again = EnergyBudgetCore(1e6)
    again.load_state_dict(state)
    assert again.prior_spent_j == state["spent_j"] and again.spent_j == state["spent_j"]
    with pytest.raises(ValueError, match="budget_j"):
        EnergyBudgetCore(float("nan"))
    with pytest.raises(ValueError, match="action"):
        EnergyBudgetCore(10.0, action="explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not in a known format"):
        again.load_state_dict({"version": 99})
