"""Build the sustainability report of a run: Markdown, HTML, PNG plots, emissions.csv.

``build_report(run_dir)`` reads what EnergyMonitor wrote (``energy_summary.json``,
``energy_trace.csv``) and, when present, what ShapSummary and a budget callback wrote,
and writes into ``output_dir`` (default: ``run_dir``)::

    report.md              the report, plots referenced relative to it
    report.html            the same, self-contained (plots embedded)
    emissions.csv          one CodeCarbon-compatible row
    report_files/*.png     the plots

``report_main(argv)`` is the ``lightning-sustain report`` command line.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_sustain.report.disclosure import Disclosure, build_disclosure
from lightning_sustain.report.emissions import emissions_row, run_id_for, write_emissions_csv
from lightning_sustain.report.inputs import ReportInputError, RunInputs, Trace, load_run
from lightning_sustain.report.progress import (
    EnergyToTarget,
    MetricProgress,
    available_metrics,
    energy_to_target,
    metric_progress,
)
from lightning_sustain.report.render import (
    Block,
    Bullets,
    Callout,
    Heading,
    Image,
    Para,
    Table,
    to_html,
    to_markdown,
)
from lightning_sustain.report.sci import FUNCTIONAL_UNITS, SciScore, compute_sci, count_epochs

__all__ = ["ReportInputError", "ReportResult", "build_report", "report_main"]

logger = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
EMISSIONS_CSV = "emissions.csv"
PLOTS_DIRNAME = "report_files"


@dataclass
class ReportResult:
    """What :func:`build_report` wrote and the headline numbers it stated.

    Attributes:
        output_dir: where the report went.
        markdown_path: ``report.md``.
        html_path: ``report.html`` (self-contained).
        emissions_csv_path: ``emissions.csv`` (CodeCarbon columns and units).
        plot_paths: plot name (``power``, ``energy_per_step``, ``cumulative``,
            ``metric``, ``shap_<output>``) -> PNG path.
        energy_kwh: IT energy of the run (all ranks), kWh.
        facility_energy_kwh: energy including PUE, kWh.
        co2e_g: CO2e of the run (PUE applied), grams.
        duration_s: wall-clock time of fit, seconds.
        steps: training steps.
        samples: training samples.
        energy_per_sample_j: training-step energy per sample, J (``None`` without samples).
        provenance: provenance of the energy figures, e.g. ``"counter (simulated)"``.
        simulated: whether any figure comes from the simulated NVML device.
        sci: the SCI score for the chosen functional unit.
        energy_to_target: energy-to-target, when a target metric and value were given.
        progress: energy per point of the target metric gained, when a metric was given.
        warnings: what the report could not include, in words.
    """

    output_dir: Path
    markdown_path: Path
    html_path: Path
    emissions_csv_path: Path
    plot_paths: dict[str, Path]
    energy_kwh: float
    facility_energy_kwh: float
    co2e_g: float
    duration_s: float
    steps: int
    samples: int
    energy_per_sample_j: float | None
    provenance: str
    simulated: bool
    sci: SciScore
    energy_to_target: EnergyToTarget | None = None
    progress: MetricProgress | None = None
    warnings: list[str] = field(default_factory=list)

    def headline(self) -> str:
        """One line with the headline numbers, e.g. for a terminal."""
        text = (
            f"{self.energy_kwh:.4g} kWh ({self.provenance}), {self.co2e_g:.4g} g CO2e, "
            f"{self.duration_s:.1f} s, {self.steps} steps, {self.samples} samples; "
            f"SCI {self.sci.sci_g:.4g} g CO2e per {self.sci.unit_words}"
        )
        t = self.energy_to_target
        if t is not None:
            if t.reached and t.energy_j is not None:
                text += (
                    f"; energy-to-target ({t.metric} {'>=' if t.mode == 'max' else '<='} "
                    f"{t.target_value:g}): {t.energy_j / 3.6e6:.4g} kWh"
                )
            else:
                text += f"; target {t.metric}={t.target_value:g} not reached"
        return text


# -- formatting ---------------------------------------------------------------------------
def _g(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}"


def _energy(joules: float) -> str:
    kwh = joules / 3.6e6
    if joules < 3.6e6 * 1e-3:  # under 1 Wh: joules read better
        return f"{_g(joules)} J ({kwh:.3g} kWh)"
    return f"{_g(kwh)} kWh ({joules:.4g} J)"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min ({seconds:.0f} s)"
    return f"{seconds / 3600:.2f} h ({seconds:.0f} s)"


def _check_positive(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportInputError(f"{name}={value!r} must be a number > 0 or None.")
    if not math.isfinite(value) or value <= 0:
        raise ReportInputError(f"{name}={value!r} must be a finite number > 0.")
    return float(value)


def _device_names(summary: dict[str, Any], trace: Trace | None) -> dict[str, str]:
    """Trace column label (``gpu0``, ``cpu0``) -> ``label: name [provenance]``.

    The trace is written by global rank 0 with one column per device of that rank, in
    the order of the summary's device list.
    """
    if trace is None:
        return {}
    rank0 = [d for d in summary.get("devices", []) if int(d.get("rank", 0)) == 0]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in rank0:
        by_kind.setdefault(str(d.get("kind")), []).append(d)
    seen: dict[str, int] = {}
    names: dict[str, str] = {}
    for label in trace.device_energy_j:
        kind = label.rstrip("0123456789")
        i = seen.get(kind, 0)
        seen[kind] = i + 1
        devices = by_kind.get(kind, [])
        if i < len(devices):
            names[label] = f"{label}: {devices[i].get('name')} [{devices[i].get('provenance')}]"
        else:
            names[label] = label
    return names


# -- sections -----------------------------------------------------------------------------
def _totals_section(summary: dict[str, Any]) -> list[Block]:
    totals, carbon = summary["totals"], summary["carbon"]
    prov = summary["provenance"]
    pue = float(carbon.get("pue", 1.0))
    per_sample = totals.get("energy_per_sample_j")
    per_step = totals.get("energy_per_step_j")
    facility = float(totals.get("facility_energy_kwh", totals["energy_kwh"] * pue))
    rows = [
        ["Energy (IT equipment, run)", _energy(float(totals["energy_j"])), prov],
        [
            "Energy incl. data-centre overhead",
            f"{_g(facility)} kWh",
            f"{prov}, x PUE {pue:g} (EnergyMonitor's pue setting)",
        ],
        [
            "CO2e",
            f"{_g(float(totals['co2e_g']))} g",
            f"{prov} energy x {carbon['g_co2e_per_kwh']:g} g/kWh "
            f"({carbon.get('source', 'unknown')}) x PUE {pue:g}",
        ],
        [
            "Time (run, wall clock)",
            _duration(float(totals["duration_s"])),
            "measured (monotonic clock)",
        ],
        ["Training steps", str(int(totals["steps"])), "counted"],
        ["Training samples", str(int(totals["samples"])), "counted (batch sizes)"],
        [
            "Energy per sample",
            f"{_g(per_sample)} J" if per_sample is not None else "n/a",
            f"{prov} (training-step energy / samples)",
        ],
        [
            "Energy per step",
            f"{_g(per_step)} J" if per_step is not None else "n/a",
            f"{prov} (training-step energy / steps)",
        ],
    ]
    phases = [
        ["Training steps", _energy(float(totals.get("train_energy_j", 0.0)))],
        ["Validation", _energy(float(totals.get("validation_energy_j", 0.0)))],
        ["Test", _energy(float(totals.get("test_energy_j", 0.0)))],
        ["Explanation (SHAP)", _energy(float(totals.get("explain_energy_j", 0.0)))],
        [
            "Other (data loading between phases, hooks, set-up)",
            _energy(float(totals.get("other_energy_j", 0.0))),
        ],
    ]
    devices = [
        [
            str(d.get("name")),
            str(d.get("kind")),
            str(d.get("rank", 0)),
            _energy(float(d.get("fit_energy_j", 0.0))),
            _energy(float(d.get("train_energy_j", 0.0))),
            str(d.get("provenance")),
        ]
        for d in summary.get("devices", [])
    ]
    rows += _efficiency_rows(summary)
    world = int(summary.get("world_size", 1) or 1)
    return [
        Heading("Totals"),
        Table(["Quantity", "Value", "Provenance"], rows, ["l", "r", "l"]),
        Para(
            "Provenance: counter = cumulative hardware energy counter (NVML, RAPL); "
            "integrated = power samples integrated over time; estimated = CPU time x an "
            "assumed power per core; (simulated) = the simulated NVML device, not hardware."
        ),
        Heading("Energy by phase", 3),
        Table(["Phase", "Energy"], phases, ["l", "r"]),
        Heading("Measured devices", 3),
        Table(
            ["Device", "Kind", "Rank", "Fit energy", "Training-step energy", "Provenance"],
            devices,
            ["l", "l", "r", "r", "r", "l"],
        ),
        Para(f"{world} process(es); totals are summed over all ranks."),
    ]


def _efficiency_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Rows for FLOP efficiency, tokens per J and time-resolved CO2e, where the summary has them."""
    totals, prov = summary["totals"], summary["provenance"]
    rows: list[list[str]] = []
    train = (summary.get("efficiency") or {}).get("train")
    if train and totals.get("j_per_tflop") is not None:
        how = f"{prov} energy / counted FLOPs ({train.get('method', 'method not stated')})"
        rows += [
            ["FLOPs per training batch (per rank)", f"{int(train['flops_per_step']):,}", "counted"],
            ["Energy per TFLOP", f"{_g(totals['j_per_tflop'])} J", how],
            ["Achieved TFLOP/s per W", _g(totals.get("tflops_per_s_per_w")), f"{prov}, same count"],
        ]
    if totals.get("tokens_per_j") is not None:
        rows.append(["Tokens per J", _g(totals["tokens_per_j"]), f"{prov} (training)"])
    tr = summary.get("carbon_time_resolved")
    if tr and totals.get("co2e_time_resolved_g") is not None:
        rows.append(
            [
                "CO2e, time-resolved",
                f"{_g(float(totals['co2e_time_resolved_g']))} g",
                f"{tr.get('source')}; {tr.get('status')}; "
                f"{float(tr.get('fallback_fraction', 0.0)):.1%} of the time on the fallback",
            ]
        )
    return rows


def _sci_section(sci: SciScore) -> list[Block]:
    if sci.embodied_supplied:
        m_note = "user-supplied"
    else:
        m_note = (
            "not supplied: M defaults to 0, so this score covers operational emissions only "
            "(pass embodied_emissions_g / --embodied-emissions-g to include the hardware's "
            "embodied emissions)"
        )
    r_note = {
        "run": "one training run",
        "sample": "training samples processed",
        "step": "training steps (optimizer steps)",
        "epoch": "training epochs",
    }[sci.functional_unit]
    rows = [
        ["E (energy, incl. PUE)", f"{_g(sci.energy_kwh, 6)} kWh", "measured fit energy x PUE"],
        [
            "I (carbon intensity)",
            f"{sci.intensity_g_per_kwh:g} g CO2e/kWh",
            f"{sci.intensity_source}; location-based annual average unless user-supplied",
        ],
        ["O = E x I", f"{_g(sci.operational_g, 6)} g CO2e", "operational emissions"],
        ["M (embodied emissions)", f"{_g(sci.embodied_g, 6)} g CO2e", m_note],
        ["R (functional unit)", f"{sci.r:g} x {sci.functional_unit}", r_note],
        ["SCI = (E x I + M) / R", f"{_g(sci.sci_g, 6)} g CO2e per {sci.unit_words}", ""],
    ]
    blocks: list[Block] = [
        Heading("Software Carbon Intensity (ISO/IEC 21031:2024)"),
        Para(f"SCI = {_g(sci.sci_g, 6)} g CO2e per {sci.unit_words}."),
        Table(["Term", "Value", "Note"], rows, ["l", "r", "l"]),
    ]
    if not sci.embodied_supplied:
        blocks.append(Callout("M, the embodied emissions, was not supplied and is 0 here."))
    return blocks


def _target_section(
    summary: dict[str, Any],
    target_metric: str | None,
    target: EnergyToTarget | None,
    progress: MetricProgress | None,
) -> list[Block]:
    blocks: list[Block] = [Heading("Energy-to-target")]
    if target_metric is None:
        known = ", ".join(available_metrics(summary)) or "none"
        blocks.append(
            Para(
                "No target metric was given (target_metric= / --target-metric). Metrics "
                f"recorded at the end of each validation run: {known}."
            )
        )
        return blocks
    op = ">=" if (target is None or target.mode == "max") else "<="
    if target is None:
        blocks.append(
            Para(
                f"No target value was given for {target_metric} (target_value= / "
                "--target-value); energy per point gained is shown below."
            )
        )
    elif target.reached:
        assert target.energy_j is not None and target.elapsed_s is not None
        blocks += [
            Para(
                f"{target.metric} {op} {target.target_value:g} was first reached at epoch "
                f"{target.epoch}, step {target.step} (value {target.value:.4g}). As MLPerf "
                "Power reports energy-to-train, the figures cover everything from the start "
                "of fit to the end of that evaluation, validation included, all ranks."
            ),
            Table(
                ["Quantity", "Until target first reached", "Whole run"],
                [
                    [
                        "Energy",
                        _energy(target.energy_j),
                        _energy(float(summary["totals"]["energy_j"])),
                    ],
                    [
                        "CO2e",
                        f"{_g(target.co2e_g)} g",
                        f"{_g(float(summary['totals']['co2e_g']))} g",
                    ],
                    [
                        "Time",
                        _duration(target.elapsed_s),
                        _duration(float(summary["totals"]["duration_s"])),
                    ],
                ],
                ["l", "r", "r"],
            ),
        ]
    else:
        best = (
            "no evaluation recorded it"
            if target.best_value is None
            else (f"best value {target.best_value:.4g} over {target.evaluations} evaluation(s)")
        )
        blocks.append(
            Para(
                f"Target not reached: {target.metric} {op} {target.target_value:g} was not "
                f"reached ({best}). The whole run used "
                f"{_energy(float(summary['totals']['energy_j']))}."
            )
        )
    if progress is not None and progress.rows:
        unit = "percentage point" if progress.point == 0.01 else f"{progress.point:g}"
        blocks.append(Heading(f"Energy per point of {progress.metric} gained", 3))
        rows = []
        for r in progress.rows:
            if r.gain_points is None:
                gain, per = "n/a (first evaluation)", "n/a"
            elif r.energy_per_point_j is None:
                gain, per = f"{r.gain_points:+.3g}", "no gain"
            else:
                gain, per = f"{r.gain_points:+.3g}", _energy(r.energy_per_point_j)
            rows.append(
                [str(r.epoch), str(r.step), f"{r.value:.4g}", _energy(r.delta_energy_j), gain, per]
            )
        blocks.append(
            Table(
                [
                    "Epoch",
                    "Step",
                    progress.metric,
                    "Energy since previous",
                    f"Gain ({unit}s)",
                    f"Energy per {unit}",
                ],
                rows,
                ["r", "r", "r", "r", "r", "r"],
            )
        )
        if progress.best_index is not None:
            best = progress.rows[progress.best_index]
            share = (
                100.0 * progress.energy_after_best_j / progress.total_energy_j
                if progress.total_energy_j > 0
                else 0.0
            )
            if progress.best_index == len(progress.rows) - 1:
                text = (
                    f"The best {progress.metric} ({best.value:.4g}) came at the last evaluation "
                    f"(epoch {best.epoch}): training was still improving when it stopped."
                )
            else:
                text = (
                    f"The best {progress.metric} ({best.value:.4g}) came at epoch {best.epoch}, "
                    f"step {best.step}; the {_energy(progress.energy_after_best_j)} spent "
                    f"after it ({share:.1f}% of the run) did not improve it: training had "
                    "stopped paying."
                )
            blocks.append(Para(text))
    return blocks


def _budget_section(
    trace: Trace | None,
    summary: dict[str, Any],
    energy_budget_kwh: float | None,
    power_budget_w: float | None,
    source: str,
) -> list[Block]:
    if energy_budget_kwh is None and power_budget_w is None:
        return []
    rows = []
    if energy_budget_kwh is not None:
        used = float(summary["totals"]["energy_kwh"])
        rows.append(
            [
                "Energy budget",
                f"{energy_budget_kwh:g} kWh",
                f"{_g(used)} kWh used ({100 * used / energy_budget_kwh:.1f}%)",
            ]
        )
    if power_budget_w is not None:
        if trace is not None and len(trace):
            power = trace.energy_j / trace.duration_s.clip(min=1e-9)
            peak = float(power.max())
            over = int((power > power_budget_w).sum())
            rows.append(
                [
                    "Power budget",
                    f"{power_budget_w:g} W",
                    f"peak mean step power {_g(peak)} W (rank 0 devices); "
                    f"{over} of {len(trace)} steps above the budget",
                ]
            )
        else:
            rows.append(["Power budget", f"{power_budget_w:g} W", "no trace to compare"])
    return [
        Heading("Budgets"),
        Table(["Budget", "Limit", "Run"], rows, ["l", "r", "l"]),
        Para(f"Budget source: {source}. Budget lines are drawn in the plots."),
    ]


def _disclosure_section(d: Disclosure) -> list[Block]:
    return [
        Heading("EU AI Act disclosure (Annex XI, technical documentation)"),
        Para(
            "Energy facts of this training run for the technical documentation that "
            "Regulation (EU) 2024/1689, Annex XI, Section 1, point 2 (d) and (e) asks "
            "providers of general-purpose AI models to keep: computational resources, "
            "training time, known or estimated energy consumption."
        ),
        Table(["Item", "Value"], [[k, v] for k, v in d.facts], ["l", "l"]),
        Heading("Method", 3),
        Bullets(d.methods),
        Heading("Caveats", 3),
        Bullets(d.caveats),
    ]


def _shap_section(
    inputs: RunInputs, plots_dir: Path, plot_paths: dict[str, Path], max_outputs: int = 3
) -> list[Block]:
    shap = inputs.shap
    if shap is None:
        return []
    blocks: list[Block] = [Heading("Explanations (SHAP)")]
    if shap.get("status") not in (None, "ok"):
        blocks.append(Para(f"SHAP summary status: {shap.get('status')}: {shap.get('error', '')}"))
        return blocks
    blocks.append(
        Para(
            f"Explainer: {shap.get('explainer', '?')}; {shap.get('n_explained', '?')} rows "
            f"explained against {shap.get('n_background', '?')} background rows. "
            f"Privacy: {shap.get('privacy', {}).get('note', 'n/a')}"
        )
    )
    for out in list(shap.get("outputs", []))[:max_outputs]:
        if not isinstance(out, dict):
            continue
        name = str(out.get("name", "output"))
        feats = [f for f in out.get("top_features", []) if isinstance(f, dict)][:10]
        blocks.append(Heading(f"Top features for {name}", 3))
        blocks.append(
            Table(
                ["Rank", "Feature", "mean |SHAP|"],
                [
                    [str(i), str(f.get("name")), _g(f.get("mean_abs_shap"))]
                    for i, f in enumerate(feats, start=1)
                ],
                ["r", "l", "r"],
            )
        )
        bar = (out.get("plots") or {}).get("bar")
        if isinstance(bar, str):
            src = inputs.shap_dir / Path(bar).name
            if src.is_file():
                dst = plots_dir / f"shap_{src.name}"
                shutil.copyfile(src, dst)
                plot_paths[f"shap_{name}"] = dst
                blocks.append(Image(f"mean |SHAP| for {name}", dst))
    return blocks


# -- the report ---------------------------------------------------------------------------
def build_report(
    run_dir: str | Path,
    *,
    output_dir: str | Path | None = None,
    functional_unit: str = "run",
    target_metric: str | None = None,
    target_value: float | None = None,
    target_mode: str = "max",
    embodied_emissions_g: float = 0.0,
    energy_budget_kwh: float | None = None,
    power_budget_w: float | None = None,
    project_name: str = "lightning_sustain",
    metric_point: float | None = None,
    intensity_file: str | Path | None = None,
    intensity_timezone: str = "UTC",
) -> ReportResult:
    """Write the sustainability report of a run.

    Args:
        run_dir: the directory EnergyMonitor wrote ``energy_summary.json`` (and
            ``energy_trace.csv``) to: the Trainer's ``log_dir``.
        output_dir: where to write; default ``run_dir``.
        functional_unit: R of the SCI score: ``"run"``, ``"sample"``, ``"step"`` or
            ``"epoch"``.
        target_metric: a metric recorded at validation ends (e.g. ``"val_acc"``) for
            energy-to-target and energy per point gained.
        target_value: the quality target for energy-to-target.
        target_mode: ``"max"`` (reached when metric >= target) or ``"min"`` (<=).
        embodied_emissions_g: M of the SCI score, grams CO2e of embodied hardware
            emissions attributed to this run; default 0 (and the report says so).
        energy_budget_kwh: an energy budget to show; default: from a budget file in the
            run directory, if any.
        power_budget_w: a power budget to show; default: from a budget file, if any.
        project_name: ``project_name`` column of ``emissions.csv``.
        metric_point: size of one "point" of the target metric; default 0.01 (a
            percentage point) for metrics within [0, 1], else 1.
        intensity_file: a carbon-intensity time series (CSV/JSON, docs/carbon.md): adds
            time-resolved CO2e next to the annual figure and intensity under power.
        intensity_timezone: IANA zone of naive timestamps in ``intensity_file``.

    Returns:
        The :class:`ReportResult`.

    Raises:
        ReportInputError: the run directory has no readable energy summary, or an option
            is invalid (unknown functional unit, target metric never recorded...). The
            message says what to do.
    """
    inputs = load_run(run_dir)
    summary = inputs.summary
    energy_budget_kwh = _check_positive("energy_budget_kwh", energy_budget_kwh)
    power_budget_w = _check_positive("power_budget_w", power_budget_w)
    if target_value is not None and target_metric is None:
        raise ReportInputError("target_value was given without target_metric; name the metric.")
    if target_mode not in ("max", "min"):
        raise ReportInputError(f"target_mode={target_mode!r} is not 'max' or 'min'.")
    epochs = count_epochs(summary, inputs.trace.epoch if inputs.trace is not None else None)
    try:
        sci = compute_sci(summary, functional_unit, embodied_emissions_g, epochs=epochs)
        target = progress = None
        if target_metric is not None:
            progress = metric_progress(summary, target_metric, target_mode, metric_point)
            if target_value is not None:
                target = energy_to_target(summary, target_metric, target_value, target_mode)
    except ReportInputError:
        raise
    except ValueError as err:
        raise ReportInputError(str(err)) from err

    budget_source = "arguments"
    if energy_budget_kwh is None and inputs.budget.get("energy_budget_kwh") is not None:
        energy_budget_kwh = float(inputs.budget["energy_budget_kwh"])
        budget_source = str(inputs.budget.get("source"))
    if power_budget_w is None and inputs.budget.get("power_budget_w") is not None:
        power_budget_w = float(inputs.budget["power_budget_w"])
        budget_source = str(inputs.budget.get("source"))

    out_dir = Path(output_dir) if output_dir is not None else inputs.run_dir
    plots_dir = out_dir / PLOTS_DIRNAME
    try:
        plots_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportInputError(f"Cannot create the output directory {plots_dir}: {err}") from err

    simulated = bool(summary.get("simulated"))
    note = "simulated device" if simulated else ""
    warnings = list(inputs.warnings)
    plot_paths: dict[str, Path] = {}
    trace = inputs.trace
    from lightning_sustain.report import plots

    def attempt(name: str, make: Any) -> None:
        try:
            plot_paths[name] = make()
        except Exception as err:  # a plot failing must not lose the report
            warnings.append(f"The {name} plot could not be drawn: {type(err).__name__}: {err}")
            logger.warning("Report: %s", warnings[-1])

    if trace is not None:
        names = _device_names(summary, trace)
        world = int(summary.get("world_size", 1) or 1)
        rank_note = ", ".join(x for x in (note, "rank 0" if world > 1 else "") if x)
        attempt(
            "power",
            lambda: plots.plot_power(
                trace,
                plots_dir / "power.png",
                device_names=names,
                power_budget_w=power_budget_w,
                note=rank_note,
            ),
        )
        attempt(
            "energy_per_step",
            lambda: plots.plot_energy_per_step(
                trace, plots_dir / "energy_per_step.png", note=rank_note
            ),
        )
    attempt(
        "cumulative",
        lambda: plots.plot_cumulative(
            trace,
            summary,
            plots_dir / "cumulative.png",
            energy_budget_kwh=energy_budget_kwh,
            note=note,
        ),
    )
    if progress is not None and progress.rows:
        attempt(
            "metric",
            lambda: plots.plot_metric(progress, plots_dir / "metric.png", target=target, note=note),
        )

    # -- assemble -------------------------------------------------------------------------
    totals = summary["totals"]
    title = f"Sustainability report: {inputs.run_dir.resolve().name}"
    blocks: list[Block] = [Heading(title, 1)]
    blocks.append(
        Para(
            f"Run directory: {inputs.run_dir}. Energy summary written "
            f"{summary.get('written_at', '?')}, status {summary.get('status', '?')}; report "
            f"built {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}."
        )
    )
    if simulated:
        blocks.append(
            Callout(
                "This run was measured on the simulated NVML device. Figures marked "
                "(simulated) are test data, not measurements of real hardware."
            )
        )
    if summary.get("status") != "completed":
        blocks.append(
            Callout(
                f"The run did not complete ({summary.get('status')}); the "
                "report covers the part that ran."
            )
        )
    if summary.get("incomplete"):
        blocks.append(
            Callout(
                "Some devices failed to report during the run; their energy "
                "after the failure is missing from these totals."
            )
        )
    blocks.append(
        Bullets(
            [
                f"Energy: {_energy(float(totals['energy_j']))}, {summary['provenance']}",
                f"CO2e: {_g(float(totals['co2e_g']))} g",
                f"Time: {_duration(float(totals['duration_s']))}; "
                f"{int(totals['steps'])} steps, {int(totals['samples'])} samples",
                f"SCI: {_g(sci.sci_g)} g CO2e per {sci.unit_words}",
            ]
        )
    )
    blocks += _totals_section(summary)
    blocks += _sci_section(sci)
    blocks += _target_section(summary, target_metric, target, progress)
    if "metric" in plot_paths:
        blocks.append(Image(f"{target_metric} against cumulative energy", plot_paths["metric"]))
    blocks += _budget_section(trace, summary, energy_budget_kwh, power_budget_w, budget_source)
    if intensity_file is not None:
        blocks += _time_resolved_blocks(
            trace, summary, intensity_file, intensity_timezone, plots_dir, note, warnings
        )
    blocks.append(Heading("Plots"))
    for key, alt in (
        ("power", "Power over time per device"),
        ("energy_per_step", "Energy per training step"),
        ("cumulative", "Cumulative energy and CO2e"),
    ):
        if key in plot_paths:
            blocks.append(Image(alt, plot_paths[key]))
    blocks += _disclosure_section(build_disclosure(summary))
    blocks += _shap_section(inputs, plots_dir, plot_paths)
    blocks += [
        Heading("CodeCarbon-compatible emissions.csv"),
        Para(
            f"{EMISSIONS_CSV} holds one row with CodeCarbon's columns and units (emissions "
            "in kg CO2e, energies in kWh, powers in W as means over the run, duration in s); "
            "energy_consumed includes the PUE; fields not measured are empty."
        ),
    ]
    if warnings:
        blocks += [Heading("Not included"), Bullets(warnings)]

    md_path = out_dir / REPORT_MD
    html_path = out_dir / REPORT_HTML
    csv_path = out_dir / EMISSIONS_CSV
    try:
        md_path.write_text(to_markdown(blocks, out_dir), encoding="utf-8")
        html_path.write_text(to_html(blocks, title), encoding="utf-8")
        row = emissions_row(
            summary, run_id=run_id_for(inputs.run_dir, summary), project_name=project_name
        )
        write_emissions_csv(csv_path, row)
    except OSError as err:
        raise ReportInputError(f"Cannot write the report into {out_dir}: {err}") from err
    per_sample = totals.get("energy_per_sample_j")
    return ReportResult(
        output_dir=out_dir,
        markdown_path=md_path,
        html_path=html_path,
        emissions_csv_path=csv_path,
        plot_paths=plot_paths,
        energy_kwh=float(totals["energy_kwh"]),
        facility_energy_kwh=float(totals.get("facility_energy_kwh", totals["energy_kwh"])),
        co2e_g=float(totals["co2e_g"]),
        duration_s=float(totals["duration_s"]),
        steps=int(totals["steps"]),
        samples=int(totals["samples"]),
        energy_per_sample_j=float(per_sample) if per_sample is not None else None,
        provenance=str(summary["provenance"]),
        simulated=simulated,
        sci=sci,
        energy_to_target=target,
        progress=progress,
        warnings=warnings,
    )


def _time_resolved_blocks(
    trace: Trace | None,
    summary: dict[str, Any],
    intensity_file: str | Path,
    timezone: str,
    plots_dir: Path,
    note: str,
    warnings: list[str],
) -> list[Block]:
    """Time-resolved CO2e (report/carbon.py); a bad file becomes a warning, not a failure."""
    from lightning_sustain.report import carbon as _carbon

    if trace is None:
        warnings.append("Time-resolved CO2e needs the step trace (energy_trace.csv).")
        return []
    try:
        comparison = _carbon.compare_carbon(trace, summary, intensity_file, timezone=timezone)
    except ValueError as err:  # IntensityDataError included: names file and row
        warnings.append(f"Time-resolved CO2e could not be computed: {err}")
        return []
    plot: Path | None = None
    try:
        plot = _carbon.plot_power_and_intensity(
            trace, comparison, plots_dir / "power_intensity.png", note=note
        )
    except Exception as err:  # a plot failing must not lose the report
        warnings.append(f"The intensity plot could not be drawn: {type(err).__name__}: {err}")
    return _carbon.carbon_section(comparison, plot)


# -- command line -------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-sustain report",
        description=(
            "Write report.md, report.html, plots and a CodeCarbon-compatible emissions.csv "
            "for a run directory written by EnergyMonitor."
        ),
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run's log directory (holds energy_summary.json)"
    )
    p.add_argument("--output-dir", "-o", default=None, help="where to write (default: RUN_DIR)")
    p.add_argument(
        "--functional-unit",
        choices=FUNCTIONAL_UNITS,
        default="run",
        help="R of the SCI score (default: run)",
    )
    p.add_argument(
        "--target-metric", default=None, help="metric for energy-to-target, e.g. val_acc"
    )
    p.add_argument("--target-value", type=float, default=None, help="quality target value")
    p.add_argument(
        "--target-mode",
        choices=("max", "min"),
        default="max",
        help="max: reached when metric >= target; min: when <= (default: max)",
    )
    p.add_argument(
        "--embodied-emissions-g",
        type=float,
        default=0.0,
        help="M of the SCI score in g CO2e (default: 0, stated in the report)",
    )
    p.add_argument(
        "--energy-budget-kwh",
        type=float,
        default=None,
        help="energy budget line (default: from a budget file in RUN_DIR)",
    )
    p.add_argument(
        "--power-budget-w",
        type=float,
        default=None,
        help="power budget line (default: from a budget file in RUN_DIR)",
    )
    p.add_argument(
        "--project-name", default="lightning_sustain", help="project_name column of emissions.csv"
    )
    p.add_argument(
        "--metric-point",
        type=float,
        default=None,
        help="size of one point of the target metric (default: 0.01 for metrics in [0, 1], else 1)",
    )
    p.add_argument(
        "--intensity-file",
        default=None,
        help="carbon-intensity time series (CSV/JSON, docs/carbon.md) for time-resolved CO2e",
    )
    p.add_argument(
        "--intensity-timezone", default="UTC", help="IANA zone of naive times in the file"
    )
    return p


def report_main(argv: list[str] | None = None) -> int:
    """Entry point of ``lightning-sustain report``.

    Args:
        argv: the arguments after ``report``; default ``sys.argv[1:]``.

    Returns:
        0 on success, 2 for a user error (bad option, missing or corrupt run directory),
        printed as one message without a traceback.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        result = build_report(
            args.run_dir,
            output_dir=args.output_dir,
            functional_unit=args.functional_unit,
            target_metric=args.target_metric,
            target_value=args.target_value,
            target_mode=args.target_mode,
            embodied_emissions_g=args.embodied_emissions_g,
            energy_budget_kwh=args.energy_budget_kwh,
            power_budget_w=args.power_budget_w,
            project_name=args.project_name,
            metric_point=args.metric_point,
            intensity_file=args.intensity_file,
            intensity_timezone=args.intensity_timezone,
        )
    except ReportInputError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    for warning in result.warnings:
        print(f"{parser.prog}: warning: {warning}", file=sys.stderr)
    print(f"Report: {result.markdown_path}")
    print(f"        {result.html_path}")
    print(f"        {result.emissions_csv_path}")
    print(result.headline())
    return 0
