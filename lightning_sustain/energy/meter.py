"""Background sampling of energy devices and energy-between-timestamps queries.

One process-wide sampler thread reads every registered device at its interval and
stores its cumulative-energy curve. :class:`EnergyMeter` objects are views onto some of
those curves: two callbacks asking for the same GPU share one curve and one sampler, so
a device is never read twice over. Per-step energy is answered by linear interpolation
of the cumulative curve at the step boundaries, so the training thread only records
timestamps.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Sequence

import numpy as np

from lightning_sustain.energy.device import EnergyDevice
from lightning_sustain.energy.errors import EnergyMeasurementError
from lightning_sustain.energy.estimate import validate_positive
from lightning_sustain.energy.types import DeviceInfo, EnergyReading

logger = logging.getLogger(__name__)

#: Default sampling interval when a device states no preference, in seconds.
DEFAULT_INTERVAL_S = 0.05
#: How much of each curve is kept, in seconds; older points are dropped (constant memory).
DEFAULT_HISTORY_S = 600.0


class DeviceStream:
    """The sampled cumulative-energy curve of one device (bounded in memory).

    Args:
        device: the device to read.
        interval_s: how often the sampler reads it.
        history_s: how many seconds of curve to keep.
    """

    def __init__(self, device: EnergyDevice, interval_s: float, history_s: float) -> None:
        self.device = device
        self.info: DeviceInfo = device.info
        self.interval_s = interval_s
        self.history_s = history_s
        self._lock = threading.Lock()
        self._times_s: list[float] = []
        self._energies_j: list[float] = []
        self._last_power_w: float | None = None
        self._next_due_s = 0.0
        self.failure: str | None = None
        self.failed_at_s: float | None = None
        self.refcount = 0

    # -- writing (sampler thread, or sample_now) --------------------------------------
    def poll(self) -> None:
        """Read the device once and append the reading (warns once if reading fails)."""
        if self.failure is not None:
            return
        read_many = getattr(self.device, "read_many", None)
        try:
            if read_many is not None:
                readings = list(read_many())
            else:
                reading = self.device.read()
                readings = [reading] if reading is not None else []
        except EnergyMeasurementError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:  # measurement must never take training down
            self._fail(f"unexpected {type(exc).__name__} reading {self.info.name}: {exc}")
            return
        for reading in readings:
            self._append(reading)

    def next_due_s(self, now_s: float) -> float:
        """When to read the device next: its own hint (``next_poll_s``) if it has one."""
        hint = getattr(self.device, "next_poll_s", None)
        if hint is None:
            return now_s + self.interval_s
        try:
            return float(hint(now_s, self.interval_s))
        except Exception:  # a hint is an optimisation only
            return now_s + self.interval_s

    def _fail(self, message: str) -> None:
        with self._lock:
            self.failure = message
            self.failed_at_s = time.monotonic()
        logger.warning(
            "Energy measurement of %s stopped: %s Training continues; this device's energy "
            "after this point is not counted and the summary is marked incomplete.",
            self.info.name,
            message,
        )

    def _append(self, reading: EnergyReading) -> None:
        with self._lock:
            if self._times_s and reading.timestamp_s <= self._times_s[-1]:
                return  # out-of-order or duplicate timestamp: keep the curve monotone
            if self._energies_j and reading.energy_j < self._energies_j[-1]:
                return
            self._times_s.append(reading.timestamp_s)
            self._energies_j.append(reading.energy_j)
            if reading.power_w is not None:
                self._last_power_w = reading.power_w
            self._trim()

    def _trim(self) -> None:
        times = self._times_s
        if len(times) < 1024 or times[-1] - times[0] < 2 * self.history_s:
            return
        cut = bisect.bisect_left(times, times[-1] - self.history_s)
        del times[:cut]
        del self._energies_j[:cut]

    # -- reading ----------------------------------------------------------------------
    @property
    def latest_time_s(self) -> float | None:
        """Timestamp of the newest point, or None before the first reading."""
        with self._lock:
            return self._times_s[-1] if self._times_s else None

    @property
    def first_time_s(self) -> float | None:
        """Timestamp of the oldest point still kept."""
        with self._lock:
            return self._times_s[0] if self._times_s else None

    @property
    def last_power_w(self) -> float | None:
        """The most recent power figure the device gave, in watts."""
        return self._last_power_w

    def energy_at(self, times_s: Iterable[float]) -> list[float]:
        """Cumulative energy at each time, by linear interpolation of the curve.

        Times before the first point get the first value; times after the last point
        get the last value (ask only up to :attr:`latest_time_s` for exact answers).
        """
        query = np.asarray(times_s if isinstance(times_s, (list, tuple)) else list(times_s))
        return self.energy_at_array(query).tolist()

    def energy_at_array(self, query: np.ndarray) -> np.ndarray:
        """:meth:`energy_at` for an array of times, as an array (no per-element Python)."""
        if query.size == 0:
            return np.zeros(0)
        lo_t, hi_t = float(query.min()), float(query.max())
        with self._lock:
            ts, es = self._times_s, self._energies_j
            if not ts:
                return np.zeros(query.size)
            # only the part of the curve the query needs (plus one point each side)
            lo = max(0, bisect.bisect_left(ts, lo_t) - 1)
            hi = min(len(ts), bisect.bisect_right(ts, hi_t) + 1)
            t_part, e_part = ts[lo:hi], es[lo:hi]
        # np.interp clamps outside the range: the first/last values, as documented
        return np.interp(query, t_part, e_part)

    def points_between(
        self, t0_s: float, t1_s: float, context: int = 1
    ) -> tuple[list[float], list[float]]:
        """The curve's points in ``[t0_s, t1_s]`` plus ``context`` on each side, if any."""
        with self._lock:
            ts, es = self._times_s, self._energies_j
            lo = max(0, bisect.bisect_left(ts, t0_s) - context)
            hi = min(len(ts), bisect.bisect_right(ts, t1_s) + context)
            return ts[lo:hi], es[lo:hi]

    def time_of_point(self, back: int = 0) -> float | None:
        """Time of the point ``back`` places before the newest (None if there is none)."""
        with self._lock:
            return self._times_s[-1 - back] if len(self._times_s) > back else None

    def mean_power_w(self, t0_s: float, t1_s: float) -> float | None:
        """Mean power between two times from the curve, in watts."""
        if t1_s <= t0_s:
            return None
        e0, e1 = self.energy_at([t0_s, t1_s])
        return (e1 - e0) / (t1_s - t0_s)


#: Longest wait at meter construction for a device's first point, in seconds.
FIRST_POINT_TIMEOUT_S = 0.5


def _wait_for_first_point(stream: DeviceStream, timeout_s: float = FIRST_POINT_TIMEOUT_S) -> None:
    """Poll until the curve has its first point (bounded), so it starts at construction.

    A counter's first value applies to an update at an unknown earlier time, so its curve
    begins at the first *change* (up to one update period, ~100 ms for NVML). Waiting for
    it here makes every window that starts after the meter was built measured in full.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        stream.poll()
        if stream.latest_time_s is not None or stream.failure is not None:
            return
        if time.monotonic() >= deadline:
            logger.warning(
                "%s gave no energy reading within %.1f s of opening; energy before its "
                "first reading is not counted.",
                stream.info.name,
                timeout_s,
            )
            return
        time.sleep(0.001)


class _Sampler:
    """The process-wide registry of device streams and the thread that samples them."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.streams: dict[str, DeviceStream] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    def register(self, device: EnergyDevice, interval_s: float, history_s: float) -> DeviceStream:
        with self.lock:
            stream = self.streams.get(device.info.device_id)
            if stream is None:
                stream = DeviceStream(device, interval_s, history_s)
                _wait_for_first_point(stream)  # the curve starts now, not one update later
                self.streams[device.info.device_id] = stream
            else:
                if device is not stream.device:
                    device.close()  # an identical device is already being sampled
                stream.interval_s = min(stream.interval_s, interval_s)
                stream.history_s = max(stream.history_s, history_s)
            stream.refcount += 1
            self._ensure_thread()
            self._wake.set()
            return stream

    def release(self, stream: DeviceStream) -> None:
        with self.lock:
            stream.refcount -= 1
            if stream.refcount > 0:
                return
            self.streams.pop(stream.info.device_id, None)
            thread = self._thread if not self.streams else None
            if thread is not None:
                self._stop.set()
                self._wake.set()
                self._thread = None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        try:
            stream.device.close()
        except Exception as exc:  # pragma: no cover - closing must not raise
            logger.debug("closing %s failed: %s", stream.info.name, exc)

    def poll_now(self, streams: Sequence[DeviceStream]) -> None:
        with self.lock:
            for stream in streams:
                stream.poll()

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="lightning-sustain-meter", daemon=True
        )
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            now = time.monotonic()
            with self.lock:
                streams = list(self.streams.values())
                for stream in streams:
                    if now >= stream._next_due_s:
                        stream.poll()
                        stream._next_due_s = stream.next_due_s(now)
                next_due = min((s._next_due_s for s in streams), default=now + 0.1)
            # a plain sleep: an Event wait costs several times more CPU per wake-up here,
            # and stopping only has to wait one interval (<= 0.1 s)
            time.sleep(max(0.0, next_due - time.monotonic()))

    def reset_after_fork(self) -> None:
        # Threads do not survive fork: a forked child (a DataLoader worker) starts clean
        # and never reads the parent's devices.
        self.lock = threading.RLock()
        self.streams = {}
        self._thread = None
        self._stop = threading.Event()
        self._wake = threading.Event()


_SAMPLER = _Sampler()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_SAMPLER.reset_after_fork)


def active_sampler_threads() -> int:
    """Number of live sampler threads in this process (0 or 1); for tests and diagnostics."""
    return sum(1 for t in threading.enumerate() if t.name == "lightning-sustain-meter")


def _release_all(streams: list[DeviceStream]) -> None:
    for stream in streams:
        _SAMPLER.release(stream)
    streams.clear()


class EnergyMeter:
    """A view onto the sampled energy curves of some devices.

    Devices are sampled on a background thread from construction until :meth:`close`
    (or garbage collection). Meters over the same device share one curve. Construction
    waits (at most :data:`FIRST_POINT_TIMEOUT_S`) until every device's curve has its first
    point, so every window that starts after construction is measured in full; energy
    before a curve's first point (:meth:`curve_start_s`) is not measured.

    Accuracy (docs/energy.md, measured on the simulated device with a busy pure-Python
    training thread, 2-core VM at load average ~16): ``counter`` curves are exact at each
    update up to 1 mJ; 1 s windows were within 0.41 % of ground truth (median 0.006-0.022 %)
    with NVML's native poller (update timestamps p90 0.25-0.36 ms), within 6 % (median
    0.6-1.6 %) with the Python sampler (p90 39 ms); ``integrated`` curves (power refreshed
    every ~100 ms, sample-and-hold, trapezoid rule) were exact under constant power and
    within 2.5 % (median 1.1 %) on 1 s windows of a 1 s square wave.

    Args:
        devices: the devices to measure. A device already sampled in this process is
            reused and the duplicate closed.
        interval_s: sampling interval in seconds; ``None`` uses each device's preferred
            interval (10 ms for NVML, 50 ms for RAPL, 100 ms for the CPU estimate).
        history_s: seconds of curve kept per device (memory stays constant).

    Raises:
        ValueError: non-positive or non-numeric ``interval_s`` / ``history_s``.
    """

    def __init__(
        self,
        devices: Sequence[EnergyDevice],
        interval_s: float | None = None,
        history_s: float = DEFAULT_HISTORY_S,
    ) -> None:
        if interval_s is not None:
            interval_s = validate_positive("interval_s", interval_s)
        history_s = validate_positive("history_s", history_s)
        self._streams: list[DeviceStream] = []
        try:
            for device in devices:
                device_interval = interval_s or device.preferred_interval_s or DEFAULT_INTERVAL_S
                self._streams.append(_SAMPLER.register(device, device_interval, history_s))
        except BaseException:
            _release_all(self._streams)
            raise
        self._finalizer = weakref.finalize(self, _release_all, self._streams)

    # -- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        """Stop sampling this meter's devices (other meters' devices keep running)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return not self._finalizer.alive

    def __enter__(self) -> EnergyMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ----------------------------------------------------------------------
    @property
    def device_infos(self) -> list[DeviceInfo]:
        """Descriptions of the measured devices, in order."""
        return [stream.info for stream in self._streams]

    @property
    def streams(self) -> list[DeviceStream]:
        """The underlying device curves."""
        return list(self._streams)

    def device(self, device_id: str) -> EnergyDevice:
        """Return the device object behind ``device_id`` (e.g. to set a power limit)."""
        for stream in self._streams:
            if stream.info.device_id == device_id:
                return stream.device
        raise KeyError(f"device {device_id!r} is not measured by this meter")

    def sample_now(self) -> None:
        """Read every device once, synchronously (used at the end of a run)."""
        _SAMPLER.poll_now(self._streams)

    def curve_start_s(self) -> float | None:
        """The latest first point over the healthy curves: windows from here on are exact.

        The meter waits for each curve's first point at construction, so this is at most
        the construction time. Energy before a curve's first point is not measured:
        :meth:`energy_between` counts it as zero.
        """
        firsts = [s.first_time_s for s in self._streams if s.failure is None]
        known = [t for t in firsts if t is not None]
        return max(known) if known else None

    def latest_time_s(self, points_after: int = 0) -> float | None:
        """Time up to which every healthy device's curve is known.

        Args:
            points_after: require this many further points after the returned time on
                every curve (per-step attribution wants the next update interval too).
        """
        latest = [s.time_of_point(points_after) for s in self._streams if s.failure is None]
        known = [t for t in latest if t is not None]
        if not known:
            return None
        return min(known) if len(known) == len(latest) else None

    def energy_at(self, times_s: Sequence[float]) -> dict[str, list[float]]:
        """Cumulative energy of each device at each time, in joules."""
        return {s.info.device_id: s.energy_at(times_s) for s in self._streams}

    def energy_between(self, t0_s: float, t1_s: float) -> dict[str, float]:
        """Joules each device used between two ``time.monotonic()`` timestamps."""
        result = {}
        for stream in self._streams:
            e0, e1 = stream.energy_at([t0_s, t1_s])
            result[stream.info.device_id] = e1 - e0
        return result

    def power_w(self) -> dict[str, float | None]:
        """The latest power figure of each device, in watts (None where unknown)."""
        return {s.info.device_id: s.last_power_w for s in self._streams}

    def failures(self) -> dict[str, str]:
        """Devices whose measurement stopped, with the reason."""
        return {s.info.device_id: s.failure for s in self._streams if s.failure is not None}

    def wait_until_covered(self, t_s: float, timeout_s: float = 1.0) -> bool:
        """Block until every healthy curve extends past ``t_s`` (or the timeout passes).

        Returns:
            True when covered, False on timeout (queries then clamp to the last value).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            latest = self.latest_time_s()
            if latest is None and not any(s.failure is None for s in self._streams):
                return True
            if latest is not None and latest >= t_s:
                return True
            if time.monotonic() >= deadline:
                return False
            self.sample_now()
            time.sleep(0.002)

    def __repr__(self) -> str:
        names = ", ".join(s.info.name for s in self._streams)
        return f"EnergyMeter([{names}], closed={self.closed})"
