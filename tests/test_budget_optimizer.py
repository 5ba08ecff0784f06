"""PowerLimitOptimizer: the choice (pure) and the callback on the simulated device."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_sustain.budget.optimizer import LimitProfile, candidate_limits_w, choose_limit
from lightning_sustain.callbacks.power_budget import PowerBudget
from lightning_sustain.callbacks.power_limit_optimizer import PowerLimitOptimizer
from tests.helpers import TinyClassifier, loader


@pytest.fixture(autouse=True)
def _journal(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SUSTAIN_LIMIT_JOURNAL", str(tmp_path / "journal.json"))


PROFILES = [
    LimitProfile(400.0, energy_per_step_j=10.0, time_per_step_s=0.100, steps=5),
    LimitProfile(320.0, energy_per_step_j=9.4, time_per_step_s=0.103, steps=5),
    LimitProfile(280.0, energy_per_step_j=8.6, time_per_step_s=0.108, steps=5),
    LimitProfile(240.0, energy_per_step_j=8.0, time_per_step_s=0.114, steps=5),
]


def test_choose_limit_objectives():
    assert choose_limit(PROFILES, "energy", max_slowdown=0.1).limit_w == 280.0
    assert choose_limit(PROFILES, "energy", max_slowdown=0.2).limit_w == 240.0
    assert choose_limit(PROFILES, "energy", max_slowdown=0.0).limit_w == 400.0
    assert choose_limit(PROFILES, "time").limit_w == 400.0
    # energy x time: 1.0, 0.968, 0.929, 0.912 -> 240 W when allowed
    assert choose_limit(PROFILES, "balanced", max_slowdown=0.2).limit_w == 240.0
    with pytest.raises(ValueError, match="objective"):
        choose_limit(PROFILES, "speed")
    with pytest.raises(ValueError, match="at least one"):
        choose_limit([])


def test_candidate_limits():
    assert candidate_limits_w(400.0, 100.0, 400.0) == [400.0, 360.0, 320.0, 280.0, 240.0]
    assert candidate_limits_w(400.0, 300.0, 350.0) == [350.0, 320.0, 300.0]
    with pytest.raises(ValueError, match="fractions"):
        candidate_limits_w(400.0, 100.0, 400.0, fractions=[0.0])


def _trainer(tmp_path, callbacks, max_steps):
    return pl.Trainer(
        max_steps=max_steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=callbacks,
    )  # fmt: skip


def test_optimizer_profiles_keeps_a_limit_and_restores(simulated_nvml, tmp_path, caplog):
    # Each profiled phase (5 steps of 40 ms busy work) spans 20+ counter periods, so where
    # a phase boundary falls between two counter updates (at most full power x one period
    # plus one sampling interval, ~7 J a boundary) cannot reorder the phases' energies:
    # above idle, a phase at 400 W draws ~56 J, one at 200 W ~31 J.
    sim = simulated_nvml(1, counter_period_s=0.01)
    opt = PowerLimitOptimizer(limits_w=[400.0, 280.0, 200.0], warmup_steps=2, steps_per_limit=5)
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(sim.power_limit_w(0))

    with caplog.at_level(logging.INFO, logger="lightning_sustain"):
        _trainer(tmp_path, [opt, Probe()], max_steps=22).fit(
            TinyClassifier(sim=sim, busy_s=0.04), loader(n=32 * 25)
        )
    assert [p.limit_w for p in opt.profiles] == [400.0, 280.0, 200.0]
    assert [p.steps for p in opt.profiles] == [5, 5, 5]
    assert seen[:2] == [400.0, 400.0]
    assert seen[2:7] == [400.0] * 5 and seen[7:12] == [280.0] * 5 and seen[12:17] == [200.0] * 5
    assert opt.chosen is not None
    assert opt.chosen == choose_limit(opt.profiles, "energy", 0.1)
    assert seen[17:] == [opt.chosen.limit_w] * 5, "the chosen limit stays in force"
    assert sim.power_limit_w(0) == 400.0, "restored at the end of fit"
    # capped busy work draws less power: the energy per step above idle falls with the
    # limit (above idle, so that Lightning's per-step overhead, idle power for a time
    # that varies with the machine's load, does not decide the order)
    idle_w = sim.specs[0].idle_power_w
    above_idle_j = [p.energy_per_step_j - idle_w * p.time_per_step_s for p in opt.profiles]
    assert above_idle_j[2] < above_idle_j[1] < above_idle_j[0], above_idle_j
    assert any("keeping" in r.message for r in caplog.records)


def test_optimizer_without_permission_warns_and_trains(sim, tmp_path, caplog):
    sim.set_limit_permitted(0, False)
    opt = PowerLimitOptimizer(warmup_steps=1, steps_per_limit=1)
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, [opt], max_steps=4)
        trainer.fit(TinyClassifier(), loader())
    assert trainer.global_step == 4 and opt.chosen is None
    assert any("PowerLimitOptimizer disabled" in r.message for r in caplog.records)
    assert sim.power_limit_w(0) == 400.0


def test_optimizer_refuses_a_power_budget_alongside(sim, tmp_path):
    with pytest.raises(MisconfigurationException, match="both set GPU power limits"):
        _trainer(tmp_path, [PowerLimitOptimizer(), PowerBudget(watts=200)], 2).fit(
            TinyClassifier(), loader()
        )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"objective": "cheap"}, "objective"),
        ({"max_slowdown": -0.1}, "max_slowdown"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"steps_per_limit": 0}, "steps_per_limit"),
        ({"limits_w": []}, "limits_w"),
        ({"limits_w": [300.0, -1.0]}, "limits_w"),
    ],
)
def test_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PowerLimitOptimizer(**kwargs)
