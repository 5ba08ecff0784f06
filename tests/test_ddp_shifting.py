"""Power-shifting policy (pure) and SustainDDPStrategy's bad-input handling (one process)."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sustain.budget.shifting import (
    PowerShiftingPolicy,
    RankPowerState,
    split_budget,
)
from lightning_sustain.strategies.sustain_ddp import SustainDDPStrategy
from lightning_sustain.testing import SimulatedDeviceSpec
from tests.helpers import TinyClassifier, loader


def state(rank, wait, limit, low=100.0, high=400.0, power=None, adjustable=True):
    return RankPowerState(rank, wait, limit, low, high, power, adjustable)


# -- policy -------------------------------------------------------------------------------
def test_waiting_rank_gives_power_to_critical_rank():
    policy = PowerShiftingPolicy(target_slack=0.05)
    decision = policy.rebalance([state(0, 0.40, 300.0), state(1, 0.02, 300.0)], budget_w=600.0)
    fast, slow = decision.limits_w
    assert decision.critical_rank == 1
    assert fast < 300.0
    assert slow > 300.0
    assert fast + slow <= 600.0 + 1e-9
    assert decision.changed


def test_decrease_is_bounded_and_conservative():
    policy = PowerShiftingPolicy(target_slack=0.05, max_decrease=0.5)
    # 40% waiting: under t ~ 1/P the rank could run at 0.6/0.95 of its power
    decision = policy.rebalance([state(0, 0.40, 400.0), state(1, 0.0, 400.0)], budget_w=800.0)
    assert decision.limits_w[0] == pytest.approx(400.0 * 0.6 / 0.95)
    # a rank waiting 90% is lowered by at most max_decrease in one round
    decision = policy.rebalance([state(0, 0.90, 400.0), state(1, 0.0, 400.0)], budget_w=800.0)
    assert decision.limits_w[0] == pytest.approx(200.0)


def test_measured_power_below_limit_is_the_base():
    policy = PowerShiftingPolicy(target_slack=0.05)
    # the device draws 150 W on average while working 60% of the time: busy power <= 250 W
    decision = policy.rebalance(
        [state(0, 0.40, 400.0, power=150.0), state(1, 0.0, 400.0)], budget_w=800.0
    )
    assert decision.limits_w[0] == pytest.approx(max(250.0 * 0.6 / 0.95, 200.0))


def test_rank_that_became_too_slow_gets_power_back():
    policy = PowerShiftingPolicy(target_slack=0.05, raise_fraction=0.1)
    # rank 0 was lowered and is now the critical one; rank 1 waits only 1% more
    decision = policy.rebalance([state(0, 0.00, 150.0), state(1, 0.01, 400.0)], budget_w=800.0)
    assert decision.critical_rank == 0
    assert decision.limits_w[0] == 400.0  # the critical rank gets its maximum
    assert decision.limits_w[1] == 400.0


def test_ranks_within_margin_keep_their_limits():
    policy = PowerShiftingPolicy(target_slack=0.05)
    decision = policy.rebalance([state(0, 0.04, 250.0), state(1, 0.0, 400.0)], budget_w=800.0)
    assert decision.limits_w == (250.0, 400.0)
    assert not decision.changed


def test_budget_is_taken_from_waiting_ranks_before_critical_rank():
    policy = PowerShiftingPolicy(target_slack=0.05)
    states = [state(0, 0.30, 200.0), state(1, 0.30, 200.0), state(2, 0.0, 200.0)]
    decision = policy.rebalance(states, budget_w=600.0)
    assert decision.limits_w[2] == 400.0
    assert sum(decision.limits_w) <= 600.0 + 1e-9
    assert all(v >= 100.0 for v in decision.limits_w)


def test_infeasible_budget_is_a_clear_error():
    policy = PowerShiftingPolicy()
    with pytest.raises(ValueError, match="below the 200 W"):
        policy.rebalance([state(0, 0.1, 300.0), state(1, 0.0, 300.0)], budget_w=150.0)
    with pytest.raises(ValueError, match="below"):
        split_budget(150.0, [(100.0, 400.0), (100.0, 400.0)], [None, None])


def test_invalid_state_names_rank_and_field():
    with pytest.raises(ValueError, match="rank 3: wait_fraction"):
        PowerShiftingPolicy().rebalance([state(3, 1.5, 300.0)], budget_w=400.0)
    with pytest.raises(ValueError, match="target_slack"):
        PowerShiftingPolicy(target_slack=0.9)


def test_split_budget_is_proportional_to_maximum_for_different_ranges():
    limits = split_budget(600.0, [(100.0, 400.0), (150.0, 700.0)], [None, None])
    assert sum(limits) == pytest.approx(600.0)
    assert limits[1] / limits[0] == pytest.approx(700.0 / 400.0)
    # a fixed (unchangeable) rank counts as it is
    limits = split_budget(600.0, [(100.0, 400.0), (100.0, 400.0)], [None, 350.0])
    assert limits == [250.0, 350.0]


ranks_strategy = st.lists(
    st.tuples(
        st.floats(0.0, 1.0),  # wait fraction
        st.floats(50.0, 300.0),  # min
        st.floats(0.0, 500.0),  # extra range
        st.floats(0.0, 1.0),  # where the current limit sits in the range
        st.booleans(),  # adjustable
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(ranks=ranks_strategy, slack=st.floats(0.0, 1.0))
def test_limits_stay_in_range_and_never_exceed_budget(ranks, slack):
    states = []
    for i, (wait, low, extra, pos, adjustable) in enumerate(ranks):
        high = low + extra
        states.append(state(i, wait, low + pos * extra, low, high, adjustable=adjustable))
    floor = sum(s.min_limit_w if s.adjustable else s.limit_w for s in states)
    budget = floor + slack * sum(s.max_limit_w - s.min_limit_w for s in states)
    policy = PowerShiftingPolicy()
    for limits in (
        policy.initial_limits(states, budget),
        policy.rebalance(states, budget).limits_w,
    ):
        assert sum(limits) <= budget + 1e-6
        for s, v in zip(states, limits, strict=True):
            if s.adjustable:
                assert s.min_limit_w - 1e-9 <= v <= s.max_limit_w + 1e-9
            else:
                assert v == s.limit_w


# -- strategy: bad input --------------------------------------------------------------------
class Model(TinyClassifier):
    def train_dataloader(self):
        return loader(n=64, batch_size=8)


@pytest.fixture
def one_rank(monkeypatch, tmp_path):
    """Run a 1-process DDP fit in this process; clean up the process group afterwards."""
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LIGHTNING_SUSTAIN_LIMIT_JOURNAL", str(tmp_path / "journal.json"))

    def fit(strategy, model=None, steps=6):
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            strategy=strategy,
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(model or Model())
        return trainer

    fit.tmp_path = tmp_path
    yield fit
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_unknown_comm_hook_is_rejected():
    with pytest.raises(
        ValueError, match="comm_hook='fp8' is not known.*'fp16', 'bf16', 'powersgd'"
    ):
        SustainDDPStrategy(comm_hook="fp8")
    with pytest.raises(ValueError, match="exclusive"):
        SustainDDPStrategy(comm_hook="fp16", ddp_comm_hook=lambda state, bucket: None)
    with pytest.raises(ValueError, match="job_power_budget_w"):
        SustainDDPStrategy(job_power_budget_w=-5)
    with pytest.raises(ValueError, match="shift_every_n_steps"):
        SustainDDPStrategy(shift_every_n_steps=0)
    with pytest.raises(ValueError, match="needs measure_wait=True"):
        SustainDDPStrategy(shift_power=True, measure_wait=False)


def test_comm_hook_on_cpu_is_a_clear_error(one_rank):
    with pytest.raises(ValueError, match="comm_hook='bf16'.*CUDA.*cpu"):
        one_rank(SustainDDPStrategy(comm_hook="bf16"))


def test_shifting_without_budget_warns_and_uses_current_limits(one_rank, simulated_nvml, caplog):
    sim = simulated_nvml([SimulatedDeviceSpec(default_limit_w=350.0)], counter_period_s=0.02)
    strategy = SustainDDPStrategy(shift_power=True, shift_every_n_steps=2, log_every_n_steps=2)
    with caplog.at_level(logging.WARNING, logger="lightning_sustain"):
        one_rank(strategy, Model(sim=sim, busy_s=0.01))
    assert "without a job power budget" in caplog.text
    summary = strategy.ddp_summary
    assert summary["power_shifting"]["job_budget_w"] == 350.0
    assert summary["ranks"][0]["limit_mode"] == "hardware"
    assert summary["power_shifting"]["rounds"] >= 2
    # a single rank is its own critical path: it gets its maximum within the budget
    assert summary["ranks"][0]["final_power_limit_w"] == 350.0
    assert sim.power_limit_w(0) == 350.0  # and the original limit is back


def test_rank_that_cannot_set_limits_is_throttled_in_software(one_rank, simulated_nvml, caplog):
    sim = simulated_nvml([SimulatedDeviceSpec(set_limit_permitted=False)], counter_period_s=0.02)
    strategy = SustainDDPStrategy(job_power_budget_w=200.0, shift_every_n_steps=2)
    with caplog.at_level(logging.WARNING, logger="lightning_sustain"):
        one_rank(strategy, Model(sim=sim, busy_s=0.02), steps=10)
    assert "throttled in software" in caplog.text
    row = strategy.ddp_summary["ranks"][0]
    assert row["limit_mode"] == "software"
    assert row["final_power_limit_w"] == 200.0
    assert sim.limit_set_count(0) == 0  # the hardware limit was never changed
    assert sim.power_limit_w(0) == 400.0


def test_summary_lists_the_rank_and_total_for_one_process(one_rank, simulated_nvml, tmp_path):
    sim = simulated_nvml(1, counter_period_s=0.02)
    one_rank(SustainDDPStrategy(log_every_n_steps=2), Model(sim=sim, busy_s=0.01))
    summary = json.loads((tmp_path / "ddp_summary.json").read_text())
    assert summary["world_size"] == 1
    (row,) = summary["ranks"]
    assert row["device"] == "Simulated NVIDIA H100 80GB HBM3"
    assert row["energy_j"] > 0
    assert summary["total"]["energy_j"] == row["energy_j"]
    assert 0.0 <= row["wait_fraction"] < 0.5


def test_job_power_budget_callback_turns_shifting_on_and_owns_the_limits(one_rank, simulated_nvml):
    from lightning_sustain.callbacks.power_budget import PowerBudget

    sim = simulated_nvml(1, counter_period_s=0.02)
    budget = PowerBudget(watts=300.0, per="job")
    strategy = SustainDDPStrategy(shift_every_n_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[budget],
        default_root_dir=one_rank.tmp_path,
    )
    trainer.fit(Model(sim=sim, busy_s=0.01))
    summary = strategy.ddp_summary
    assert summary["power_shifting"]["enabled"] is True
    assert summary["power_shifting"]["job_budget_w"] == 300.0
    assert summary["ranks"][0]["limit_mode"] == "hardware"
    assert summary["ranks"][0]["final_power_limit_w"] == 300.0
    assert strategy.accounting.guard is None  # the callback's guard set and restored the limit
    assert sim.limit_set_count(0) >= 1
    assert sim.power_limit_w(0) == 400.0


def test_device_power_budget_rules_out_shifting(one_rank, simulated_nvml, caplog):
    from lightning_sustain.callbacks.power_budget import PowerBudget

    sim = simulated_nvml(1, counter_period_s=0.02)
    strategy = SustainDDPStrategy(shift_power=True, shift_every_n_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[PowerBudget(watts=250.0, per="device")],
        default_root_dir=one_rank.tmp_path,
    )
    with caplog.at_level(logging.WARNING, logger="lightning_sustain"):
        trainer.fit(Model(sim=sim, busy_s=0.01))
    assert "power shifting is off" in caplog.text
    assert strategy.ddp_summary["power_shifting"]["enabled"] is False
    assert sim.power_limit_w(0) == 400.0
