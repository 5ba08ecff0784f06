"""Old argument names (Trainer's removed ``gpus=``, ``output_dir=``) keep working, with a
DeprecationWarning that names the new one, on every callback and the strategy."""

from __future__ import annotations

import warnings

import pytest

from lightning_sustain import (
    CarbonAwareController,
    EnergyBudget,
    EnergyMonitor,
    PowerBudget,
    PowerLimitOptimizer,
    SustainDDPStrategy,
)

CASES = [
    (EnergyMonitor, {}, "gpus", "nvml_devices", "none", "nvml_devices"),
    (EnergyMonitor, {}, "output_dir", "dirpath", "/tmp/x", "dirpath"),
    (EnergyBudget, {"max_kwh": 1.0}, "gpus", "nvml_devices", "none", "gpus"),
    (PowerBudget, {"watts": 100}, "gpus", "nvml_devices", "none", "gpus"),
    (PowerLimitOptimizer, {}, "gpus", "nvml_devices", "none", "gpus"),
    (CarbonAwareController, {"intensity_file": None}, "gpus", "nvml_devices", "none", "gpus"),
    (SustainDDPStrategy, {}, "output_dir", "dirpath", "/tmp/x", "output_dir"),
]


@pytest.mark.parametrize(("cls", "base", "old", "new", "value", "attr"), CASES)
def test_old_name_warns_and_still_works(cls, base, old, new, value, attr) -> None:
    with pytest.warns(DeprecationWarning, match=f"{old}=.*{new}="):
        obj = cls(**base, **{old: value})
    assert getattr(obj, attr) == value
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        obj = cls(**base, **{new: value})  # the new name: no warning
    assert getattr(obj, attr) == value
