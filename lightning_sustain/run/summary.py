"""A run's energy summary: per-rank records in, one job summary out (no Lightning here).

Each process keeps a *rank record* (its own phases, devices, failures); the job summary
adds every rank's record to the totals restored from a checkpoint. Ranks also write their
record to ``<dirpath>/energy_ranks/rank<N>.json`` at log intervals, so a job whose ranks
fail still has each rank's last energy (:func:`summarise_rank_files`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_sustain.energy.carbon import CarbonIntensity, co2e_g, joules_to_kwh
from lightning_sustain.energy.efficiency import StepFlops, efficiency_figures
from lightning_sustain.report.trace import SUMMARY_SCHEMA, write_summary

logger = logging.getLogger(__name__)

#: ``train``: training steps; ``validation``: validation inside fit; ``fit``: the whole fit
#: stage; ``validate`` / ``test`` / ``predict``: those stages; ``explain``: a model explanation
#: (ShapSummary) inside fit, reported as its own line, not as "other".
PHASE_NAMES = ("train", "validation", "fit", "validate", "test", "predict", "explain")
#: The stages whose energy adds up to the run's total.
STAGES = ("fit", "validate", "test", "predict")
RANK_DIRNAME = "energy_ranks"


def empty_phase() -> dict[str, Any]:
    """A phase at zero (joules per device, seconds, batches, samples, tokens)."""
    return {"device_energy_j": {}, "duration_s": 0.0, "batches": 0, "samples": 0, "tokens": 0}


def empty_phases() -> dict[str, dict[str, Any]]:
    """Every phase at zero."""
    return {name: empty_phase() for name in PHASE_NAMES}


def phase_energy_j(phase: dict[str, Any]) -> float:
    """Joules of every device of a phase together."""
    return float(sum(phase.get("device_energy_j", {}).values()))


def add_phase(into: dict[str, Any], other: dict[str, Any], *, across_ranks: bool) -> None:
    """Add one phase into another.

    Args:
        into: the accumulator (changed in place).
        other: the phase to add.
        across_ranks: ranks run side by side: take the longest duration and the most
            batches (per-rank counts, as Lightning's ``global_step``); samples, tokens and
            energy add up. ``False`` for stages run one after another: everything adds up.
            ``rank_batches`` (batches summed over ranks, for FLOP totals) always adds up.
    """
    into["rank_batches"] = int(into.get("rank_batches", into.get("batches", 0))) + int(
        other.get("rank_batches", other.get("batches", 0))
    )
    for device_id, joules in other.get("device_energy_j", {}).items():
        into["device_energy_j"][device_id] = into["device_energy_j"].get(device_id, 0.0) + joules
    if across_ranks:
        into["duration_s"] = max(into["duration_s"], float(other.get("duration_s", 0.0)))
        into["batches"] = max(into["batches"], int(other.get("batches", 0)))
    else:
        into["duration_s"] += float(other.get("duration_s", 0.0))
        into["batches"] += int(other.get("batches", 0))
    into["samples"] += int(other.get("samples", 0))
    into["tokens"] += int(other.get("tokens", 0))


def with_energy(phases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """JSON-ready phases: each with its ``energy_j`` and ``steps`` (batches) added."""
    return {
        name: dict(p, energy_j=phase_energy_j(p), steps=int(p.get("batches", 0)))
        for name, p in phases.items()
    }


def combine_phases(
    ranks: Sequence[dict[str, Any]], prior: dict[str, dict[str, Any]] | None
) -> tuple[dict[str, dict[str, Any]], int]:
    """Job-wide phases and optimizer steps from rank records plus checkpointed totals."""
    phases = empty_phases()
    optimizer_steps = 0
    for rank in ranks:
        for name, value in rank.get("phases", {}).items():
            add_phase(phases.setdefault(name, empty_phase()), value, across_ranks=True)
        optimizer_steps = max(optimizer_steps, int(rank.get("optimizer_steps", 0)))
    if prior:
        for name, value in prior.get("phases", {}).items():
            add_phase(phases.setdefault(name, empty_phase()), value, across_ranks=False)
        optimizer_steps += int(prior.get("optimizer_steps", 0))
    return phases, optimizer_steps


def _per(energy_j: float, count: float) -> float | None:
    return energy_j / count if count else None


def build_summary(
    ranks: Sequence[dict[str, Any]],
    *,
    prior: dict[str, Any] | None,
    carbon: CarbonIntensity,
    pue: float,
    status: str,
    resumed: bool,
    world_size: int,
    stages: Sequence[dict[str, Any]] = (),
    missing_ranks: Sequence[int] = (),
) -> dict[str, Any]:
    """The job summary (schema ``lightning_sustain.energy_summary/1``, fields added).

    Headline totals cover every stage recorded so far, including those restored from a
    checkpoint: ``energy_j`` = fit + validate + test + predict; ``duration_s`` their
    wall-clock sum; ``steps`` optimizer steps (per rank, as Lightning's ``global_step``);
    ``batches`` training batches per rank; ``samples``/``tokens`` summed over ranks.
    """
    ranks = sorted(ranks, key=lambda r: r["global_rank"])
    phases, optimizer_steps = combine_phases(ranks, prior)
    energy = {name: phase_energy_j(p) for name, p in phases.items()}
    total_j = sum(energy[s] for s in STAGES)
    duration_s = sum(phases[s]["duration_s"] for s in STAGES)
    train, predict = phases["train"], phases["predict"]
    devices = [dict(d, rank=r["global_rank"]) for r in ranks for d in r.get("devices", [])]
    provenances = sorted({d["provenance"] for d in devices})
    failures = {
        f"rank{r['global_rank']}:{k}": v for r in ranks for k, v in r.get("failures", {}).items()
    }
    for rank in missing_ranks:
        failures[f"rank{rank}:missing"] = "no record from this rank: its energy is not counted"
    predict_kwh_facility = joules_to_kwh(energy["predict"]) * pue
    predict_co2e = co2e_g(energy["predict"], carbon, pue)
    history = _sum_histories([r.get("metric_history", []) for r in ranks])
    time_resolved = _time_resolved(ranks, prior, total_j, carbon, pue)
    return {
        "schema": SUMMARY_SCHEMA,
        "status": status,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": "+".join(provenances) if provenances else "none",
        "simulated": any(d.get("simulated") for d in devices),
        "incomplete": bool(failures),
        "failures": failures,
        "missing_ranks": sorted(missing_ranks),
        "resumed": resumed,
        "stages": list(stages),
        "totals": {
            "energy_j": total_j,
            "energy_kwh": joules_to_kwh(total_j),
            "facility_energy_kwh": joules_to_kwh(total_j) * pue,
            "co2e_g": co2e_g(total_j, carbon, pue),
            "duration_s": duration_s,
            "fit_energy_j": energy["fit"],
            "train_energy_j": energy["train"],
            "validation_energy_j": energy["validation"] + energy["validate"],
            "test_energy_j": energy["test"],
            "predict_energy_j": energy["predict"],
            "explain_energy_j": energy["explain"],
            "other_energy_j": max(
                0.0, energy["fit"] - energy["train"] - energy["validation"] - energy["explain"]
            ),
            "steps": optimizer_steps,
            "batches": int(train["batches"]),
            "samples": int(train["samples"]),
            "tokens": int(train["tokens"]),
            "energy_per_sample_j": _per(energy["train"], train["samples"]),
            "energy_per_step_j": _per(energy["train"], optimizer_steps),
            "energy_per_token_j": _per(energy["train"], train["tokens"]),
            "predict_samples": int(predict["samples"]),
            "predict_tokens": int(predict["tokens"]),
            "predict_energy_per_sample_j": _per(energy["predict"], predict["samples"]),
            "predict_energy_per_token_j": _per(energy["predict"], predict["tokens"]),
            # SCI (ISO/IEC 21031) per inference and per generated/processed token, embodied
            # emissions not included (M = 0): facility energy x intensity / R
            "sci_per_inference_g": _per(predict_co2e, predict["samples"]),
            "sci_per_token_g": _per(predict_co2e, predict["tokens"]),
            "predict_facility_energy_kwh": predict_kwh_facility,
            # location-based (energy x yearly intensity) is co2e_g; this one integrates the
            # intensity time series interval by interval (None without an intensity source)
            "co2e_time_resolved_g": time_resolved.get("co2e_g") if time_resolved else None,
        },
        "carbon": {
            "g_co2e_per_kwh": carbon.g_co2e_per_kwh,
            "source": carbon.source,
            "region": carbon.region,
            "pue": pue,
        },
        "carbon_time_resolved": time_resolved,
        "phases": with_energy(phases),
        "devices": devices,
        "ranks": [
            {
                "global_rank": r["global_rank"],
                "local_rank": r.get("local_rank", 0),
                "node_rank": r.get("node_rank", 0),
                "hostname": r.get("hostname", ""),
                "status": r.get("status", ""),
                "energy_j": sum(phase_energy_j(r["phases"][s]) for s in STAGES if s in r["phases"]),
                "train_energy_j": phase_energy_j(r["phases"].get("train", {})),
                "optimizer_steps": int(r.get("optimizer_steps", 0)),
                "batches": int(r["phases"].get("train", {}).get("batches", 0)),
            }
            for r in ranks
        ],
        "world_size": world_size,
        "metric_history": history,
    }


def _time_resolved(
    ranks: Sequence[dict[str, Any]],
    prior: dict[str, Any] | None,
    total_j: float,
    carbon: CarbonIntensity,
    pue: float,
) -> dict[str, Any] | None:
    """Time-resolved CO2e of the job: every rank's integrated intervals plus the prior.

    Energy the integration did not see (a resumed checkpoint without time-resolved figures,
    a rank with no record of it, the last moments after the counters' coverage) is counted
    at the yearly intensity and reported as ``annual_remainder_energy_j``.
    """
    parts = [r["carbon_time"] for r in ranks if isinstance(r.get("carbon_time"), dict)]
    if not parts:
        return None
    prior_part = (prior or {}).get("carbon_time")
    if isinstance(prior_part, dict):
        parts = [*parts, prior_part]
    integrated_j = sum(float(p.get("energy_j", 0.0)) for p in parts)
    integrated_g = sum(float(p.get("co2e_g", 0.0)) for p in parts)
    fallback_s = sum(float(p.get("fallback_s", 0.0)) for p in parts)
    seconds = sum(float(p.get("duration_s", 0.0)) for p in parts)
    remainder_j = max(0.0, total_j - integrated_j)
    kwh = joules_to_kwh(integrated_j) * pue
    first = parts[0]
    warnings: list[str] = []
    for p in parts:
        for w in p.get("warnings", []):
            if w not in warnings:
                warnings.append(w)
    return {
        "co2e_g": integrated_g + co2e_g(remainder_j, carbon, pue),
        "integrated_co2e_g": integrated_g,
        "integrated_energy_j": integrated_j,
        "annual_remainder_energy_j": remainder_j,
        "mean_g_co2e_per_kwh": integrated_g / kwh if kwh > 0 else None,
        "fallback_s": fallback_s,
        "fallback_fraction": fallback_s / seconds if seconds > 0 else 0.0,
        "source": first.get("source"),
        "status": first.get("status"),
        "method": (
            "each rank's cumulative energy curve split into intervals of at most "
            f"{first.get('resolution_s')} s, each interval's energy x the source's mean "
            "intensity over it x PUE; uncovered times use the yearly intensity (fallback)"
        ),
        "warnings": warnings,
    }


def add_efficiency(
    summary: dict[str, Any], step_flops: dict[str, StepFlops], note: str | None = None
) -> dict[str, Any]:
    """Add samples/tokens per joule and, with FLOPs per step, the efficiency figures.

    FLOPs per step are per rank and per batch (forward and backward for training), so the
    FLOP total is ``flops_per_step x`` batches **summed over ranks** (``rank_batches``),
    set against the energy of every rank: J per TFLOP and TFLOP/s per W are job-wide.

    Args:
        summary: a summary from :func:`build_summary` (changed in place).
        step_flops: ``"train"`` and/or ``"predict"`` -> the counted FLOPs of one batch.
        note: why FLOPs are missing, when they are (kept in ``efficiency["note"]``).

    Returns:
        The same summary.
    """
    totals, phases = summary["totals"], summary["phases"]
    provenance = summary.get("provenance")
    for phase, prefix in (("train", ""), ("predict", "predict_")):
        p = phases.get(phase, {})
        energy = float(p.get("energy_j", 0.0))
        totals[f"{prefix}samples_per_j"] = _per(float(p.get("samples", 0)), energy)
        totals[f"{prefix}tokens_per_j"] = _per(float(p.get("tokens", 0)), energy)
    efficiency: dict[str, Any] = {}
    for phase, flops in step_flops.items():
        p = phases.get(phase)
        if not p:
            continue
        prefix = "" if phase == "train" else f"{phase}_"
        figures = efficiency_figures(
            flops,
            steps=int(p.get("rank_batches", p.get("batches", 0))),
            energy_j=max(0.0, float(p.get("energy_j", 0.0))),
            duration_s=float(p.get("duration_s", 0.0)) or None,
            samples=int(p.get("samples", 0)) or None,
            tokens=int(p.get("tokens", 0)) or None,
            energy_provenance=provenance,
        ).to_dict()
        figures["steps_counted"] = (
            f"{phase} batches summed over ranks (each rank runs flops_per_step per batch)"
        )
        efficiency[phase] = figures
        for key in ("flops_per_step", "total_tflop", "j_per_tflop", "tflops_per_s_per_w"):
            totals[f"{prefix}{key}"] = figures[key]
        totals[f"{prefix}achieved_tflops_per_s"] = figures["achieved_tflops_per_s"]
    if note and not efficiency:
        efficiency["note"] = note
    summary["efficiency"] = efficiency
    return summary


def _sum_histories(histories: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Cluster-wide metric history: rank 0's entries with energy summed over ranks."""
    if not histories:
        return []
    merged = [dict(entry) for entry in histories[0]]
    for other in histories[1:]:
        for entry, extra in zip(merged, other, strict=False):
            entry["energy_j"] += extra["energy_j"]
            entry["co2e_g"] += extra["co2e_g"]
    return merged


def rank_file(dirpath: str | os.PathLike[str], global_rank: int) -> Path:
    """Where a rank's partial record goes."""
    return Path(dirpath) / RANK_DIRNAME / f"rank{global_rank}.json"


def write_rank_record(dirpath: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Write a rank's record atomically (never raises: measurement must not stop training)."""
    try:
        write_summary(rank_file(dirpath, record["global_rank"]), record)
    except Exception as exc:
        logger.warning("Could not write the rank's energy record: %s", exc)


def read_rank_records(
    dirpath: str | os.PathLike[str], world_size: int
) -> tuple[list[dict[str, Any]], list[int]]:
    """The per-rank records found in ``dirpath`` and the ranks that have none."""
    found, missing = [], []
    for rank in range(world_size):
        path = rank_file(dirpath, rank)
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            missing.append(rank)
    return found, missing


def summarise_rank_files(
    dirpath: str | os.PathLike[str],
    world_size: int,
    *,
    carbon: CarbonIntensity,
    pue: float = 1.0,
    prior: dict[str, Any] | None = None,
    status: str = "interrupted",
    resumed: bool = False,
    stages: Sequence[dict[str, Any]] = (),
    own: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A job summary from the rank files of ``dirpath`` (after a failure, no collective).

    Args:
        dirpath: the run directory.
        world_size: ranks expected.
        carbon: the intensity to apply.
        pue: power usage effectiveness.
        prior: totals restored from a checkpoint.
        status: the summary's status.
        resumed: whether the run resumed from a checkpoint.
        stages: the stage log.
        own: this rank's fresh record (preferred over its file).

    Returns:
        The summary; ``missing_ranks`` names the ranks without a record.
    """
    records, missing = read_rank_records(dirpath, world_size)
    if own is not None:
        records = [r for r in records if r["global_rank"] != own["global_rank"]] + [own]
        missing = [m for m in missing if m != own["global_rank"]]
    return build_summary(
        records,
        prior=prior,
        carbon=carbon,
        pue=pue,
        status=status,
        resumed=resumed,
        world_size=world_size,
        stages=stages,
        missing_ranks=missing,
    )
