"""Carbon intensity look-up and CO2e arithmetic.

The shipped table (``data/carbon_intensity.csv``) holds annual national averages from
Ember's yearly electricity data; the file's header cites the source and year.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources

from lightning_sustain.energy.estimate import validate_positive

JOULES_PER_KWH = 3.6e6

#: Two-letter codes are ISO 3166-1 alpha-2; a few alpha-3 codes are accepted too.
_ALPHA3_TO_ALPHA2 = {
    "AUT": "AT", "AUS": "AU", "BEL": "BE", "BRA": "BR", "CAN": "CA", "CHE": "CH",
    "CHN": "CN", "CZE": "CZ", "DEU": "DE", "DNK": "DK", "ESP": "ES", "FIN": "FI",
    "FRA": "FR", "GBR": "GB", "IRL": "IE", "IND": "IN", "ITA": "IT", "JPN": "JP",
    "KOR": "KR", "MEX": "MX", "NLD": "NL", "NOR": "NO", "NZL": "NZ", "POL": "PL",
    "PRT": "PT", "SWE": "SE", "SGP": "SG", "USA": "US", "ZAF": "ZA", "UK": "GB",
}  # fmt: skip


@dataclass(frozen=True)
class CarbonIntensity:
    """A carbon intensity and where it came from.

    Attributes:
        g_co2e_per_kwh: grams of CO2-equivalent per kWh of electricity.
        source: a citation or ``"user-supplied"``.
        region: the country or region code, if looked up.
    """

    g_co2e_per_kwh: float
    source: str
    region: str | None = None


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, tuple[str, float, str]]:
    text = resources.files("lightning_sustain.energy").joinpath("data/carbon_intensity.csv")
    rows = [line for line in text.read_text().splitlines() if not line.startswith("#")]
    table: dict[str, tuple[str, float, str]] = {}
    for row in csv.DictReader(rows):
        table[row["code"].upper()] = (row["name"], float(row["g_co2e_per_kwh"]), row["year"])
    return table


def available_regions() -> list[str]:
    """The region codes in the shipped table."""
    return sorted(_table())


def carbon_intensity_for(country: str) -> CarbonIntensity:
    """Look a country (ISO 3166 alpha-2 or alpha-3, or ``WORLD``/``EU``) up in the table.

    Raises:
        ValueError: for an unknown code, listing the known ones.
    """
    code = country.strip().upper()
    code = _ALPHA3_TO_ALPHA2.get(code, code)
    entry = _table().get(code)
    if entry is None:
        raise ValueError(
            f"country={country!r} is not in the shipped carbon-intensity table; use one of "
            f"{', '.join(available_regions())} or pass carbon_intensity_g_per_kwh."
        )
    name, value, year = entry
    return CarbonIntensity(value, f"Ember yearly electricity data {year} ({name})", code)


def resolve_carbon_intensity(
    carbon_intensity_g_per_kwh: float | None = None, country: str | None = None
) -> CarbonIntensity:
    """Pick the intensity from an explicit value, else a country, else the world average.

    Raises:
        ValueError: both are given, the value is negative or not a number, or the
            country is unknown.
    """
    if carbon_intensity_g_per_kwh is not None and country is not None:
        raise ValueError("Give either carbon_intensity_g_per_kwh or country, not both.")
    if carbon_intensity_g_per_kwh is not None:
        value = validate_positive(
            "carbon_intensity_g_per_kwh", carbon_intensity_g_per_kwh, allow_zero=True
        )
        return CarbonIntensity(value, "user-supplied")
    return carbon_intensity_for(country or "WORLD")


def joules_to_kwh(energy_j: float) -> float:
    """Convert joules to kilowatt-hours."""
    return energy_j / JOULES_PER_KWH


def co2e_g(energy_j: float, intensity: CarbonIntensity, pue: float = 1.0) -> float:
    """Grams of CO2e for an IT energy figure, scaled by the facility's PUE."""
    return joules_to_kwh(energy_j) * pue * intensity.g_co2e_per_kwh
