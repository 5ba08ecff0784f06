"""The sustainability report, built from a real EnergyMonitor run on the simulated GPU."""

from __future__ import annotations

import copy
import csv
import json
import math
import re
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pynvml
import pytest
import torch

from lightning_sustain import EnergyMonitor
from lightning_sustain.callbacks.shap_summary import ShapSummary
from lightning_sustain.report.builder import ReportInputError, build_report, report_main
from lightning_sustain.report.emissions import CODECARBON_COLUMNS, emissions_row, run_id_for
from lightning_sustain.report.inputs import read_trace
from lightning_sustain.report.progress import energy_to_target, metric_progress
from lightning_sustain.report.sci import compute_sci
from lightning_sustain.testing import SimulatedNVML
from tests.helpers import TinyClassifier, loader

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class AccuracyClassifier(TinyClassifier):
    """TinyClassifier that also logs validation accuracy (the metric for energy-to-target)."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.layer(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real 3-epoch fit with EnergyMonitor (simulated GPU + CPU estimate) and ShapSummary."""
    root = tmp_path_factory.mktemp("run")
    sim = SimulatedNVML(1, counter_period_s=0.05).install()
    pynvml.nvmlInit()
    try:
        trainer = pl.Trainer(
            max_epochs=3,
            callbacks=[
                EnergyMonitor(country="DE", pue=1.2),
                ShapSummary(
                    num_background=8, num_samples=8, nsamples=10, top_k_outputs=1, submodule="layer"
                ),
            ],
            logger=False,
            default_root_dir=root,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=2,
        )
        torch.manual_seed(0)
        trainer.fit(AccuracyClassifier(sim=sim, busy_s=0.005), loader(), loader(n=64, seed=1))
    finally:
        pynvml.nvmlShutdown()
        sim.uninstall()
    assert (root / "energy_summary.json").is_file()
    return root


@pytest.fixture(scope="module")
def default_report(run_dir: Path, tmp_path_factory):
    """The report with default options, built once for the tests that only read it."""
    return build_report(run_dir, output_dir=tmp_path_factory.mktemp("out") / "out")


@pytest.fixture
def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "energy_summary.json").read_text())


@pytest.fixture
def run_copy(run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the run directory a test may damage."""
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def _history(summary: dict, metric: str) -> list[dict]:
    return [h for h in summary["metric_history"] if metric in h["metrics"]]


# ---------------------------------------------------------------- files and numbers


def test_report_files_and_headline_numbers_match_the_summary(
    default_report, summary: dict
) -> None:
    result = default_report
    totals = summary["totals"]
    assert result.energy_kwh == totals["energy_kwh"]
    assert result.facility_energy_kwh == pytest.approx(totals["energy_kwh"] * 1.2)
    assert result.co2e_g == totals["co2e_g"]
    assert result.duration_s == totals["duration_s"]
    assert result.steps == totals["steps"] == 24
    assert result.samples == totals["samples"] == 768
    assert result.energy_per_sample_j == pytest.approx(totals["train_energy_j"] / 768)
    assert result.provenance == summary["provenance"] == "counter (simulated)+estimated"
    assert result.simulated is True

    for path in (result.markdown_path, result.html_path, result.emissions_csv_path):
        assert path.is_file() and path.parent == result.output_dir
    assert {"power", "energy_per_step", "cumulative"} <= set(result.plot_paths)
    for png in result.plot_paths.values():
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000

    md = result.markdown_path.read_text()
    # every headline figure is in the report, with its provenance next to it
    assert f"{totals['energy_kwh']:.4g} kWh" in md or f"{totals['energy_j']:.4g} J" in md
    assert "| Energy (IT equipment, run) |" in md
    energy_row = next(line for line in md.splitlines() if line.startswith("| Energy (IT"))
    assert "counter (simulated)+estimated" in energy_row
    per_sample_row = next(line for line in md.splitlines() if "| Energy per sample |" in line)
    assert f"{totals['energy_per_sample_j']:.4g} J" in per_sample_row
    assert "counter (simulated)" in per_sample_row
    assert "| Training samples | 768 |" in md and "| Training steps | 24 |" in md
    assert "simulated NVML device" in md
    for device in summary["devices"]:
        assert device["name"] in md and device["provenance"] in md
    # the plots are referenced relative to the Markdown file and exist there
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert refs and all((result.output_dir / ref).is_file() for ref in refs)
    # SCI per run by default, and M = 0 is stated
    assert f"{result.sci.sci_g:.6g} g CO2e per training run" in md
    assert "M defaults to 0" in md and "not supplied" in md


def test_html_is_self_contained(default_report) -> None:
    result = default_report
    html = result.html_path.read_text()
    assert html.startswith("<!DOCTYPE html>")
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) == len(result.plot_paths)
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert "<table>" in html and "Software Carbon Intensity" in html


def test_report_goes_into_the_run_dir_by_default(run_copy: Path) -> None:
    result = build_report(run_copy)
    assert result.markdown_path == run_copy / "report.md"
    assert (run_copy / "report_files" / "power.png").is_file()


def test_power_plot_names_every_trace_device(run_dir: Path, summary: dict) -> None:
    trace = read_trace(run_dir / "energy_trace.csv")
    assert set(trace.device_energy_j) == {"gpu0", "cpu0"}
    assert len(trace) == 24
    assert [int(b - a) for a, b in zip(trace.step, trace.step[1:], strict=False)] == [1] * 23
    assert trace.energy_j.sum() == pytest.approx(summary["totals"]["train_energy_j"])


# ---------------------------------------------------------------- SCI


@pytest.mark.parametrize(
    "unit, r_key", [("run", None), ("sample", "samples"), ("step", "steps"), ("epoch", None)]
)
def test_sci_arithmetic(summary: dict, unit, r_key) -> None:
    sci = compute_sci(summary, unit, epochs=3)
    e_kwh = summary["totals"]["energy_kwh"] * summary["carbon"]["pue"]
    i = summary["carbon"]["g_co2e_per_kwh"]
    r = {"run": 1, "epoch": 3}.get(unit) or summary["totals"][r_key]
    assert sci.r == r and sci.energy_kwh == pytest.approx(e_kwh, rel=1e-12)
    assert sci.sci_g == pytest.approx(e_kwh * i / r, rel=1e-12)
    assert not sci.embodied_supplied and sci.embodied_g == 0
    # with M = 0, the operational part equals the summary's CO2e
    assert sci.operational_g == pytest.approx(summary["totals"]["co2e_g"], rel=1e-12)
    assert sci.sci_g * r == pytest.approx(summary["totals"]["co2e_g"], rel=1e-12)


def test_sci_with_embodied_emissions_per_epoch(run_dir: Path, summary: dict, tmp_path) -> None:
    result = build_report(
        run_dir, output_dir=tmp_path, functional_unit="epoch", embodied_emissions_g=7.5
    )
    e_kwh = summary["totals"]["energy_kwh"] * 1.2
    assert result.sci.r == 3  # three epochs trained
    assert result.sci.sci_g == pytest.approx((e_kwh * 381 + 7.5) / 3, rel=1e-12)
    md = result.markdown_path.read_text()
    assert "user-supplied" in md and "M defaults to 0" not in md


def test_sci_rejects_bad_options(summary: dict) -> None:
    with pytest.raises(ValueError, match="functional_unit='token'"):
        compute_sci(summary, "token")
    with pytest.raises(ValueError, match="embodied_emissions_g=-1"):
        compute_sci(summary, "run", -1.0)
    no_samples = copy.deepcopy(summary)
    no_samples["totals"]["samples"] = 0
    with pytest.raises(ValueError, match="no samples counted"):
        compute_sci(no_samples, "sample")
    with pytest.raises(ValueError, match="no epochs counted"):
        compute_sci(summary, "epoch", epochs=0)


# ---------------------------------------------------------------- energy-to-target


def test_energy_to_target_reached(run_dir: Path, summary: dict, tmp_path: Path) -> None:
    history = _history(summary, "val_acc")
    assert len(history) == 3
    values = [h["metrics"]["val_acc"] for h in history]
    target = sorted(values)[1]  # reached, but not necessarily at the first evaluation
    first = next(h for h in history if h["metrics"]["val_acc"] >= target)
    result = build_report(
        run_dir, output_dir=tmp_path, target_metric="val_acc", target_value=target
    )
    t = result.energy_to_target
    assert t is not None and t.reached
    assert (t.epoch, t.step) == (first["epoch"], first["step"])
    assert t.value == first["metrics"]["val_acc"]
    assert t.energy_j == first["energy_j"] and t.co2e_g == first["co2e_g"]
    assert t.elapsed_s == first["elapsed_s"]
    assert 0 < t.energy_j <= summary["totals"]["energy_j"]
    md = result.markdown_path.read_text()
    assert f"val_acc >= {target:g} was first reached at epoch {first['epoch']}" in md
    assert "metric" in result.plot_paths
    assert "energy-to-target" in result.headline()
    assert "Energy per point of val_acc gained" in md and result.progress is not None


def test_energy_to_target_not_reached(run_dir: Path, summary: dict, tmp_path: Path) -> None:
    result = build_report(run_dir, output_dir=tmp_path, target_metric="val_acc", target_value=1.5)
    t = result.energy_to_target
    assert t is not None and not t.reached and t.energy_j is None
    assert t.best_value == max(h["metrics"]["val_acc"] for h in _history(summary, "val_acc"))
    md = result.markdown_path.read_text()
    assert "Target not reached: val_acc >= 1.5 was not reached" in md
    assert "not reached" in result.headline()


def test_energy_to_target_min_mode(summary: dict) -> None:
    history = _history(summary, "val_loss")
    target = sorted(h["metrics"]["val_loss"] for h in history)[1]
    first = next(h for h in history if h["metrics"]["val_loss"] <= target)
    t = energy_to_target(summary, "val_loss", target, mode="min")
    assert t.reached and t.mode == "min"
    assert (t.energy_j, t.step) == (first["energy_j"], first["step"])
    assert not energy_to_target(summary, "val_loss", -1.0, mode="min").reached


def test_energy_per_point_gained_from_a_run(summary: dict) -> None:
    progress = metric_progress(summary, "val_acc")
    history = _history(summary, "val_acc")
    assert progress.point == 0.01 and len(progress.rows) == 3
    assert progress.rows[0].gain_points is None
    assert progress.rows[0].delta_energy_j == history[0]["energy_j"]
    for prev, row, h in zip(progress.rows, progress.rows[1:], history[1:], strict=False):
        assert row.delta_energy_j == pytest.approx(h["energy_j"] - prev.energy_j)
        gain = (h["metrics"]["val_acc"] - prev.value) / 0.01
        assert row.gain_points == pytest.approx(gain)
        if gain > 0:
            assert row.energy_per_point_j == pytest.approx(row.delta_energy_j / gain)
        else:
            assert row.energy_per_point_j is None


def _synthetic(values: list[float], energies: list[float], total_j: float) -> dict:
    return {
        "totals": {"energy_j": total_j},
        "metric_history": [
            {"epoch": i, "step": 10 * (i + 1), "metrics": {"acc": v}, "energy_j": e,
             "co2e_g": e / 1000, "elapsed_s": float(i + 1)}
            for i, (v, e) in enumerate(zip(values, energies, strict=True))
        ],
    }  # fmt: skip


def test_energy_per_point_finds_where_training_stopped_paying() -> None:
    s = _synthetic([0.50, 0.60, 0.65, 0.64, 0.65], [100, 200, 350, 500, 650], total_j=700)
    p = metric_progress(s, "acc")
    assert [r.gain_points for r in p.rows][1:] == pytest.approx([10, 5, -1, 1])
    assert [r.energy_per_point_j for r in p.rows] == pytest.approx([None, 10, 30, None, 150])
    assert p.best_index == 2  # first evaluation with the best value
    assert p.energy_after_best_j == pytest.approx(700 - 350)
    # min mode: lower is better, and a metric outside [0, 1] counts whole units
    loss = _synthetic([3.0, 2.0, 2.5], [10, 20, 30], total_j=30)
    q = metric_progress(loss, "acc", mode="min")
    assert q.point == 1.0
    assert [r.gain_points for r in q.rows][1:] == pytest.approx([1.0, -0.5])
    assert q.best_index == 1


def test_unknown_target_metric_names_the_recorded_ones(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ReportInputError, match="recorded metrics: .*val_acc"):
        build_report(run_dir, output_dir=tmp_path, target_metric="val_f1", target_value=0.5)
    with pytest.raises(ReportInputError, match="without target_metric"):
        build_report(run_dir, output_dir=tmp_path, target_value=0.5)
    with pytest.raises(ReportInputError, match="target_mode"):
        build_report(run_dir, output_dir=tmp_path, target_metric="val_acc", target_mode="up")


# ---------------------------------------------------------------- emissions.csv


def test_emissions_csv_has_codecarbon_columns_and_units(
    default_report, run_dir: Path, summary: dict
) -> None:
    result = default_report
    with result.emissions_csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames
    assert header == list(CODECARBON_COLUMNS) and len(header) == 32
    for name in ("timestamp", "project_name", "run_id", "duration", "emissions",
                 "emissions_rate", "cpu_power", "gpu_power", "ram_power", "cpu_energy",
                 "gpu_energy", "ram_energy", "energy_consumed", "country_iso_code",
                 "tracking_mode", "pue"):  # fmt: skip
        assert name in header
    assert len(rows) == 1
    row = rows[0]
    totals = summary["totals"]
    assert float(row["emissions"]) == pytest.approx(totals["co2e_g"] / 1000)  # kg
    assert float(row["duration"]) == pytest.approx(totals["duration_s"])
    assert float(row["emissions_rate"]) == pytest.approx(
        totals["co2e_g"] / 1000 / totals["duration_s"]
    )
    assert float(row["energy_consumed"]) == pytest.approx(totals["facility_energy_kwh"])
    gpu_j = sum(d["fit_energy_j"] for d in summary["devices"] if d["kind"] == "gpu")
    cpu_j = sum(d["fit_energy_j"] for d in summary["devices"] if d["kind"] == "cpu")
    assert float(row["gpu_energy"]) == pytest.approx(gpu_j / 3.6e6)
    assert float(row["cpu_energy"]) == pytest.approx(cpu_j / 3.6e6)
    assert float(row["gpu_power"]) == pytest.approx(gpu_j / totals["duration_s"])
    assert float(row["ram_energy"]) == 0.0
    assert row["project_name"] == "lightning_sustain"
    assert row["country_iso_code"] == "DEU" and row["country_name"] == "Germany"
    assert row["pue"] == "1.2" and row["tracking_mode"] == "machine"
    assert row["gpu_count"] == "1" and "Simulated" in row["gpu_model"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", row["timestamp"])
    for unknown in ("experiment_id", "os", "cpu_model", "longitude", "ram_total_size"):
        assert row[unknown] == ""
    # the same run gets the same run_id when the report is rebuilt
    assert run_id_for(run_dir, summary) == row["run_id"]
    assert emissions_row(summary, run_id="x", project_name="demo")["project_name"] == "demo"


# ---------------------------------------------------------------- optional inputs


def test_shap_summary_is_embedded(run_dir: Path, default_report) -> None:
    shap_summary = json.loads((run_dir / "shap" / "summary.json").read_text())
    result = default_report
    md = result.markdown_path.read_text()
    assert "Explanations (SHAP)" in md
    top = shap_summary["outputs"][0]["top_features"][0]["name"]
    assert f"| 1 | {top} |" in md
    shap_plots = [k for k in result.plot_paths if k.startswith("shap_")]
    assert shap_plots
    assert result.plot_paths[shap_plots[0]].read_bytes()[:8] == PNG_MAGIC


def test_budget_file_and_arguments(run_copy: Path, summary: dict) -> None:
    (run_copy / "energy_budget.json").write_text(json.dumps({"energy_budget_kwh": 0.01}))
    result = build_report(run_copy)
    md = result.markdown_path.read_text()
    used = summary["totals"]["energy_kwh"]
    assert "| Energy budget | 0.01 kWh |" in md
    assert f"({100 * used / 0.01:.1f}%)" in md and "Budget source: energy_budget.json" in md
    result = build_report(run_copy, energy_budget_kwh=0.5, power_budget_w=50.0)
    md = result.markdown_path.read_text()
    assert "| Energy budget | 0.5 kWh |" in md and "| Power budget | 50 W |" in md
    with pytest.raises(ReportInputError, match="power_budget_w"):
        build_report(run_copy, power_budget_w=-3.0)


def test_missing_trace_is_reported_not_fatal(run_copy: Path) -> None:
    (run_copy / "energy_trace.csv").unlink()
    result = build_report(run_copy)
    assert "power" not in result.plot_paths and "cumulative" in result.plot_paths
    assert any("energy_trace.csv" in w for w in result.warnings)
    assert "## Not included" in result.markdown_path.read_text()


def test_corrupt_trace_line_is_named(run_copy: Path) -> None:
    path = run_copy / "energy_trace.csv"
    lines = path.read_text().splitlines()
    lines[5] = lines[5].replace(lines[5].split(",")[7], "garbage", 1)
    path.write_text("\n".join(lines) + "\n")
    result = build_report(run_copy)
    assert any("line 6" in w for w in result.warnings)
    assert "power" not in result.plot_paths


def test_truncated_last_trace_line_is_ignored(run_copy: Path) -> None:
    path = run_copy / "energy_trace.csv"
    text = path.read_text()
    path.write_text(text[: text.rstrip("\n").rfind(",")])  # crash mid-line
    trace = read_trace(path)
    assert len(trace) == 23
    assert "power" in build_report(run_copy).plot_paths


def test_resumed_trace_clock_is_made_monotonic(tmp_path: Path) -> None:
    path = tmp_path / "energy_trace.csv"
    header = "step,epoch,rank,start_s,end_s,duration_s,samples,energy_j,power_w,provenance"
    rows = ["0,0,0,0.0,1.0,1.0,4,10,10,counter", "1,0,0,1.0,2.0,1.0,4,10,10,counter",
            "2,1,0,0.5,1.5,1.0,4,20,20,counter"]  # fmt: skip
    path.write_text("\n".join([header, *rows]) + "\n")
    trace = read_trace(path)
    assert trace.resumed_segments == 1
    assert list(trace.start_s) == [0.0, 1.0, 2.0] and list(trace.end_s) == [1.0, 2.0, 3.0]


# ---------------------------------------------------------------- bad run directories


def test_missing_and_corrupt_summaries_give_clear_errors(run_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(ReportInputError, match="does not exist"):
        build_report(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportInputError, match="No energy_summary.json in .*EnergyMonitor"):
        build_report(empty)
    summary_path = run_copy / "energy_summary.json"
    text = summary_path.read_text()
    summary_path.write_text(text[: len(text) // 2])
    with pytest.raises(ReportInputError, match="not valid JSON"):
        build_report(run_copy)
    data = json.loads(text)
    summary_path.write_text(json.dumps(dict(data, schema="something/else")))
    with pytest.raises(ReportInputError, match="not a lightning_sustain energy summary"):
        build_report(run_copy)
    broken = copy.deepcopy(data)
    broken["totals"]["energy_kwh"] = "lots"
    summary_path.write_text(json.dumps(broken))
    with pytest.raises(ReportInputError, match="totals.energy_kwh is 'lots'"):
        build_report(run_copy)
    broken = copy.deepcopy(data)
    broken["totals"]["co2e_g"] = math.inf
    summary_path.write_text(json.dumps(broken))
    with pytest.raises(ReportInputError, match="totals.co2e_g"):
        build_report(run_copy)


# ---------------------------------------------------------------- command line


def test_cli_success_prints_paths_and_headline(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    code = report_main([str(run_dir), "-o", str(out), "--functional-unit", "sample",
                        "--target-metric", "val_acc", "--target-value", "0.0",
                        "--embodied-emissions-g", "2"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    assert str(out / "report.md") in captured.out and str(out / "emissions.csv") in captured.out
    assert "per training sample" in captured.out and "energy-to-target" in captured.out
    assert (out / "report.html").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}"], "does not exist"),
        (["{run}", "--target-metric", "nope", "--target-value", "1"], "was not recorded"),
        (["{run}", "--functional-unit", "token"], "invalid choice"),
        (["{run}", "--embodied-emissions-g", "-5"], "embodied_emissions_g=-5"),
    ],
)
def test_cli_user_errors_exit_2_without_traceback(
    run_dir: Path, tmp_path: Path, capsys, args, message
) -> None:
    argv = [a.format(run=run_dir, missing=tmp_path / "missing") for a in args]
    assert report_main([*argv, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_corrupt_summary_exits_2(run_copy: Path, capsys) -> None:
    (run_copy / "energy_summary.json").write_text("{not json")
    assert report_main([str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "lightning-sustain report: error:" in err and "not valid JSON" in err


def test_cli_help_exits_0(capsys) -> None:
    assert report_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--functional-unit" in out and "--target-metric" in out


# ---------------------------------------------------------------- disclosure and regions


def test_disclosure_names_method_and_status(summary: dict) -> None:
    from lightning_sustain.report.disclosure import build_disclosure

    d = build_disclosure(summary)
    assert d.energy_status.startswith("simulated (not a measurement")
    assert "partly estimated" in d.energy_status  # GPU counter + CPU estimate
    assert any(m.startswith("counter: measured") for m in d.methods)
    assert any(m.startswith("estimated: estimated") for m in d.methods)
    facts = dict(d.facts)
    assert facts["Floating point operations"] == "not measured by lightning_sustain"
    assert "1 process(es) on 1 host(s)" in facts["Computational resources"]
    # a two-rank run on real counters only: known, both GPUs counted
    ddp = copy.deepcopy(summary)
    gpu = next(dev for dev in ddp["devices"] if dev["kind"] == "gpu")
    ddp["devices"] = [
        dict(gpu, simulated=False, provenance="counter", rank=r, name="NVIDIA H100")
        for r in (0, 1)
    ]
    ddp["simulated"] = False
    ddp["world_size"] = 2
    ddp["ranks"] = [{"global_rank": r, "hostname": "node-a"} for r in (0, 1)]
    d2 = build_disclosure(ddp)
    assert d2.energy_status == "known (measured)"
    assert "2 x NVIDIA H100 (gpu); 2 process(es) on 1 host(s)" == dict(d2.facts)[
        "Computational resources"
    ]
    assert not any("simulated" in c for c in d2.caveats)


def test_emissions_row_leaves_unknown_country_empty(summary: dict) -> None:
    world = copy.deepcopy(summary)
    world["carbon"]["region"] = "WORLD"
    row = emissions_row(world, run_id="r")
    assert row["country_iso_code"] == "" and row["country_name"] == ""
    assert float(row["emissions"]) == pytest.approx(summary["totals"]["co2e_g"] / 1000)
