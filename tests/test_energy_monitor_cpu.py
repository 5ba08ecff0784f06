"""EnergyMonitor in a real Trainer on CPU (CPU-time estimate; no GPU simulator)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_sustain import EnergyMonitor
from lightning_sustain.report.trace import SUMMARY_SCHEMA, read_summary
from tests.helpers import TinyClassifier, loader


def fit(tmp_path: Path, monitor: EnergyMonitor, logger=False, max_epochs=1, **kwargs):
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=[monitor],
        logger=logger,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        log_every_n_steps=2,
        **kwargs,
    )
    trainer.fit(TinyClassifier(), loader(), loader(n=64))
    return trainer


def test_summary_and_trace_with_csv_logger(tmp_path: Path) -> None:
    monitor = EnergyMonitor(nvml_devices="none", cpu="estimate", country="FR")
    trainer = fit(tmp_path, monitor, logger=CSVLogger(tmp_path), max_epochs=2)
    log_dir = Path(trainer.log_dir)
    summary = read_summary(log_dir / "energy_summary.json")
    assert summary["schema"] == SUMMARY_SCHEMA
    assert summary["provenance"] == "estimated"
    assert summary["simulated"] is False
    totals = summary["totals"]
    assert totals["steps"] == 16 and totals["samples"] == 512
    assert totals["energy_j"] > 0
    assert totals["energy_j"] >= totals["train_energy_j"] + totals["validation_energy_j"] - 1e-9
    assert totals["validation_energy_j"] > 0
    assert totals["energy_per_sample_j"] == pytest.approx(totals["train_energy_j"] / 512)
    assert summary["carbon"]["region"] == "FR"
    assert totals["co2e_g"] == pytest.approx(totals["energy_kwh"] * 56, rel=1e-9)

    rows = list(csv.DictReader((log_dir / "energy_trace.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(16))
    assert all(r["provenance"] == "estimated" for r in rows)
    trace_sum = sum(float(r["energy_j"]) for r in rows)  # rows are rounded to 1e-6 J
    assert trace_sum == pytest.approx(totals["train_energy_j"], abs=1e-4)
    # contiguous step spans (no validation in between within an epoch)
    assert float(rows[1]["start_s"]) == pytest.approx(float(rows[0]["end_s"]))

    metrics = list(csv.DictReader((log_dir / "metrics.csv").open()))
    logged = [m for m in metrics if m.get("energy/train_energy_kwh")]
    assert logged, "energy metrics reach the CSV logger"
    kwh = [float(m["energy/train_energy_kwh"]) for m in logged]
    assert kwh == sorted(kwh), "cumulative energy never decreases"


def test_tensorboard_logger_receives_energy_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = EnergyMonitor(nvml_devices="none", cpu="estimate")
    trainer = fit(tmp_path, monitor, logger=TensorBoardLogger(tmp_path))
    acc = EventAccumulator(trainer.log_dir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "energy/train_energy_kwh" in tags and "energy/power_w" in tags


def test_progress_bar_shows_power_and_energy(tmp_path: Path) -> None:
    monitor = EnergyMonitor(nvml_devices="none", cpu="estimate")
    trainer = fit(tmp_path, monitor)
    # the progress bar shows logged keys under the same names (one key scheme)
    assert {"energy/power_w", "energy/energy_kwh"} <= set(trainer.progress_bar_metrics)
    assert trainer.progress_bar_metrics["energy/energy_kwh"] > 0


def test_validate_and_test_accounted_separately(tmp_path: Path) -> None:
    monitor = EnergyMonitor(nvml_devices="none", cpu="estimate", dirpath=str(tmp_path / "t"))
    trainer = pl.Trainer(
        callbacks=[monitor], logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.test(TinyClassifier(), loader(n=128))
    summary = json.loads((tmp_path / "t" / "energy_summary.json").read_text())
    assert summary["totals"]["test_energy_j"] > 0
    assert summary["totals"]["train_energy_j"] == 0
    assert summary["phases"]["test"]["steps"] == 4


def test_resume_keeps_counting(tmp_path: Path) -> None:
    first = EnergyMonitor(nvml_devices="none", cpu="estimate", dirpath=str(tmp_path / "a"))
    trainer = fit(tmp_path, first, max_epochs=1, enable_checkpointing=True)
    ckpt = trainer.checkpoint_callback.best_model_path
    spent = read_summary(tmp_path / "a" / "energy_summary.json")["totals"]
    second = EnergyMonitor(nvml_devices="none", cpu="estimate", dirpath=str(tmp_path / "b"))
    trainer2 = pl.Trainer(
        max_epochs=2, callbacks=[second], logger=False, enable_progress_bar=False,
        default_root_dir=tmp_path, log_every_n_steps=2,
    )  # fmt: skip
    trainer2.fit(TinyClassifier(), loader(), loader(n=64), ckpt_path=ckpt)
    resumed = read_summary(tmp_path / "b" / "energy_summary.json")
    assert resumed["resumed"] is True
    assert resumed["totals"]["steps"] == 16  # 8 before the checkpoint + 8 after
    assert resumed["totals"]["train_energy_j"] > spent["train_energy_j"]


def test_corrupt_checkpoint_state_is_a_clear_error() -> None:
    monitor = EnergyMonitor(nvml_devices="none", cpu="none")
    with pytest.raises(ValueError, match="not in a known format"):
        monitor.load_state_dict({"something": 1})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"pue": 0.5}, "pue"),
        ({"pue": "x"}, "pue"),
        ({"watts_per_core": -3}, "watts_per_core"),
        ({"interval_s": 0}, "interval_s"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"nvml_devices": "all"}, "nvml_devices"),
        ({"nvml_devices": [-1]}, "nvml_devices"),
        ({"cpu": "gpu"}, "cpu"),
        ({"country": "Atlantis"}, "country"),
        ({"carbon_intensity_g_per_kwh": -1}, "carbon_intensity_g_per_kwh"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        EnergyMonitor(**kwargs)


def test_no_device_warns_and_still_trains(tmp_path: Path, caplog) -> None:
    monitor = EnergyMonitor(nvml_devices="none", cpu="none", dirpath=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        fit(tmp_path, monitor)
    assert any("measures no device" in r.message for r in caplog.records)
    summary = read_summary(tmp_path / "energy_summary.json")
    assert summary["totals"]["energy_j"] == 0 and summary["provenance"] == "none"


def test_exception_in_training_still_writes_summary(tmp_path: Path) -> None:
    class Boom(TinyClassifier):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    monitor = EnergyMonitor(nvml_devices="none", cpu="estimate", dirpath=str(tmp_path))
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[monitor], logger=False, enable_progress_bar=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Boom(), loader())
    summary = read_summary(tmp_path / "energy_summary.json")
    assert summary["status"].startswith("interrupted")
    assert summary["totals"]["steps"] == 3
    assert monitor.meter is None, "meter closed after the failure"


def test_metric_history_for_energy_to_target(tmp_path: Path) -> None:
    monitor = EnergyMonitor(nvml_devices="none", cpu="estimate", dirpath=str(tmp_path))
    fit(tmp_path, monitor, max_epochs=3)
    history = read_summary(tmp_path / "energy_summary.json")["metric_history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert all("val_loss" in h["metrics"] for h in history)
    energies = [h["energy_j"] for h in history]
    assert energies == sorted(energies) and energies[0] > 0
    assert history[-1]["elapsed_s"] > history[0]["elapsed_s"]


def test_old_argument_names_warn_and_still_work(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="nvml_devices"):
        monitor = EnergyMonitor(gpus="none", cpu="estimate", output_dir=str(tmp_path / "old"))
    assert monitor.nvml_devices == "none" and monitor.dirpath == str(tmp_path / "old")
    fit(tmp_path, monitor)
    assert (tmp_path / "old" / "energy_summary.json").exists()


def test_default_dirpath_is_the_trainer_log_dir(tmp_path: Path) -> None:
    monitor = EnergyMonitor(nvml_devices="none", cpu="estimate", report=False)
    trainer = fit(tmp_path, monitor, logger=CSVLogger(tmp_path))
    assert (Path(trainer.log_dir) / "energy_summary.json").exists()
