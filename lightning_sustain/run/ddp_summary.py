"""``ddp_summary.json``: the per-rank table of a DDP job, at the end and after a failure.

No Lightning and no collective here: :class:`~lightning_sustain.run.ddp_accounting.DDPAccounting`
gathers the rows (at the end of training, every rank together) or knows what it knows
(after a failure), and these functions build, merge and write the file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from lightning_sustain.budget.rank_power import MODE_HARDWARE, MODE_NONE, MODE_SOFTWARE

logger = logging.getLogger(__name__)

SUMMARY_FILENAME = "ddp_summary.json"
SUMMARY_SCHEMA = "lightning_sustain.ddp_summary/1"


def hostname() -> str:
    """This node's name ("" where ``os.uname`` does not exist)."""
    return os.uname().nodename if hasattr(os, "uname") else ""


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


@contextlib.contextmanager
def _summary_lock(path: Path) -> Iterator[None]:
    """An exclusive lock next to ``path`` while surviving ranks merge a failure summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_job_summary(
    infos: Sequence[dict[str, Any]],
    ranks: Sequence[dict[str, float]],
    *,
    world_size: int,
    num_nodes: int,
    power_shifting: dict[str, Any],
) -> dict[str, Any]:
    """The end-of-training summary from every rank's info and gathered row.

    Args:
        infos: per rank: ranks, hostname, devices, duration_s, failures and ``totals``
            (wait_s, step_s, steps over the whole run).
        ranks: per rank: the last gathered row (energy, limit, mode).
        world_size: the job's size.
        num_nodes: the job's nodes.
        power_shifting: the ``power_shifting`` entry.
    """
    rows = []
    for info, r in zip(infos, ranks, strict=True):
        energy_j = r["energy_j"]
        d = info["duration_s"]
        wait_s, step_s, steps = info["totals"]
        rows.append(
            {
                "global_rank": info["global_rank"],
                "node_rank": info["node_rank"],
                "local_rank": info["local_rank"],
                "hostname": info["hostname"],
                "device": " + ".join(x["name"] for x in info["devices"]) or "none",
                "devices": info["devices"],
                "energy_j": energy_j,
                "mean_power_w": energy_j / d if d > 0 else 0.0,
                "wait_fraction": wait_s / step_s if step_s else 0.0,
                "wait_s": wait_s,
                "step_time_s": step_s / steps if steps else None,
                "steps": int(steps),
                "final_power_limit_w": r["limit_w"] if r["mode"] != MODE_NONE else None,
                "limit_mode": {MODE_HARDWARE: "hardware", MODE_SOFTWARE: "software"}.get(
                    r["mode"], "none"
                ),
                "failures": info["failures"],
            }
        )
    total_j = float(sum(row["energy_j"] for row in rows))
    duration = max((i["duration_s"] for i in infos), default=0.0)
    provenances = sorted({d["provenance"] for i in infos for d in i["devices"]})
    return {
        "schema": SUMMARY_SCHEMA,
        "written_at": _now_iso(),
        "world_size": world_size,
        "num_nodes": num_nodes,
        "provenance": "+".join(provenances) if provenances else "none",
        "ranks": rows,
        "total": {
            "energy_j": total_j,
            "mean_power_w": total_j / duration if duration > 0 else 0.0,
            "duration_s": duration,
        },
        "power_shifting": power_shifting,
    }


def write_job_summary(summary_dir: Path, summary: dict[str, Any]) -> Path | None:
    """Write ``ddp_summary.json`` atomically; a failure is a warning (returns None)."""
    try:
        summary_dir.mkdir(parents=True, exist_ok=True)
        path = summary_dir / SUMMARY_FILENAME
        _write_json(path, summary)
    except OSError as exc:
        logger.warning("Could not write the DDP summary to %s: %s", summary_dir, exc)
        return None
    return path


def merge_failure_summary(
    summary_dir: Path,
    rows: dict[int, dict[str, Any]],
    *,
    run_id: str,
    exception: BaseException,
    world_size: int,
    num_nodes: int,
    duration_s: float,
    provenances: Sequence[str],
    power_shifting: dict[str, Any],
) -> dict[str, Any]:
    """Write ``ddp_summary.json`` after a failure, merged with what other ranks wrote.

    A rank's ``final`` row (its own figures measured at the failure) replaces a row from
    the last gather (``final: false``); ranks of which nothing is known are listed in
    ``missing_ranks`` and not counted. Several ranks may write at once (file lock).

    Returns:
        The summary written.
    """
    path = summary_dir / SUMMARY_FILENAME
    rows = dict(rows)
    with _summary_lock(path):
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if isinstance(previous, dict) and previous.get("run_id") == run_id:
            for row in previous.get("ranks", []):
                r = int(row.get("global_rank", -1))
                if row.get("final") and not rows.get(r, {}).get("final"):
                    rows[r] = row
        ordered = [rows[r] for r in sorted(rows)]
        total_j = float(sum(row["energy_j"] for row in ordered))
        interrupted = isinstance(exception, (SystemExit, KeyboardInterrupt))
        summary = {
            "schema": SUMMARY_SCHEMA,
            "written_at": _now_iso(),
            "run_id": run_id,
            "status": "interrupted" if interrupted else "failed",
            "complete": False,
            "error": type(exception).__name__,
            "world_size": world_size,
            "num_nodes": num_nodes,
            "provenance": "+".join(sorted(set(provenances))) if provenances else "none",
            "ranks": ordered,
            "missing_ranks": [r for r in range(world_size) if r not in rows],
            "total": {
                "energy_j": total_j,
                "mean_power_w": total_j / duration_s if duration_s > 0 else 0.0,
                "duration_s": duration_s,
                "note": "sum of the ranks' figures known at the failure (rows with "
                "final=false are from the last gather; missing_ranks are not counted)",
            },
            "power_shifting": power_shifting,
        }
        summary_dir.mkdir(parents=True, exist_ok=True)
        _write_json(path, summary)
    return summary


def format_summary_table(summary: dict[str, Any]) -> str:
    """The per-rank table of a ``ddp_summary.json`` as text (what the strategies log)."""
    header = (
        f"{'rank':>4} {'node':>4} {'local':>5}  {'device':<34} {'energy_J':>10} "
        f"{'power_W':>8} {'wait':>6} {'limit_W':>8}"
    )
    lines = ["Per-rank energy (SustainDDPStrategy)", header]
    for r in summary["ranks"]:
        limit = r["final_power_limit_w"]
        lines.append(
            f"{r['global_rank']:>4} {r['node_rank']:>4} {r['local_rank']:>5}  "
            f"{r['device'][:34]:<34} {r['energy_j']:>10.1f} {r['mean_power_w']:>8.1f} "
            f"{r['wait_fraction']:>6.1%} {('-' if limit is None else f'{limit:.0f}'):>8}"
        )
    total = summary["total"]
    lines.append(
        f"{'all':>4} {'':>4} {'':>5}  {'':<34} {total['energy_j']:>10.1f} "
        f"{total['mean_power_w']:>8.1f}"
    )
    return "\n".join(lines)
