"""EnergyBudget's "spent" and EnergyMonitor's fit energy agree, before and after a resume.

Both read the same process-wide sampler curve of the simulated GPU; the budget's last
figure is taken at its last check (a step end, with the unmeasured tail predicted) plus the
stop checkpoint's measured energy; the monitor's fit stage also covers the set-up before
the first step and Lightning's teardown. They agree within one step's energy.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from lightning_sustain import EnergyMonitor
from lightning_sustain.callbacks.energy_budget import EnergyBudget
from lightning_sustain.testing import SimulatedDeviceSpec
from tests.helpers import TinyClassifier, loader

KWH = 3.6e6
BUSY_S = 0.01


@pytest.fixture
def sim(simulated_nvml):
    return simulated_nvml([SimulatedDeviceSpec(idle_power_w=5.0)], counter_period_s=0.05)


def _fit(tmp_path, sim, budget_j, name, ckpt_path=None):
    budget = EnergyBudget(max_kwh=budget_j / KWH, cpu="none", forecast_after_steps=4)
    monitor = EnergyMonitor(
        cpu="none", dirpath=str(tmp_path / name), report=False)
    trainer = pl.Trainer(
        max_steps=200,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[monitor, budget],
    )
    trainer.fit(TinyClassifier(sim=sim, busy_s=BUSY_S), loader(n=32 * 200), ckpt_path=ckpt_path)
    return trainer, budget, monitor


def test_budget_spent_matches_the_monitor_across_a_resume(sim, tmp_path):
    # one busy step of the simulated H100 at full power, the tolerance's unit
    step_j = sim.specs[0].busy_power_w * BUSY_S
    trainer, first, monitor = _fit(tmp_path, sim, 40.0, "first")
    assert first.exceeded and 0 < trainer.global_step < 200
    fit_j = monitor.summary["totals"]["fit_energy_j"]
    # the budget's figure at its decision includes a predicted tail of the last step (the
    # counter lags); the monitor's includes the set-up before the first step and teardown
    assert abs(fit_j - first.spent_j) <= max(step_j, 0.05 * fit_j)

    trainer, larger, monitor2 = _fit(tmp_path, sim, 80.0, "second", ckpt_path=first.checkpoint_path)
    # after the resume both carry the first run's energy: the headline totals cover the
    # whole training so far, and the budget's prior equals what it saved
    at_save_j = first.spent_j - first.checkpoint_energy_j  # spent_j counts the checkpoint
    assert larger.prior_spent_j == pytest.approx(at_save_j, rel=0.25)
    fit2_j = monitor2.summary["totals"]["fit_energy_j"]
    assert fit2_j > fit_j
    assert abs(fit2_j - larger.spent_j) <= max(2 * step_j, 0.05 * fit2_j)
