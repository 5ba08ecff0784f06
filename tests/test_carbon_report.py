"""Time-resolved CO2e in the report, from a real run's trace and an intensity file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pynvml
import pytest

from lightning_sustain import EnergyMonitor
from lightning_sustain.report.builder import build_report, report_main
from lightning_sustain.report.carbon import compare_carbon, fit_start_unix_s
from lightning_sustain.report.inputs import read_trace
from lightning_sustain.testing import SimulatedNVML
from tests.helpers import TinyClassifier, loader


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("carbon-run")
    sim = SimulatedNVML(1, counter_period_s=0.05).install()
    pynvml.nvmlInit()
    try:
        pl.Trainer(
            max_epochs=2,
            callbacks=[EnergyMonitor(country="DE", pue=1.2)],
            logger=False,
            default_root_dir=root,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        ).fit(TinyClassifier(sim=sim, busy_s=0.005), loader())
    finally:
        pynvml.nvmlShutdown()
        sim.uninstall()
    return root


def _file(tmp_path, points, name="grid.csv"):
    path = tmp_path / name
    path.write_text("timestamp,g_co2e_per_kwh\n" + "".join(f"{t:.3f},{v}\n" for t, v in points))
    return path


def test_constant_file_at_the_annual_value_reproduces_the_annual_figure(run_dir, tmp_path):
    summary = json.loads((run_dir / "energy_summary.json").read_text())
    now = time.time()
    path = _file(tmp_path, [(now - 86400, 381), (now + 86400, 381)])
    trace = read_trace(run_dir / "energy_trace.csv")
    comparison = compare_carbon(trace, summary, path)
    assert comparison.scaled_co2e_g == pytest.approx(summary["totals"]["co2e_g"], rel=1e-9)
    expected = trace.energy_j.sum() / 3.6e6 * 1.2 * 381
    assert comparison.traced.total_co2e_g == pytest.approx(expected, rel=1e-9)
    assert comparison.traced.fallback_fraction == 0.0
    # EnergyMonitor writes started_at; a summary without it falls back to written_at
    start, note = fit_start_unix_s(summary)
    assert abs(start - now) < 600 and "started_at" in note
    older = {k: v for k, v in summary.items() if k != "started_at"}
    start_old, note_old = fit_start_unix_s(older)
    assert abs(start_old - start) < 5 and "written_at" in note_old


def test_step_change_is_integrated_interval_by_interval(run_dir, tmp_path):
    summary = json.loads((run_dir / "energy_summary.json").read_text())
    trace = read_trace(run_dir / "energy_trace.csv")
    start, _ = fit_start_unix_s(summary)
    split = float(f"{start + float(np.median(trace.start_s)):.3f}")  # as the file stores it
    path = _file(tmp_path, [(start - 86400, 100), (split, 600), (start + 86400, 600)])
    comparison = compare_carbon(trace, summary, path)
    a, b = start + trace.start_s, start + trace.end_s
    # exact per step: the share of each step before the split at 100, after it at 600
    before = np.clip(split - a, 0, None)
    span = np.where(b > a, b - a, 1.0)
    share = np.where(b > a, np.minimum(before, span) / span, (a < split).astype(float))
    intensity = 100 * share + 600 * (1 - share)
    expected = float(np.sum(trace.energy_j / 3.6e6 * 1.2 * intensity))
    assert comparison.traced.total_co2e_g == pytest.approx(expected, rel=1e-9)
    assert 100 < comparison.traced.mean_intensity_g_per_kwh < 600


def test_report_shows_both_figures_and_the_plot(run_dir, tmp_path):
    now = time.time()
    path = _file(tmp_path, [(now - 86400, 50), (now + 86400, 50)])
    result = build_report(run_dir, output_dir=tmp_path / "out", intensity_file=path)
    text = result.markdown_path.read_text()
    assert "Time-resolved CO2e" in text and "Location-based (annual average)" in text
    assert (tmp_path / "out" / "report_files" / "power_intensity.png").is_file()
    assert "does not cover" not in text


def test_file_not_covering_the_run_is_said_in_the_report(run_dir, tmp_path):
    path = _file(tmp_path, [(1_000_000_000, 50), (1_000_003_600, 50)])
    result = build_report(run_dir, output_dir=tmp_path / "out", intensity_file=path)
    text = result.markdown_path.read_text()
    assert "does not cover 100.0%" in text


def test_bad_file_is_a_warning_naming_file_and_row(run_dir, tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("timestamp,g_co2e_per_kwh\n100,1\n50,2\n")
    rc = report_main([str(run_dir), "-o", str(tmp_path / "out"), "--intensity-file", str(path)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "bad.csv: row 3" in err and "sort the file" in err
