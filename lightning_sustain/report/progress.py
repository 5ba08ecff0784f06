"""Energy-to-target and energy per point of metric gained, from the metric history.

EnergyMonitor records, at the end of every validation run, the monitored metrics and the
fit energy (all ranks), CO2e and time spent so far. Energy-to-target is read off that
history the way MLPerf Power reports energy-to-train: everything spent from the start of
fit until the evaluation at which the metric first reached the target, evaluation
included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

TargetMode = Literal["max", "min"]


@dataclass(frozen=True)
class EnergyToTarget:
    """When (and at what cost) the target was first reached.

    Attributes:
        metric: the metric's name.
        target_value: the target.
        mode: ``"max"`` (reached when metric >= target) or ``"min"`` (metric <= target).
        reached: whether any evaluation reached it.
        energy_j: fit energy until that evaluation (IT energy, all ranks), or ``None``.
        co2e_g: CO2e until then (PUE applied), or ``None``.
        elapsed_s: time since the start of fit, or ``None``.
        epoch: epoch of that evaluation, or ``None``.
        step: global step of that evaluation, or ``None``.
        value: the metric's value then, or ``None``.
        best_value: the best value seen in the run (``None`` without evaluations).
        evaluations: how many evaluations logged the metric.
    """

    metric: str
    target_value: float
    mode: str
    reached: bool
    energy_j: float | None
    co2e_g: float | None
    elapsed_s: float | None
    epoch: int | None
    step: int | None
    value: float | None
    best_value: float | None
    evaluations: int


@dataclass(frozen=True)
class GainRow:
    """One evaluation of the metric and what the energy since the previous one bought.

    Attributes:
        epoch: epoch of the evaluation.
        step: global step.
        value: the metric.
        energy_j: cumulative fit energy at the evaluation, joules.
        delta_energy_j: energy since the previous evaluation (since the start of fit for
            the first), joules.
        gain_points: improvement since the previous evaluation in points (positive is
            better, whatever the mode); ``None`` for the first (no baseline).
        energy_per_point_j: ``delta_energy_j / gain_points`` when the metric improved,
            else ``None``.
    """

    epoch: int
    step: int
    value: float
    energy_j: float
    delta_energy_j: float
    gain_points: float | None
    energy_per_point_j: float | None


@dataclass
class MetricProgress:
    """The metric's history with energy per point gained, and where gains stopped.

    Attributes:
        metric: the metric's name.
        mode: ``"max"`` or ``"min"``.
        point: the size of one point in metric units (``0.01`` for metrics in [0, 1],
            i.e. one percentage point; else ``1.0``).
        rows: one :class:`GainRow` per evaluation.
        best_index: index into ``rows`` of the first evaluation with the best value.
        energy_after_best_j: fit energy spent after that evaluation, joules.
        total_energy_j: the run's total fit energy, joules.
    """

    metric: str
    mode: str
    point: float
    rows: list[GainRow] = field(default_factory=list)
    best_index: int | None = None
    energy_after_best_j: float = 0.0
    total_energy_j: float = 0.0


def available_metrics(summary: dict[str, Any]) -> list[str]:
    """Names of the metrics recorded in the summary's metric history."""
    names: set[str] = set()
    for entry in summary.get("metric_history", []):
        names.update(entry.get("metrics", {}))
    return sorted(names)


def _series(summary: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    out = []
    for entry in summary.get("metric_history", []):
        value = entry.get("metrics", {}).get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                out.append(dict(entry, value=float(value)))
    return out


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def check_metric(summary: dict[str, Any], metric: str) -> None:
    """Raise a clear error when ``metric`` was never recorded.

    Raises:
        ValueError: the metric is not in the history; lists the ones that are.
    """
    names = available_metrics(summary)
    if metric not in names:
        known = ", ".join(names) if names else "none (no validation ran, or nothing was logged)"
        raise ValueError(
            f"target_metric={metric!r} was not recorded in the run's metric history; "
            f"recorded metrics: {known}. EnergyMonitor records the Trainer's callback metrics "
            "at the end of each validation run."
        )


def energy_to_target(
    summary: dict[str, Any], metric: str, target_value: float, mode: str = "max"
) -> EnergyToTarget:
    """Energy, CO2e and time until ``metric`` first reached ``target_value``.

    Args:
        summary: the energy summary.
        metric: name of the monitored metric (e.g. ``"val_acc"``).
        target_value: the quality target.
        mode: ``"max"`` (higher is better) or ``"min"`` (lower is better).

    Returns:
        The :class:`EnergyToTarget` (``reached=False`` when no evaluation reached it).

    Raises:
        ValueError: an unknown mode, a non-finite target, or a metric never recorded.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"target_mode={mode!r} is not 'max' or 'min'.")
    if not isinstance(target_value, (int, float)) or not math.isfinite(target_value):
        raise ValueError(f"target_value={target_value!r} must be a finite number.")
    check_metric(summary, metric)
    series = _series(summary, metric)
    best: float | None = None
    for entry in series:
        if best is None or _better(entry["value"], best, mode):
            best = entry["value"]
    for entry in series:
        hit = entry["value"] >= target_value if mode == "max" else entry["value"] <= target_value
        if hit:
            return EnergyToTarget(
                metric=metric,
                target_value=float(target_value),
                mode=mode,
                reached=True,
                energy_j=float(entry["energy_j"]),
                co2e_g=float(entry["co2e_g"]),
                elapsed_s=float(entry["elapsed_s"]),
                epoch=int(entry.get("epoch", -1)),
                step=int(entry.get("step", -1)),
                value=entry["value"],
                best_value=best,
                evaluations=len(series),
            )
    return EnergyToTarget(
        metric,
        float(target_value),
        mode,
        False,
        None,
        None,
        None,
        None,
        None,
        None,
        best,
        len(series),
    )


def metric_progress(
    summary: dict[str, Any], metric: str, mode: str = "max", point: float | None = None
) -> MetricProgress:
    """Energy per point of ``metric`` gained, evaluation by evaluation.

    Args:
        summary: the energy summary.
        metric: the metric's name.
        mode: ``"max"`` or ``"min"``.
        point: size of one point in metric units; default ``0.01`` when every value lies
            in [0, 1] (a percentage point), else ``1.0``.

    Returns:
        The :class:`MetricProgress`.

    Raises:
        ValueError: an unknown mode, a bad point size, or a metric never recorded.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"target_mode={mode!r} is not 'max' or 'min'.")
    check_metric(summary, metric)
    series = _series(summary, metric)
    if point is None:
        point = 0.01 if series and all(0.0 <= e["value"] <= 1.0 for e in series) else 1.0
    if not math.isfinite(point) or point <= 0:
        raise ValueError(f"metric point size {point!r} must be a finite number > 0.")
    sign = 1.0 if mode == "max" else -1.0
    rows: list[GainRow] = []
    prev_value: float | None = None
    prev_energy = 0.0
    best_index: int | None = None
    for entry in series:
        energy = float(entry["energy_j"])
        delta_e = max(0.0, energy - prev_energy)
        gain = None if prev_value is None else sign * (entry["value"] - prev_value) / point
        per_point = delta_e / gain if gain is not None and gain > 0 else None
        rows.append(
            GainRow(
                epoch=int(entry.get("epoch", -1)),
                step=int(entry.get("step", -1)),
                value=entry["value"],
                energy_j=energy,
                delta_energy_j=delta_e,
                gain_points=gain,
                energy_per_point_j=per_point,
            )
        )
        if best_index is None or _better(entry["value"], rows[best_index].value, mode):
            best_index = len(rows) - 1
        prev_value, prev_energy = entry["value"], energy
    total = float(summary["totals"]["energy_j"])
    after = total - rows[best_index].energy_j if best_index is not None else 0.0
    return MetricProgress(metric, mode, point, rows, best_index, max(0.0, after), total)
