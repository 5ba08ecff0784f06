"""Time-resolved CO2e in the report: the step trace x an intensity time series.

The report's headline CO2e is location-based: the run's energy x one yearly average.
With an intensity file (``lightning-sustain report RUN_DIR --intensity-file grid.csv``)
this module adds CO2e integrated step by step over the trace, shows both figures side
by side, plots intensity under power, and says how much of the run the file did not
cover (those intervals use the summary's yearly intensity as the fallback).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sustain.energy.intensity import (
    ConstantIntensity,
    TimeResolvedCO2e,
    TimeSeriesIntensity,
    time_resolved_co2e,
)
from lightning_sustain.report.inputs import Trace
from lightning_sustain.report.render import (
    Block,
    Bullets,
    Callout,
    Heading,
    Image,
    Para,
    Table,
)


@dataclass
class CarbonComparison:
    """Location-based (annual) vs time-resolved CO2e of one run.

    Attributes:
        annual_co2e_g: the summary's CO2e (energy x yearly intensity x PUE), all ranks.
        annual_g_per_kwh: the summary's (yearly) intensity.
        traced: the time-resolved result over the trace's steps (rank 0).
        scaled_co2e_g: all ranks' energy x the traced steps' energy-weighted intensity.
        start_unix_s: the fit start used to place the trace in time.
        start_note: how the fit start was known.
    """

    annual_co2e_g: float
    annual_g_per_kwh: float
    traced: TimeResolvedCO2e
    scaled_co2e_g: float
    start_unix_s: float
    start_note: str


def _utc(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def fit_start_unix_s(summary: dict[str, Any]) -> tuple[float, str]:
    """When fit started: ``started_at`` if the summary has it, else ``written_at - duration``.

    Raises:
        ValueError: the summary has neither usable field.
    """
    started = summary.get("started_at")
    if started:
        stamp = _dt.datetime.fromisoformat(str(started).replace("Z", "+00:00"))
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=_dt.timezone.utc)
        return stamp.timestamp(), "the summary's started_at"
    written = summary.get("written_at")
    if not written:
        raise ValueError("the energy summary has no started_at or written_at time")
    stamp = _dt.datetime.fromisoformat(str(written).replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=_dt.timezone.utc)
    duration = float(summary["totals"]["duration_s"])
    return (
        stamp.timestamp() - duration,
        "written_at minus the run's duration (to about a second; the summary has no started_at)",
    )


def compare_carbon(
    trace: Trace,
    summary: dict[str, Any],
    intensity_file: str | Path,
    *,
    timezone: str = "UTC",
) -> CarbonComparison:
    """Time-resolved CO2e of the traced steps, against the summary's annual figure.

    Raises:
        IntensityDataError: the file cannot be used (message names file and row).
        ValueError: the summary has no usable time.
    """
    carbon = summary["carbon"]
    fallback = ConstantIntensity(
        float(carbon["g_co2e_per_kwh"]), str(carbon.get("source", "summary"))
    )
    provider = TimeSeriesIntensity(str(intensity_file), fallback=fallback, timezone=timezone)
    start, note = fit_start_unix_s(summary)
    pue = float(carbon.get("pue", 1.0))
    traced = time_resolved_co2e(
        start + trace.start_s, start + trace.end_s, np.maximum(trace.energy_j, 0.0), provider, pue
    )
    total_j = float(summary["totals"]["energy_j"])
    mean = traced.mean_intensity_g_per_kwh
    if not np.isfinite(mean):
        mean = fallback.g_co2e_per_kwh
    scaled = total_j / 3.6e6 * pue * mean
    return CarbonComparison(
        float(summary["totals"]["co2e_g"]), fallback.g_co2e_per_kwh, traced, scaled, start, note
    )


def carbon_section(comparison: CarbonComparison, plot: Path | None) -> list[Block]:
    """Report blocks: the two figures side by side, coverage, and the plot."""
    t = comparison.traced
    blocks: list[Block] = [Heading("Time-resolved CO2e")]
    rows = [
        [
            "Location-based (annual average)",
            f"{comparison.annual_co2e_g:.4g} g",
            "energy x one yearly intensity (summary)",
        ],
        [
            "Time-resolved (whole run, scaled)",
            f"{comparison.scaled_co2e_g:.4g} g",
            f"energy x {t.mean_intensity_g_per_kwh:.4g} g/kWh, the energy-weighted intensity "
            "of the traced steps",
        ],
        [
            "Time-resolved (traced steps, step by step)",
            f"{t.total_co2e_g:.4g} g",
            f"{len(t.co2e_g)} steps of rank 0, each step's energy x the mean intensity over it",
        ],
    ]
    blocks.append(Table(["CO2e", "Value", "How"], rows, ["l", "r", "l"]))
    if t.intensity_g_per_kwh.size:
        blocks.append(
            Bullets(
                [
                    f"Intensity source: {t.source}",
                    f"Intensity during the run: {t.intensity_g_per_kwh.min():.4g} to "
                    f"{t.intensity_g_per_kwh.max():.4g} g/kWh",
                    f"Fit start placed at {_utc(comparison.start_unix_s)} from "
                    f"{comparison.start_note}",
                ]
            )
        )
    if t.fallback_fraction > 0:
        blocks.append(
            Callout(
                f"The intensity file does not cover {t.fallback_fraction:.1%} of the traced "
                "time; those steps use the summary's yearly intensity (fallback)."
            )
        )
    blocks.append(
        Para(
            "Time-resolved accounting integrates CO2e interval by interval, so a run that "
            "drew its power when the grid was clean shows less CO2e than energy x the "
            "yearly average. Energy provenance is that of the trace (see Totals)."
        )
    )
    if plot is not None:
        blocks.append(Image("Power (top) and grid carbon intensity (bottom)", plot))
    return blocks


def plot_power_and_intensity(
    trace: Trace, comparison: CarbonComparison, path: Path, note: str = ""
) -> Path:
    """Mean power per step (top) and the intensity over each step (bottom), shared time axis."""
    from lightning_sustain.report.plots import _figure, _save

    fig = _figure(8.0, 5.0)
    top = fig.add_subplot(2, 1, 1)
    bottom = fig.add_subplot(2, 1, 2, sharex=top)
    duration = np.where(trace.duration_s > 0, trace.duration_s, np.nan)
    mid = (trace.start_s + trace.end_s) / 2
    top.plot(mid, trace.energy_j / duration, color="black", lw=1.2)
    top.set_ylabel("power [W]")
    top.set_title("Power and grid carbon intensity" + (f" ({note})" if note else ""))
    top.grid(alpha=0.3)
    intensity = comparison.traced.intensity_g_per_kwh
    bottom.plot(mid, intensity, color="tab:green", lw=1.2, label="time-resolved")
    bottom.axhline(
        comparison.annual_g_per_kwh,
        color="tab:gray",
        ls="--",
        lw=1.0,
        label=f"yearly average {comparison.annual_g_per_kwh:g}",
    )
    bottom.set_ylabel("gCO2e/kWh")
    bottom.set_xlabel("time since start of fit [s]")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8, loc="best")
    return _save(fig, path)


__all__ = [
    "CarbonComparison",
    "carbon_section",
    "compare_carbon",
    "fit_start_unix_s",
    "plot_power_and_intensity",
]
