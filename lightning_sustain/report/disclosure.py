"""The energy facts the EU AI Act asks providers of general-purpose AI models to document.

Regulation (EU) 2024/1689, Annex XI, Section 1, point 2 lists, for the technical
documentation of a general-purpose AI model, among others: (d) the computational
resources used to train the model (e.g. number of floating point operations), training
time, and other relevant details related to the training; (e) known or estimated energy
consumption of the model (where unknown, it may be based on the computational resources
used). This module collects those facts for one training run, with the measurement
method named. It does not decide whether a model falls under the Act; a provider's
documentation covers all training runs, not one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_METHODS = {
    "counter": "measured: cumulative hardware energy counters (NVML total-energy counter "
    "for GPUs, RAPL for CPU packages and DRAM)",
    "integrated": "measured: device power readings sampled off the training thread and "
    "integrated over time",
    "estimated": "estimated: CPU time x an assumed power per busy core (no power sensor read)",
}


@dataclass
class Disclosure:
    """Disclosure facts of one run.

    Attributes:
        energy_status: ``"known (measured)"``, ``"estimated"`` or ``"partly estimated"``;
            prefixed ``"simulated (not a measurement; method otherwise: ...)"`` for runs on
            the simulated device.
        facts: (field, value) pairs in the order they are shown.
        methods: one sentence per provenance present, naming the method.
        caveats: what limits the figures (simulation, failures, interruption...).
    """

    energy_status: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)


def _kinds(devices: list[dict[str, Any]]) -> str:
    counts: dict[tuple[str, str], int] = {}
    for d in devices:
        key = (str(d.get("kind", "?")), str(d.get("name", "?")))
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{n} x {name} ({kind})" for (kind, name), n in counts.items()) or "none"


def _fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min ({seconds:.0f} s)"
    return f"{seconds / 3600:.2f} h ({seconds:.0f} s)"


def build_disclosure(summary: dict[str, Any]) -> Disclosure:
    """Collect the Annex XI energy facts of a run from its energy summary."""
    totals, carbon = summary["totals"], summary["carbon"]
    devices: list[dict[str, Any]] = list(summary.get("devices", []))
    base = {str(d.get("provenance", "")).split(" ")[0] for d in devices}
    simulated = bool(summary.get("simulated")) or any(d.get("simulated") for d in devices)
    if not base or base == {"estimated"}:
        status = "estimated"
    elif "estimated" in base:
        status = "partly estimated"
    else:
        status = "known (measured)"
    if simulated:
        status = f"simulated (not a measurement; method otherwise: {status})"
    phases = summary.get("phases", {})
    train_s = float(phases.get("train", {}).get("duration_s", 0.0))
    hosts = {r.get("hostname") for r in summary.get("ranks", []) if r.get("hostname")}
    world = int(summary.get("world_size", 1) or 1)
    facts = [
        (
            "Energy consumption of this training run (IT equipment)",
            f"{totals['energy_kwh']:.6g} kWh ({totals['energy_j']:.6g} J), {summary['provenance']}",
        ),
        (
            f"Energy including data-centre overhead (PUE {float(carbon.get('pue', 1.0)):g})",
            f"{float(totals.get('facility_energy_kwh', totals['energy_kwh'])):.6g} kWh",
        ),
        ("Known or estimated", status),
        (
            "Of which training steps / validation / explanation (SHAP) / other",
            f"{totals.get('train_energy_j', 0.0):.6g} J / "
            f"{totals.get('validation_energy_j', 0.0):.6g} J / "
            f"{totals.get('explain_energy_j', 0.0):.6g} J / "
            f"{totals.get('other_energy_j', 0.0):.6g} J",
        ),
        (
            "Computational resources",
            f"{_kinds(devices)}; {world} process(es) on {max(1, len(hosts))} host(s)",
        ),
        ("Floating point operations", "not measured by lightning_sustain"),
        ("Training time (wall clock, fit)", _fmt_duration(float(totals["duration_s"]))),
        ("Time in training steps", _fmt_duration(train_s)),
        ("Training steps / samples", f"{int(totals['steps'])} / {int(totals['samples'])}"),
        (
            "Greenhouse-gas emissions (not required by Annex XI)",
            f"{totals['co2e_g']:.6g} g CO2e at {carbon['g_co2e_per_kwh']:g} g/kWh "
            f"({carbon.get('source', 'unknown source')})",
        ),
    ]
    methods = [f"{p}: {_METHODS[p]}" for p in sorted(base) if p in _METHODS]
    for d in devices:
        methods.append(f"{d.get('name', '?')} (rank {d.get('rank', 0)}): {d.get('provenance')}")
    caveats = []
    if simulated:
        caveats.append(
            "Figures marked (simulated) come from the simulated NVML device: they are test "
            "data, not a measurement, and must not be filed."
        )
    if summary.get("status") != "completed":
        caveats.append(
            f"The run did not complete (status: {summary.get('status')}); the "
            "figures cover the part that ran."
        )
    if summary.get("incomplete"):
        failures = summary.get("failures") or {}
        caveats.append(
            "Some devices failed to report during the run; their energy after the failure is "
            "missing: " + ", ".join(f"{k}: {v}" for k, v in failures.items())
        )
    if summary.get("resumed"):
        caveats.append("The run was resumed from a checkpoint; totals include the earlier part.")
    caveats.append(
        "Only the devices listed were measured (e.g. no network, storage or cooling beyond "
        "the PUE factor). A model's documentation covers all of its training runs, "
        "including experiments not measured here."
    )
    return Disclosure(status, facts, methods, caveats)
