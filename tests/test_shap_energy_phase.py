"""The explanation's energy is its own line (``explain``), not "other": ShapSummary with
EnergyMonitor in a real Trainer on the simulated GPU with a constant power profile."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_sustain import EnergyMonitor
from lightning_sustain.callbacks.shap_summary import ShapSummary
from lightning_sustain.testing.profiles import PowerProfile
from tests.test_shap_callback import Net, TabularDM

POWER_W = 200.0


@pytest.mark.parametrize("order", ["monitor_first", "shap_first"])
def test_shap_energy_is_its_own_phase(simulated_nvml, tmp_path, order):
    sim = simulated_nvml(1, counter_period_s=0.02)
    sim.set_power_profile(0, PowerProfile.constant(POWER_W))
    monitor = EnergyMonitor(cpu="none", dirpath=str(tmp_path / "energy"))
    shap = ShapSummary()
    callbacks = [monitor, shap] if order == "monitor_first" else [shap, monitor]
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(Net(), datamodule=TabularDM())

    window = shap.window
    assert window is not None
    truth_j = sim.profile_energy_j(
        0, window["start_monotonic_s"], window["end_monotonic_s"]
    )
    totals = json.loads((Path(tmp_path) / "energy" / "energy_summary.json").read_text())["totals"]
    explain_j = totals["explain_energy_j"]
    # constant power: the phase's energy is power x its duration; the phase opens a moment
    # after the window's start and closes a moment before its end (counter 20 ms)
    assert explain_j == pytest.approx(truth_j, rel=0.05, abs=POWER_W * 0.02)
    assert explain_j > 0
    parts = (
        totals["train_energy_j"] + totals["validation_energy_j"] + explain_j
        + totals["other_energy_j"]
    )  # fmt: skip
    assert parts == pytest.approx(totals["fit_energy_j"], rel=1e-6, abs=1e-6)
    report = (Path(tmp_path) / "energy" / "report.md").read_text()
    assert "Explanation (SHAP)" in report
