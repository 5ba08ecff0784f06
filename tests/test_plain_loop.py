"""A plain PyTorch loop under torchrun (2 gloo processes) measured by EnergyRun."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lightning_sustain.report.trace import read_summary
from tests.frontends import BOUNDARY_J, REPO, run_driven, truth_events, truth_j

pytestmark = pytest.mark.slow


def test_torchrun_two_ranks_matches_ground_truth(tmp_path: Path, simulated_nvml) -> None:
    simulated_nvml(2, counter_period_s=0.02)
    out = tmp_path / "run"
    proc = run_driven(
        REPO / "examples" / "plain_torch.py",
        ["--steps", "30", "--log-every", "5", "--predict-batches", "10", "--cpu", "none",
         "--dirpath", str(out), "--simulate-gpu-load", "0.01"],
        tmp_path, torchrun=2,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(out / "energy_summary.json")
    events = truth_events(tmp_path)
    totals = summary["totals"]
    assert summary["world_size"] == 2 and summary["provenance"] == "counter (simulated)"
    assert [r["global_rank"] for r in summary["ranks"]] == [0, 1]
    assert totals["steps"] == 30 and totals["batches"] == 30  # per rank
    assert totals["samples"] == 2 * 30 * 64  # summed over ranks
    assert totals["predict_samples"] == 2 * 10 * 64
    for rank in (0, 1):
        per_rank = summary["ranks"][rank]
        fit_truth, predict_truth = truth_j(events, "fit", rank), truth_j(events, "predict", rank)
        # two stages, two boundaries each
        assert per_rank["energy_j"] == pytest.approx(
            fit_truth + predict_truth, rel=0.04, abs=4 * BOUNDARY_J
        )
    assert totals["fit_energy_j"] == pytest.approx(truth_j(events, "fit"), rel=0.04)
    # a ~0.1 s stage: 2 ranks x 2 boundaries dominate the error
    assert totals["predict_energy_j"] == pytest.approx(
        truth_j(events, "predict"), abs=4 * BOUNDARY_J
    )
    assert totals["predict_energy_per_sample_j"] > 0 and totals["sci_per_inference_g"] > 0
    rows = list(csv.DictReader((out / "energy_trace.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(30))  # rank zero's trace
    # each rank's record is on disk (kept after any failure)
    assert sorted(p.name for p in (out / "energy_ranks").iterdir()) == ["rank0.json", "rank1.json"]
