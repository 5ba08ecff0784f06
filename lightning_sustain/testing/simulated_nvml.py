"""A SIMULATED NVML device for tests, demos and users' CI.

Everything this module produces is simulated: no number comes from hardware. The C
library ``simnvml.c`` (shipped next to this file) is compiled on demand with the system C
compiler into a shared library whose soname is ``libnvidia-ml.so.1``. Once loaded with
:meth:`SimulatedNVML.install`, the real ``pynvml`` bindings talk to it exactly as they would
to the NVIDIA driver, in this process and in child processes (DDP ranks), which all share
the device state through a memory-mapped file.

Typical use::

    from lightning_sustain.testing import SimulatedNVML

    with SimulatedNVML(devices=2) as sim:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        sim.busy(0, 0.2)  # 0.2 s of nominal work at full load
        print(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))  # millijoules, simulated
        print(sim.ground_truth_energy_j(0))  # exact, for accuracy checks
        pynvml.nvmlShutdown()

The power/time model is documented in ``docs/simulated-nvml.md``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_sustain.testing.profiles import PowerProfile

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "FAULTS",
    "LIBRARY_NAME",
    "STATE_ENV_VAR",
    "SimulatedDeviceSpec",
    "SimulatedNVML",
    "SimulatedNVMLError",
    "build_library",
]

#: Environment variable holding the path of the shared state file.
STATE_ENV_VAR = "LIGHTNING_SUSTAIN_SIMNVML_STATE"
#: Environment variable overriding the build cache root.
CACHE_ENV_VAR = "LIGHTNING_SUSTAIN_CACHE"
#: File name (and soname) of the built library.
LIBRARY_NAME = "libnvidia-ml.so.1"

#: Architecture names accepted by :class:`SimulatedDeviceSpec`, with NVML's constants.
ARCHITECTURES: dict[str, int] = {
    "kepler": 2,
    "maxwell": 3,
    "pascal": 4,
    "volta": 5,
    "turing": 6,
    "ampere": 7,
    "ada": 8,
    "hopper": 9,
    "blackwell": 10,
}
#: Fault kinds accepted by :meth:`SimulatedNVML.set_fault` (``None`` clears the fault).
FAULTS: dict[str | None, int] = {
    None: 0,
    "gpu_lost": 1,
    "counter_backwards": 2,
    "unknown_error": 3,
}

_SOURCE = Path(__file__).with_name("simnvml.c")
_CFLAGS = ("-O2", "-shared", "-fPIC", f"-Wl,-soname,{LIBRARY_NAME}")
_LIBS = ("-lpthread", "-lm")
_MAX_DEVICES = 64
_STR_LEN = 96
_LAYOUT_VERSION = 2


class SimulatedNVMLError(RuntimeError):
    """The simulated NVML library could not be built, loaded or attached."""


class _Spec(ctypes.Structure):
    # Mirrors lsim_spec_t in simnvml.c.
    _fields_ = [
        ("name", ctypes.c_char * _STR_LEN),
        ("uuid", ctypes.c_char * _STR_LEN),
        ("idle_power_w", ctypes.c_double),
        ("busy_power_w", ctypes.c_double),
        ("min_limit_w", ctypes.c_double),
        ("max_limit_w", ctypes.c_double),
        ("default_limit_w", ctypes.c_double),
        ("speed", ctypes.c_double),
        ("perf_exponent", ctypes.c_double),
        ("initial_energy_j", ctypes.c_double),
        ("architecture", ctypes.c_int32),
        ("set_limit_permitted", ctypes.c_int32),
        ("field_values_supported", ctypes.c_int32),
        ("mig_enabled", ctypes.c_int32),
    ]


class _Readout(ctypes.Structure):
    # Mirrors lsim_readout_t in simnvml.c.
    _fields_ = [
        ("ground_truth_energy_j", ctypes.c_double),
        ("power_w", ctypes.c_double),
        ("load", ctypes.c_double),
        ("limit_w", ctypes.c_double),
        ("default_limit_w", ctypes.c_double),
        ("time_scale", ctypes.c_double),
        ("limit_set_time_s", ctypes.c_double),
        ("now_s", ctypes.c_double),
        ("limit_set_count", ctypes.c_uint64),
        ("counter_mj", ctypes.c_uint64),
        ("fault", ctypes.c_int32),
        ("architecture", ctypes.c_int32),
        ("set_limit_permitted", ctypes.c_int32),
        ("field_values_supported", ctypes.c_int32),
        ("mig_enabled", ctypes.c_int32),
        ("pad", ctypes.c_int32),
    ]


_SET_PERMITTED, _SET_FIELD_VALUES, _SET_MIG, _SET_ARCH, _SET_FAULT = range(5)


#: SimulatedDeviceSpec fields that are non-negative numbers (validated, copied to C).
_NUMERIC_SPEC_FIELDS = (
    "idle_power_w",
    "busy_power_w",
    "min_limit_w",
    "max_limit_w",
    "default_limit_w",
    "speed",
    "perf_exponent",
    "initial_energy_j",
)


@dataclass
class SimulatedDeviceSpec:
    """Static description of one SIMULATED GPU.

    The defaults describe an uncapped device: the default power limit (400 W) is above
    the busy power (350 W), so a busy period draws 350 W and runs at full speed until a
    lower limit is set.

    Attributes:
        name: Name reported by ``nvmlDeviceGetName``.
        architecture: One of :data:`ARCHITECTURES`. Pre-Volta names (``kepler``,
            ``maxwell``, ``pascal``) make the energy counter return NOT_SUPPORTED.
        idle_power_w: Power drawn at load 0, in watts.
        busy_power_w: Power drawn at load 1 when the limit does not bind, in watts.
        min_limit_w: Lowest power limit that may be set, in watts.
        max_limit_w: Highest power limit that may be set, in watts.
        default_limit_w: Limit in force at start, in ``[min_limit_w, max_limit_w]``.
        speed: Relative work rate (1.0 = reference device; 0.6 = a slower GPU).
        perf_exponent: Exponent of the performance loss when capped: work stretches by
            ``(busy_power_w / cap) ** perf_exponent`` (1/3: clock ~ cube root of power).
        set_limit_permitted: Whether ``nvmlDeviceSetPowerManagementLimit`` is allowed
            (False makes it return NVML_ERROR_NO_PERMISSION, as for a non-root user).
        field_values_supported: Whether ``nvmlDeviceGetFieldValues`` answers power
            fields (False: every field carries NVML_ERROR_NOT_SUPPORTED).
        mig_enabled: Whether MIG mode is on (the energy counter and power readings then
            return NVML_ERROR_NOT_SUPPORTED).
        uuid: UUID reported by NVML; ``None`` gives
            ``GPU-00000000-0000-0000-0000-<index+1, 12 digits>``.
        initial_energy_j: Starting value of the energy counter (real counters count
            from driver load, so they rarely start at zero).
    """

    name: str = "Simulated NVIDIA H100 80GB HBM3"
    architecture: str = "hopper"
    idle_power_w: float = 70.0
    busy_power_w: float = 350.0
    min_limit_w: float = 100.0
    max_limit_w: float = 400.0
    default_limit_w: float = 400.0
    speed: float = 1.0
    perf_exponent: float = 1.0 / 3.0
    set_limit_permitted: bool = True
    field_values_supported: bool = True
    mig_enabled: bool = False
    uuid: str | None = None
    initial_energy_j: float = 0.0

    def validate(self) -> None:
        """Check the settings.

        Raises:
            ValueError: A setting is out of range; the message names it.
        """
        for field_name in _NUMERIC_SPEC_FIELDS:
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(
                    f"SimulatedDeviceSpec.{field_name} must be a number, got {value!r}"
                )
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"SimulatedDeviceSpec.{field_name} must be a finite number >= 0, got {value!r}"
                )
        if self.busy_power_w < self.idle_power_w:
            raise ValueError(
                f"SimulatedDeviceSpec.busy_power_w ({self.busy_power_w}) must be >= "
                f"idle_power_w ({self.idle_power_w})"
            )
        if self.min_limit_w <= 0:
            raise ValueError(f"SimulatedDeviceSpec.min_limit_w must be > 0, got {self.min_limit_w}")
        if self.min_limit_w > self.max_limit_w:
            raise ValueError(
                f"SimulatedDeviceSpec.min_limit_w ({self.min_limit_w}) must be <= "
                f"max_limit_w ({self.max_limit_w})"
            )
        if not self.min_limit_w <= self.default_limit_w <= self.max_limit_w:
            raise ValueError(
                f"SimulatedDeviceSpec.default_limit_w ({self.default_limit_w}) must lie in "
                f"[min_limit_w, max_limit_w] = [{self.min_limit_w}, {self.max_limit_w}]"
            )
        if self.speed <= 0:
            raise ValueError(f"SimulatedDeviceSpec.speed must be > 0, got {self.speed}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"SimulatedDeviceSpec.architecture {self.architecture!r} is unknown; "
                f"use one of {sorted(ARCHITECTURES)}"
            )
        for field_name in ("name", "uuid"):
            value = getattr(self, field_name)
            if value is None and field_name == "uuid":
                continue
            if not isinstance(value, str) or not value or len(value.encode()) >= _STR_LEN:
                raise ValueError(
                    f"SimulatedDeviceSpec.{field_name} must be a non-empty string shorter "
                    f"than {_STR_LEN} bytes, got {value!r}"
                )


def _find_compiler() -> str:
    candidates = [os.environ.get("CC"), "cc", "gcc", "clang"]
    for candidate in candidates:
        if not candidate:
            continue
        found = shutil.which(candidate)
        if found:
            return found
    raise SimulatedNVMLError(
        "No C compiler found to build the simulated NVML library: install gcc or set CC "
        "to a C compiler."
    )


def _default_cache_root() -> Path:
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "lightning_sustain"


def build_library(cache_dir: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Compile the simulated NVML library (once) and return its path.

    The library is cached under ``<cache root>/simnvml/<hash>/libnvidia-ml.so.1``, where the
    cache root is ``$LIGHTNING_SUSTAIN_CACHE`` or ``~/.cache/lightning_sustain`` and the
    hash covers the C source, the compiler and the flags; it is rebuilt only when one of
    those changes. The build is atomic (compile to a temporary name, then ``os.replace``),
    so concurrent processes never load a half-written file.

    Args:
        cache_dir: Cache root to use instead of the default.
        force: Rebuild even when a cached library exists.

    Returns:
        Path of the built ``libnvidia-ml.so.1``.

    Raises:
        SimulatedNVMLError: No C compiler was found, or compilation failed.
    """
    compiler = _find_compiler()
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256()
    for part in (source, compiler.encode(), " ".join(_CFLAGS + _LIBS).encode()):
        digest.update(part)
        digest.update(b"\0")
    digest.update(platform.machine().encode())
    root = Path(cache_dir) if cache_dir is not None else _default_cache_root()
    out_dir = root / "simnvml" / digest.hexdigest()[:16]
    target = out_dir / LIBRARY_NAME
    if target.is_file() and not force:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{LIBRARY_NAME}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    cmd = [compiler, *_CFLAGS, "-o", str(tmp), str(_SOURCE), *_LIBS]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise SimulatedNVMLError(
                f"Building the simulated NVML library failed ({' '.join(cmd)}):\n"
                f"{proc.stderr.strip()}"
            )
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.debug("Built simulated NVML library at %s", target)
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    lib.lsim_now.restype = ctypes.c_double
    lib.lsim_open.restype = ctypes.c_void_p
    lib.lsim_open.argtypes = [ctypes.c_char_p]
    lib.lsim_close.argtypes = [ctypes.c_void_p]
    lib.lsim_close.restype = None
    lib.lsim_create.argtypes = [
        ctypes.c_char_p,
        ctypes.c_uint,
        ctypes.POINTER(_Spec),
        ctypes.c_double,
    ]
    lib.lsim_num_devices.argtypes = [ctypes.c_void_p]
    lib.lsim_period_s.argtypes = [ctypes.c_void_p]
    lib.lsim_period_s.restype = ctypes.c_double
    lib.lsim_read.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.POINTER(_Readout)]
    lib.lsim_get_spec.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.POINTER(_Spec)]
    lib.lsim_set_load.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_double]
    lib.lsim_set_limit_w.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_double]
    lib.lsim_set_int.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_int]
    _dbl_p = ctypes.POINTER(ctypes.c_double)
    lib.lsim_set_profile.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, _dbl_p,
                                     _dbl_p, _dbl_p, ctypes.c_double, ctypes.c_double]  # fmt: skip
    lib.lsim_profile_energy_j.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_double,
                                          ctypes.c_double, _dbl_p]  # fmt: skip
    lib.lsim_t0.argtypes = [ctypes.c_void_p]
    lib.lsim_t0.restype = ctypes.c_double
    if lib.lsim_spec_size() != ctypes.sizeof(_Spec) or lib.lsim_readout_size() != ctypes.sizeof(
        _Readout
    ):
        raise SimulatedNVMLError(
            f"{path} does not match this version of lightning_sustain (struct layout "
            "differs); delete the cache directory and retry."
        )
    return lib


def _warn_if_pynvml_bound_elsewhere() -> None:
    pynvml = sys.modules.get("pynvml")
    nvml_lib = getattr(pynvml, "nvmlLib", None) if pynvml is not None else None
    if nvml_lib is not None and not hasattr(nvml_lib, "lsim_simulated_marker"):
        warnings.warn(
            "pynvml already loaded a real NVML library in this process before SimulatedNVML "
            "was installed, so pynvml calls here keep going to the real driver. Install "
            "SimulatedNVML before the first pynvml.nvmlInit() (child processes are fine).",
            RuntimeWarning,
            stacklevel=3,
        )


def _uuid_for(index: int) -> str:
    return f"GPU-00000000-0000-0000-0000-{index + 1:012d}"


class SimulatedNVML:
    """Controller of a set of SIMULATED NVIDIA GPUs served through the real NVML API.

    Create it, :meth:`install` it (or use it as a context manager), then use ``pynvml`` as
    usual; drive the simulated workload with :meth:`set_load` / :meth:`busy` and read the
    exact energy with :meth:`ground_truth_energy_j`. Child processes started after
    :meth:`install` (DDP ranks, ``subprocess``) see the same devices; inside them
    :meth:`attach` returns a controller for the shared state.

    ``pynvml`` caches its library handle for the life of the process and keeps an init
    refcount: pair every ``pynvml.nvmlInit()`` with ``pynvml.nvmlShutdown()``. The library
    stays loaded after :meth:`uninstall`; a later ``SimulatedNVML`` in the same process works
    because the library re-reads ``LIGHTNING_SUSTAIN_SIMNVML_STATE`` on every ``nvmlInit``.

    Args:
        devices: Number of identical default devices, or one
            :class:`SimulatedDeviceSpec` per device.
        counter_period_s: Update period of the energy counter and of the sampled power
            readings, in seconds (hardware: about 0.1 s).
        state_path: Where to create the shared state file; ``None`` uses a fresh
            temporary directory.

    Raises:
        ValueError: A setting is invalid; the message names it.
    """

    def __init__(
        self,
        devices: int | Sequence[SimulatedDeviceSpec] = 1,
        *,
        counter_period_s: float = 0.1,
        state_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(devices, bool):
            raise ValueError(f"devices must be an int or a sequence of specs, got {devices!r}")
        if isinstance(devices, int):
            if not 1 <= devices <= _MAX_DEVICES:
                raise ValueError(f"devices must be between 1 and {_MAX_DEVICES}, got {devices}")
            specs = [SimulatedDeviceSpec() for _ in range(devices)]
        else:
            specs = [dataclasses.replace(spec) for spec in devices]
            if not 1 <= len(specs) <= _MAX_DEVICES:
                raise ValueError(
                    f"devices must hold between 1 and {_MAX_DEVICES} specs, got {len(specs)}"
                )
            for spec in specs:
                if not isinstance(spec, SimulatedDeviceSpec):
                    raise ValueError(
                        f"devices must contain SimulatedDeviceSpec objects, got {spec!r}"
                    )
        for index, spec in enumerate(specs):
            try:
                spec.validate()
            except ValueError as exc:
                raise ValueError(f"device {index}: {exc}") from None
            if spec.uuid is None:
                spec.uuid = _uuid_for(index)
        uuids = [spec.uuid for spec in specs]
        if len(set(uuids)) != len(uuids):
            raise ValueError(f"SimulatedDeviceSpec.uuid values must be unique, got {uuids}")
        if (
            isinstance(counter_period_s, bool)
            or not isinstance(counter_period_s, (int, float))
            or not math.isfinite(counter_period_s)
            or counter_period_s <= 0
        ):
            raise ValueError(f"counter_period_s must be a number > 0, got {counter_period_s!r}")
        self._specs = tuple(specs)
        self._period_s = float(counter_period_s)
        self._requested_state_path = Path(state_path) if state_path is not None else None
        self._state_path: Path | None = None
        self._library_path: Path | None = None
        self._lib: ctypes.CDLL | None = None
        self._handle: int | None = None
        self._owns_state = False
        self._tmp_dir: Path | None = None
        self._saved_env: dict[str, str | None] | None = None

    # ---- lifecycle -------------------------------------------------------------------
    def install(self) -> SimulatedNVML:
        """Build (if needed) and load the library, create the state, set the environment.

        After this call ``pynvml.nvmlInit()`` in this process, and in child processes
        started from now on, talks to the simulated devices.

        Returns:
            ``self``, so ``sim = SimulatedNVML(2).install()`` works.

        Raises:
            SimulatedNVMLError: Already installed, or the library or state file could not
                be built or created.
        """
        if self._handle is not None:
            raise SimulatedNVMLError("This SimulatedNVML is already installed or attached.")
        self._library_path = build_library()
        self._lib = _load(self._library_path)
        _warn_if_pynvml_bound_elsewhere()
        if self._requested_state_path is None:
            self._tmp_dir = Path(tempfile.mkdtemp(prefix="lightning_sustain_simnvml_"))
            path = self._tmp_dir / "state.bin"
        else:
            path = self._requested_state_path
            path.parent.mkdir(parents=True, exist_ok=True)
        c_specs = (_Spec * len(self._specs))()
        for c_spec, spec in zip(c_specs, self._specs, strict=True):
            c_spec.name = spec.name.encode()
            c_spec.uuid = (spec.uuid or "").encode()
            for field_name in _NUMERIC_SPEC_FIELDS:
                setattr(c_spec, field_name, float(getattr(spec, field_name)))
            c_spec.architecture = ARCHITECTURES[spec.architecture]
            c_spec.set_limit_permitted = int(spec.set_limit_permitted)
            c_spec.field_values_supported = int(spec.field_values_supported)
            c_spec.mig_enabled = int(spec.mig_enabled)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        rc = self._lib.lsim_create(str(tmp).encode(), len(self._specs), c_specs, self._period_s)
        if rc != 0:
            if tmp.exists():
                tmp.unlink()
            self._cleanup_tmp_dir()
            raise SimulatedNVMLError(
                f"Could not create the simulated NVML state file {path}: {os.strerror(rc)}"
            )
        os.replace(tmp, path)  # readers never see a half-initialised file
        self._state_path = path
        self._owns_state = True
        self._open_state()
        self._saved_env = {
            "LD_LIBRARY_PATH": os.environ.get("LD_LIBRARY_PATH"),
            STATE_ENV_VAR: os.environ.get(STATE_ENV_VAR),
        }
        lib_dir = str(self._library_path.parent)
        old_ld = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = lib_dir + (os.pathsep + old_ld if old_ld else "")
        os.environ[STATE_ENV_VAR] = str(path)
        logger.info(
            "SIMULATED NVML installed: %d device(s), state %s, library %s",
            len(self._specs),
            path,
            self._library_path,
        )
        return self

    def uninstall(self) -> None:
        """Restore the environment variables and remove the state file this object created.

        The library stays loaded in this process (``pynvml`` keeps its handle). Safe to call
        more than once.
        """
        if self._saved_env is not None:
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._saved_env = None
        self._close_state()
        if self._owns_state and self._state_path is not None:
            try:
                self._state_path.unlink()
            except FileNotFoundError:
                pass
            self._owns_state = False
        self._cleanup_tmp_dir()

    def close(self) -> None:
        """Release this controller.

        Same as :meth:`uninstall`; for an attached controller it only unmaps the state.
        """
        self.uninstall()

    def __enter__(self) -> SimulatedNVML:
        return self.install() if self._handle is None else self

    def __exit__(self, *exc_info: Any) -> None:
        self.uninstall()

    def __del__(self) -> None:
        try:
            self._close_state()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @classmethod
    def attach(cls, state_path: str | os.PathLike[str] | None = None) -> SimulatedNVML:
        """Attach to simulated devices created by another process (e.g. a DDP parent).

        Args:
            state_path: State file; ``None`` reads ``LIGHTNING_SUSTAIN_SIMNVML_STATE``.

        Returns:
            A controller that drives load and reads ground truth of the shared devices. It
            neither changes the environment nor deletes the state file.

        Raises:
            SimulatedNVMLError: No state path is given or set, or the file is not a valid
                simulated NVML state.
        """
        if state_path is None:
            env = os.environ.get(STATE_ENV_VAR)
            if not env:
                raise SimulatedNVMLError(
                    f"No simulated NVML state to attach to: {STATE_ENV_VAR} is not set. "
                    "Create the devices with SimulatedNVML(...).install() in a parent process."
                )
            state_path = env
        self = cls.__new__(cls)
        self._requested_state_path = Path(state_path)
        self._state_path = Path(state_path)
        self._library_path = build_library()
        self._lib = _load(self._library_path)
        self._handle = None
        self._owns_state = False
        self._tmp_dir = None
        self._saved_env = None
        self._open_state()
        assert self._handle is not None
        n = self._lib.lsim_num_devices(self._handle)
        self._period_s = float(self._lib.lsim_period_s(self._handle))
        specs = []
        for index in range(n):
            raw = _Spec()
            self._lib.lsim_get_spec(self._handle, index, ctypes.byref(raw))
            arch = {v: k for k, v in ARCHITECTURES.items()}.get(raw.architecture, "hopper")
            specs.append(
                SimulatedDeviceSpec(
                    name=raw.name.decode(),
                    architecture=arch,
                    idle_power_w=raw.idle_power_w,
                    busy_power_w=raw.busy_power_w,
                    min_limit_w=raw.min_limit_w,
                    max_limit_w=raw.max_limit_w,
                    default_limit_w=raw.default_limit_w,
                    speed=raw.speed,
                    perf_exponent=raw.perf_exponent,
                    set_limit_permitted=bool(raw.set_limit_permitted),
                    field_values_supported=bool(raw.field_values_supported),
                    mig_enabled=bool(raw.mig_enabled),
                    uuid=raw.uuid.decode(),
                    initial_energy_j=raw.initial_energy_j,
                )
            )
        self._specs = tuple(specs)
        return self

    def _open_state(self) -> None:
        assert self._lib is not None and self._state_path is not None
        handle = self._lib.lsim_open(str(self._state_path).encode())
        if not handle:
            raise SimulatedNVMLError(
                f"{self._state_path} is not a valid simulated NVML state file (missing, "
                "truncated, or written by another version)."
            )
        self._handle = handle

    def _close_state(self) -> None:
        if self._handle is not None and self._lib is not None:
            self._lib.lsim_close(self._handle)
        self._handle = None

    def _cleanup_tmp_dir(self) -> None:
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    # ---- properties ------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        """Number of simulated devices."""
        return len(self._specs)

    @property
    def specs(self) -> tuple[SimulatedDeviceSpec, ...]:
        """The device specs as created (copies; run-time changes are not reflected)."""
        return tuple(dataclasses.replace(spec) for spec in self._specs)

    @property
    def counter_period_s(self) -> float:
        """Update period of the energy counter and sampled power, in seconds."""
        return self._period_s

    @property
    def library_path(self) -> Path | None:
        """Path of the loaded ``libnvidia-ml.so.1`` (``None`` before :meth:`install`)."""
        return self._library_path

    @property
    def state_path(self) -> Path | None:
        """Path of the shared state file (``None`` before :meth:`install`)."""
        return self._state_path

    def uuid(self, index: int) -> str:
        """UUID that NVML reports for device ``index``."""
        self._check_index(index)
        return str(self._specs[index].uuid)

    # ---- driving and reading ---------------------------------------------------------
    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"index must be an int, got {index!r}")
        if not 0 <= index < len(self._specs):
            raise ValueError(
                f"index {index} out of range: this SimulatedNVML has {len(self._specs)} device(s)"
            )

    def _live(self) -> tuple[ctypes.CDLL, int]:
        if self._handle is None or self._lib is None:
            raise SimulatedNVMLError(
                "SimulatedNVML is not installed: call install() (or use it as a context "
                "manager) or attach() first."
            )
        return self._lib, self._handle

    def _read(self, index: int) -> _Readout:
        self._check_index(index)
        lib, handle = self._live()
        out = _Readout()
        rc = lib.lsim_read(handle, index, ctypes.byref(out))
        if rc != 0:
            raise SimulatedNVMLError(f"Reading simulated device {index} failed: {os.strerror(rc)}")
        return out

    def _set_int(self, index: int, which: int, value: int) -> None:
        self._check_index(index)
        lib, handle = self._live()
        rc = lib.lsim_set_int(handle, index, which, value)
        if rc != 0:
            raise SimulatedNVMLError(f"Updating simulated device {index} failed: {os.strerror(rc)}")

    def set_load(self, index: int, fraction: float) -> None:
        """Set the utilisation of device ``index`` (0 = idle, 1 = busy).

        Args:
            index: Device index.
            fraction: Load in ``[0, 1]``.

        Raises:
            ValueError: ``fraction`` is not a number in ``[0, 1]`` or ``index`` is invalid.
        """
        self._check_index(index)
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0.0 <= fraction <= 1.0
        ):
            raise ValueError(f"load fraction must be a number in [0, 1], got {fraction!r}")
        lib, handle = self._live()
        lib.lsim_set_load(handle, index, float(fraction))

    def load(self, index: int) -> float:
        """Current load of device ``index`` in ``[0, 1]``."""
        return float(self._read(index).load)

    def time_scale(self, index: int) -> float:
        """Wall-clock seconds one nominal second of busy work takes on device ``index`` now.

        ``(1 / speed) * (busy_power_w / min(busy_power_w, limit)) ** perf_exponent``.
        """
        return float(self._read(index).time_scale)

    def busy(self, index: int, nominal_s: float) -> float:
        """Run ``nominal_s`` seconds of reference work on device ``index`` at full load.

        Sets the load to 1, sleeps until the work is done (progress is integrated with the
        time scale in force, so a limit changed meanwhile takes effect), then sets the load
        to 0.

        Args:
            index: Device index.
            nominal_s: Work duration on an uncapped device of speed 1, in seconds.

        Returns:
            Wall-clock seconds from just before the load was raised to just after it was
            lowered (an upper bound on the time spent at load 1).

        Raises:
            ValueError: ``nominal_s`` is negative or not finite.
        """
        if (
            isinstance(nominal_s, bool)
            or not isinstance(nominal_s, (int, float))
            or not math.isfinite(nominal_s)
            or nominal_s < 0
        ):
            raise ValueError(f"nominal_s must be a finite number >= 0, got {nominal_s!r}")
        start = time.monotonic()
        self.set_load(index, 1.0)
        last = time.monotonic()
        remaining = float(nominal_s)
        try:
            while remaining > 1e-9:
                scale = self.time_scale(index)
                time.sleep(min(remaining * scale, 0.02))
                now = time.monotonic()
                remaining -= (now - last) / scale
                last = now
        finally:
            self.set_load(index, 0.0)
        return time.monotonic() - start

    def ground_truth_energy_j(self, index: int) -> float:
        """Exact energy drawn by device ``index`` since creation, in joules (not quantised).

        Includes ``initial_energy_j``; unaffected by the ``counter_backwards`` fault.
        """
        return float(self._read(index).ground_truth_energy_j)

    def ground_truth_sample(self, index: int) -> tuple[float, float]:
        """Exact ``(time_s, energy_j)`` of device ``index``, read atomically.

        ``time_s`` is on the ``time.monotonic()`` clock (CLOCK_MONOTONIC, shared by all
        processes), so samples taken at step boundaries give per-step ground truth.
        """
        out = self._read(index)
        return float(out.now_s), float(out.ground_truth_energy_j)

    def counter_energy_mj(self, index: int) -> int:
        """What ``nvmlDeviceGetTotalEnergyConsumption`` returns now, in millijoules."""
        return int(self._read(index).counter_mj)

    def power_w(self, index: int) -> float:
        """Power drawn by device ``index`` right now, in watts (exact, not sampled)."""
        return float(self._read(index).power_w)

    def power_limit_w(self, index: int) -> float:
        """Power limit in force on device ``index``, in watts."""
        return float(self._read(index).limit_w)

    def default_limit_w(self, index: int) -> float:
        """Default power limit of device ``index``, in watts."""
        return float(self._read(index).default_limit_w)

    def set_power_limit_w(self, index: int, watts: float) -> None:
        """Set the power limit directly (test backdoor: ignores ``set_limit_permitted``).

        Does not count in :meth:`limit_set_count`, which counts NVML calls only.

        Raises:
            ValueError: ``watts`` is outside the device's ``[min_limit_w, max_limit_w]``.
        """
        self._check_index(index)
        spec = self._specs[index]
        if (
            isinstance(watts, bool)
            or not isinstance(watts, (int, float))
            or not spec.min_limit_w <= watts <= spec.max_limit_w
        ):
            raise ValueError(
                f"power limit {watts!r} W is outside device {index}'s range "
                f"[{spec.min_limit_w}, {spec.max_limit_w}] W"
            )
        lib, handle = self._live()
        lib.lsim_set_limit_w(handle, index, float(watts))

    def limit_set_count(self, index: int) -> int:
        """Number of successful ``nvmlDeviceSetPowerManagementLimit`` calls on ``index``."""
        return int(self._read(index).limit_set_count)

    def limit_set_time_s(self, index: int) -> float | None:
        """``time.monotonic()`` of the last successful NVML limit change, or ``None``."""
        value = float(self._read(index).limit_set_time_s)
        return None if value < 0 else value

    def set_limit_permitted(self, index: int, permitted: bool) -> None:
        """Allow or forbid ``nvmlDeviceSetPowerManagementLimit`` (NO_PERMISSION when not)."""
        self._set_int(index, _SET_PERMITTED, int(bool(permitted)))

    def set_field_values_supported(self, index: int, supported: bool) -> None:
        """Make ``nvmlDeviceGetFieldValues`` answer, or report NOT_SUPPORTED per field."""
        self._set_int(index, _SET_FIELD_VALUES, int(bool(supported)))

    def set_mig(self, index: int, enabled: bool) -> None:
        """Turn MIG mode on or off (on: energy and power readings are NOT_SUPPORTED)."""
        self._set_int(index, _SET_MIG, int(bool(enabled)))

    def set_architecture(self, index: int, architecture: str) -> None:
        """Change the reported architecture (e.g. ``"pascal"`` to lose the energy counter).

        Raises:
            ValueError: Unknown architecture name.
        """
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture {architecture!r} is unknown; use one of {sorted(ARCHITECTURES)}"
            )
        self._set_int(index, _SET_ARCH, ARCHITECTURES[architecture])

    def set_power_profile(
        self, index: int, profile: PowerProfile | None, origin_s: float | None = None
    ) -> None:
        """Make device ``index`` draw ``profile`` over wall time, independent of the load.

        From now on the device's power follows the profile (``set_load``, ``busy`` and power
        limits still stretch simulated work but no longer change the power); ``None``
        returns to the load model. The energy counter and sampled power readings integrate
        the profile exactly, so :meth:`profile_energy_j` is the ground truth of any window.

        Args:
            index: Device index.
            profile: The power profile, or ``None``.
            origin_s: ``time.monotonic()`` of profile time 0; ``None`` uses now.

        Raises:
            ValueError: ``profile`` is not a :class:`PowerProfile` or ``origin_s`` is not finite.
        """
        self._check_index(index)
        lib, handle = self._live()
        if profile is None:
            rc = lib.lsim_set_profile(handle, index, 0, None, None, None, 1.0, 0.0)
        else:
            if not isinstance(profile, PowerProfile):
                raise ValueError(f"profile must be a PowerProfile or None, got {profile!r}")
            origin = time.monotonic() if origin_s is None else origin_s
            if isinstance(origin, bool) or not isinstance(origin, (int, float)) or not (
                math.isfinite(origin)
            ):
                raise ValueError(f"origin_s must be a finite number, got {origin_s!r}")
            n = len(profile.starts_s)
            arrays = [(ctypes.c_double * n)(*values) for values in
                      (profile.starts_s, profile.start_power_w, profile.end_power_w)]  # fmt: skip
            rc = lib.lsim_set_profile(handle, index, n, *arrays, profile.period_s, float(origin))
        if rc != 0:
            raise SimulatedNVMLError(f"Setting the power profile of device {index} failed: "
                                     f"{os.strerror(rc)}")  # fmt: skip

    def profile_energy_j(self, index: int, t0_s: float, t1_s: float) -> float:
        """Exact energy of device ``index``'s profile between two ``time.monotonic()`` times.

        Any window, past or future, as long as the profile was in force over it.

        Raises:
            SimulatedNVMLError: No profile is set on the device.
        """
        self._check_index(index)
        lib, handle = self._live()
        out = ctypes.c_double()
        rc = lib.lsim_profile_energy_j(handle, index, float(t0_s), float(t1_s), ctypes.byref(out))
        if rc != 0:
            raise SimulatedNVMLError(
                f"Device {index} has no power profile: call set_power_profile() first."
            )
        return float(out.value)

    @property
    def counter_origin_s(self) -> float:
        """``time.monotonic()`` of counter update 0 (ground truth for timestamp checks).

        The counter updates at this time plus whole multiples of :attr:`counter_period_s`.
        """
        lib, handle = self._live()
        return float(lib.lsim_t0(handle))

    def set_fault(self, index: int, kind: str | None) -> None:
        """Inject or clear a fault on device ``index``.

        Args:
            index: Device index.
            kind: ``None`` (clear), ``"gpu_lost"`` (every call on the device returns
                NVML_ERROR_GPU_IS_LOST), ``"unknown_error"`` (NVML_ERROR_UNKNOWN), or
                ``"counter_backwards"`` (the energy counter restarts from zero, as after a
                driver reload, and counts up from there; clearing the fault does not undo
                the jump).

        Raises:
            ValueError: Unknown fault kind.
        """
        if kind not in FAULTS:
            raise ValueError(f"fault kind {kind!r} is unknown; use one of {list(FAULTS)}")
        self._set_int(index, _SET_FAULT, FAULTS[kind])

    def fault(self, index: int) -> str | None:
        """The fault currently injected on device ``index`` (``None`` if none)."""
        code = int(self._read(index).fault)
        return {v: k for k, v in FAULTS.items()}[code]

    def __repr__(self) -> str:
        state = "installed" if self._owns_state else ("attached" if self._handle else "idle")
        return (
            f"SimulatedNVML(devices={len(self._specs)}, counter_period_s={self._period_s}, "
            f"state={state}, state_path={str(self._state_path) if self._state_path else None!r})"
        )
