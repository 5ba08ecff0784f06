"""EnergyMonitor on the simulated GPU: provenance, accuracy, faults, attribution."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_sustain import EnergyMonitor
from lightning_sustain.energy.attribution import StepAttribution
from lightning_sustain.report.trace import read_summary
from lightning_sustain.testing import SimulatedDeviceSpec
from tests.helpers import TinyClassifier, loader


class Truth(pl.Callback):
    def __init__(self, sim):
        self.sim = sim

    def on_fit_start(self, trainer, pl_module):
        self.start = self.sim.ground_truth_energy_j(0)

    def on_fit_end(self, trainer, pl_module):
        self.end = self.sim.ground_truth_energy_j(0)


def run(tmp_path, sim, monitor, busy_s=0.01, n=320, **kw):
    truth = Truth(sim)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[monitor, truth], logger=False, enable_progress_bar=False,
        enable_checkpointing=False, default_root_dir=tmp_path, log_every_n_steps=5, **kw,
    )  # fmt: skip
    trainer.fit(TinyClassifier(sim=sim, busy_s=busy_s), loader(n=n))
    return truth


def test_simulated_gpu_counter_total_matches_ground_truth(tmp_path: Path, simulated_nvml) -> None:
    # The two ends of a run are each uncertain by up to one counter update; with a 20 ms
    # counter and a ~0.8 s run that is about 1 %.
    sim = simulated_nvml(1, counter_period_s=0.02)
    # report=False: building the report happens inside on_fit_end, after the monitor's fit
    # interval closes and before Truth's, and would add idle energy to the ground truth only
    monitor = EnergyMonitor(cpu="none", dirpath=str(tmp_path), report=False)
    truth = run(tmp_path, sim, monitor, busy_s=0.02, n=960)
    summary = read_summary(tmp_path / "energy_summary.json")
    assert summary["provenance"] == "counter (simulated)"
    assert summary["simulated"] is True
    assert summary["devices"][0]["name"].startswith("Simulated")
    measured = summary["totals"]["energy_j"]
    assert measured == pytest.approx(truth.end - truth.start, rel=0.03)
    rows = list(csv.DictReader((tmp_path / "energy_trace.csv").open()))
    assert len(rows) == 30 and all(r["provenance"] == "counter (simulated)" for r in rows)
    assert "energy_j:gpu0" in rows[0]


def test_pre_volta_gpu_is_integrated_and_cpu_estimate_added(tmp_path: Path, simulated_nvml) -> None:
    sim = simulated_nvml([SimulatedDeviceSpec(architecture="pascal")], counter_period_s=0.02)
    monitor = EnergyMonitor(cpu="estimate", dirpath=str(tmp_path))
    run(tmp_path, sim, monitor, n=128)
    summary = read_summary(tmp_path / "energy_summary.json")
    assert summary["provenance"] == "estimated+integrated (simulated)"
    kinds = {d["kind"]: d["provenance"] for d in summary["devices"]}
    assert kinds == {"gpu": "integrated (simulated)", "cpu": "estimated"}


def test_gpu_lost_mid_run_training_continues(tmp_path: Path, simulated_nvml, caplog) -> None:
    sim = simulated_nvml(1, counter_period_s=0.02)

    class LoseGpu(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 4:
                sim.set_fault(0, "gpu_lost")

    monitor = EnergyMonitor(cpu="estimate", dirpath=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        trainer = pl.Trainer(
            max_epochs=1, callbacks=[monitor, LoseGpu()], logger=False, enable_progress_bar=False,
            enable_checkpointing=False, default_root_dir=tmp_path, log_every_n_steps=2,
        )  # fmt: skip
        trainer.fit(TinyClassifier(sim=sim, busy_s=0.01), loader(n=320))
    sim.set_fault(0, None)
    assert trainer.global_step == 10, "training finished despite the lost GPU"
    summary = read_summary(tmp_path / "energy_summary.json")
    assert summary["incomplete"] is True
    assert any("lost" in v for v in summary["failures"].values())
    assert sum("stopped" in r.message for r in caplog.records) == 1


def test_no_nvml_means_cpu_only_and_says_so(tmp_path: Path, monkeypatch) -> None:
    # no simulator installed in this test: gpus="auto" on CPU measures no GPU
    monitor = EnergyMonitor(nvml_devices="auto", cpu="estimate", dirpath=str(tmp_path))
    trainer = pl.Trainer(
        max_steps=3, callbacks=[monitor], logger=False, enable_progress_bar=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(TinyClassifier(), loader(n=96))
    summary = read_summary(tmp_path / "energy_summary.json")
    assert [d["kind"] for d in summary["devices"]] == ["cpu"]


def test_attribution_recovers_linear_step_model() -> None:
    # steps of varying length: energy = 5 J per step + 70 W x duration
    import numpy as np

    rng = np.random.default_rng(0)
    durations = rng.uniform(0.02, 0.2, size=400)
    ends = np.cumsum(durations)
    starts = ends - durations
    step_energy = 5.0 + 70.0 * durations
    cumulative = np.concatenate([[0.0], np.cumsum(step_energy)])
    bounds_t = np.concatenate([[0.0], ends])
    ticks = np.arange(0.0, ends[-1], 0.1)  # a counter updating every 100 ms
    # cumulative energy at the ticks, assuming uniform power within each step
    tick_energy = np.interp(ticks, bounds_t, cumulative)
    model = StepAttribution()
    model.update(list(zip(starts, ends, strict=True)), list(ticks), list(tick_energy))
    assert model.fixed_j == pytest.approx(5.0, rel=0.05)
    assert model.power_w == pytest.approx(70.0, rel=0.05)
    split = model.split(float(step_energy[:10].sum()), list(durations[:10]))
    assert split == pytest.approx(list(step_energy[:10]), rel=0.02)
    assert sum(split) == pytest.approx(step_energy[:10].sum())


def test_attribution_without_fit_is_proportional_to_duration() -> None:
    assert StepAttribution().split(10.0, [1.0, 3.0]) == [2.5, 7.5]
