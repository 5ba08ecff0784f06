"""PNG plots of a run: power per device, energy per step, cumulative energy and CO2e.

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the Agg
backend, without pyplot: no GUI backend, nothing left in pyplot's registry, safe in
worker threads and on headless machines. Long traces are binned (energy-preserving
means) to at most ``max_points`` points so plotting stays fast for million-step runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sustain.report.inputs import Trace
from lightning_sustain.report.progress import EnergyToTarget, MetricProgress

logger = logging.getLogger(__name__)

MAX_POINTS = 2000


def _figure(width: float = 8.0, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100, format="png")
    return path


def _bins(n: int, max_points: int) -> np.ndarray:
    """Start indices of at most ``max_points`` contiguous bins over ``n`` rows."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n, max_points, endpoint=False).astype(np.int64))


def _binned_power(
    trace: Trace, energy_j: np.ndarray, max_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """Staircase (x, y) of mean power per bin, with gaps (NaN) where no step ran."""
    starts = _bins(len(trace), max_points)
    ends = np.append(starts[1:], len(trace))
    e = np.add.reduceat(energy_j, starts)
    d = np.add.reduceat(trace.duration_s, starts)
    power = np.divide(e, d, out=np.zeros_like(e), where=d > 0)
    t0 = trace.start_s[starts]
    t1 = trace.end_s[ends - 1]
    xs: list[float] = []
    ys: list[float] = []
    for i in range(len(starts)):
        if i and t0[i] > t1[i - 1] + 1e-3:  # validation or a pause in between
            xs.append(float("nan"))
            ys.append(float("nan"))
        xs += [float(t0[i]), float(t1[i])]
        ys += [float(power[i]), float(power[i])]
    return np.asarray(xs), np.asarray(ys)


def plot_power(
    trace: Trace,
    path: Path,
    *,
    device_names: dict[str, str] | None = None,
    power_budget_w: float | None = None,
    note: str = "",
    max_points: int = MAX_POINTS,
) -> Path:
    """Mean power per training step over time, per device and in total.

    Args:
        trace: the per-step trace.
        path: the PNG to write.
        device_names: trace column label -> display name with provenance.
        power_budget_w: draw the power budget as a horizontal line.
        note: appended to the title (e.g. "simulated").
        max_points: bin longer traces to this many points.

    Returns:
        ``path``.
    """
    names = device_names or {}
    fig = _figure()
    ax = fig.add_subplot()
    if len(trace.device_energy_j) > 1:
        for label, energy in trace.device_energy_j.items():
            x, y = _binned_power(trace, energy, max_points)
            ax.plot(x, y, lw=1.2, label=names.get(label, label))
    x, y = _binned_power(trace, trace.energy_j, max_points)
    ax.plot(x, y, lw=1.6, color="black", label="total (measured devices)")
    if power_budget_w is not None:
        ax.axhline(
            power_budget_w,
            color="tab:red",
            ls="--",
            lw=1.2,
            label=f"power budget {power_budget_w:g} W",
        )
    ax.set_xlabel("time since start of fit [s]")
    ax.set_ylabel("mean power per step [W]")
    ax.set_title("Power over time" + (f" ({note})" if note else ""))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_energy_per_step(
    trace: Trace, path: Path, *, note: str = "", max_points: int = MAX_POINTS
) -> Path:
    """Energy of each training step (binned means for long traces)."""
    starts = _bins(len(trace), max_points)
    counts = np.diff(np.append(starts, len(trace)))
    mean_e = np.add.reduceat(trace.energy_j, starts) / counts
    fig = _figure()
    ax = fig.add_subplot()
    steps = trace.step[starts]
    if len(starts) <= 200:
        ax.bar(steps, mean_e, width=np.maximum(counts, 1) * 0.9, align="edge", color="tab:blue")
    else:
        ax.plot(steps, mean_e, lw=1.0, color="tab:blue")
    ax.set_xlabel("training step")
    ylabel = "energy per step [J]" if len(starts) == len(trace) else "mean energy per step [J]"
    ax.set_ylabel(ylabel)
    ax.set_title("Energy per step" + (f" ({note})" if note else ""))
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_cumulative(
    trace: Trace | None,
    summary: dict[str, Any],
    path: Path,
    *,
    energy_budget_kwh: float | None = None,
    note: str = "",
    max_points: int = MAX_POINTS,
) -> Path:
    """Cumulative energy (kWh) and CO2e (g) over time.

    The line is the training steps' energy from the trace; the markers are the fit
    energy (validation included, all ranks) at the end of each validation run.
    """
    carbon = summary["carbon"]
    g_per_kwh = float(carbon["g_co2e_per_kwh"]) * float(carbon.get("pue", 1.0))
    fig = _figure()
    ax = fig.add_subplot()
    if trace is not None and len(trace):
        cum_kwh = np.cumsum(trace.energy_j) / 3.6e6
        idx = _bins(len(trace), max_points)
        idx = np.append(idx[1:] - 1, len(trace) - 1)
        ax.plot(
            trace.end_s[idx],
            cum_kwh[idx],
            color="tab:green",
            lw=1.6,
            label="training steps (trace)",
        )
    history = summary.get("metric_history", [])
    if history:
        ax.plot(
            [h["elapsed_s"] for h in history],
            [h["energy_j"] / 3.6e6 for h in history],
            "o",
            color="tab:purple",
            ms=4,
            label="fit energy at validation ends",
        )
    totals = summary["totals"]
    ax.plot(
        [totals["duration_s"]],
        [totals["energy_kwh"]],
        "s",
        color="black",
        ms=5,
        label=f"run total {totals['energy_kwh']:.3g} kWh",
    )
    if energy_budget_kwh is not None:
        ax.axhline(
            energy_budget_kwh,
            color="tab:red",
            ls="--",
            lw=1.2,
            label=f"energy budget {energy_budget_kwh:g} kWh",
        )
    ax.set_xlabel("time since start of fit [s]")
    ax.set_ylabel("cumulative energy [kWh]")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    co2 = ax.secondary_yaxis(
        "right", functions=(lambda k: k * g_per_kwh, lambda g: g / g_per_kwh if g_per_kwh else g)
    )
    co2.set_ylabel(f"cumulative CO2e [g] (at {g_per_kwh:g} g/kWh incl. PUE)")
    ax.set_title("Cumulative energy and CO2e" + (f" ({note})" if note else ""))
    return _save(fig, path)


def plot_metric(
    progress: MetricProgress, path: Path, *, target: EnergyToTarget | None = None, note: str = ""
) -> Path:
    """The monitored metric against cumulative fit energy, with the target when set."""
    fig = _figure()
    ax = fig.add_subplot()
    kwh = [r.energy_j / 3.6e6 for r in progress.rows]
    ax.plot(kwh, [r.value for r in progress.rows], "o-", color="tab:blue", label=progress.metric)
    if target is not None:
        ax.axhline(
            target.target_value,
            color="tab:red",
            ls="--",
            lw=1.2,
            label=f"target {target.target_value:g}",
        )
        if target.reached and target.energy_j is not None:
            ax.axvline(
                target.energy_j / 3.6e6,
                color="tab:red",
                ls=":",
                lw=1.0,
                label="target first reached",
            )
    if progress.best_index is not None:
        best = progress.rows[progress.best_index]
        ax.plot(
            [best.energy_j / 3.6e6],
            [best.value],
            "*",
            color="gold",
            ms=14,
            mec="black",
            label=f"best {best.value:.4g}",
        )
    ax.set_xlabel("cumulative fit energy [kWh]")
    ax.set_ylabel(progress.metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{progress.metric} against energy" + (f" ({note})" if note else ""))
    return _save(fig, path)
