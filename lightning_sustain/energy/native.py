"""A native (C) thread that polls NVML's energy counter without the GIL.

Python's sampler thread needs the GIL between polls; while the training thread runs pure
Python it wakes late, and a counter update is stamped tens of milliseconds off (measured:
p90 39-44 ms). :class:`NativeCounterPoller` runs ``counter_poller.c`` (built on first use
with the system C compiler and cached, like the simulated NVML library) in a thread of
its own that calls ``nvmlDeviceGetTotalEnergyConsumption`` from the very library pynvml
loaded (the driver's ``libnvidia-ml.so.1`` on a real machine, the simulated one in tests)
and records every counter change with the times of the poll that saw it and of the poll
before. Python drains those records at leisure (a ctypes call, which releases the GIL).

Without a C compiler, or if the helper cannot be built or started, :func:`load_poller`
returns None once with a warning and the Python sampler is used instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("counter_poller.c")
_LIBRARY_NAME = "liblsp_counter_poller.so"
_CFLAGS = ("-O2", "-shared", "-fPIC")
_LIBS = ("-lpthread", "-ldl", "-lm")
#: Environment variable that turns the native poller off (``0``) for comparison runs.
NATIVE_ENV_VAR = "LIGHTNING_SUSTAIN_NATIVE_POLLER"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_failed: str | None = None


class NativePollerUnavailable(RuntimeError):
    """The native counter poller cannot be built, loaded or started here."""


def _cache_root() -> Path:
    env = os.environ.get("LIGHTNING_SUSTAIN_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lightning_sustain"


def compile_shared_library(
    source: Path, library_name: str, subdir: str, cflags: tuple[str, ...], libs: tuple[str, ...]
) -> Path:
    """Compile one C file into a cached shared library (atomically) and return its path.

    The cache key covers the source, the compiler, the flags and the machine type.

    Raises:
        NativePollerUnavailable: no C compiler, or compilation failed.
    """
    compiler = next(
        (
            found
            for c in (os.environ.get("CC"), "cc", "gcc", "clang")
            if c and (found := shutil.which(c))
        ),
        None,
    )
    if compiler is None:
        raise NativePollerUnavailable("no C compiler found (install gcc or set CC)")
    digest = hashlib.sha256()
    for part in (source.read_bytes(), compiler.encode(), " ".join(cflags + libs).encode(),
                 platform.machine().encode()):  # fmt: skip
        digest.update(part)
        digest.update(b"\0")
    out_dir = _cache_root() / subdir / digest.hexdigest()[:16]
    target = out_dir / library_name
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{library_name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    cmd = [compiler, *cflags, "-o", str(tmp), str(source), *libs]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise NativePollerUnavailable(f"compiling {source.name} failed: {proc.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _load() -> ctypes.CDLL:
    global _lib, _load_failed
    with _lock:
        if _lib is not None:
            return _lib
        if _load_failed is not None:
            raise NativePollerUnavailable(_load_failed)
        try:
            path = compile_shared_library(_SOURCE, _LIBRARY_NAME, "counter_poller", _CFLAGS, _LIBS)
            lib = ctypes.CDLL(str(path))
        except (NativePollerUnavailable, OSError) as exc:
            _load_failed = str(exc)
            warnings.warn(
                f"The native NVML counter poller is unavailable ({exc}); using the Python "
                "sampler, whose counter-update timestamps are less accurate while the "
                "training thread holds the GIL (see docs/energy.md). Install a C compiler "
                "(gcc) to enable it.",
                RuntimeWarning,
                stacklevel=4,
            )
            raise NativePollerUnavailable(_load_failed) from exc
        dbl_p = ctypes.POINTER(ctypes.c_double)
        lib.lsp_start.restype = ctypes.c_void_p
        lib.lsp_start.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p,
                                  ctypes.c_double, ctypes.c_double, ctypes.c_int]  # fmt: skip
        lib.lsp_drain.restype = ctypes.c_int
        lib.lsp_drain.argtypes = [ctypes.c_void_p, dbl_p, dbl_p,
                                  ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_int]  # fmt: skip
        lib.lsp_error.argtypes = [ctypes.c_void_p]
        lib.lsp_cpu_s.argtypes = [ctypes.c_void_p]
        lib.lsp_cpu_s.restype = ctypes.c_double
        lib.lsp_polls.argtypes = [ctypes.c_void_p]
        lib.lsp_polls.restype = ctypes.c_ulonglong
        lib.lsp_dropped.argtypes = [ctypes.c_void_p]
        lib.lsp_dropped.restype = ctypes.c_ulonglong
        lib.lsp_stop.argtypes = [ctypes.c_void_p]
        lib.lsp_stop.restype = None
        _lib = lib
        return lib


def native_poller_enabled() -> bool:
    """False when ``LIGHTNING_SUSTAIN_NATIVE_POLLER=0`` turns the native poller off."""
    return os.environ.get(NATIVE_ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class CounterRecord:
    """One counter value seen by the native poller.

    Attributes:
        t_prev_s: ``time.monotonic()`` of the previous poll (None for the first reading).
        t_s: ``time.monotonic()`` of the poll that saw the value.
        energy_mj: the counter value, in millijoules.
    """

    t_prev_s: float | None
    t_s: float
    energy_mj: int


class NativeCounterPoller:
    """A native thread polling one device's NVML energy counter.

    Args:
        pynvml: the ``pynvml`` module (its loaded library is the one polled).
        handle: the pynvml device handle.
        interval_s: poll interval while an update is due (timestamps within half of it).
        guard_s: how long before an expected update polling starts.
        capacity: ring-buffer size in records (older records are dropped when full).

    Raises:
        NativePollerUnavailable: the helper cannot be built or started here.
    """

    def __init__(
        self,
        pynvml: Any,
        handle: Any,
        interval_s: float = 0.001,
        guard_s: float = 0.004,
        capacity: int = 4096,
    ) -> None:
        lib = _load()
        nvml_lib = getattr(pynvml, "nvmlLib", None)
        if nvml_lib is None:
            raise NativePollerUnavailable("pynvml has not loaded an NVML library")
        fn = ctypes.cast(nvml_lib.nvmlDeviceGetTotalEnergyConsumption, ctypes.c_void_p).value
        name = getattr(nvml_lib, "_name", None)
        device = ctypes.cast(handle, ctypes.c_void_p).value
        self._lib = lib
        self._handle = lib.lsp_start(fn, name.encode() if name else None, device,
                                     float(interval_s), float(guard_s), int(capacity))  # fmt: skip
        if not self._handle:
            raise NativePollerUnavailable(
                f"the native poller could not start on {name!r} (library mismatch or no thread)"
            )
        self._pid = os.getpid()  # the thread exists in this process only (not after fork)
        self._n = 256
        self._t_prev = (ctypes.c_double * self._n)()
        self._t = (ctypes.c_double * self._n)()
        self._mj = (ctypes.c_ulonglong * self._n)()

    def drain(self) -> list[CounterRecord]:
        """Every record since the last call, oldest first."""
        if not self._handle or os.getpid() != self._pid:
            return []
        out: list[CounterRecord] = []
        while True:
            n = self._lib.lsp_drain(self._handle, self._t_prev, self._t, self._mj, self._n)
            for k in range(n):
                prev = self._t_prev[k]
                out.append(CounterRecord(prev if prev >= 0 else None, self._t[k], self._mj[k]))
            if n < self._n:
                return out

    @property
    def error(self) -> int:
        """The NVML return code that stopped polling (0 while healthy)."""
        return int(self._lib.lsp_error(self._handle)) if self._handle else 0

    @property
    def cpu_s(self) -> float:
        """CPU seconds the native thread has used."""
        return float(self._lib.lsp_cpu_s(self._handle)) if self._handle else 0.0

    @property
    def polls(self) -> int:
        """NVML calls made so far."""
        return int(self._lib.lsp_polls(self._handle)) if self._handle else 0

    def stop(self) -> None:
        """Stop and join the thread (idempotent)."""
        if self._handle:
            handle, self._handle = self._handle, None
            if os.getpid() == self._pid:  # a forked child must not join its parent's thread
                self._lib.lsp_stop(handle)

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
