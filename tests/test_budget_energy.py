"""EnergyBudget with a real Trainer and the simulated NVML device."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_sustain.callbacks.energy_budget import BudgetExceeded, EnergyBudget
from lightning_sustain.testing import SimulatedDeviceSpec
from tests.helpers import TinyClassifier, loader

KWH = 3.6e6


@pytest.fixture
def sim(simulated_nvml):
    """One simulated GPU that idles at 5 W: a step's energy is its busy period (3.5 J),
    not the framework overhead between steps, which varies with the machine's load."""
    return simulated_nvml([SimulatedDeviceSpec(idle_power_w=5.0)], counter_period_s=0.05)


class Truth(Callback):
    """Ground-truth joules of simulated GPU 0 from training start until the stop.

    Listed before the EnergyBudget, so its start is the earlier one. The stop is when the
    budget's checkpoint is taken (or training ends); writing the checkpoint file is the
    cost of stopping and is not a training step.
    """

    def __init__(self, sim):
        self.sim = sim
        self.start_j = self.end_j = None

    def on_train_start(self, trainer, pl_module):
        self.start_j = self.sim.ground_truth_energy_j(0)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.end_j is None:
            self.end_j = self.sim.ground_truth_energy_j(0)

    def on_train_end(self, trainer, pl_module):
        if self.end_j is None:
            self.end_j = self.sim.ground_truth_energy_j(0)

    @property
    def spent_j(self):
        return self.end_j - self.start_j


def _trainer(tmp_path, callbacks, max_steps=60, **kwargs):
    return pl.Trainer(
        max_steps=max_steps,
        logger=kwargs.pop("logger", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


def _model(sim):
    return TinyClassifier(sim=sim, busy_s=0.01)


def test_stop_checkpoints_and_stays_within_budget(sim, tmp_path):
    truth = Truth(sim)
    budget = EnergyBudget(max_kwh=60.0 / KWH, cpu="none", forecast_after_steps=4)
    trainer = _trainer(tmp_path, [truth, budget])
    trainer.fit(_model(sim), loader(n=32 * 60))
    assert 0 < trainer.global_step < 60
    assert truth.spent_j <= 60.0
    # how close it gets is measured by benchmarks/bench_budgets.py; here: not absurdly early
    assert truth.spent_j > 0.6 * 60.0, "stopped far too early"
    assert budget.exceeded
    ckpt = Path(budget.checkpoint_path)
    assert ckpt.exists() and ckpt.parent == tmp_path / "checkpoints"
    state = torch.load(ckpt, weights_only=False)["callbacks"][budget.state_key]
    assert state["spent_j"] == pytest.approx(truth.spent_j, rel=0.1)
    assert budget.forecast is not None and budget.forecast.exceeds_budget


def test_resume_keeps_counting(sim, tmp_path):
    first = EnergyBudget(max_kwh=40.0 / KWH, cpu="none")
    trainer = _trainer(tmp_path, [first])
    trainer.fit(_model(sim), loader(n=32 * 60))
    stopped_at = trainer.global_step
    ckpt = first.checkpoint_path
    assert ckpt is not None

    # the same budget: what is left is at most the first run's safety margin (its decision
    # used a predicted tail and a conservative next-step bound; the checkpoint holds the
    # measured energy), so the resumed run stops within a few steps and never crosses it
    truth0 = Truth(sim)
    again = EnergyBudget(max_kwh=40.0 / KWH, cpu="none")
    trainer = _trainer(tmp_path, [truth0, again])
    trainer.fit(_model(sim), loader(n=32 * 60), ckpt_path=ckpt)
    assert stopped_at <= trainer.global_step <= stopped_at + 8
    assert again.prior_spent_j + truth0.spent_j <= 40.0 * 1.02
    # the checkpoint holds the energy at the moment it was written; first.spent_j is the
    # last check's figure, taken a step or a validation earlier or later (timing-dependent)
    # (first.spent_j also counts the stop checkpoint, written after the saved state)
    at_save_j = first.spent_j - first.checkpoint_energy_j
    assert again.prior_spent_j == pytest.approx(at_save_j, rel=0.25)

    # a larger budget continues from the energy already spent
    truth = Truth(sim)
    larger = EnergyBudget(max_kwh=80.0 / KWH, cpu="none")
    trainer = _trainer(tmp_path, [truth, larger])
    trainer.fit(_model(sim), loader(n=32 * 60), ckpt_path=ckpt)
    assert trainer.global_step > stopped_at
    assert larger.prior_spent_j == pytest.approx(again.prior_spent_j)
    assert larger.prior_spent_j + truth.spent_j <= 80.0
    assert larger.exceeded and larger.spent_j > 60.0


def test_raise_saves_a_checkpoint_first(sim, tmp_path):
    budget = EnergyBudget(
        max_kwh=30.0 / KWH, action="raise", cpu="none", checkpoint_dir=str(tmp_path / "ck")
    )
    with pytest.raises(BudgetExceeded, match="max_kwh") as info:
        _trainer(tmp_path, [budget]).fit(_model(sim), loader(n=32 * 60))
    assert info.value.checkpoint_path is not None
    assert Path(info.value.checkpoint_path).parent == tmp_path / "ck"
    assert Path(info.value.checkpoint_path).exists()
    assert info.value.budget_j == pytest.approx(30.0)
    # The stop decision comes before the budget is crossed; measured energy at a decision is
    # uncertain by ~0.3 step, and benchmarks/bench_budgets.py saw 1 run in 24 end 0.08 step
    # over. Allow that margin here so the test checks the behaviour, not the noise.
    assert info.value.spent_j <= info.value.budget_j * 1.02


def test_warn_keeps_training(sim, tmp_path, caplog):
    budget = EnergyBudget(max_kwh=20.0 / KWH, action="warn", cpu="none", forecast_after_steps=3)
    trainer = _trainer(tmp_path, [budget], max_steps=30)
    with caplog.at_level(logging.WARNING, logger="lightning_sustain"):
        trainer.fit(_model(sim), loader(n=32 * 60))
    assert trainer.global_step == 30
    messages = [r.message for r in caplog.records]
    assert sum("training continues past it" in m for m in messages) == 1
    forecast = [m for m in messages if "exceeds the budget" in m]
    assert len(forecast) == 1 and "planned steps fit" in forecast[0]


def test_forecast_is_close_on_a_steady_workload(sim, tmp_path):
    truth = Truth(sim)
    budget = EnergyBudget(max_kwh=1.0, cpu="none", forecast_after_steps=10)
    trainer = _trainer(tmp_path, [truth, budget], max_steps=40, log_every_n_steps=1000)
    trainer.fit(TinyClassifier(sim=sim, busy_s=0.03), loader(n=32 * 60))
    assert trainer.global_step == 40 and not budget.exceeded
    forecast = budget.forecast
    assert forecast.planned_steps == 40 and 10 <= forecast.steps_done < 20
    # the tolerance covers sleep jitter of the loaded CI machine in the simulated busy time;
    # benchmarks/bench_budgets.py measures the forecast error properly
    assert forecast.total_j == pytest.approx(truth.spent_j, rel=0.2)
    assert not forecast.exceeds_budget and forecast.steps_fit > 40


def test_co2e_budget_uses_the_intensity(sim, tmp_path):
    budget = EnergyBudget(max_co2e_g=0.005, carbon_intensity_g_per_kwh=500.0, pue=1.2, cpu="none")
    assert budget.budget_j == pytest.approx(0.005 / 500.0 / 1.2 * KWH)
    trainer = _trainer(tmp_path, [budget])
    trainer.fit(_model(sim), loader(n=32 * 60))
    assert trainer.global_step < 60 and budget.spent_j <= budget.budget_j


def test_budget_smaller_than_one_step_says_so(sim, tmp_path, caplog):
    budget = EnergyBudget(max_kwh=0.5 / KWH, cpu="none")
    trainer = _trainer(tmp_path, [budget])
    with caplog.at_level(logging.WARNING, logger="lightning_sustain"):
        trainer.fit(_model(sim), loader(n=32 * 60))
    # the first step's energy is unknown before it runs: it is measured, then the run stops
    # and says why
    assert trainer.global_step == 1
    assert any("smaller than the energy" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({}, "exactly one"),
        ({"max_kwh": 1.0, "max_co2e_g": 5.0}, "exactly one"),
        ({"max_kwh": 0}, "max_kwh"),
        ({"max_kwh": -1.0}, "max_kwh"),
        ({"max_co2e_g": float("nan")}, "max_co2e_g"),
        ({"max_kwh": 1.0, "action": "explode"}, "action"),
        ({"max_kwh": 1.0, "forecast_after_steps": 1}, "forecast_after_steps"),
        ({"max_kwh": 1.0, "check_every_n_steps": 0}, "check_every_n_steps"),
        ({"max_kwh": 1.0, "pue": 0.5}, "pue"),
        ({"max_co2e_g": 5.0, "carbon_intensity_g_per_kwh": 0.0}, "carbon intensity of 0"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EnergyBudget(**kwargs)


def test_unknown_checkpoint_state_is_a_clear_error():
    with pytest.raises(ValueError, match="EnergyBudget state"):
        EnergyBudget(max_kwh=1.0).load_state_dict({"version": 99})
