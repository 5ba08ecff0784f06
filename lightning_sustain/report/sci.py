"""Software Carbon Intensity (ISO/IEC 21031:2024) of a training run.

``SCI = (E x I + M) per R``: ``E`` the energy the software consumed (kWh), ``I`` the
carbon intensity of that electricity (gCO2e/kWh), ``M`` the embodied emissions of the
hardware share the run used (gCO2e), ``R`` the functional unit.

Here ``E`` is the facility energy of the run (measured IT energy x PUE), ``I`` the
intensity EnergyMonitor used, and ``M`` what the user supplies (default 0, and the
report says so: embodied emissions are not measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

FunctionalUnit = Literal["run", "sample", "step", "epoch"]
FUNCTIONAL_UNITS: tuple[str, ...] = ("run", "sample", "step", "epoch")

_UNIT_WORDS = {
    "run": "training run",
    "sample": "training sample",
    "step": "training step",
    "epoch": "training epoch",
}


@dataclass(frozen=True)
class SciScore:
    """An SCI score and its terms.

    Attributes:
        sci_g: the score, gCO2e per functional unit.
        functional_unit: ``"run"``, ``"sample"``, ``"step"`` or ``"epoch"``.
        r: how many functional units the run holds (R).
        energy_kwh: E, facility energy (IT energy x PUE) in kWh.
        intensity_g_per_kwh: I, gCO2e per kWh.
        intensity_source: where I comes from.
        embodied_g: M, embodied emissions in gCO2e (user-supplied).
        embodied_supplied: whether M was given (``False``: M = 0 by default).
        operational_g: O = E x I, in gCO2e.
    """

    sci_g: float
    functional_unit: str
    r: float
    energy_kwh: float
    intensity_g_per_kwh: float
    intensity_source: str
    embodied_g: float
    embodied_supplied: bool
    operational_g: float

    @property
    def unit_words(self) -> str:
        """The functional unit in words, e.g. ``"training sample"``."""
        return _UNIT_WORDS[self.functional_unit]


def count_epochs(summary: dict[str, Any], trace_epochs: Any = None) -> int:
    """Number of training epochs in the run, from the trace or the metric history."""
    if trace_epochs is not None and len(trace_epochs):
        return len({int(e) for e in trace_epochs})
    epochs = {int(e["epoch"]) for e in summary.get("metric_history", []) if "epoch" in e}
    return len(epochs)


def compute_sci(
    summary: dict[str, Any],
    functional_unit: str = "run",
    embodied_emissions_g: float = 0.0,
    *,
    embodied_supplied: bool | None = None,
    epochs: int | None = None,
) -> SciScore:
    """Compute the SCI score of a run.

    Args:
        summary: the energy summary.
        functional_unit: ``"run"``, ``"sample"`` (training samples), ``"step"``
            (training steps) or ``"epoch"`` (training epochs).
        embodied_emissions_g: M, the embodied emissions attributed to the run, gCO2e.
        embodied_supplied: whether the user gave M; default: ``embodied_emissions_g != 0``.
        epochs: number of epochs (needed for ``"epoch"``).

    Returns:
        The :class:`SciScore`.

    Raises:
        ValueError: an unknown unit, a negative or non-finite M, or a unit the run has
            none of (e.g. ``"sample"`` when no samples were counted).
    """
    if functional_unit not in FUNCTIONAL_UNITS:
        raise ValueError(
            f"functional_unit={functional_unit!r} is not one of {', '.join(FUNCTIONAL_UNITS)}."
        )
    if (
        isinstance(embodied_emissions_g, bool)
        or not isinstance(embodied_emissions_g, (int, float))
        or not math.isfinite(embodied_emissions_g)
        or embodied_emissions_g < 0
    ):
        raise ValueError(
            f"embodied_emissions_g={embodied_emissions_g!r} must be a finite number >= 0 "
            "(grams CO2e of the hardware's embodied emissions attributed to this run)."
        )
    totals, carbon = summary["totals"], summary["carbon"]
    pue = float(carbon.get("pue", 1.0))
    energy_kwh = float(totals.get("facility_energy_kwh", totals["energy_kwh"] * pue))
    intensity = float(carbon["g_co2e_per_kwh"])
    if functional_unit == "run":
        r = 1.0
    elif functional_unit == "sample":
        r = float(totals.get("samples") or 0)
    elif functional_unit == "step":
        r = float(totals.get("steps") or 0)
    else:
        r = float(epochs or 0)
    if r <= 0:
        raise ValueError(
            f"functional_unit={functional_unit!r}: the run has no {functional_unit}s counted "
            "(R = 0); pick another functional unit, e.g. 'run'."
        )
    operational_g = energy_kwh * intensity
    sci_g = (operational_g + float(embodied_emissions_g)) / r
    return SciScore(
        sci_g=sci_g,
        functional_unit=functional_unit,
        r=r,
        energy_kwh=energy_kwh,
        intensity_g_per_kwh=intensity,
        intensity_source=str(carbon.get("source", "unknown")),
        embodied_g=float(embodied_emissions_g),
        embodied_supplied=(
            embodied_emissions_g != 0 if embodied_supplied is None else embodied_supplied
        ),
        operational_g=operational_g,
    )
