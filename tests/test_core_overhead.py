"""Where the measuring core spends CPU: work per batch or per counter update, never per step.

Counts calls, not time (timings are in benchmarks/bench_core.py): the resolver resolves
in batches at its own interval (log intervals do not wake it), the Python sampler drains
the native poller once per counter update, the native thread polls only around expected
updates, and the cheaper code paths give the same numbers as the ones they replaced.
"""

from __future__ import annotations

import collections
import csv
import threading
import time
from pathlib import Path

import numpy as np
import pynvml
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sustain import EnergyRun
from lightning_sustain.energy import accounting, attribution
from lightning_sustain.energy.accounting import StepEnergy
from lightning_sustain.energy.meter import DeviceStream
from lightning_sustain.energy.native import NativeCounterPoller
from lightning_sustain.energy.nvml import NvmlGpu
from lightning_sustain.energy.types import DeviceInfo, Provenance
from lightning_sustain.report.trace import TraceWriter
from lightning_sustain.run.distributed import RankInfo
from lightning_sustain.run.energy_run import LOG_REFRESH_S


def _count_on(thread_name: str, counts: collections.Counter, key: str, fn):
    def wrapper(*args, **kwargs):
        if threading.current_thread().name == thread_name:
            counts[key] += 1
        return fn(*args, **kwargs)

    return wrapper


def test_resolver_works_per_batch_not_per_step_or_log_interval(simulated_nvml, monkeypatch):
    simulated_nvml(1, counter_period_s=0.02)
    counts: collections.Counter = collections.Counter()
    name = "lightning-sustain-resolver"
    for cls, attr in ((accounting.EnergyAccountant, "_resolve_steps"),
                      (DeviceStream, "energy_at_array"),
                      (accounting.StepAttribution, "update")):  # fmt: skip
        monkeypatch.setattr(cls, attr, _count_on(name, counts, attr, getattr(cls, attr)))
    monkeypatch.setattr(
        accounting, "attribute_steps",
        _count_on(name, counts, "attribute_steps", attribution.attribute_steps),
    )  # fmt: skip
    monkeypatch.setattr(
        attribution, "choose_method",
        _count_on(name, counts, "choose_method", attribution.choose_method),
    )  # fmt: skip
    resolves = []
    original = accounting.EnergyAccountant.resolve

    def resolve(self, *args, **kwargs):
        got = original(self, *args, **kwargs)
        if threading.current_thread().name == name:
            resolves.append(len(got))
        return got

    monkeypatch.setattr(accounting.EnergyAccountant, "resolve", resolve)
    interval_s = 0.2
    run = EnergyRun(None, cpu="none", log_every_n_steps=5, resolve_interval_s=interval_s,
                    ranks=RankInfo(), sync=False)  # fmt: skip
    run.start_stage("fit")
    t0 = time.monotonic()
    steps = 0
    while time.monotonic() - t0 < 1.2:  # ~1 ms steps: hundreds of steps, many log intervals
        time.sleep(0.0005)
        run.step(samples=1)
        steps += 1
    elapsed = time.monotonic() - t0
    summary = run.end_stage()
    run.close()
    log_intervals = steps // 5
    # its own clock, plus log intervals at most every LOG_REFRESH_S (fresh figures)
    wakes = elapsed / interval_s + elapsed / LOG_REFRESH_S + 2
    assert steps > 200 and log_intervals > 40
    # the resolver ran on its own clock: not once per log interval, not once per step
    assert len(resolves) <= wakes, (len(resolves), log_intervals)
    batches = sum(1 for n in resolves if n)
    assert batches >= 1 and sum(resolves) > 0.5 * steps  # it did resolve most steps
    # per batch of steps: one curve query per device (one more when a phase mark is
    # pending), one attribution, one model update
    assert counts["_resolve_steps"] <= len(resolves)
    assert counts["energy_at_array"] <= 2 * len(resolves)
    assert counts["attribute_steps"] <= batches
    assert counts["update"] <= batches
    # the attribution's choice (its costly part) is made again every choice_refresh_s
    assert counts["choose_method"] <= elapsed / 0.5 + 2
    assert summary["totals"]["batches"] == steps


def test_python_sampler_drains_the_native_poller_once_per_counter_update(
    simulated_nvml, monkeypatch
):
    simulated_nvml(1, counter_period_s=0.1)
    counts: collections.Counter = collections.Counter()
    name = "lightning-sustain-meter"
    monkeypatch.setattr(
        DeviceStream, "poll", _count_on(name, counts, "poll", DeviceStream.poll)
    )  # fmt: skip
    monkeypatch.setattr(NvmlGpu, "_stamp", _count_on(name, counts, "stamp", NvmlGpu._stamp))
    run = EnergyRun(None, cpu="none", ranks=RankInfo(), sync=False)
    run.start_stage("fit")
    assert run.meter.streams[0].device.native  # gcc is there: the native thread polls
    time.sleep(0.5)  # the first updates teach the period (drained every 20 ms meanwhile)
    counts.clear()
    t0 = time.monotonic()
    time.sleep(1.5)
    elapsed = time.monotonic() - t0
    updates = len(run.meter.streams[0].points_between(t0, t0 + elapsed, context=0)[0])
    run.close()
    # the Python thread wakes about once per counter update (just after it; again soon
    # when an update is late), not per poll of the native thread (~50 per second)
    assert counts["poll"] <= 2 * updates + 3
    assert updates >= 10 and counts["stamp"] <= updates + 2


def test_native_poller_polls_around_updates_not_continuously(simulated_nvml) -> None:
    sim = simulated_nvml(1, counter_period_s=0.05)
    poller = NativeCounterPoller(pynvml, pynvml.nvmlDeviceGetHandleByIndex(0), interval_s=0.001)
    try:
        time.sleep(0.6)  # learns the period
        p0, n0 = poller.polls, len(poller.drain())
        time.sleep(1.0)
        polls, updates = poller.polls - p0, len(poller.drain())
    finally:
        poller.stop()
    assert n0 >= 3 and updates >= 15
    period_polls = sim.counter_period_s / 0.001  # polling every interval would cost this
    assert polls / updates < 0.5 * period_polls, (polls, updates)


def _stamp_numpy(brackets, previous_poll: float, now: float) -> float:
    """The former numpy least-squares grid fit, kept here as the reference."""
    mid = 0.5 * (previous_poll + now)
    if len(brackets) < 6:
        return mid
    lo, hi = np.array([b[0] for b in brackets]), np.array([b[1] for b in brackets])
    mids, widths = 0.5 * (lo + hi), np.maximum(hi - lo, 2e-4)
    gaps = np.diff(mids)
    period0 = float(np.median(gaps))
    if period0 <= 0:
        return mid
    n = np.concatenate(([0.0], np.cumsum(np.maximum(np.round(gaps / period0), 1.0))))
    w = 1.0 / widths**2
    design = np.column_stack((np.ones_like(n), n)) * np.sqrt(w)[:, None]
    (t0, period), *_ = np.linalg.lstsq(design, mids * np.sqrt(w), rcond=None)
    grid = t0 + n * period
    if float(np.maximum(lo - grid, grid - hi).max()) > 1e-3:
        return mid
    return float(min(max(grid[-1], previous_poll), now))


@settings(max_examples=60, deadline=None)
@given(
    period=st.floats(0.02, 0.2),
    jitter=st.sampled_from([0.0, 0.0005, 0.003]),
    widths=st.lists(st.sampled_from([0.001, 0.002, 0.004, 0.05]), min_size=1, max_size=45),
    skips=st.lists(st.booleans(), min_size=45, max_size=45),
    seed=st.integers(0, 2**16),
)
def test_python_stamp_equals_the_numpy_least_squares_fit(period, jitter, widths, skips, seed):
    rng = np.random.default_rng(seed)

    class Gpu:
        _poller = object()
        _brackets: collections.deque = collections.deque(maxlen=30)

    gpu = Gpu()
    gpu._brackets = collections.deque(maxlen=30)
    reference: collections.deque = collections.deque(maxlen=30)
    k = 0
    for i, width in enumerate(widths):
        k += 2 if skips[i] else 1  # a missed update now and then
        tick = 1000.0 + k * period + rng.normal(0.0, jitter) if jitter else 1000.0 + k * period
        lo = tick - rng.uniform(0.0, width)
        hi = lo + width
        reference.append((lo, hi))
        expected = _stamp_numpy(reference, lo, hi)
        got = NvmlGpu._stamp(gpu, lo, hi)
        assert abs(got - expected) < 1e-9


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 10**7), st.integers(0, 500), st.floats(0.0, 1e5),
                  st.floats(0.0, 10.0), st.floats(0.0, 1e4), st.integers(0, 4096)),
        min_size=1, max_size=20,
    ),
    devices=st.integers(1, 3),
)  # fmt: skip
def test_trace_rows_read_as_the_former_f_string_rows(tmp_path_factory, rows, devices):
    infos = [DeviceInfo(device_id=f"gpu:{i}", kind="gpu", name="g", provenance=Provenance.COUNTER,
                        simulated=True, index=i) for i in range(devices)]  # fmt: skip
    steps = []
    for step, epoch, start, duration, energy, samples in rows:
        per = {f"gpu:{i}": energy / (i + 1) for i in range(devices)}
        steps.append(StepEnergy(step, epoch, start, start + duration, energy, per, samples))
    path = Path(tmp_path_factory.mktemp("trace")) / "t.csv"
    writer = TraceWriter(path, infos, t0_s=0.25, rank=3)
    writer.write(steps)
    writer.close()
    lines = path.read_text().splitlines()[1:]
    assert len(lines) == len(steps)
    for line, s in zip(lines, steps, strict=True):
        per_device = "".join(f",{s.device_energy_j.get(i.device_id, 0.0):.6f}" for i in infos)
        former = (
            f"{s.step},{s.epoch},3,{s.start_s - 0.25:.6f},{s.end_s - 0.25:.6f},"
            f"{s.end_s - s.start_s:.6f},{s.samples},{s.energy_j:.6f},{s.power_w:.3f},"
            f"counter (simulated){per_device}"
        )
        assert line == former
    assert [int(r["step"]) for r in csv.DictReader(path.open())] == [s.step for s in steps]


def test_energy_monitor_state_key_is_built_once_per_setting(simulated_nvml, tmp_path, monkeypatch):
    """Lightning formats every callback's state_key for each hook it calls, every step."""
    import lightning.pytorch as pl
    import torch

    from lightning_sustain import EnergyMonitor

    simulated_nvml(1, counter_period_s=0.02)
    built: collections.Counter = collections.Counter()
    original = EnergyMonitor._generate_state_key

    def generate(self, **kwargs):
        built["key"] += 1
        return original(self, **kwargs)

    monkeypatch.setattr(EnergyMonitor, "_generate_state_key", generate)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = EnergyMonitor(cpu="none", dirpath=str(tmp_path), report=False, flops=False)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 4)))
    trainer = pl.Trainer(
        max_steps=40, callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(Module(), data)
    assert monitor.summary["totals"]["batches"] == 40
    assert built["key"] == 1  # 40 steps x several hooks each asked for it
    assert monitor.state_key == "EnergyMonitor{'gpus': 'auto', 'cpu': 'none'}"
    monitor.nvml_devices = [0]  # a changed setting gives its own key
    assert monitor.state_key == "EnergyMonitor{'gpus': [0], 'cpu': 'none'}"
    monitor.nvml_devices.append(1)  # also when a list is changed in place
    assert monitor.state_key == "EnergyMonitor{'gpus': [0, 1], 'cpu': 'none'}"
