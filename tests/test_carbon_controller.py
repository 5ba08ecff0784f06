"""CarbonAwareController with real Trainers on the simulated NVML device (real pynvml)."""

from __future__ import annotations

import json
import logging
import os
import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_sustain.callbacks.carbon_aware import (
    DECISIONS_FILENAME,
    STATUS_FILENAME,
    CarbonAwareController,
    CarbonControllerError,
)
from lightning_sustain.callbacks.energy_budget import EnergyBudget
from lightning_sustain.callbacks.power_budget import PowerBudget
from lightning_sustain.energy.intensity import IntensityDataError
from lightning_sustain.testing.grid import diurnal_intensity, write_intensity_csv
from tests.helpers import TinyClassifier, loader


@pytest.fixture(autouse=True)
def _journal(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SUSTAIN_LIMIT_JOURNAL", str(tmp_path / "journal.json"))


def _trainer(tmp_path, callbacks, max_steps=20, **kwargs):
    return pl.Trainer(
        max_steps=max_steps,
        logger=kwargs.pop("logger", False),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


def _steps_file(tmp_path, points, name="steps.csv"):
    """A generic CSV of (seconds from now, intensity) points."""
    now = time.time()
    lines = ["timestamp,g_co2e_per_kwh"] + [f"{now + t:.3f},{v}" for t, v in points]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class LimitProbe(Callback):
    def __init__(self, sim):
        self.sim = sim
        self.limits: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.limits.append(self.sim.power_limit_w(0))


def test_power_mode_caps_dirty_periods_within_the_bound_and_restores(sim, tmp_path):
    series = diurnal_intensity(time.time(), 120, period_s=2.0, resolution_s=0.05, swing=4)
    path = write_intensity_csv(series, tmp_path / "grid.csv")
    controller = CarbonAwareController(
        intensity_file=str(path),
        max_slowdown=0.2,
        min_limit_fraction=0.5,
        warmup_steps=3,
        decide_every_s=0.01,
        busy_power_w=350.0,
    )
    probe = LimitProbe(sim)
    logger = CSVLogger(tmp_path, name="logs")
    trainer = _trainer(
        tmp_path, [controller, probe], max_steps=30, logger=logger, log_every_n_steps=1
    )
    trainer.fit(TinyClassifier(sim=sim, busy_s=0.02), loader(n=32 * 30))
    assert controller.hardware_mode == "hardware"
    decisions = controller.log.decisions
    assert len(decisions) >= 10
    assert all(d.projected_slowdown <= 0.2 + 1e-9 for d in decisions)
    capped = [d for d in decisions if d.limit_fraction is not None and d.limit_fraction < 1]
    assert capped, "a 4x diurnal swing must lead to capping in dirty periods"
    assert all(d.limit_fraction >= 0.5 - 1e-9 for d in decisions)
    assert min(probe.limits) < 400.0 and min(probe.limits) >= 175.0 - 1e-6
    assert sim.power_limit_w(0) == 400.0, "the original limit is restored"
    lines = (tmp_path / "logs" / "version_0" / DECISIONS_FILENAME).read_text().splitlines()
    assert len(lines) == len(decisions)
    first = json.loads(lines[0])
    assert {"time_unix_s", "intensity_g_per_kwh", "limit_w", "reason", "action"} <= set(first)
    assert "carbon/intensity_g_per_kwh" in trainer.callback_metrics
    assert controller.co2e_g > 0 and controller.energy_j > 0


def test_power_mode_falls_back_to_software_without_permission(sim, tmp_path, caplog):
    sim.set_limit_permitted(0, False)
    path = _steps_file(tmp_path, [(-5, 600), (3600, 600)])
    controller = CarbonAwareController(
        intensity_file=path, max_slowdown=0.3, warmup_steps=3, decide_every_s=0.01,
        busy_power_w=350.0,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="lightning_sustain"):
        _trainer(tmp_path, [controller], max_steps=15).fit(
            TinyClassifier(sim=sim, busy_s=0.02), loader(n=32 * 15)
        )
    assert controller.hardware_mode == "software"
    assert "software throttle" in caplog.text and "NO_PERMISSION" in caplog.text
    assert sim.limit_set_count(0) == 0 and sim.power_limit_w(0) == 400.0
    targets = [d.limit_w for d in controller.log.decisions if d.limit_w is not None]
    assert targets and all(t < 350.0 for t in targets)


def test_pause_stop_writes_status_and_resume_completes(sim, tmp_path):
    path = _steps_file(tmp_path, [(-10, 600), (4.0, 100), (3600, 100)])  # slack for load
    kwargs = dict(
        mode="pause",
        intensity_file=path,
        pause_above_g_per_kwh=300,
        deadline_s=60,
        resume_overhead_s=0.5,
        warmup_steps=3,
        decide_every_s=0.01,
        dirpath=str(tmp_path / "run"),
    )
    controller = CarbonAwareController(**kwargs)
    trainer = _trainer(tmp_path, [controller], max_steps=20)
    trainer.fit(TinyClassifier(sim=sim, busy_s=0.01), loader(n=32 * 20))
    assert trainer.global_step < 20
    status = json.loads((tmp_path / "run" / STATUS_FILENAME).read_text())
    assert status["status"] == "paused_for_carbon"
    assert status["checkpoint"] and status["resume_at_unix_s"] > time.time() - 5
    assert 0 <= status["resume_in_s"] <= 4.0
    assert controller.log.decisions[-1].action == "pause_stop"
    deadline = controller.deadline_unix_s
    # the scheduler requeues the job at resume_at
    time.sleep(max(0.0, status["resume_at_unix_s"] - time.time()))
    resumed = CarbonAwareController(**kwargs)
    trainer2 = _trainer(tmp_path, [resumed], max_steps=20)
    trainer2.fit(
        TinyClassifier(sim=sim, busy_s=0.01), loader(n=32 * 20), ckpt_path=status["checkpoint"]
    )
    assert trainer2.global_step == 20
    assert resumed.status["status"] == "completed"
    assert resumed.deadline_unix_s == deadline, "the deadline is kept across the resume"
    assert time.time() < deadline
    # the checkpoint holds the CO2e at the moment it was written (the first run also
    # counts its own teardown after it, which the resumed run never sees)
    ckpt = torch.load(status["checkpoint"], map_location="cpu", weights_only=False)
    saved = [v for v in ckpt["callbacks"].values() if isinstance(v, dict) and "co2e_g" in v]
    assert len(saved) == 1
    assert controller.co2e_g >= saved[0]["co2e_g"] > 0
    assert resumed.co2e_g > saved[0]["co2e_g"], "CO2e carries across the resume"


def test_pause_wait_in_process_meets_the_deadline(sim, tmp_path):
    path = _steps_file(tmp_path, [(-10, 600), (3.0, 100), (3600, 100)])
    controller = CarbonAwareController(
        mode="pause", intensity_file=path, pause_above_g_per_kwh=300, on_pause="wait",
        deadline_s=30, warmup_steps=3, decide_every_s=0.01,
    )  # fmt: skip
    start = time.time()
    trainer = _trainer(tmp_path, [controller], max_steps=12)
    trainer.fit(TinyClassifier(sim=sim, busy_s=0.01), loader(n=32 * 12))
    assert trainer.global_step == 12
    actions = [d.action for d in controller.log.decisions]
    assert "pause_wait" in actions
    assert "pause_wait" in actions and controller.log.decisions[-1].intensity_g_per_kwh == 100
    assert time.time() - start >= 2.5, "it waited for the clean period"
    assert time.time() < controller.deadline_unix_s


def test_pause_refused_when_the_deadline_would_be_missed(sim, tmp_path):
    path = _steps_file(tmp_path, [(-10, 600), (30, 100), (3600, 100)])
    controller = CarbonAwareController(
        mode="pause", intensity_file=path, pause_above_g_per_kwh=300, deadline_s=10,
        warmup_steps=3, decide_every_s=0.01,
    )  # fmt: skip
    trainer = _trainer(tmp_path, [controller], max_steps=10)
    trainer.fit(TinyClassifier(sim=sim, busy_s=0.01), loader(n=32 * 10))
    assert trainer.global_step == 10
    assert {d.action for d in controller.log.decisions} == {"run"}
    assert "deadline" in controller.log.decisions[0].reason


def test_bad_file_does_not_stop_training_unless_strict(sim, tmp_path, caplog):
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,g_co2e_per_kwh\n100,5\n200,-3\n")
    controller = CarbonAwareController(
        intensity_file=str(bad), country="DE", warmup_steps=3, decide_every_s=0.01
    )
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, [controller], max_steps=8)
        trainer.fit(TinyClassifier(sim=sim, busy_s=0.005), loader(n=32 * 8))
    assert trainer.global_step == 8
    assert "bad.csv: row 3" in controller.provider_note and "381" in controller.provider_note
    assert all(d.intensity_g_per_kwh == 381 for d in controller.log.decisions)
    strict = CarbonAwareController(intensity_file=str(bad), strict=True)
    with pytest.raises(IntensityDataError, match="row 3"):
        _trainer(tmp_path, [strict], max_steps=4).fit(TinyClassifier(), loader(n=32 * 4))


def test_trace_not_covering_the_run_falls_back_and_says_so(sim, tmp_path):
    path = _steps_file(tmp_path, [(-100, 200), (-90, 200)])  # ended 80 s ago
    controller = CarbonAwareController(
        intensity_file=path, carbon_intensity_g_per_kwh=444, warmup_steps=3, decide_every_s=0.01
    )
    _trainer(tmp_path, [controller], max_steps=8).fit(
        TinyClassifier(sim=sim, busy_s=0.005), loader(n=32 * 8)
    )
    assert {d.intensity_status for d in controller.log.decisions} == {"fallback"}
    assert controller.provider.warnings and "does not cover" in controller.provider.warnings[0]


def test_fast_dev_run_writes_nothing(sim, tmp_path):
    path = _steps_file(tmp_path, [(-10, 600), (3600, 600)])
    controller = CarbonAwareController(
        intensity_file=path, warmup_steps=2, decide_every_s=0.01, dirpath=str(tmp_path / "out")
    )
    pl.Trainer(
        fast_dev_run=4, default_root_dir=tmp_path, callbacks=[controller],
        enable_progress_bar=False, enable_model_summary=False,
    ).fit(TinyClassifier(sim=sim, busy_s=0.005), loader(n=32 * 4))  # fmt: skip
    assert not (tmp_path / "out").exists()
    assert sim.power_limit_w(0) == 400.0


def test_co2e_budget_stops_with_checkpoint_next_to_energy_budget(sim, tmp_path):
    path = _steps_file(tmp_path, [(-10, 1_000_000), (3600, 1_000_000)])
    controller = CarbonAwareController(
        mode="pause", intensity_file=path, pause_above_g_per_kwh=2_000_000, max_co2e_g=20.0,
        warmup_steps=3, decide_every_s=0.01,
    )  # fmt: skip
    energy = EnergyBudget(max_kwh=1.0)
    trainer = _trainer(tmp_path, [controller, energy], max_steps=200)
    trainer.fit(TinyClassifier(sim=sim, busy_s=0.01), loader(n=32 * 200))
    assert trainer.global_step < 200
    assert controller.status["status"] == "co2e_budget_reached"
    assert 10.0 < controller.co2e_g <= 20.0
    assert controller.status["checkpoint"].endswith(".ckpt")
    assert not energy.exceeded


def test_exception_restores_the_limit(sim, tmp_path):
    series = diurnal_intensity(time.time() - 10, 120, period_s=2.0, resolution_s=0.05, swing=4)
    path = write_intensity_csv(series, tmp_path / "grid.csv")

    class Boom(TinyClassifier):
        def training_step(self, batch, batch_idx):
            if batch_idx == 12:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    controller = CarbonAwareController(
        intensity_file=str(path), max_slowdown=0.5, warmup_steps=3, decide_every_s=0.01,
        busy_power_w=350.0,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, [controller], max_steps=30).fit(
            Boom(sim=sim, busy_s=0.01), loader(n=32 * 30)
        )
    assert sim.power_limit_w(0) == 400.0


def test_refuses_to_share_limits_with_power_budget(tmp_path):
    with pytest.raises(CarbonControllerError, match="PowerBudget"):
        _trainer(tmp_path, [CarbonAwareController(), PowerBudget(watts=200)]).fit(
            TinyClassifier(), loader()
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "sleep"}, "mode"),
        ({"mode": "pause"}, "pause_above_g_per_kwh"),
        ({"deadline": "tomorrow"}, "ISO 8601"),
        ({"deadline": "2030-01-01T00:00:00Z", "deadline_s": 5}, "not both"),
        ({"max_slowdown": -0.1}, "max_slowdown"),
        ({"min_limit_fraction": 1.5}, "min_limit_fraction"),
        ({"warmup_steps": 1}, "warmup_steps"),
        ({"provider": object()}, "IntensityProvider"),
    ],
)
def test_invalid_settings_name_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CarbonAwareController(**kwargs)


class StepProvider:
    """A user-written live source: dirty for one second after its first use, then clean."""

    def __init__(self):
        self.t0 = None
        self.calls = 0

    def _value(self, t):
        if self.t0 is None:
            self.t0 = time.time()
        return 600.0 if t < self.t0 + 1.0 else 100.0

    def intensity_at(self, time_unix_s):
        from lightning_sustain.energy.intensity import IntensityReading

        self.calls += 1
        return IntensityReading(self._value(time_unix_s), "series", "my live API")

    def mean_intensity(self, start_unix_s, end_unix_s):
        if end_unix_s <= start_unix_s or self.t0 is None:
            return self._value(start_unix_s), 0.0
        split = min(max(self.t0 + 1.0, start_unix_s), end_unix_s)
        dirty = split - start_unix_s
        total = end_unix_s - start_unix_s
        return (600.0 * dirty + 100.0 * (total - dirty)) / total, 0.0

    def describe(self):
        return "my live API"


def test_a_user_provider_plugs_in(sim, tmp_path):
    provider = StepProvider()
    controller = CarbonAwareController(
        mode="pause", provider=provider, pause_above_g_per_kwh=300, on_pause="wait",
        deadline_s=30, warmup_steps=2, decide_every_s=0.01,
    )  # fmt: skip
    trainer = _trainer(tmp_path, [controller], max_steps=8)
    trainer.fit(TinyClassifier(sim=sim, busy_s=0.005), loader(n=32 * 8))
    assert trainer.global_step == 8
    assert provider.calls > 0
    assert controller.log.decisions[0].action == "pause_wait"
    assert controller.log.decisions[-1].intensity_g_per_kwh == 100.0


def test_deadline_at_risk_is_warned_and_training_goes_on(sim, tmp_path, caplog):
    path = _steps_file(tmp_path, [(-10, 600), (3600, 600)])
    controller = CarbonAwareController(
        mode="pause", intensity_file=path, pause_above_g_per_kwh=300, deadline_s=0.3,
        warmup_steps=2, decide_every_s=0.01,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, [controller], max_steps=10)
        trainer.fit(TinyClassifier(sim=sim, busy_s=0.05), loader(n=32 * 10))
    assert trainer.global_step == 10
    assert "at risk" in caplog.text
    assert {d.action for d in controller.log.decisions} == {"run"}


def test_configurable_from_yaml_like_lightning_cli():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CarbonAwareController, "carbon")
    cfg = parser.parse_object(
        {"carbon": {"mode": "pause", "pause_above_g_per_kwh": 350, "deadline_s": 3600.0,
                    "on_pause": "wait", "country": "FR"}}
    )  # fmt: skip
    controller = parser.instantiate(cfg).carbon
    assert isinstance(controller, CarbonAwareController)
    assert controller.mode == "pause" and controller.fallback.g_co2e_per_kwh > 0


class RewriteAt(Callback):
    """Replaces the intensity file mid-run (a forecast refreshed by a cron job)."""

    def __init__(self, path, step, text):
        self.path, self.step, self.text = path, step, text

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as handle:
                handle.write(self.text)
            os.replace(tmp, self.path)


def test_file_changing_during_the_run(sim, tmp_path, caplog):
    now = time.time()
    path = _steps_file(tmp_path, [(-10, 200), (3600, 200)])
    valid = f"timestamp,g_co2e_per_kwh\n{now - 10:.3f},700\n{now + 3600:.3f},700\n"
    invalid = f"timestamp,g_co2e_per_kwh\n{now - 10:.3f},700\n{now - 20:.3f},-5\n"
    controller = CarbonAwareController(
        intensity_file=path, warmup_steps=2, decide_every_s=0.01, busy_power_w=350.0
    )
    with caplog.at_level(logging.INFO, logger="lightning_sustain"):
        trainer = _trainer(
            tmp_path,
            [controller, RewriteAt(path, 6, valid), RewriteAt(path, 12, invalid)],
            max_steps=18,
        )
        trainer.fit(TinyClassifier(sim=sim, busy_s=0.01), loader(n=32 * 18))
    assert trainer.global_step == 18
    seen = [d.intensity_g_per_kwh for d in controller.log.decisions]
    assert seen[0] == 200 and seen[-1] == 700, "the valid new version is used, then kept"
    assert "new version is in use" in caplog.text
    assert "previous version stays in use" in caplog.text and "steps.csv" in caplog.text


class _BurnCpu(Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        end = time.process_time() + self.seconds
        while time.process_time() < end:
            pass


def test_cpu_only_machine_uses_the_software_throttle(tmp_path):
    path = _steps_file(tmp_path, [(-10, 600), (3600, 600)])
    controller = CarbonAwareController(
        intensity_file=path, max_slowdown=0.3, warmup_steps=3, decide_every_s=0.01,
        cpu="estimate",
    )  # fmt: skip
    # ~25 ms of CPU work per step: on a quiet machine 12 bare tiny steps end before the
    # CPU estimate's sampler has a second point, and the run would measure 0 J
    trainer = _trainer(tmp_path, [_BurnCpu(0.025), controller], max_steps=12)
    trainer.fit(TinyClassifier(), loader(n=32 * 12))
    assert trainer.global_step == 12
    assert controller.hardware_mode == "software"
    assert controller.log.decisions and controller.energy_j > 0
