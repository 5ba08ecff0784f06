"""EnergyBudget's reserves (issue 11): what is reserved, when, and what is saved on resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_sustain.callbacks.energy_budget import EnergyBudget
from lightning_sustain.testing import SimulatedDeviceSpec
from tests.helpers import TinyClassifier, loader


class BusyValidation(TinyClassifier):
    def validation_step(self, batch, batch_idx):
        self._sim.busy(0, 0.05)  # validation costs energy too
        return super().validation_step(batch, batch_idx)


@pytest.fixture
def sim(simulated_nvml):
    return simulated_nvml([SimulatedDeviceSpec(idle_power_w=5.0)], counter_period_s=0.05)


class SavedAfterValidation(Callback):
    """Right after a validation run, the state a checkpoint would save vs ground truth."""

    def __init__(self, sim, budget):
        self.sim, self.budget, self.pairs = sim, budget, []

    def on_train_start(self, trainer, pl_module):
        self.start_j = self.sim.ground_truth_energy_j(0)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        saved = self.budget.state_dict()["spent_j"]
        self.pairs.append((saved, self.sim.ground_truth_energy_j(0) - self.start_j))


def test_saved_spent_is_measured_energy_right_after_validation(sim, tmp_path):
    budget = EnergyBudget(max_kwh=1.0, cpu="none", action="warn")
    probe = SavedAfterValidation(sim, budget)
    trainer = pl.Trainer(
        max_steps=24, val_check_interval=8, limit_val_batches=3, num_sanity_val_steps=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[probe, budget],
    )  # fmt: skip
    trainer.fit(BusyValidation(sim=sim, busy_s=0.02), loader(512), loader(96))
    assert len(probe.pairs) == 3
    for saved, truth in probe.pairs:
        # measured up to (at most a sampling interval before) the save: never ahead of the
        # truth (no predicted tail or validation estimate), and not far behind it
        assert saved <= truth * 1.01 + 0.5
        assert saved >= truth - 350.0 * 0.05 - 1.0


def _budget_in_trainer(tmp_path, action, **kwargs):
    budget = EnergyBudget(max_kwh=1.0, cpu="none", action=action)
    trainer = pl.Trainer(
        max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[budget],
        num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip
    return budget, trainer


@pytest.mark.parametrize(
    ("action", "val_kwargs", "reserved"),
    [
        ("stop", {"limit_val_batches": 3}, True),  # Lightning validates after a stop
        ("stop", {"limit_val_batches": 0}, False),  # no validation at all
        ("stop", {"limit_val_batches": 3, "check_val_every_n_epoch": 2}, False),  # not now
        ("raise", {"limit_val_batches": 3}, False),  # raising ends the run at once
        ("warn", {"limit_val_batches": 3}, False),
    ],
)
def test_validation_is_reserved_only_when_one_follows_the_stop(
    sim, tmp_path, action, val_kwargs, reserved
):
    budget, trainer = _budget_in_trainer(tmp_path, action, **val_kwargs)
    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            follows = budget._validation_follows(trainer)
            reserve = budget.core.reserve(1, validation_follows=follows)
            seen.append((follows, reserve.validation_j, budget.core.next_step_j()))

    trainer.callbacks.append(Probe())
    trainer.fit(BusyValidation(sim=sim, busy_s=0.01), loader(128), loader(96))
    assert seen
    for follows, validation_j, step_j in seen:
        assert follows is reserved
        if reserved:
            # before a validation was measured: one bounded training step per batch
            assert step_j is not None and validation_j == pytest.approx(3 * step_j)
        else:
            assert validation_j == 0.0


def test_checkpoint_cost_is_measured_and_reserved(sim, tmp_path):
    budget, trainer = _budget_in_trainer(tmp_path, "stop", limit_val_batches=0)
    trainer.fit(TinyClassifier(sim=sim, busy_s=0.02), loader(256))
    core = budget.core
    # the trial write was timed, and the idle probe around it measured the idle power
    assert core._trial_s > 0 and not core._checkpoint_durations  # no real write yet
    assert core.idle_power_w == pytest.approx(5.0, rel=0.05)  # the simulated idle power
    assert core.checkpoint_j() > 0
    if core.power_follows_time is False:  # the simulated device's power follows the work
        assert core.checkpoint_j() == pytest.approx(
            1.5 * core.idle_power_w * (4 * core._trial_s + 0.03)
        )
    warn = EnergyBudget(max_kwh=1.0, action="warn")
    assert warn.core.checkpoint_j() == 0.0
