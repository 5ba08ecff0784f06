"""Owned power limits: stacking jobs, stale owners, refused sets, restore-limits.

Every process here is real; limits live in the simulated device's shared state, so they
persist across processes as on hardware.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lightning_sustain.budget.limits import (
    PowerLimitGuard,
    journal_entries,
    journal_path,
    process_start_time,
)
from lightning_sustain.energy.errors import PowerLimitPermissionError
from lightning_sustain.energy.nvml import NvmlGpu

REPO = Path(__file__).resolve().parents[1]

OWNER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from lightning_sustain.energy.nvml import NvmlGpu
    from lightning_sustain.budget.limits import PowerLimitGuard
    gpu = NvmlGpu(int(sys.argv[2]))
    guard = PowerLimitGuard([gpu])
    print("applied", guard.set_limit_w(gpu, float(sys.argv[1])), flush=True)
    command = sys.stdin.readline().strip()
    if command == "close":
        guard.close()
    elif command == "raise":
        raise RuntimeError("training failed")
    print("done", flush=True)
    """
)


@pytest.fixture(autouse=True)
def _journal(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SUSTAIN_LIMIT_JOURNAL", str(tmp_path / "journal.json"))


class Owner:
    """A real process holding a cap on GPU 0 until told how to end."""

    def __init__(self, tmp_path: Path, limit_w: float, index: int = 0) -> None:
        script = tmp_path / "owner.py"
        if not script.exists():
            script.write_text(OWNER.format(repo=str(REPO)))
        self.limit_w = limit_w
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(limit_w), str(index)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "applied", self.proc.stderr.read()
        self.applied_w = float(line[1])

    def end(self, how: str) -> None:
        if how == "sigkill":
            self.proc.kill()
        elif how == "sigterm":
            self.proc.send_signal(signal.SIGTERM)
        else:  # close / raise / exit (atexit)
            self.proc.stdin.write(f"{how}\n")
            self.proc.stdin.flush()
        self.proc.wait(timeout=120)


def _wait_for(predicate, timeout_s: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout_s} s")


def test_refused_set_is_info_leaves_no_entry_and_no_error(sim, caplog):
    sim.set_limit_permitted(0, False)
    gpu = NvmlGpu(0)
    try:
        with caplog.at_level(logging.INFO):
            guard = PowerLimitGuard([gpu])
            with pytest.raises(PowerLimitPermissionError):
                guard.set_limit_w(gpu, 200.0)
            assert not journal_path().exists(), "a refused set journals nothing"
            assert not guard.changed
            guard.close()
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert sim.power_limit_w(0) == 400.0 and sim.limit_set_count(0) == 0
    finally:
        sim.set_limit_permitted(0, True)
        gpu.close()


def test_entry_exists_only_while_the_cap_is_in_force(sim):
    gpu = NvmlGpu(0)
    try:
        guard = PowerLimitGuard([gpu])
        assert journal_entries() == {}
        guard.set_limit_w(gpu, 220.0)
        entry = journal_entries()[sim.uuid(0)]
        assert entry["original_w"] == 400.0
        (owner,) = entry["owners"]
        assert (owner.pid, owner.limit_w) == (os.getpid(), 220.0)
        assert owner.start_time == process_start_time(os.getpid())
        guard.close()
        assert journal_entries() == {} and sim.power_limit_w(0) == 400.0
    finally:
        gpu.close()


@pytest.mark.parametrize(
    "seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in range(1, 6))]
)
def test_overlapping_jobs_stack_and_the_device_returns_to_its_original(sim, tmp_path, seed):
    # two jobs cap one GPU; whatever order they start and end in, and however they end,
    # the device runs at the lowest live cap and comes back to its true original
    rng = random.Random(seed)
    caps = rng.sample([150.0, 200.0, 250.0, 300.0], 2)
    first = Owner(tmp_path, caps[0])
    assert sim.power_limit_w(0) == caps[0]
    second = Owner(tmp_path, caps[1])
    assert second.applied_w == min(caps) == sim.power_limit_w(0)
    owners = [first, second]
    rng.shuffle(owners)
    how_first = rng.choice(["close", "raise", "exit", "sigterm", "sigkill"])
    how_last = rng.choice(["close", "raise", "exit", "sigterm", "sigkill"])
    owners[0].end(how_first)
    # the survivor's cap holds (a cap is never lifted under a live job); a SIGKILLed
    # owner's cap is released by the survivor's watchdog
    _wait_for(lambda: sim.power_limit_w(0) == owners[1].limit_w)
    owners[1].end(how_last)
    if how_last == "sigkill":
        assert sim.power_limit_w(0) == owners[1].limit_w, "nobody left to restore it"
        gpu = NvmlGpu(0)
        try:
            PowerLimitGuard([gpu]).close()  # the next run restores it
        finally:
            gpu.close()
    assert sim.power_limit_w(0) == 400.0
    assert journal_entries() == {}


def test_sigkilled_owner_is_restored_by_a_live_process_within_10_s(sim, tmp_path):
    gpu = NvmlGpu(1)
    try:
        guard = PowerLimitGuard([gpu])
        guard.set_limit_w(gpu, 300.0)  # this process holds a limit: its watchdog runs
        victim = Owner(tmp_path, 180.0)
        assert sim.power_limit_w(0) == 180.0
        victim.end("sigkill")
        elapsed = _wait_for(lambda: sim.power_limit_w(0) == 400.0)
        assert elapsed < 10.0
        assert sim.uuid(0) not in journal_entries()
        guard.close()
        assert sim.power_limit_w(1) == 400.0 and journal_entries() == {}
    finally:
        gpu.close()


def test_reused_pid_with_another_start_time_is_stale(sim, caplog):
    # the journal names this very pid, but a process that started at another time: the
    # owner is gone and its pid reused, so its cap is released
    sim.set_power_limit_w(0, 210.0)
    stale = {
        "version": 2,
        "gpus": {
            sim.uuid(0): {
                "original_w": 400.0,
                "owners": [
                    {
                        "host": os.uname().nodename,
                        "pid": os.getpid(),
                        "start_time": (process_start_time(os.getpid()) or 0) + 12345,
                        "limit_w": 210.0,
                    }
                ],
            }
        },
    }
    journal_path().write_text(json.dumps(stale))
    gpu = NvmlGpu(0)
    try:
        with caplog.at_level(logging.WARNING):
            PowerLimitGuard([gpu]).close()
        assert sim.power_limit_w(0) == 400.0
        assert journal_entries() == {}
        assert any("no longer runs" in r.message for r in caplog.records)
    finally:
        gpu.close()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_sustain", "restore-limits", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_restore_limits_shows_what_and_whose_and_leaves_live_caps(sim, tmp_path):
    dead = Owner(tmp_path, 170.0)
    dead.end("sigkill")
    assert sim.power_limit_w(0) == 170.0
    out = _cli()
    assert out.returncode == 0, out.stderr
    assert f"{sim.uuid(0)}: set to 400 W (its original limit)" in out.stdout
    assert f"pid {dead.proc.pid} on {os.uname().nodename} (cap 170 W)" in out.stdout
    assert sim.power_limit_w(0) == 400.0
    live = Owner(tmp_path, 240.0, index=1)
    try:
        out = _cli()
        assert out.returncode == 0, out.stderr
        assert f"{sim.uuid(1)}: capped at 240 W by live pid {live.proc.pid}" in out.stdout
        assert sim.power_limit_w(1) == 240.0, "a live job's cap is left alone"
        out = _cli("--all")
        assert out.returncode == 0, out.stderr
        assert f"lifted the caps of pid {live.proc.pid}" in out.stdout
        assert sim.power_limit_w(1) == 400.0 and journal_entries() == {}
    finally:
        live.end("close")
    assert sim.power_limit_w(1) == 400.0


def test_sigterm_during_a_journal_update_restores_without_deadlock(sim, tmp_path):
    script = tmp_path / "mid_update.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal, sys
            sys.path.insert(0, {str(REPO)!r})
            from lightning_sustain.budget import limits
            from lightning_sustain.energy.nvml import NvmlGpu
            gpu = NvmlGpu(0)
            guard = limits.PowerLimitGuard([gpu])
            guard.set_limit_w(gpu, 190.0)
            with limits._journal_locked():  # the signal lands while the file lock is held
                os.kill(os.getpid(), signal.SIGTERM)
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr.decode()[-2000:]
    assert sim.power_limit_w(0) == 400.0
    assert journal_entries() == {}
