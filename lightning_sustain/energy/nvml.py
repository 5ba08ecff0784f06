"""NVIDIA GPUs through NVML (``pynvml``, from the ``nvidia-ml-py`` package).

Energy comes from the total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
Volta and newer) where the device supports it, else from power samples
(``NVML_FI_DEV_POWER_INSTANT`` through ``nvmlDeviceGetFieldValues``, else
``nvmlDeviceGetPowerUsage``) integrated over time by the device object.

NVML errors are mapped once, here, to the exceptions in :mod:`lightning_sustain.energy.errors`.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.energy.errors import (
    DeviceUnavailableError,
    EnergyMeasurementError,
    MeasurementNotSupportedError,
    PowerLimitError,
    PowerLimitPermissionError,
)
from lightning_sustain.energy.native import (
    NativeCounterPoller,
    NativePollerUnavailable,
    native_poller_enabled,
)
from lightning_sustain.energy.types import DeviceInfo, EnergyReading, Provenance

logger = logging.getLogger(__name__)

#: Symbol exported by the simulated NVML library; its presence marks readings as simulated.
SIMULATED_MARKER_SYMBOL = "lsim_simulated_marker"

_session_lock = threading.Lock()
_session_refcount = 0


def _pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
        raise DeviceUnavailableError(
            "The 'pynvml' module is missing; install it with `pip install nvidia-ml-py`."
        ) from exc
    return pynvml


def nvml_init() -> Any:
    """Initialise NVML once per process (reference counted) and return ``pynvml``.

    Raises:
        DeviceUnavailableError: when no NVML library or driver is available.
    """
    global _session_refcount
    pynvml = _pynvml()
    with _session_lock:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise DeviceUnavailableError(
                f"NVML is not available ({exc}): no NVIDIA driver or libnvidia-ml.so.1 "
                "was found. GPU energy cannot be measured; CPU energy is measured or "
                "estimated instead."
            ) from exc
        _session_refcount += 1
    return pynvml


def nvml_shutdown() -> None:
    """Release one reference taken by :func:`nvml_init`."""
    global _session_refcount
    pynvml = _pynvml()
    with _session_lock:
        if _session_refcount <= 0:
            return
        _session_refcount -= 1
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:  # pragma: no cover - shutdown failures are benign
            logger.debug("nvmlShutdown failed: %s", exc)


def nvml_available() -> bool:
    """Return True when NVML can be initialised in this process."""
    try:
        nvml_init()
    except DeviceUnavailableError:
        return False
    nvml_shutdown()
    return True


def nvml_is_simulated() -> bool:
    """Return True when the loaded NVML library is lightning_sustain's simulated device."""
    pynvml = _pynvml()
    lib = getattr(pynvml, "nvmlLib", None)
    if lib is None:
        return False
    try:
        getattr(lib, SIMULATED_MARKER_SYMBOL)
    except AttributeError:
        return False
    return True


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class VisibleGpu:
    """One entry of ``CUDA_VISIBLE_DEVICES`` resolved to an NVML device.

    Attributes:
        cuda_ordinal: the index CUDA (and torch) uses for the device in this process.
        nvml_index: the NVML index of the physical device, or None for a MIG slice.
        uuid: the device UUID as NVML reports it.
        mig: True when the entry names a MIG slice, which NVML cannot meter.
    """

    cuda_ordinal: int
    nvml_index: int | None
    uuid: str
    mig: bool = False


def resolve_visible_gpus(cuda_visible_devices: str | None = None) -> list[VisibleGpu]:
    """Map CUDA ordinals to NVML devices, honouring ``CUDA_VISIBLE_DEVICES``.

    Entries may be indices (``"0,2"``), full or prefix UUIDs (``"GPU-8f3c..."``) or MIG
    identifiers (``"MIG-..."``). Resolution stops at the first invalid entry, as CUDA does.

    Args:
        cuda_visible_devices: the variable's value; ``None`` reads the environment.

    Returns:
        One :class:`VisibleGpu` per device CUDA would expose, in CUDA ordinal order.

    Raises:
        DeviceUnavailableError: when NVML is not available.
    """
    if cuda_visible_devices is None:
        cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    pynvml = nvml_init()
    try:
        count = pynvml.nvmlDeviceGetCount()
        uuids = [
            _decode(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)))
            for i in range(count)
        ]
    finally:
        nvml_shutdown()
    if cuda_visible_devices is None:
        return [VisibleGpu(i, i, uuids[i]) for i in range(count)]
    visible: list[VisibleGpu] = []
    for raw in cuda_visible_devices.split(","):
        entry = raw.strip()
        if not entry:
            break
        ordinal = len(visible)
        if entry.isdigit() or (entry.startswith("-") and entry[1:].isdigit()):
            index = int(entry)
            if index < 0 or index >= count:
                break  # CUDA ignores this entry and every one after it
            visible.append(VisibleGpu(ordinal, index, uuids[index]))
        elif entry.upper().startswith("MIG-"):
            visible.append(VisibleGpu(ordinal, None, entry, mig=True))
        else:
            wanted = entry if entry.upper().startswith("GPU-") else f"GPU-{entry}"
            matches = [i for i, uuid in enumerate(uuids) if uuid.lower().startswith(wanted.lower())]
            if len(matches) != 1:
                break
            visible.append(VisibleGpu(ordinal, matches[0], uuids[matches[0]]))
    return visible


def nvml_index_for_uuid(uuid: str) -> int:
    """Return the NVML index of the device with this UUID (a unique prefix is enough).

    Raises:
        DeviceUnavailableError: when NVML is unavailable or no single device matches.
    """
    pynvml = nvml_init()
    try:
        count = pynvml.nvmlDeviceGetCount()
        wanted = uuid.lower()
        matches = [
            i
            for i in range(count)
            if _decode(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)))
            .lower()
            .startswith(wanted)
        ]
    finally:
        nvml_shutdown()
    if len(matches) != 1:
        raise DeviceUnavailableError(
            f"No single NVML device has UUID {uuid!r} ({len(matches)} match); check "
            "CUDA_VISIBLE_DEVICES and `nvidia-smi -L`."
        )
    return matches[0]


#: How often the Python sampler drains a native poller's records while the counter's
#: update period is not known yet (the first few updates), in seconds; once it is known,
#: the sampler wakes once per update, just after it. Live readers (budgets) see each
#: update within this long either way.
NATIVE_DRAIN_INTERVAL_S = 0.02
#: How long after an expected counter update the sampler collects it, in seconds.
NATIVE_DRAIN_MARGIN_S = 0.005


class NvmlGpu(EnergyDevice):
    """One physical NVIDIA GPU measured through NVML.

    Args:
        nvml_index: the NVML device index (not the CUDA ordinal; see
            :func:`resolve_visible_gpus`).
        prefer_counter: use the total-energy counter when the device has one.
        native_poller: poll the counter from a native thread
            (:mod:`lightning_sustain.energy.native`), so update times stay accurate while
            the training thread holds the GIL; ``None``: on unless
            ``LIGHTNING_SUSTAIN_NATIVE_POLLER=0``. Falls back to Python polling, with a
            warning, where the helper cannot be built (no C compiler).

    Raises:
        DeviceUnavailableError: NVML is missing or the index does not exist.
        MeasurementNotSupportedError: the device is in MIG mode or reports neither
            energy nor power.
    """

    #: Poll interval suited to NVML: the counter and power readings update about every
    #: 100 ms on current GPUs; polling at 10 ms timestamps each update within 5 ms (20 ms
    #: polling saved ~7 us of CPU per 2.5 ms step but tripled the run-total error).
    preferred_interval_s = 0.01

    def __init__(
        self, nvml_index: int, prefer_counter: bool = True, native_poller: bool | None = None
    ) -> None:
        self._pynvml = nvml_init()
        self._closed = False
        pynvml = self._pynvml
        try:
            count = pynvml.nvmlDeviceGetCount()
            if not 0 <= nvml_index < count:
                raise DeviceUnavailableError(
                    f"NVML device index {nvml_index} does not exist: this machine has "
                    f"{count} NVML device(s)."
                )
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
            name = _decode(pynvml.nvmlDeviceGetName(self._handle))
            self.uuid = _decode(pynvml.nvmlDeviceGetUUID(self._handle))
            self._check_not_mig(name)
            simulated = nvml_is_simulated()
            self._mode = self._choose_mode(prefer_counter)
        except pynvml.NVMLError as exc:
            nvml_shutdown()
            if exc.value == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise DeviceUnavailableError(
                    f"NVML device {nvml_index} is lost ({exc}); it cannot be measured."
                ) from exc
            raise EnergyMeasurementError(f"NVML failed to open device {nvml_index}: {exc}") from exc
        except BaseException:
            nvml_shutdown()
            raise
        provenance = Provenance.COUNTER if self._mode == "counter" else Provenance.INTEGRATED
        self.nvml_index = nvml_index
        self.info = DeviceInfo(
            device_id=f"gpu:{self.uuid}",
            kind="gpu",
            name=name,
            provenance=provenance,
            simulated=simulated,
            index=nvml_index,
        )
        self._last_raw_mj: int | None = None
        self._last_poll_s: float | None = None
        self._energy_j = 0.0
        self._last_power_w: float | None = None
        self._backwards_warned = False
        self._last_change_s = 0.0
        self._origin_set = False
        self._update_periods: collections.deque[float] = collections.deque(maxlen=9)
        self._poller: NativeCounterPoller | None = None
        self._brackets: collections.deque[tuple[float, float]] = collections.deque(maxlen=30)
        if native_poller is None:
            native_poller = native_poller_enabled()
        if native_poller and self._mode == "counter":
            try:
                self._poller = NativeCounterPoller(pynvml, self._handle)
            except NativePollerUnavailable as exc:
                logger.info("NVML device %d: no native counter poller (%s)", nvml_index, exc)
            except Exception as exc:  # noqa: BLE001 - measurement falls back, never fails
                logger.warning("NVML device %d: native poller failed to start (%s); "
                               "polling from Python", nvml_index, exc)  # fmt: skip
        if self._poller is not None:
            # Python only drains the native thread's records (stamped by the native
            # thread): once per counter update is enough, and each wake-up of a Python
            # thread costs the training thread a GIL hand-over
            self.preferred_interval_s = NATIVE_DRAIN_INTERVAL_S
        logger.debug("NVML device %d (%s) measured by %s", nvml_index, name, self._mode)

    # -- set-up -----------------------------------------------------------------------
    def _check_not_mig(self, name: str) -> None:
        pynvml = self._pynvml
        try:
            current, _pending = pynvml.nvmlDeviceGetMigMode(self._handle)
        except pynvml.NVMLError:
            return  # pre-Ampere devices have no MIG mode at all
        if current == getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1):
            raise MeasurementNotSupportedError(
                f"GPU {name} ({self.uuid}) is in MIG mode: NVML cannot measure energy or "
                "power per MIG slice, so this GPU's energy is not measured. Disable MIG "
                "(`nvidia-smi -mig 0`) for per-device energy."
            )

    def _choose_mode(self, prefer_counter: bool) -> str:
        pynvml = self._pynvml
        if prefer_counter:
            try:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
                return "counter"
            except pynvml.NVMLError as exc:
                if exc.value != pynvml.NVML_ERROR_NOT_SUPPORTED:
                    raise self._map_error(exc, "read the energy counter") from exc
        if self._read_field_power_w() is not None:
            return "field"
        try:
            pynvml.nvmlDeviceGetPowerUsage(self._handle)
            return "power"
        except pynvml.NVMLError as exc:
            raise MeasurementNotSupportedError(
                f"NVML device {self.uuid} reports neither total energy nor power ({exc})."
            ) from exc

    def _map_error(self, exc: Exception, action: str) -> EnergyMeasurementError:
        pynvml = self._pynvml
        code = getattr(exc, "value", None)
        if code == pynvml.NVML_ERROR_GPU_IS_LOST:
            return DeviceUnavailableError(
                f"GPU {self.uuid} was lost while trying to {action} (NVML: {exc}); its "
                "energy after this point is not measured."
            )
        if code == pynvml.NVML_ERROR_NOT_SUPPORTED:
            return MeasurementNotSupportedError(f"GPU {self.uuid} cannot {action}: {exc}")
        return EnergyMeasurementError(f"NVML failed to {action} on GPU {self.uuid}: {exc}")

    # -- reading ----------------------------------------------------------------------
    @property
    def native(self) -> bool:
        """True when a native thread polls the counter (:mod:`lightning_sustain.energy.native`)."""
        return self._poller is not None

    @property
    def native_cpu_s(self) -> float:
        """CPU seconds used by the native poller thread so far (0 without one)."""
        return self._poller.cpu_s if self._poller is not None else 0.0

    @property
    def mode(self) -> str:
        """How energy is obtained: ``counter``, ``field`` (instant power) or ``power``."""
        return self._mode

    def _read_field_power_w(self) -> float | None:
        pynvml = self._pynvml
        field_id = getattr(pynvml, "NVML_FI_DEV_POWER_INSTANT", None)
        if field_id is None:
            return None
        try:
            values = pynvml.nvmlDeviceGetFieldValues(self._handle, [field_id])
        except pynvml.NVMLError:
            return None
        value = values[0]
        if value.nvmlReturn != pynvml.NVML_SUCCESS:
            return None
        return float(value.value.uiVal) / 1000.0

    def _read_power_w(self) -> float:
        if self._mode == "field":
            power_w = self._read_field_power_w()
            if power_w is not None:
                return power_w
            self._mode = "power"  # the field stopped answering: use the older call
        return float(self._pynvml.nvmlDeviceGetPowerUsage(self._handle)) / 1000.0

    def read(self) -> EnergyReading | None:
        """Poll the device.

        Returns:
            A new reading, or None when the counter has not updated since the last one
            (a counter reading is timestamped at the midpoint of the poll interval in
            which it changed).

        Raises:
            EnergyMeasurementError: if the device cannot be read (GPU lost, NVML error).
        """
        readings = self.read_many()
        return readings[-1] if readings else None

    def read_many(self) -> list[EnergyReading]:
        """Every new reading since the last call (several when a native poller runs).

        Raises:
            EnergyMeasurementError: if the device cannot be read (GPU lost, NVML error).
        """
        if self._poller is not None:
            return self._drain_native()
        pynvml = self._pynvml
        now = time.monotonic()
        try:
            if self._mode == "counter":
                raw_mj = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            else:
                power_w = self._read_power_w()
        except pynvml.NVMLError as exc:
            raise self._map_error(exc, "read energy") from exc
        if self._mode == "counter":
            reading = self._counter_reading(now, raw_mj)
            return [reading] if reading is not None else []
        return [self._integrate(now, power_w)]

    def _drain_native(self) -> list[EnergyReading]:
        assert self._poller is not None
        readings = []
        for record in self._poller.drain():
            if record.t_prev_s is not None:
                self._last_poll_s = record.t_prev_s  # the poll before this change
            reading = self._counter_reading(record.t_s, record.energy_mj)
            if reading is not None:
                readings.append(reading)
        error = self._poller.error
        if error:
            pynvml = self._pynvml
            self._poller.stop()
            raise self._map_error(pynvml.NVMLError(error), "read energy")
        return readings

    def _stamp(self, previous_poll: float, now: float) -> float:
        """When the counter updated, given the polls before and after the change.

        Python polling: the midpoint of the two polls. Native polling: the counter updates
        on a regular clock, so a grid ``t0 + n * period`` is fitted by weighted least
        squares to the last brackets' midpoints (weight 1 / width^2: sharp brackets count
        most) and the update is placed on the grid, clipped into its own bracket (the
        update certainly happened between the two polls). Where the grid does not fit
        (a bracket misses it by more than 1 ms: no regular clock) or is not known yet,
        the midpoint is used.
        """
        mid = 0.5 * (previous_poll + now)
        if self._poller is None:
            return mid
        self._brackets.append((previous_poll, now))
        if len(self._brackets) < 6:
            return mid
        # plain Python over <= 30 brackets: several times cheaper than numpy's per-call
        # overhead at this size, and it runs on the sampler thread (GIL) per update
        lo = [b[0] for b in self._brackets]
        hi = [b[1] for b in self._brackets]
        mids = [0.5 * (a + b) for a, b in zip(lo, hi, strict=True)]
        gaps = sorted(b - a for a, b in zip(mids, mids[1:], strict=False))
        half = len(gaps) // 2
        period0 = gaps[half] if len(gaps) % 2 else 0.5 * (gaps[half - 1] + gaps[half])
        if period0 <= 0:
            return mid
        n = [0.0]
        for a, b in zip(mids, mids[1:], strict=False):
            n.append(n[-1] + max(float(round((b - a) / period0)), 1.0))
        # weighted least squares mids ~ t0 + n * period, weight 1 / width^2
        sw = swn = swnn = swy = swny = 0.0
        for a, b, k, y in zip(lo, hi, n, mids, strict=True):
            w = 1.0 / max(b - a, 2e-4) ** 2
            sw += w
            swn += w * k
            swnn += w * k * k
            swy += w * y
            swny += w * k * y
        det = sw * swnn - swn * swn
        if det <= 0:
            return mid
        period = (sw * swny - swn * swy) / det
        t0 = (swy - period * swn) / sw
        worst = max(max(a - (t0 + k * period), (t0 + k * period) - b)
                    for a, b, k in zip(lo, hi, n, strict=True))  # fmt: skip
        if worst > 1e-3:
            return mid
        return float(min(max(t0 + n[-1] * period, previous_poll), now))

    def _counter_reading(self, now: float, raw_mj: int) -> EnergyReading | None:
        previous_mj, previous_poll = self._last_raw_mj, self._last_poll_s
        self._last_raw_mj, self._last_poll_s = raw_mj, now
        if previous_mj is None or previous_poll is None:
            return None  # baseline only: this value applies to an unknown earlier update
        if raw_mj == previous_mj:
            return None
        if not self._origin_set:
            # The first update seen is the curve's origin: its time is known (between two
            # polls), whereas the baseline value's update time is not.
            self._origin_set = True
            self._last_change_s = (previous_poll + now) / 2.0
            return EnergyReading(self._last_change_s, 0.0, None)
        if raw_mj < previous_mj:
            if not self._backwards_warned:
                logger.warning(
                    "The energy counter of GPU %s went backwards (%d mJ -> %d mJ; driver "
                    "reset or counter wrap). The lost interval is not counted; measurement "
                    "continues from the new value.",
                    self.uuid,
                    previous_mj,
                    raw_mj,
                )
                self._backwards_warned = True
            return None
        delta_j = (raw_mj - previous_mj) / 1000.0
        timestamp = self._stamp(previous_poll, now)
        interval = timestamp - self._last_change_s
        self._update_periods.append(interval)
        self._energy_j += delta_j
        power_w = delta_j / interval if interval > 0 else None
        self._last_change_s = timestamp
        return EnergyReading(timestamp, self._energy_j, power_w)

    def next_poll_s(self, now_s: float, interval_s: float) -> float:
        """When the sampler should read this device next (a ``time.monotonic()`` value).

        The energy counter updates periodically (about every 100 ms). Once its period is
        known, the sampler sleeps until shortly before the next expected update and then
        polls every ``interval_s`` until it comes, so each update is still timestamped
        within ``interval_s / 2`` while the sampler wakes about three times less often.
        """
        if self._poller is not None:
            return self._next_drain_s(now_s, interval_s)
        if self._mode != "counter" or len(self._update_periods) < 3:
            return now_s + interval_s
        period_s = sorted(self._update_periods)[len(self._update_periods) // 2]
        if period_s < 4 * interval_s:
            return now_s + interval_s
        expected_s = self._last_change_s + period_s
        return max(now_s + interval_s, expected_s - 1.5 * interval_s)

    def _next_drain_s(self, now_s: float, interval_s: float) -> float:
        """With a native poller: wake the sampler just after each expected counter update.

        The native thread stamps each update; Python only has to collect it, once per
        update and soon after it (so figures read live, e.g. by a budget, stay fresh).
        """
        if len(self._update_periods) < 3:
            return now_s + min(interval_s, NATIVE_DRAIN_INTERVAL_S)
        period_s = sorted(self._update_periods)[len(self._update_periods) // 2]
        due_s = self._last_change_s + period_s + NATIVE_DRAIN_MARGIN_S
        if due_s <= now_s:  # the expected update has not come yet: look again soon
            return now_s + NATIVE_DRAIN_MARGIN_S
        return min(due_s, now_s + max(interval_s, period_s))

    def _integrate(self, now: float, power_w: float) -> EnergyReading:
        if self._last_poll_s is not None and self._last_power_w is not None:
            self._energy_j += 0.5 * (power_w + self._last_power_w) * (now - self._last_poll_s)
        self._last_poll_s, self._last_power_w = now, power_w
        return EnergyReading(now, self._energy_j, power_w)

    # -- power limits -----------------------------------------------------------------
    def power_limit_w(self) -> float:
        """The power limit in force now (NVML enforced limit), in watts."""
        return self._limit_call("read the power limit", "nvmlDeviceGetEnforcedPowerLimit") / 1000

    def default_power_limit_w(self) -> float:
        """The device's default power limit, in watts."""
        return (
            self._limit_call(
                "read the default power limit", "nvmlDeviceGetPowerManagementDefaultLimit"
            )
            / 1000
        )

    def power_limit_range_w(self) -> tuple[float, float]:
        """The (minimum, maximum) power limit the device accepts, in watts."""
        low_mw, high_mw = self._limit_call(
            "read the power limit range", "nvmlDeviceGetPowerManagementLimitConstraints"
        )
        return low_mw / 1000.0, high_mw / 1000.0

    def set_power_limit_w(self, power_w: float) -> None:
        """Set the device power limit.

        Args:
            power_w: the new limit in watts, inside :meth:`power_limit_range_w`.

        Raises:
            PowerLimitPermissionError: the driver refused (not root, or restricted).
            PowerLimitError: any other failure, including a value out of range.
        """
        self._limit_call(
            f"set the power limit to {power_w:.0f} W",
            "nvmlDeviceSetPowerManagementLimit",
            int(round(power_w * 1000)),
        )

    def _limit_call(self, action: str, function: str, *args: Any) -> Any:
        pynvml = self._pynvml
        try:
            return getattr(pynvml, function)(self._handle, *args)
        except pynvml.NVMLError as exc:
            if exc.value != pynvml.NVML_ERROR_NO_PERMISSION:
                raise PowerLimitError(f"NVML failed to {action} on GPU {self.uuid}: {exc}") from exc
            raise PowerLimitPermissionError(
                f"NVML refused to {action} on GPU {self.uuid} ({exc}): changing power limits "
                "needs root or `nvidia-smi -acp UNRESTRICTED`. Use the software power "
                "budget (mode='software') where that is not possible."
            ) from exc

    def close(self) -> None:
        """Release this device's NVML reference."""
        if not self._closed:
            self._closed = True
            if self._poller is not None:
                self._poller.stop()  # joins the thread before NVML may go away
            nvml_shutdown()


def open_gpus(nvml_indices: Sequence[int], prefer_counter: bool = True) -> list[NvmlGpu]:
    """Open several NVML devices, closing the already opened ones if one fails."""
    opened: list[NvmlGpu] = []
    try:
        for index in nvml_indices:
            opened.append(NvmlGpu(index, prefer_counter=prefer_counter))
    except BaseException:
        for gpu in opened:
            gpu.close()
        raise
    return opened
