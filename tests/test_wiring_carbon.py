"""Time-resolved CO2e and inference tokens wired into the run core and the Trainer front end.

Issue 15: the summary carries location-based (yearly) CO2e and CO2e integrated interval by
interval against an intensity file, with ``started_at``; a bad file never stops training.
Issue 13: ``trainer.predict`` counts tokens, energy per token and SCI per token.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sustain import EnergyMonitor, EnergyRun
from lightning_sustain.energy.carbon import co2e_g
from lightning_sustain.report.carbon import compare_carbon
from lightning_sustain.report.inputs import read_trace
from lightning_sustain.report.trace import read_summary
from lightning_sustain.run import RankInfo
from tests.helpers import TinyClassifier, loader
from tests.test_energy_layer import LinearDevice


def _write_series(path: Path, start: float, step_s: float, values: list[float]) -> Path:
    rows = "".join(f"{start + i * step_s:.6f},{v}\n" for i, v in enumerate(values))
    path.write_text("timestamp,g_co2e_per_kwh\n" + rows)
    return path


def _started(summary: dict) -> float:
    stamp = dt.datetime.fromisoformat(summary["started_at"])
    assert stamp.utcoffset() == dt.timedelta(0)  # ISO 8601, UTC
    return stamp.timestamp()


def _overlap_integral(t0: float, t1: float, start: float, step_s: float, values) -> float:
    """Integral of a step-function intensity over [t0, t1], g/kWh x s (ground truth)."""
    total = 0.0
    for i, v in enumerate(values):
        a, b = start + i * step_s, start + (i + 1) * step_s
        total += max(0.0, min(b, t1) - max(a, t0)) * v
    return total


@settings(max_examples=5, deadline=None)
@given(values=st.lists(st.integers(0, 900), min_size=4, max_size=8))
def test_constant_power_co2e_is_power_times_integral_of_intensity(tmp_path_factory, values):
    """At constant power P, time-resolved CO2e = P x integral of I(t) dt (exact ground truth)."""
    tmp = tmp_path_factory.mktemp("ci")
    power_w, step_s = 200.0, 0.15
    start = time.time() - 0.05
    series = _write_series(tmp / "grid.csv", start, step_s, values + [values[-1]])
    run = EnergyRun(
        tmp, devices=[LinearDevice(power_w, name=f"c{time.monotonic_ns()}")], ranks=RankInfo(),
        report=False, trace=False, intensity_file=series, log_every_n_steps=1000,
    )  # fmt: skip
    with run:
        t_end = time.monotonic() + step_s * (len(values) - 1)
        while time.monotonic() < t_end:
            time.sleep(0.01)
            run.step(samples=1)
    run.close()
    summary = read_summary(tmp / "energy_summary.json")
    t0 = _started(summary)
    t1 = t0 + summary["totals"]["duration_s"]
    tr = summary["carbon_time_resolved"]
    assert tr["status"] == "ok" and tr["fallback_fraction"] == 0.0
    # the integration covers the stage's energy exactly (same curve, same end points)
    assert tr["integrated_energy_j"] == pytest.approx(summary["totals"]["energy_j"], rel=1e-6)
    expected = power_w / 3.6e6 * _overlap_integral(t0, t1, start, step_s, values + [values[-1]])
    # started_at is kept to the millisecond: at most 1 ms x the largest intensity off
    slack = power_w / 3.6e6 * 0.002 * max(values)
    assert summary["totals"]["co2e_time_resolved_g"] == pytest.approx(expected, abs=slack + 1e-9)
    # the location-based figure is unchanged: energy x the yearly intensity
    assert summary["totals"]["co2e_g"] == pytest.approx(
        co2e_g(summary["totals"]["energy_j"], run.carbon, 1.0)
    )


class _Busy(TinyClassifier):
    def predict_step(self, batch, batch_idx):
        x, _ = batch
        if self._sim is not None:
            self._sim.busy(0, 0.005)
        return self.layer(x)


def _trainer(tmp_path: Path, monitor: EnergyMonitor) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1, callbacks=[monitor], logger=False, enable_progress_bar=False,
        enable_checkpointing=False, default_root_dir=tmp_path, log_every_n_steps=5,
    )  # fmt: skip


def test_trainer_time_resolved_against_a_varying_file(tmp_path: Path, simulated_nvml) -> None:
    sim = simulated_nvml(1, counter_period_s=0.02)
    values = [100.0 if i % 4 else 800.0 for i in range(400)]
    series = _write_series(tmp_path / "grid.csv", time.time() - 1.0, 0.25, values)
    monitor = EnergyMonitor(
        cpu="none", dirpath=str(tmp_path), report=False, intensity_file=str(series), country="DE"
    )
    before = time.time()
    _trainer(tmp_path, monitor).fit(_Busy(sim=sim, busy_s=0.01), loader(n=640))
    summary = read_summary(tmp_path / "energy_summary.json")
    assert before - 0.01 <= _started(summary) <= time.time()
    totals, tr = summary["totals"], summary["carbon_time_resolved"]
    assert tr["status"] == "ok" and tr["fallback_fraction"] == 0.0
    assert tr["integrated_energy_j"] == pytest.approx(totals["energy_j"], rel=0.01)
    kwh = totals["energy_kwh"]
    assert 100.0 * kwh * 0.99 <= totals["co2e_time_resolved_g"] <= 800.0 * kwh * 1.01
    assert totals["co2e_g"] == pytest.approx(kwh * summary["carbon"]["g_co2e_per_kwh"])
    assert monitor.run.metrics["energy/co2e_time_resolved_g"] == pytest.approx(
        totals["co2e_time_resolved_g"]
    )
    # an independent path: the report's step-by-step integration over the trace, placed in
    # time by started_at, sees the same energy-weighted intensity
    comparison = compare_carbon(read_trace(tmp_path / "energy_trace.csv"), summary, series)
    assert comparison.start_note == "the summary's started_at"
    assert comparison.traced.mean_intensity_g_per_kwh == pytest.approx(
        tr["mean_g_co2e_per_kwh"], rel=0.15
    )


@pytest.mark.parametrize("kind", ["negative", "unsorted", "missing", "uncovered"])
def test_bad_intensity_file_never_stops_training(
    tmp_path: Path, simulated_nvml, caplog, kind: str
) -> None:
    sim = simulated_nvml(1, counter_period_s=0.02)
    now = time.time()
    path = tmp_path / "grid.csv"
    if kind == "negative":
        _write_series(path, now - 5, 1.0, [300, -20, 300] * 40)
    elif kind == "unsorted":
        path.write_text(f"timestamp,g_co2e_per_kwh\n{now + 5},300\n{now - 5},200\n")
    elif kind == "uncovered":  # a valid file for another year
        _write_series(path, now - 400 * 86400, 3600.0, [50.0] * 24)
    monitor = EnergyMonitor(
        cpu="none", dirpath=str(tmp_path), report=False, intensity_file=str(path)
    )
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, monitor)
        trainer.fit(TinyClassifier(sim=sim, busy_s=0.005), loader(n=160))
    assert trainer.state.finished and trainer.global_step == 5
    summary = read_summary(tmp_path / "energy_summary.json")
    tr, totals = summary["carbon_time_resolved"], summary["totals"]
    if kind == "uncovered":
        assert tr["status"] == "ok"
        assert tr["fallback_fraction"] == pytest.approx(1.0, rel=1e-4)  # Unix-time round-off
        assert tr["warnings"] and "does not cover" in tr["warnings"][0]
    else:
        assert tr["status"].startswith("fallback: intensity file not usable")
        assert str(path) in tr["status"] or kind == "missing"
    assert "intensity" in caplog.text.lower()
    # falling back means the yearly intensity: both figures agree
    assert totals["co2e_time_resolved_g"] == pytest.approx(totals["co2e_g"], rel=0.01)


def test_strict_intensity_file_is_refused_up_front(tmp_path: Path) -> None:
    path = _write_series(tmp_path / "grid.csv", time.time(), 1.0, [10, -1, 10])
    with pytest.raises(ValueError, match="negative"):
        EnergyRun(tmp_path, devices=[], intensity_file=path, intensity_strict=True)


# -- inference tokens ------------------------------------------------------------------
class _Generator(_Busy):
    """``count_tokens`` reports generated tokens: 3 per sample in predict."""

    def count_tokens(self, batch, outputs, stage):
        return 3 * outputs.shape[0] if stage == "predict" else 0


@pytest.mark.parametrize("route", ["hook", "tokens_per_sample"])
def test_predict_counts_tokens_energy_and_sci_per_token(
    tmp_path: Path, simulated_nvml, route: str
) -> None:
    sim = simulated_nvml(1, counter_period_s=0.02)
    if route == "hook":
        module, monitor = (
            _Generator(sim=sim),
            EnergyMonitor(cpu="none", dirpath=str(tmp_path), report=False, pue=1.2),
        )
        per_sample = 3
    else:
        module, monitor = (
            _Busy(sim=sim),
            EnergyMonitor(
                cpu="none", dirpath=str(tmp_path), report=False, pue=1.2, tokens_per_sample=7
            ),
        )
        per_sample = 7
    preds = _trainer(tmp_path, monitor).predict(module, loader(n=96, batch_size=16))
    assert len(preds) == 6
    summary = read_summary(tmp_path / "energy_summary.json")
    t = summary["totals"]
    assert t["predict_samples"] == 96 and t["predict_tokens"] == 96 * per_sample
    assert t["predict_energy_j"] > 0
    tokens = 96 * per_sample
    assert t["predict_energy_per_token_j"] == pytest.approx(t["predict_energy_j"] / tokens)
    co2e = co2e_g(t["predict_energy_j"], monitor.run.carbon, 1.2)
    assert t["sci_per_token_g"] == pytest.approx(co2e / (96 * per_sample))
    assert t["sci_per_inference_g"] == pytest.approx(co2e / 96)
    assert t["predict_tokens_per_j"] == pytest.approx(96 * per_sample / t["predict_energy_j"])
    # forward-only FLOPs of the first predict batch: Linear(16, 2) on 16 samples
    eff = summary["efficiency"]["predict"]
    assert eff["flops_per_step"] == 2 * 16 * 16 * 2
    assert eff["steps"] == 6
    assert t["predict_j_per_tflop"] == pytest.approx(
        t["predict_energy_j"] / (6 * eff["flops_per_step"] / 1e12)
    )
    assert np.isfinite(t["predict_tflops_per_s_per_w"])


def test_failing_count_tokens_hook_is_a_warning(tmp_path: Path, caplog) -> None:
    class Broken(_Busy):
        def count_tokens(self, batch, outputs, stage):
            raise RuntimeError("tokenizer missing")

    monitor = EnergyMonitor(nvml_devices="none", cpu="estimate", dirpath=str(tmp_path),
                            report=False, tokens_per_sample=2)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        _trainer(tmp_path, monitor).predict(Broken(), loader(n=64, batch_size=16))
    assert "count_tokens failed" in caplog.text
    # from the failing batch on, tokens come from tokens_per_sample (warned once)
    assert caplog.text.count("count_tokens failed") == 1
    assert read_summary(tmp_path / "energy_summary.json")["totals"]["predict_tokens"] == 64 * 2


def test_resume_keeps_the_time_resolved_part(tmp_path: Path) -> None:
    """After a resume the checkpoint's integrated CO2e counts, not the yearly figure."""
    now = time.time()
    series = _write_series(tmp_path / "grid.csv", now - 60, 30.0, [100.0] * 10)

    def make() -> EnergyRun:
        return EnergyRun(
            tmp_path / "run", devices=[LinearDevice(300.0, name=f"r{time.monotonic_ns()}")],
            ranks=RankInfo(), report=False, trace=False, country="PL", intensity_file=series,
            log_every_n_steps=1000,
        )  # fmt: skip

    first = make()
    with first:
        for _ in range(10):
            time.sleep(0.01)
            first.step(samples=1)
        state = first.state_dict()
    first.close()
    assert state["carbon_time"]["energy_j"] > 0
    second = make()
    second.load_state_dict(state)
    with second:
        for _ in range(10):
            time.sleep(0.01)
            second.step(samples=1)
    second.close()
    totals = second.summary["totals"]
    assert second.summary["carbon"]["g_co2e_per_kwh"] > 500  # PL's yearly figure, not 100
    # everything at 100 g/kWh; only the prior's last moments after its checkpoint differ
    assert totals["co2e_time_resolved_g"] == pytest.approx(totals["energy_kwh"] * 100.0, rel=0.02)
