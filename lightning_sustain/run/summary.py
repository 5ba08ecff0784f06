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
from lightning_sustain.report.trace import SUMMARY_SCHEMA, write_summary

logger = logging.getLogger(__name__)

#: ``train``: training steps; ``validation``: validation inside fit; ``fit``: the whole fit
#: stage; ``validate`` / ``test`` / ``predict``: those stages.
PHASE_NAMES = ("train", "validation", "fit", "validate", "test", "predict")
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
    """
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
            "other_energy_j": max(0.0, energy["fit"] - energy["train"] - energy["validation"]),
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
        },
        "carbon": {
            "g_co2e_per_kwh": carbon.g_co2e_per_kwh,
            "source": carbon.source,
            "region": carbon.region,
            "pue": pue,
        },
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
