"""Numbers in settings: numpy and torch scalars accepted wherever a number is, NaN/inf refused."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from lightning_sustain.budget.shifting import PowerShiftingPolicy
from lightning_sustain.budget.throttle import SoftwareThrottle
from lightning_sustain.callbacks.energy_budget import EnergyBudget
from lightning_sustain.callbacks.power_budget import PowerBudget
from lightning_sustain.callbacks.power_limit_optimizer import PowerLimitOptimizer
from lightning_sustain.strategies.sustain_ddp import SustainDDPStrategy

SCALARS = [
    lambda v: v,
    np.float64,
    np.float32,
    lambda v: np.int64(round(v)),
    lambda v: torch.tensor(v),
    lambda v: torch.tensor(v, dtype=torch.float32),
    lambda v: np.array(v),
]
BAD = [math.nan, math.inf, -math.inf, np.float64("nan"), torch.tensor(math.inf), np.inf]

# (factory, the setting's name, a valid value, the attribute that holds it)
SETTINGS = [
    (lambda v: PowerBudget(watts=v), "watts", 250.0, "watts"),
    (lambda v: PowerBudget(watts=100, window_s=v), "window_s", 10.0, "window_s"),
    (lambda v: EnergyBudget(max_kwh=v), "max_kwh", 2.0, "max_kwh"),
    (lambda v: EnergyBudget(max_kwh=1, pue=v), "pue", 2.0, "pue"),
    (lambda v: PowerLimitOptimizer(max_slowdown=v), "max_slowdown", 1.0, "max_slowdown"),
    (lambda v: PowerLimitOptimizer(limits_w=[300, v]), "limits_w[1]", 250.0, None),
    (
        lambda v: SustainDDPStrategy(job_power_budget_w=v),
        "job_power_budget_w",
        500.0,
        "job_power_budget_w",
    ),
    (lambda v: SustainDDPStrategy(target_slack=v), "target_slack", 0.0, "target_slack"),
    (lambda v: SoftwareThrottle(target_power_w=v), "target_power_w", 200.0, None),
    (lambda v: PowerShiftingPolicy(target_slack=v), "target_slack", 0.0, "target_slack"),
]


@pytest.mark.parametrize("wrap", SCALARS)
@pytest.mark.parametrize(("factory", "name", "value", "attr"), SETTINGS)
def test_numpy_and_torch_scalars_are_numbers(factory, name, value, attr, wrap):
    obj = factory(wrap(value))
    if attr is not None:
        held = getattr(obj, attr)
        assert type(held) is float and held == pytest.approx(value, rel=1e-6)


@pytest.mark.parametrize("bad", BAD, ids=repr)
@pytest.mark.parametrize(("factory", "name", "value", "attr"), SETTINGS)
def test_nan_and_inf_are_refused_naming_the_setting(factory, name, value, attr, bad):
    with pytest.raises(ValueError, match=re.escape(name)):
        factory(bad)


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda v: SustainDDPStrategy(shift_every_n_steps=v), "shift_every_n_steps"),
        (lambda v: EnergyBudget(max_kwh=1, check_every_n_steps=v), "check_every_n_steps"),
        (lambda v: EnergyBudget(max_kwh=1, forecast_after_steps=v), "forecast_after_steps"),
        (lambda v: PowerLimitOptimizer(steps_per_limit=v), "steps_per_limit"),
    ],
)
def test_integer_settings_take_numpy_and_torch_integers(factory, name):
    for wrap in (int, np.int64, np.int32, torch.tensor):
        factory(wrap(3))
    for bad in (True, 2.5, np.float64("nan"), "3"):
        with pytest.raises(ValueError, match=name):
            factory(bad)


def test_a_list_of_limits_is_not_a_string():
    with pytest.raises(ValueError, match="limits_w"):
        PowerLimitOptimizer(limits_w="250")
    assert PowerLimitOptimizer(limits_w=np.array([250.0, 300.0])).limits_w == [250.0, 300.0]
