"""Setting GPU power limits with a guarantee that the original limits come back.

:class:`PowerLimitGuard` remembers each device's limit before the first change and
restores it when the guard is closed, when the process exits normally (``atexit``) and
on SIGTERM (its handler restores, then chains to the handler that was there before,
Lightning's included). SIGKILL cannot be caught: the original limits are therefore also
written to a small journal file, and the next guard (or
``lightning-sustain restore-limits``) restores any limit a dead process left behind.

No Lightning import here: the budget callbacks and the DDP strategy use this module.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import threading
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from lightning_sustain.energy.errors import PowerLimitError
from lightning_sustain.energy.nvml import NvmlGpu

logger = logging.getLogger(__name__)

_JOURNAL_ENV = "LIGHTNING_SUSTAIN_LIMIT_JOURNAL"
_lock = threading.RLock()
_active_guards: weakref.WeakSet[PowerLimitGuard] = weakref.WeakSet()
_previous_sigterm: Any = None
_handler_installed = False


def journal_path() -> Path:
    """Where original limits are journaled (``$LIGHTNING_SUSTAIN_LIMIT_JOURNAL`` overrides)."""
    override = os.environ.get(_JOURNAL_ENV)
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "lightning_sustain" / "power_limits.json"


@contextlib.contextmanager
def _journal_locked() -> Iterator[None]:
    """Hold the thread lock and an exclusive file lock around a journal update.

    Several ranks on one node share the journal; without the file lock one rank's
    read-modify-write could bring back an entry another rank had just removed.
    """
    with _lock:
        path = journal_path()
        handle = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as exc:  # the journal is a safety net: work without the lock
            logger.debug("could not lock the power-limit journal: %s", exc)
        try:
            yield
        finally:
            if handle is not None:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                handle.close()


def _read_journal() -> dict[str, dict[str, Any]]:
    path = journal_path()
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_journal(data: dict[str, dict[str, Any]]) -> None:
    path = journal_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # the journal is a safety net, never a reason to fail
        logger.debug("could not write the power-limit journal %s: %s", path, exc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def restore_orphaned_limits(devices: Iterable[NvmlGpu]) -> list[str]:
    """Restore limits that a process which no longer runs left on these devices.

    Args:
        devices: the devices to check (matched by UUID against the journal).

    Returns:
        The UUIDs whose limits were restored.
    """
    restored: list[str] = []
    with _journal_locked():
        journal = _read_journal()
        for gpu in devices:
            entry = journal.get(gpu.uuid)
            if entry is None or _pid_alive(int(entry.get("pid", -1))):
                continue
            try:
                gpu.set_power_limit_w(float(entry["original_w"]))
            except (PowerLimitError, KeyError, ValueError) as exc:
                logger.warning(
                    "Could not restore the orphaned power limit of %s: %s", gpu.uuid, exc
                )
                continue
            logger.warning(
                "GPU %s was left capped by process %s, which no longer runs; its power limit "
                "is restored to %.0f W.",
                gpu.uuid,
                entry.get("pid"),
                float(entry["original_w"]),
            )
            journal.pop(gpu.uuid, None)
            restored.append(gpu.uuid)
        if restored:
            _write_journal(journal)
    return restored


def _restore_all_guards() -> None:
    for guard in list(_active_guards):
        guard.restore()


def _sigterm_handler(signum: int, frame: Any) -> None:
    _restore_all_guards()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
    elif previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _install_handlers() -> None:
    global _previous_sigterm, _handler_installed
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still works
    current = signal.getsignal(signal.SIGTERM)
    if current is _sigterm_handler:
        return
    _previous_sigterm = current
    signal.signal(signal.SIGTERM, _sigterm_handler)
    if not _handler_installed:
        atexit.register(_restore_all_guards)
        _handler_installed = True


def ensure_sigterm_handler() -> None:
    """Re-install the SIGTERM handler if something replaced it (chaining to the new one).

    Lightning registers its own handlers at the start of every ``fit``; calling this from
    a callback's ``on_fit_start`` keeps limit restoration first in line.
    """
    with _lock:
        if _active_guards:
            _install_handlers()


class PowerLimitGuard:
    """Change NVML power limits and always put the original limits back.

    Args:
        devices: the GPUs this guard may change.
        restore_orphans: first restore limits that a dead process left on these devices.

    Example::

        with PowerLimitGuard(gpus) as guard:
            guard.set_limit_w(gpus[0], 250.0)
            train()
        # limits are back to what they were, whatever happened inside
    """

    def __init__(self, devices: Iterable[NvmlGpu], restore_orphans: bool = True) -> None:
        self.devices = list(devices)
        self._originals_w: dict[str, float] = {}
        self._by_uuid = {gpu.uuid: gpu for gpu in self.devices}
        self._closed = False
        if restore_orphans:
            restore_orphaned_limits(self.devices)
        with _lock:
            _active_guards.add(self)
            _install_handlers()

    def set_limit_w(self, gpu: NvmlGpu, power_w: float) -> float:
        """Set a device's power limit, clamped to the range the device accepts.

        Args:
            gpu: one of this guard's devices.
            power_w: the wanted limit in watts.

        Returns:
            The limit actually applied (after clamping), in watts.

        Raises:
            PowerLimitPermissionError: the driver refuses changes (not root).
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
        with _journal_locked():
            if gpu.uuid not in self._originals_w:
                original_w = gpu.power_limit_w()
                self._originals_w[gpu.uuid] = original_w
                journal = _read_journal()
                journal[gpu.uuid] = {"original_w": original_w, "pid": os.getpid()}
                _write_journal(journal)
        gpu.set_power_limit_w(applied_w)
        return applied_w

    def original_limit_w(self, gpu: NvmlGpu) -> float:
        """The limit the device had before this guard changed it (its current one if unchanged)."""
        return self._originals_w.get(gpu.uuid, gpu.power_limit_w())

    @property
    def changed(self) -> bool:
        """True while at least one device is not at its original limit."""
        return bool(self._originals_w)

    def restore(self) -> list[str]:
        """Put every changed device back to its original limit (idempotent).

        Returns:
            UUIDs that could not be restored (each logged as an error).
        """
        failed: list[str] = []
        with _journal_locked():
            journal = _read_journal()
            for uuid, original_w in list(self._originals_w.items()):
                gpu = self._by_uuid[uuid]
                try:
                    gpu.set_power_limit_w(original_w)
                except PowerLimitError as exc:
                    logger.error(
                        "Could not restore GPU %s to its original %.0f W limit: %s. Restore it "
                        "with `nvidia-smi -i %s -pl %.0f`.",
                        uuid,
                        original_w,
                        exc,
                        uuid,
                        original_w,
                    )
                    failed.append(uuid)
                    continue
                del self._originals_w[uuid]
                if journal.get(uuid, {}).get("pid") == os.getpid():
                    journal.pop(uuid, None)
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
