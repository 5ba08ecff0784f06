"""The per-step energy trace (CSV, streamed) and the end-of-run summary (JSON)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from lightning_sustain.energy.accounting import StepEnergy
from lightning_sustain.energy.types import DeviceInfo

TRACE_FILENAME = "energy_trace.csv"
SUMMARY_FILENAME = "energy_summary.json"
SUMMARY_SCHEMA = "lightning_sustain.energy_summary/1"


def device_labels(infos: Sequence[DeviceInfo]) -> dict[str, str]:
    """Short, stable column labels per device id (``gpu0``, ``cpu``, ``dram0``...)."""
    labels: dict[str, str] = {}
    counts: dict[str, int] = {}
    for info in infos:
        n = counts.get(info.kind, 0)
        counts[info.kind] = n + 1
        suffix = str(info.index) if info.kind == "gpu" and info.index is not None else str(n)
        labels[info.device_id] = f"{info.kind}{suffix}"
    return labels


class TraceWriter:
    """Streams one CSV row per training step; memory stays constant however long the run.

    Columns: ``step, epoch, rank, start_s, end_s, duration_s, samples, energy_j, power_w,
    provenance`` and one ``energy_j:<device>`` column per device. Times are seconds since
    the start of fit.

    Args:
        path: the CSV file to write (parent directories are created).
        infos: the measured devices.
        t0_s: ``time.monotonic()`` at the start of fit.
        rank: global rank written in each row.
        append: continue an existing trace (resume) instead of starting a new one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        infos: Sequence[DeviceInfo],
        t0_s: float,
        rank: int = 0,
        append: bool = False,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0_s = t0_s
        self.rank = rank
        self._labels = device_labels(infos)
        self._device_ids = [info.device_id for info in infos]
        provenances = sorted({info.provenance_label for info in infos})
        # labels never hold commas; rows are formatted directly for speed (see write)
        self._provenance = ("+".join(provenances) if provenances else "none").replace(",", ";")
        write_header = not (append and self.path.exists() and self.path.stat().st_size > 0)
        self._file: IO[str] | None = open(  # noqa: SIM115 - closed in close()
            self.path, "a" if append else "w", newline="", encoding="utf-8"
        )
        self._writer = csv.writer(self._file)
        if write_header:
            self._writer.writerow(
                [
                    "step", "epoch", "rank", "start_s", "end_s", "duration_s", "samples",
                    "energy_j", "power_w", "provenance",
                    *(f"energy_j:{self._labels[d]}" for d in self._device_ids),
                ]
            )  # fmt: skip
            self._file.flush()

    def write(self, steps: Sequence[StepEnergy]) -> None:
        """Append rows for resolved steps and flush them to disk."""
        if self._file is None:
            return
        t0, ids = self.t0_s, self._device_ids
        # one %-format per row (about half the cost of f-strings with a join per device);
        # the text is the same as f"{x:.6f}" / f"{n}" would give
        provenance = self._provenance.replace("%", "%%")
        fmt = f"%s,%s,{self.rank},%.6f,%.6f,%.6f,%s,%.6f,%.3f,{provenance}" + ",%.6f" * len(ids)
        fmt += "\n"
        lines = []
        append = lines.append
        for s in steps:
            a, b, e = s.start_s, s.end_s, s.energy_j
            d = b - a
            per = s.device_energy_j
            append(fmt % (s.step, s.epoch, a - t0, b - t0, d, s.samples, e,
                          e / d if d > 0 else 0.0, *[per.get(i, 0.0) for i in ids]))  # fmt: skip
        self._file.write("".join(lines))
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


def write_summary(path: str | os.PathLike[str], summary: dict[str, Any]) -> Path:
    """Write the summary JSON atomically (temp file, then rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def read_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an energy summary written by :func:`write_summary`.

    Raises:
        ValueError: the file is not an energy summary.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("schema") != SUMMARY_SCHEMA:
        raise ValueError(f"{path} is not a lightning_sustain energy summary")
    return data
