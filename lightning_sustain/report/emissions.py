"""A CodeCarbon-compatible ``emissions.csv`` row for a run.

The columns are those of CodeCarbon's ``EmissionsData`` (2.x, ``output_methods/
emissions_data.py``), in its order, with its units: ``duration`` in seconds,
``emissions`` in kg CO2e, ``emissions_rate`` in kg/s, ``*_power`` in W, ``*_energy``
and ``energy_consumed`` in kWh, ``ram_total_size`` in GB. Fields we do not know are left
empty rather than guessed.

How our figures map:

- ``cpu_energy`` / ``gpu_energy`` / ``ram_energy``: fit energy of the devices of kind
  ``cpu`` / ``gpu`` / ``dram``, all ranks (IT energy, before PUE);
- ``*_power``: those energies divided by the run's duration (mean power; CodeCarbon
  writes its last sampled power);
- ``energy_consumed``: facility energy, IT energy x PUE, so that ``emissions`` =
  ``energy_consumed`` x intensity as in our summary;
- ``tracking_mode``: ``machine`` when a device-wide meter (NVML, RAPL) is among the
  devices, ``process`` when everything is a per-process estimate.
"""

from __future__ import annotations

import csv
import datetime as _dt
import uuid
from pathlib import Path
from typing import Any

from lightning_sustain.energy import carbon as _carbon

CODECARBON_COLUMNS: tuple[str, ...] = (
    "timestamp",
    "project_name",
    "run_id",
    "experiment_id",
    "duration",
    "emissions",
    "emissions_rate",
    "cpu_power",
    "gpu_power",
    "ram_power",
    "cpu_energy",
    "gpu_energy",
    "ram_energy",
    "energy_consumed",
    "country_name",
    "country_iso_code",
    "region",
    "cloud_provider",
    "cloud_region",
    "os",
    "python_version",
    "codecarbon_version",
    "cpu_count",
    "cpu_model",
    "gpu_count",
    "gpu_model",
    "longitude",
    "latitude",
    "ram_total_size",
    "tracking_mode",
    "on_cloud",
    "pue",
)
"""CodeCarbon's ``emissions.csv`` columns, in order."""

_KIND_COLUMN = {"cpu": "cpu", "gpu": "gpu", "dram": "ram", "ram": "ram"}


def _country(region: str | None) -> tuple[str, str]:
    """(country name, ISO 3166 alpha-3) for a region code of our table, else empty."""
    if not region:
        return "", ""
    code = region.upper()
    alpha3 = {a2: a3 for a3, a2 in getattr(_carbon, "_ALPHA3_TO_ALPHA2", {}).items() if a3 != "UK"}
    if code not in alpha3:  # WORLD, EU or an unknown code: not a country
        return "", ""
    try:
        name = _carbon.carbon_intensity_for(code).source
        name = name[name.rfind("(") + 1 : name.rfind(")")] if "(" in name else ""
    except ValueError:
        name = ""
    return name, alpha3[code]


def _timestamp(summary: dict[str, Any]) -> str:
    written = summary.get("written_at")
    try:
        moment = _dt.datetime.fromisoformat(str(written))
    except ValueError:
        moment = _dt.datetime.now(_dt.timezone.utc)
    if moment.tzinfo is not None:
        moment = moment.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return moment.isoformat(timespec="seconds")


def run_id_for(run_dir: Path, summary: dict[str, Any]) -> str:
    """A stable UUID for a run: the same run directory and summary give the same id."""
    key = f"{run_dir.resolve()}|{summary.get('written_at', '')}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "lightning_sustain:" + key))


def emissions_row(
    summary: dict[str, Any], *, run_id: str, project_name: str = "lightning_sustain"
) -> dict[str, Any]:
    """The CodeCarbon ``emissions.csv`` row of a run (unknown fields are ``""``)."""
    totals, carbon = summary["totals"], summary["carbon"]
    duration_s = float(totals["duration_s"])
    pue = float(carbon.get("pue", 1.0))
    energy_kwh = {"cpu": 0.0, "gpu": 0.0, "ram": 0.0}
    gpu_models: dict[str, int] = {}
    device_wide = False
    for dev in summary.get("devices", []):
        column = _KIND_COLUMN.get(str(dev.get("kind")))
        if column is not None:
            energy_kwh[column] += float(dev.get("fit_energy_j", 0.0)) / 3.6e6
        if dev.get("kind") == "gpu":
            model = str(dev.get("name") or "GPU")
            gpu_models[model] = gpu_models.get(model, 0) + 1
        if not str(dev.get("provenance", "")).startswith("estimated"):
            device_wide = True
    emissions_kg = float(totals["co2e_g"]) / 1000.0
    country_name, iso3 = _country(carbon.get("region"))
    row: dict[str, Any] = dict.fromkeys(CODECARBON_COLUMNS, "")
    row.update(
        timestamp=_timestamp(summary),
        project_name=project_name,
        run_id=run_id,
        duration=duration_s,
        emissions=emissions_kg,
        emissions_rate=emissions_kg / duration_s if duration_s > 0 else 0.0,
        cpu_power=energy_kwh["cpu"] * 3.6e6 / duration_s if duration_s > 0 else 0.0,
        gpu_power=energy_kwh["gpu"] * 3.6e6 / duration_s if duration_s > 0 else 0.0,
        ram_power=energy_kwh["ram"] * 3.6e6 / duration_s if duration_s > 0 else 0.0,
        cpu_energy=energy_kwh["cpu"],
        gpu_energy=energy_kwh["gpu"],
        ram_energy=energy_kwh["ram"],
        energy_consumed=float(totals.get("facility_energy_kwh", totals["energy_kwh"] * pue)),
        country_name=country_name,
        country_iso_code=iso3,
        gpu_count=sum(gpu_models.values()) if gpu_models else "",
        gpu_model=" + ".join(f"{n} x {name}" for name, n in gpu_models.items()),
        tracking_mode="machine" if device_wide else "process",
        pue=pue,
    )
    return row


def write_emissions_csv(path: Path, row: dict[str, Any]) -> Path:
    """Write the header and one row, CodeCarbon's column order."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(CODECARBON_COLUMNS))
        writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in CODECARBON_COLUMNS})
    return path
