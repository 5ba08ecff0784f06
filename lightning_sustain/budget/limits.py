"""Setting GPU power limits that always come back, shared safely between processes and jobs.

Every limit this package sets is *owned*: a per-host journal file records, per GPU, the
device's true original limit and every process that holds a cap on it (host, pid, the
process's start time, the cap it asked for). From that:

- several processes and jobs may cap one GPU at once; the device runs at the lowest cap a
  live owner holds, so a job never lifts a cap another live job set (it says so in one
  INFO line when its own wish is higher);
- when an owner ends, its cap leaves the stack: the device goes to the lowest remaining
  cap, or back to the true original when the last owner is gone;
- an owner that no longer runs (its pid is gone, or was reused by a process with another
  start time) is *stale*: any process of this package on the same host that holds a limit
  reaps it within about a second (a small watchdog thread), and so do the next guard,
  :func:`restore_orphaned_limits` and ``lightning-sustain restore-limits``. A SIGKILLed
  DDP rank's GPU is therefore restored while any other rank lives, without waiting for
  Lightning's process observer;
- an entry exists only while a limit of ours is in force: the owner record is written
  before the device is changed (a SIGKILL in between is covered) and removed again when
  the driver refuses the change (no root), so a refused set leaves nothing behind.

:class:`PowerLimitGuard` restores its limits when closed, at interpreter exit
(``atexit``) and on SIGTERM. Its SIGTERM handler restores, then hands the signal on: to
the handler that was installed before it, or, when a handler installed *after* it (such
as Lightning's, which calls the previous handler) is the one running, back to that
handler, so Lightning's graceful ``SIGTERMException`` path runs exactly as without us.

Journals are per host (``power_limits-<host>.json``): each node restores its own GPUs.
No Lightning import here: the budget callbacks and the DDP strategy use this module.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from lightning_sustain.energy.errors import EnergyMeasurementError, PowerLimitError
from lightning_sustain.energy.nvml import NvmlGpu, nvml_index_for_uuid

logger = logging.getLogger(__name__)

__all__ = [
    "LimitOwner",
    "PowerLimitGuard",
    "RestoredLimit",
    "ensure_sigterm_handler",
    "forget_owners",
    "journal_entries",
    "journal_path",
    "reap_dead_owners",
    "release_on_exit",
    "restore_orphaned_limits",
]

_JOURNAL_ENV = "LIGHTNING_SUSTAIN_LIMIT_JOURNAL"
_JOURNAL_VERSION = 2
#: seconds between two liveness checks of the watchdog thread
WATCHDOG_INTERVAL_S = 1.0
_lock = threading.RLock()
_active_guards: weakref.WeakSet[PowerLimitGuard] = weakref.WeakSet()
_previous_sigterm: Any = None
_handler_installed = False
_watchdog: threading.Thread | None = None
_lock_depth = 0  # how deep the thread holding _lock is inside _journal_locked


# -- owners ----------------------------------------------------------------------------------
def _hostname() -> str:
    return socket.gethostname()


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state, ppid, ...), or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
    except (OSError, ValueError):
        return None
    return fields if len(fields) > 19 else None


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), else None."""
    fields = _stat_fields(pid)
    try:
        return None if fields is None else int(fields[19])
    except ValueError:
        return None


@dataclass(frozen=True)
class LimitOwner:
    """A process that holds a power cap on a GPU.

    Attributes:
        host: the host name the process runs on.
        pid: its process id.
        start_time: its start time (clock ticks since boot; None where unknown), which
            tells a live owner from a new process that reuses the pid.
        limit_w: the cap it asked for, in watts.
    """

    host: str
    pid: int
    start_time: int | None
    limit_w: float

    def same_process(self, other: LimitOwner) -> bool:
        """Whether both records name one process (the caps may differ)."""
        return (self.host, self.pid, self.start_time) == (other.host, other.pid, other.start_time)

    def is_alive(self) -> bool:
        """Whether the owner still runs (owners on another host are assumed to)."""
        if self.host != _hostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        fields = _stat_fields(self.pid)
        if fields is not None and fields[0] in ("Z", "X"):
            return False  # a zombie: killed, not yet reaped by its parent
        if self.start_time is None or fields is None:
            return True
        return int(fields[19]) == self.start_time

    def describe(self) -> str:
        """The owner in words, for log lines and ``restore-limits``."""
        return f"pid {self.pid} on {self.host} (cap {self.limit_w:.0f} W)"


def _me(limit_w: float) -> LimitOwner:
    return LimitOwner(_hostname(), os.getpid(), process_start_time(os.getpid()), float(limit_w))


@dataclass
class RestoredLimit:
    """One change made because owners ended.

    Attributes:
        uuid: the GPU.
        owners: the owners whose caps were released (dead ones, or this process).
        limit_w: the limit the device was set to, in watts.
        original: True when that is the device's original limit (no owner left).
    """

    uuid: str
    owners: list[LimitOwner]
    limit_w: float
    original: bool


# -- the journal ------------------------------------------------------------------------------
def journal_path() -> Path:
    """This host's journal (``$LIGHTNING_SUSTAIN_LIMIT_JOURNAL`` overrides the path)."""
    override = os.environ.get(_JOURNAL_ENV)
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "lightning_sustain" / f"power_limits-{_hostname()}.json"


@contextlib.contextmanager
def _journal_locked() -> Iterator[None]:
    """Hold the thread lock and an exclusive file lock around a journal update."""
    global _lock_depth
    with _lock:
        path = journal_path()
        handle = None
        if _lock_depth == 0:  # re-entered (a SIGTERM handler mid-update): already held
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            except OSError as exc:  # the journal is a safety net: work without the lock
                logger.debug("could not lock the power-limit journal: %s", exc)
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
            if handle is not None:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                handle.close()


def _parse_owner(raw: Any) -> LimitOwner | None:
    try:
        start = raw.get("start_time")
        limit = raw.get("limit_w")
        return LimitOwner(
            str(raw.get("host") or _hostname()),
            int(raw["pid"]),
            None if start is None else int(start),
            float("inf") if limit is None else float(limit),
        )
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _read_journal() -> dict[str, dict[str, Any]]:
    """The journal: uuid -> {"original_w", "owners"} (version-1 files are read too)."""
    try:
        data = json.loads(journal_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    gpus = data.get("gpus") if data.get("version") == _JOURNAL_VERSION else data
    out: dict[str, dict[str, Any]] = {}
    for uuid, entry in (gpus or {}).items():
        if not isinstance(entry, dict) or "original_w" not in entry:
            continue
        raw_owners = entry.get("owners")
        if raw_owners is None and "pid" in entry:  # version 1: one owner, no start time
            raw_owners = [{"pid": entry["pid"]}]
        owners = [o for o in (_parse_owner(r) for r in raw_owners or []) if o is not None]
        try:
            out[uuid] = {"original_w": float(entry["original_w"]), "owners": owners}
        except (TypeError, ValueError):
            continue
    return out


def _write_journal(data: dict[str, dict[str, Any]]) -> None:
    path = journal_path()
    gpus = {
        uuid: {
            "original_w": entry["original_w"],
            "owners": [
                {**asdict(o), "limit_w": None if o.limit_w == float("inf") else o.limit_w}
                for o in entry["owners"]
            ],
        }
        for uuid, entry in data.items()
        if entry["owners"]
    }
    try:
        if not gpus:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _JOURNAL_VERSION, "gpus": gpus}, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # the journal is a safety net, never a reason to fail
        logger.debug("could not write the power-limit journal %s: %s", path, exc)


def journal_entries() -> dict[str, dict[str, Any]]:
    """This host's journal: uuid -> ``{"original_w": float, "owners": [LimitOwner]}``."""
    with _journal_locked():
        return _read_journal()


def _target_w(entry: dict[str, Any]) -> tuple[float, bool]:
    """The limit a GPU should run at: the lowest live cap, else its original."""
    caps = [o.limit_w for o in entry["owners"] if o.limit_w != float("inf")]
    if entry["owners"] and caps:
        return min(caps), False
    return float(entry["original_w"]), not entry["owners"]


# -- reaping stale owners ---------------------------------------------------------------------
def _release(
    journal: dict[str, dict[str, Any]], gpu: NvmlGpu, released: list[LimitOwner]
) -> RestoredLimit | None:
    """Drop ``released`` from the GPU's owners and set the device to what remains.

    On a driver failure the owners are kept (the cap is still in force) and None returned.
    """
    entry = journal.get(gpu.uuid)
    if entry is None or not released:
        return None
    remaining = [o for o in entry["owners"] if not any(o.same_process(r) for r in released)]
    trial = {"original_w": entry["original_w"], "owners": remaining}
    target_w, original = _target_w(trial)
    try:
        gpu.set_power_limit_w(target_w)
    except PowerLimitError as exc:
        logger.error(
            "Could not set GPU %s back to %.0f W after %s ended: %s. Run `lightning-sustain "
            "restore-limits` as root, or `nvidia-smi -i %s -pl %.0f`.",
            gpu.uuid,
            target_w,
            ", ".join(o.describe() for o in released),
            exc,
            gpu.uuid,
            target_w,
        )
        return None
    entry["owners"] = remaining
    if not remaining:
        journal.pop(gpu.uuid, None)
    return RestoredLimit(gpu.uuid, list(released), target_w, original)


def _open_by_uuid(uuid: str) -> NvmlGpu | None:
    try:
        return NvmlGpu(nvml_index_for_uuid(uuid))
    except EnergyMeasurementError as exc:
        logger.debug("GPU %s of the power-limit journal cannot be opened: %s", uuid, exc)
        return None


def reap_dead_owners(devices: Iterable[NvmlGpu] | None = None) -> list[RestoredLimit]:
    """Release every cap on this host whose owner no longer runs.

    Args:
        devices: the GPUs to check; None checks every GPU in this host's journal
            (opening it through NVML by UUID).

    Returns:
        What was restored, and whose caps they were (each also logged as a warning).
    """
    done: list[RestoredLimit] = []
    given = None if devices is None else {gpu.uuid: gpu for gpu in devices}
    if not _has_dead_owner():  # the common case: one read of the journal, no lock
        return done
    with _journal_locked():
        journal = _read_journal()
        changed = False
        for uuid, entry in list(journal.items()):
            dead = [o for o in entry["owners"] if o.host == _hostname() and not o.is_alive()]
            if not dead:
                continue
            if given is not None:
                if uuid not in given:
                    continue
                gpu, opened = given[uuid], False
            else:
                gpu, opened = _open_by_uuid(uuid), True
                if gpu is None:
                    continue
            try:
                result = _release(journal, gpu, dead)
            finally:
                if opened:
                    gpu.close()
            if result is None:
                continue
            changed = True
            done.append(result)
            logger.warning(
                "GPU %s was capped by %s, which no longer runs; its power limit is now %.0f W "
                "(%s).",
                uuid,
                ", ".join(o.describe() for o in dead),
                result.limit_w,
                "its original" if result.original else "the lowest cap a live owner holds",
            )
        if changed:
            _write_journal(journal)
    return done


def restore_orphaned_limits(devices: Iterable[NvmlGpu]) -> list[str]:
    """Restore limits that processes which no longer run left on these devices.

    Returns:
        The UUIDs whose limits were changed.
    """
    return [r.uuid for r in reap_dead_owners(list(devices))]


def forget_owners(uuids: Iterable[str]) -> None:
    """Drop these GPUs from this host's journal (after their limits were reset by hand)."""
    with _journal_locked():
        journal = _read_journal()
        for uuid in uuids:
            journal.pop(uuid, None)
        _write_journal(journal)


def _has_dead_owner() -> bool:
    host = _hostname()
    return any(
        o.host == host and not o.is_alive()
        for entry in _read_journal().values()
        for o in entry["owners"]
    )


def _watch() -> None:
    """Reap stale owners on this host while this process holds a limit."""
    global _watchdog
    while True:
        time.sleep(WATCHDOG_INTERVAL_S)
        with _lock:
            if not any(g._originals_w for g in list(_active_guards)):
                _watchdog = None
                return
        try:
            if _has_dead_owner():
                reap_dead_owners()
        except Exception as exc:  # a safety net must never raise in a thread
            logger.debug("power-limit watchdog: %s", exc)


def _start_watchdog() -> None:
    global _watchdog
    with _lock:
        if _watchdog is not None and _watchdog.is_alive():
            return
        _watchdog = threading.Thread(target=_watch, name="power-limit-watchdog", daemon=True)
        _watchdog.start()


# -- signals ----------------------------------------------------------------------------------
def _restore_all_guards() -> None:
    for guard in list(_active_guards):
        try:
            guard.restore()
        except Exception as exc:  # pragma: no cover - best effort at exit
            logger.debug("restoring power limits failed: %s", exc)


def _children_owning_limits() -> list[int]:
    me, host = str(os.getpid()), _hostname()
    pids = []
    for entry in _read_journal().values():
        for owner in entry["owners"]:
            fields = _stat_fields(owner.pid) if owner.host == host else None
            if fields is not None and fields[1] == me and fields[0] not in ("Z", "X"):
                pids.append(owner.pid)
    return pids


def release_on_exit(wait_for_children_s: float = 2.0) -> None:
    """Release this process's caps and those of dead owners on this host.

    Runs at interpreter exit (and from the DDP strategy's failure paths). Child processes
    that hold caps and are being killed (Lightning SIGKILLs the other ranks on
    KeyboardInterrupt) get up to ``wait_for_children_s`` to die, so their caps are
    released here rather than by the next run.
    """
    _restore_all_guards()
    try:
        deadline = time.monotonic() + wait_for_children_s
        while _children_owning_limits() and time.monotonic() < deadline:
            time.sleep(0.05)
        reap_dead_owners()
    except Exception as exc:  # pragma: no cover - best effort at exit
        logger.debug("releasing dead owners' power limits failed: %s", exc)


def _sigterm_handler(signum: int, frame: Any) -> None:
    _restore_all_guards()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
        return
    if signal.getsignal(signal.SIGTERM) is not _sigterm_handler:
        # a handler installed after ours (Lightning's composes the previous handler into
        # its own) is running and decides how the process ends: leave it to that one
        return
    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _install_handlers() -> None:
    global _previous_sigterm, _handler_installed
    if not _handler_installed:
        atexit.register(release_on_exit)
        _handler_installed = True
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still works
    current = signal.getsignal(signal.SIGTERM)
    if (
        current is _sigterm_handler
        or getattr(current, "signal_handlers", None)
        and any(h is _sigterm_handler for h in current.signal_handlers)
    ):
        return  # ours, directly or composed into a later handler
    _previous_sigterm = current
    signal.signal(signal.SIGTERM, _sigterm_handler)


def ensure_sigterm_handler() -> None:
    """Install the SIGTERM handler if none of ours is in the chain (chaining to the current one)."""
    with _lock:
        if _active_guards:
            _install_handlers()


# -- the guard --------------------------------------------------------------------------------
class PowerLimitGuard:
    """Change NVML power limits as an owner, and always release them.

    Args:
        devices: the GPUs this guard may change.
        restore_orphans: first release caps that dead processes left on these devices.

    Example::

        with PowerLimitGuard(gpus) as guard:
            guard.set_limit_w(gpus[0], 250.0)
            train()
        # limits are back to what they were (or to another live job's cap)
    """

    def __init__(self, devices: Iterable[NvmlGpu], restore_orphans: bool = True) -> None:
        self.devices = list(devices)
        self._originals_w: dict[str, float] = {}
        self._by_uuid = {gpu.uuid: gpu for gpu in self.devices}
        self._closed = False
        self._told_lower: set[tuple[str, float]] = set()
        if restore_orphans:
            reap_dead_owners(self.devices)
        with _lock:
            _active_guards.add(self)
            _install_handlers()

    def can_set_limits(self, gpu: NvmlGpu) -> bool:
        """Whether the driver lets this process set ``gpu``'s limit (sets it to itself).

        Raises:
            PowerLimitError: an NVML failure other than a refusal.
        """
        from lightning_sustain.energy.errors import PowerLimitPermissionError

        try:
            gpu.set_power_limit_w(gpu.power_limit_w())
        except PowerLimitPermissionError:
            return False
        return True

    def set_limit_w(self, gpu: NvmlGpu, power_w: float) -> float:
        """Cap a device, clamped to its range and to any lower cap another live owner holds.

        Args:
            gpu: one of this guard's devices.
            power_w: the wanted limit in watts.

        Returns:
            The limit in force after the call, in watts.

        Raises:
            PowerLimitPermissionError: the driver refuses changes (not root); nothing is
                journaled and the device is unchanged.
            PowerLimitError: any other NVML failure; the device keeps its limit.
            ValueError: the device is not one of this guard's.
        """
        if gpu.uuid not in self._by_uuid:
            raise ValueError(f"GPU {gpu.uuid} is not managed by this PowerLimitGuard.")
        if self._closed:
            raise PowerLimitError("This PowerLimitGuard is closed; create a new one.")
        low_w, high_w = gpu.power_limit_range_w()
        applied_w = min(max(float(power_w), low_w), high_w)
        if applied_w != power_w:
            logger.info(
                "Power limit %.1f W for GPU %s is outside its range [%.0f, %.0f] W; using %.1f W.",
                power_w,
                gpu.uuid,
                low_w,
                high_w,
                applied_w,
            )
        me = _me(applied_w)
        with _journal_locked():
            journal = _read_journal()
            entry = journal.get(gpu.uuid)
            if entry is not None:
                dead = [o for o in entry["owners"] if o.host == me.host and not o.is_alive()]
                if dead:
                    logger.warning(
                        "GPU %s was capped by %s, which no longer runs; that cap is released.",
                        gpu.uuid,
                        ", ".join(o.describe() for o in dead),
                    )
                    entry["owners"] = [o for o in entry["owners"] if o not in dead]
            else:
                entry = {"original_w": gpu.power_limit_w(), "owners": []}
                journal[gpu.uuid] = entry
            before = list(entry["owners"])
            others = [o for o in before if not o.same_process(me)]
            entry["owners"] = [*others, me]
            target_w, _ = _target_w(entry)
            _write_journal(journal)  # before the change: a SIGKILL in between is covered
            try:
                if target_w != gpu.power_limit_w():
                    gpu.set_power_limit_w(target_w)
                elif gpu.uuid not in self._originals_w:
                    gpu.set_power_limit_w(target_w)  # same value: still tests the permission
            except PowerLimitError:
                entry["owners"] = before
                if not before:
                    journal.pop(gpu.uuid, None)
                _write_journal(journal)
                raise
            self._originals_w[gpu.uuid] = entry["original_w"]
        lower = [o for o in others if o.limit_w < applied_w]
        if lower and (gpu.uuid, applied_w) not in self._told_lower:
            self._told_lower.add((gpu.uuid, applied_w))
            logger.info(
                "GPU %s stays at %.0f W, the lower cap held by %s; this run asked for %.0f W "
                "and does not lift another job's cap.",
                gpu.uuid,
                target_w,
                ", ".join(o.describe() for o in lower),
                applied_w,
            )
        _start_watchdog()
        return target_w

    def original_limit_w(self, gpu: NvmlGpu) -> float:
        """The device's limit before any owner capped it (its current one if uncapped)."""
        return self._originals_w.get(gpu.uuid, gpu.power_limit_w())

    @property
    def changed(self) -> bool:
        """True while this guard holds a cap on at least one device."""
        return bool(self._originals_w)

    def restore(self) -> list[str]:
        """Release every cap this guard holds (idempotent).

        Each device goes back to its original limit, or to the lowest cap another live
        owner holds. Caps of dead owners on these devices are released too.

        Returns:
            UUIDs that could not be restored (each logged as an error).
        """
        failed: list[str] = []
        if not self._originals_w:
            return failed
        with _journal_locked():
            journal = _read_journal()
            host, pid = _hostname(), os.getpid()
            for uuid in list(self._originals_w):
                gpu = self._by_uuid[uuid]
                entry = journal.get(uuid)
                if entry is None:  # someone (restore-limits --all) already released it
                    del self._originals_w[uuid]
                    continue
                released = [
                    o
                    for o in entry["owners"]
                    if (o.host == host and o.pid == pid) or (o.host == host and not o.is_alive())
                ]
                result = _release(journal, gpu, released) if released else None
                if released and result is None:
                    failed.append(uuid)
                    continue
                del self._originals_w[uuid]
            _write_journal(journal)
        return failed

    def close(self) -> None:
        """Restore the limits and stop tracking the devices."""
        if self._closed:
            return
        self.restore()
        self._closed = True
        with _lock:
            _active_guards.discard(self)
        try:
            reap_dead_owners()  # e.g. a DDP peer that was SIGKILLed: this rank releases it
        except Exception as exc:  # a safety net must not raise
            logger.debug("releasing dead owners' power limits failed: %s", exc)

    def __enter__(self) -> PowerLimitGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed and self._originals_w:
                self.restore()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
