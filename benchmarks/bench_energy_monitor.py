"""EnergyMonitor benchmarks (issues 2 and 10): overhead, accuracy, memory, profiles, timestamps.

Run:  .venv/bin/python benchmarks/bench_energy_monitor.py
      [overhead|cost|accuracy|memory|profiles|timestamps|all]

``profiles``: per-step accuracy under power that varies over wall time independently of
the training loop (simulated device profiles), ours vs plain interpolation vs the former
log-interval model, 100 ms counter, 20 ms steps, pure-Python busy training thread.
``timestamps``: counter-update timestamp error and sampler CPU per second, native poller
vs the Python sampler, with a pure-Python busy training thread.

Everything runs on CPU against the simulated NVML device (1 GPU, counter updating every
100 ms), so every energy figure printed here is SIMULATED. A and B are interleaved and
medians are quoted, since the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_sustain import EnergyMonitor  # noqa: E402
from lightning_sustain.testing import SimulatedNVML  # noqa: E402


class Model(pl.LightningModule):
    """An MLP sized so that one CPU step takes about 2 ms; optional simulated GPU work."""

    def __init__(self, width: int = 256, sim: SimulatedNVML | None = None, busy_s: float = 0.0):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
            torch.nn.ReLU(), torch.nn.Linear(width, 2),
        )  # fmt: skip
        self.sim, self.busy_s = sim, busy_s

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.sim is not None and self.busy_s:
            self.sim.busy(0, self.busy_s)
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def data(n_batches: int, batch: int = 64) -> DataLoader:
    x = torch.randn(n_batches * batch, 64)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def trainer(steps: int, callbacks: list, root: str) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        log_every_n_steps=50,
    )  # fmt: skip


class StepTimer(pl.Callback):
    """Wall and process-CPU time from the 50th step on (skips warm-up).

    Process CPU time counts every thread of the process (the monitor's sampler thread
    included) and is far less disturbed than wall time by other load on a shared machine.
    """

    def __init__(self) -> None:
        self.t_start = self.t_end = None
        self.cpu_start = self.cpu_end = None
        self.n = 0

    def on_train_batch_end(self, trainer, *args):
        self.n += 1
        if self.n == 50:
            self.t_start, self.cpu_start = time.perf_counter(), time.process_time()
        self.t_end, self.cpu_end = time.perf_counter(), time.process_time()

    def steps_per_s(self) -> float:
        return (self.n - 50) / (self.t_end - self.t_start)

    def steps_per_cpu_s(self) -> float:
        return (self.n - 50) / (self.cpu_end - self.cpu_start)


class TimedMonitor(EnergyMonitor):
    """EnergyMonitor that adds up the wall time of its per-step hooks (flushes included)."""

    hook_s = 0.0

    def on_train_batch_start(self, *args, **kwargs):
        t0 = time.perf_counter()
        super().on_train_batch_start(*args, **kwargs)
        self.hook_s += time.perf_counter() - t0

    def on_train_batch_end(self, *args, **kwargs):
        t0 = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)
        self.hook_s += time.perf_counter() - t0


def thread_cpu_s(prefix: str) -> float:
    """CPU seconds used so far by this process's threads whose name starts with ``prefix``."""
    import threading

    import psutil

    ids = {t.native_id for t in threading.enumerate() if t.name.startswith(prefix)}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)


def sampler_thread_cpu_s() -> float:
    """CPU seconds used by the meter's sampler thread and the monitor's resolver thread."""
    return thread_cpu_s("lightning-sustain-meter") + thread_cpu_s("lightning-sustain-resolver")


def bench_cost(steps: int = 1500) -> dict:
    """Direct cost of the monitor: its hooks' time plus its sampler thread's CPU time.

    Unlike the A/B throughput ratio, this does not depend on run-to-run noise of the
    shared machine: it adds up what the monitor itself spends per step.
    """
    torch.set_num_threads(1)
    sim = SimulatedNVML(1).install()
    with tempfile.TemporaryDirectory() as root:
        monitor = TimedMonitor(dirpath=root)
        timer = StepTimer()
        marks = {}

        class Mark(pl.Callback):
            def on_train_batch_end(self, trainer, *args):
                if timer.n == 50:
                    marks["hook0"], marks["cpu0"] = monitor.hook_s, sampler_thread_cpu_s()
                marks["hook1"], marks["cpu1"] = monitor.hook_s, sampler_thread_cpu_s()

        trainer(steps, [timer, monitor, Mark()], root).fit(Model(), data(steps))
    sim.uninstall()
    n = timer.n - 50
    step_s = (timer.t_end - timer.t_start) / n
    hook_us = (marks["hook1"] - marks["hook0"]) / n * 1e6
    thread_us = (marks["cpu1"] - marks["cpu0"]) / n * 1e6
    step_us = step_s * 1e6
    return {
        "step_ms": round(step_s * 1e3, 3),
        "training_thread_hooks_us_per_step": round(hook_us, 2),
        "background_threads_cpu_us_per_step": round(thread_us, 2),
        # the training thread pays only for its hooks when a spare core runs the sampler
        # and resolver threads (GIL waits are inside the hook time)
        "implied_throughput_ratio_spare_core": round(1 / (1 + hook_us / step_us), 4),
        # worst case: everything serialised on one core
        "implied_throughput_ratio_one_core": round(1 / (1 + (hook_us + thread_us) / step_us), 4),
    }


def bench_overhead(pairs: int = 11, steps: int = 600) -> dict:
    torch.set_num_threads(1)
    sim = SimulatedNVML(1).install()
    loader = data(steps)
    ratios, with_tp, without_tp, cpu_ratios = [], [], [], []
    with tempfile.TemporaryDirectory() as root:
        for i in range(pairs):
            results = {}
            order = ("with", "without") if i % 2 == 0 else ("without", "with")
            for variant in order:
                timer = StepTimer()
                cbs = [timer] + ([EnergyMonitor(dirpath=root)] if variant == "with" else [])
                torch.manual_seed(0)
                trainer(steps, cbs, root).fit(Model(), loader)
                results[variant] = timer.steps_per_s()
                results[variant + "_cpu"] = timer.steps_per_cpu_s()
            cpu_ratios.append(results["with_cpu"] / results["without_cpu"])
            with_tp.append(results["with"])
            without_tp.append(results["without"])
            ratios.append(results["with"] / results["without"])
    # hot-path cost: the two per-step hooks called directly, as Lightning calls them
    monitor = EnergyMonitor()

    class _T:  # the attributes the hooks read
        global_step = 1
        current_epoch = 0
        log_every_n_steps = 10**9

    from lightning_sustain.energy.accounting import EnergyAccountant
    from lightning_sustain.energy.meter import EnergyMeter

    monitor.meter = EnergyMeter([])
    monitor.accountant = EnergyAccountant(monitor.meter, max_pending=10**9)
    monitor._log_every = 10**9  # measure the per-step path only, not the log-interval flush
    batch = (torch.zeros(64, 64), torch.zeros(64))
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        monitor.on_train_batch_start(_T, None, batch, 0)
        monitor.on_train_batch_end(_T, None, None, batch, 0)
    hot_path_us = (time.perf_counter() - t0) / n * 1e6
    monitor.meter.close()
    sim.uninstall()
    step_ms = 1000.0 / statistics.median(without_tp)
    return {
        "step_ms_without_monitor": round(step_ms, 3),
        "throughput_with_per_s": round(statistics.median(with_tp), 1),
        "throughput_without_per_s": round(statistics.median(without_tp), 1),
        "throughput_ratio_median": round(statistics.median(ratios), 4),
        "throughput_ratios": [round(r, 4) for r in ratios],
        "cpu_time_throughput_ratio_median": round(statistics.median(cpu_ratios), 4),
        "cpu_time_throughput_ratios": [round(r, 4) for r in cpu_ratios],
        "hot_path_us_per_step": round(hot_path_us, 2),
        "target": ">= 0.99",
    }


class GroundTruth(pl.Callback):
    """Ground-truth energy at the monitor's step boundaries (simulated device readout)."""

    def __init__(self, sim: SimulatedNVML) -> None:
        self.sim = sim
        self.samples: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, *args):
        self.samples.append(self.sim.ground_truth_sample(0))


def bench_accuracy(steps: int = 600, busy_s: float = 0.02) -> dict:
    sim = SimulatedNVML(1, counter_period_s=0.1).install()
    with tempfile.TemporaryDirectory() as root:
        # report=False: the report is built after the monitor closes its fit interval
        monitor = EnergyMonitor(dirpath=root, cpu="none", report=False)
        truth = GroundTruth(sim)
        marks: dict[str, tuple[float, float]] = {}

        class FitTruth(pl.Callback):
            def on_fit_start(self, trainer, pl_module):
                marks["start"] = sim.ground_truth_sample(0)

            def on_fit_end(self, trainer, pl_module):
                marks["end"] = sim.ground_truth_sample(0)

        # order matters: FitTruth's on_fit_start runs after the monitor's, its on_fit_end
        # before the monitor closes the fit interval; both within microseconds
        cbs = [monitor, FitTruth(), truth]
        trainer(steps, cbs, root).fit(Model(sim=sim, busy_s=busy_s), data(steps))
        summary = json.loads((Path(root) / "energy_summary.json").read_text())
        trace = (Path(root) / "energy_trace.csv").read_text().splitlines()[1:]
    sim.uninstall()
    measured_fit_j = summary["totals"]["energy_j"]
    truth_fit_j = marks["end"][1] - marks["start"][1]
    step_energy = [float(line.split(",")[7]) for line in trace]
    # ground truth per step: differences between consecutive boundary samples; step 0's
    # start is not sampled, so compare steps 1..n-1
    gt = [b[1] - a[1] for a, b in zip(truth.samples, truth.samples[1:], strict=False)]
    errors = [abs(m - g) / g for m, g in zip(step_energy[1:], gt, strict=False) if g > 0]
    return {
        "provenance": summary["provenance"],
        "run_total_measured_j": round(measured_fit_j, 3),
        "run_total_truth_j": round(truth_fit_j, 3),
        "run_total_error_pct": round(100 * (measured_fit_j - truth_fit_j) / truth_fit_j, 3),
        "per_step_median_abs_error_pct": round(100 * statistics.median(errors), 3),
        "per_step_p90_abs_error_pct": round(100 * sorted(errors)[int(0.9 * len(errors))], 3),
        "steps_compared": len(errors),
        "targets": "run total within 0.5 %, per-step median within 5 %",
    }


MEMORY_CHILD = """
import json, resource, sys, tempfile
sys.path.insert(0, {repo!r})
from benchmarks.bench_energy_monitor import Model, data, trainer
from lightning_sustain import EnergyMonitor
from lightning_sustain.testing import SimulatedNVML
import torch
torch.set_num_threads(1)
steps = {steps}
sim = SimulatedNVML(1).install()
with tempfile.TemporaryDirectory() as root:
    class Small(Model):
        def __init__(self):
            super().__init__(width=8)
    loader = data(1000, batch=8)
    epochs = (steps + 999) // 1000
    t = trainer(steps, [EnergyMonitor(dirpath=root)], root)
    t.fit_loop.max_epochs = epochs
    t.fit(Small(), loader)
print(json.dumps({{"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def bench_memory(long_steps: int = 100_000, short_steps: int = 1_000) -> dict:
    results = {}
    for steps in (short_steps, long_steps):
        code = MEMORY_CHILD.format(repo=str(REPO), steps=steps)
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )  # fmt: skip
        results[steps] = (json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"],
                          time.perf_counter() - t0)  # fmt: skip
    delta_mb = (results[long_steps][0] - results[short_steps][0]) / 1024
    return {
        f"peak_rss_{short_steps}_steps_mb": round(results[short_steps][0] / 1024, 1),
        f"peak_rss_{long_steps}_steps_mb": round(results[long_steps][0] / 1024, 1),
        "delta_mb": round(delta_mb, 2),
        "long_run_wall_s": round(results[long_steps][1], 1),
        "target": "delta within 5 MB",
    }


def _busy_until(t_end: float) -> None:
    """Pure Python work (the GIL is held) until ``t_end``."""
    x = 0
    while time.monotonic() < t_end:
        for i in range(200):
            x += i * i


def _old_split(ready, per_step_plain, stream, models) -> list[float]:
    """The former attribution: an ``a + b x duration`` model shared over the whole batch."""
    from lightning_sustain.energy.attribution import StepAttribution

    bounds = [(r[2], r[3]) for r in ready]
    durations = [b - a for a, b in bounds]
    times, energies = stream.points_between(bounds[0][0], bounds[-1][1])
    if len(times) < 3:
        return per_step_plain
    update_s = statistics.median(b - a for a, b in zip(times, times[1:], strict=False))
    if statistics.median(durations) >= 2 * update_s:
        return per_step_plain
    model = models.setdefault("m", StepAttribution())
    model.update(bounds, times, energies)
    return model.split(sum(per_step_plain), durations)


def _pct(values, q: float) -> float:
    return float(np.percentile(values, q)) * 100


def bench_profiles(seconds: float = 8.0, step_s: float = 0.02, seed: int = 0) -> list[dict]:
    """Per-step error per power profile: ours, plain interpolation and the former model."""
    from lightning_sustain.energy.accounting import EnergyAccountant
    from lightning_sustain.energy.meter import EnergyMeter
    from lightning_sustain.energy.nvml import NvmlGpu
    from lightning_sustain.testing import benchmark_profiles

    rng = np.random.default_rng(seed)
    sim = SimulatedNVML(1, counter_period_s=0.1).install()
    rows = []
    try:
        for profile in benchmark_profiles(seed):
            origin = time.monotonic() - float(rng.uniform(0, profile.period_s))  # random phase
            sim.set_power_profile(0, profile, origin_s=origin)
            time.sleep(0.25)  # the curve starts after the switch: it measures this profile only
            gpu = NvmlGpu(0)
            meter = EnergyMeter([gpu])
            ours = EnergyAccountant(meter)
            plain = EnergyAccountant(meter, attribute_short_steps=False)
            got: dict[str, list] = {"ours": [], "plain": [], "former": []}
            models: dict = {}
            t = time.monotonic() + 0.3
            _busy_until(t)
            n_steps = int(seconds / step_s)
            step_times = []
            for k in range(n_steps):
                end = t + step_s * float(rng.uniform(0.9, 1.1))
                _busy_until(end)
                for acc in (ours, plain):
                    acc.record_step(k, 0, t, end, 1)
                step_times.append((t, end))
                t = end
                if (k + 1) % 50 == 0:  # a log interval: the monitor resolves here
                    got["ours"] += ours.resolve()
                    resolved = plain.resolve()
                    got["plain"] += resolved
                    if resolved:
                        vals = [s.energy_j for s in resolved]
                        ready = [(s.step, 0, s.start_s, s.end_s, 1) for s in resolved]
                        got["former"] += _old_split(ready, vals, meter.streams[0], models)
            got["ours"] += ours.resolve(wait=True)
            resolved = plain.resolve(wait=True)
            got["plain"] += resolved
            if resolved:
                vals = [s.energy_j for s in resolved]
                ready = [(s.step, 0, s.start_s, s.end_s, 1) for s in resolved]
                got["former"] += _old_split(ready, vals, meter.streams[0], models)
            truth = np.array([sim.profile_energy_j(0, a, b) for a, b in step_times])
            t0, t1 = step_times[0][0], step_times[-1][1]
            true_total = sim.profile_energy_j(0, t0, t1)
            meter_total = sum(meter.energy_between(t0, t1).values())
            # the same over whole counter intervals (first update after t0 to last before t1):
            # a window's ends inside an update interval carry up to one interval's error
            pts = meter.streams[0].points_between(t0, t1, context=0)[0]
            a_t, b_t = pts[0], pts[-1]
            aligned_err = (
                sum(meter.energy_between(a_t, b_t).values()) - sim.profile_energy_j(0, a_t, b_t)
            ) / sim.profile_energy_j(0, a_t, b_t)
            choice = ours.last_choice.get(gpu.info.device_id)
            native = gpu.native
            meter.close()
            row = {"profile": profile.name, "native_poller": native,
                   "method": choice.method if choice else "plain"}  # fmt: skip
            for name in ("ours", "plain", "former"):
                vals = got[name]
                values = np.array([v.energy_j if hasattr(v, "energy_j") else v for v in vals])
                err = np.abs(values - truth[: values.size]) / truth[: values.size]
                row[f"{name}_median_pct"] = round(_pct(err, 50), 2)
                row[f"{name}_p90_pct"] = round(_pct(err, 90), 2)
                row[f"{name}_mae_j"] = round(
                    float(np.mean(np.abs(values - truth[: values.size]))), 4
                )
            ours_sum = sum(s.energy_j for s in got["ours"])
            row["steps_total_error_pct"] = round(100 * (ours_sum - true_total) / true_total, 4)
            row["meter_total_error_pct"] = round(100 * (meter_total - true_total) / true_total, 4)
            row["aligned_total_error_pct"] = round(100 * aligned_err, 4)
            rows.append(row)
    finally:
        sim.uninstall()
    return rows


def print_profiles_table(rows: list[dict]) -> None:
    print("| profile (SIMULATED, 100 ms counter, 20 ms steps) | ours median / p90 | plain "
          "interpolation median / p90 | former model median / p90 | ours vs plain mean abs "
          "error (J) | total error (steps / meter / whole updates) | chosen |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['profile']} | {r['ours_median_pct']} % / {r['ours_p90_pct']} % | "
              f"{r['plain_median_pct']} % / {r['plain_p90_pct']} % | {r['former_median_pct']} % / "
              f"{r['former_p90_pct']} % | {r['ours_mae_j']} / {r['plain_mae_j']} | "
              f"{r['steps_total_error_pct']} % / {r['meter_total_error_pct']} % / "
              f"{r['aligned_total_error_pct']} % | "
              f"{r['method']}{'' if r['native_poller'] else ' (Python sampler)'} |")  # fmt: skip


def bench_timestamps(seconds: float = 5.0, rounds: int = 2) -> dict:
    """Counter-update timestamp error and sampler CPU/s with a busy pure-Python main thread."""
    from lightning_sustain.energy.meter import EnergyMeter
    from lightning_sustain.energy.nvml import NvmlGpu

    sim = SimulatedNVML(1, counter_period_s=0.1).install()
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for _ in range(rounds):
            for variant in ("native", "python"):
                gpu = NvmlGpu(0, native_poller=variant == "native")
                meter = EnergyMeter([gpu])
                cpu0, native0 = sampler_thread_cpu_s(), gpu.native_cpu_s
                t0 = time.monotonic()
                _busy_until(t0 + seconds)
                elapsed = time.monotonic() - t0
                cpu = sampler_thread_cpu_s() - cpu0 + gpu.native_cpu_s - native0
                ts = np.array(meter.streams[0].points_between(t0, t0 + elapsed)[0])
                meter.close()
                origin, period = sim.counter_origin_s, sim.counter_period_s
                err = np.abs(ts - (origin + np.round((ts - origin) / period) * period)) * 1e3
                r = results.setdefault(variant, {"p50": [], "p90": [], "max": [], "cpu": []})
                r["p50"].append(float(np.median(err)))
                r["p90"].append(float(np.percentile(err, 90)))
                r["max"].append(float(err.max()))
                r["cpu"].append(cpu / elapsed * 1e3)
    finally:
        sim.uninstall()
    return {
        variant: {
            "timestamp_error_ms_p50": [round(v, 2) for v in r["p50"]],
            "timestamp_error_ms_p90": [round(v, 2) for v in r["p90"]],
            "timestamp_error_ms_max": [round(v, 2) for v in r["max"]],
            "sampler_cpu_ms_per_s": [round(v, 2) for v in r["cpu"]],
        }
        for variant, r in results.items()
    }


def bench_windows(seconds: float = 6.0, window_s: float = 1.0) -> list[dict]:
    """Error of 1 s windows per provenance (counter native / Python, integrated), busy GIL."""
    from lightning_sustain.energy.meter import EnergyMeter
    from lightning_sustain.energy.nvml import NvmlGpu
    from lightning_sustain.testing import PowerProfile, SimulatedDeviceSpec

    rows = []
    for arch, native, label in (("hopper", True, "counter, native poller"),
                                ("hopper", False, "counter, Python sampler"),
                                ("pascal", False, "integrated (pre-Volta power)")):  # fmt: skip
        sim = SimulatedNVML([SimulatedDeviceSpec(architecture=arch)], counter_period_s=0.1)
        sim.install()
        try:
            for profile in (PowerProfile.constant(300.0), PowerProfile.square(1.0)):
                sim.set_power_profile(0, profile, origin_s=time.monotonic() - 0.31)
                time.sleep(0.25)  # power readings hold the last tick's power: let one pass
                gpu = NvmlGpu(0, native_poller=native)
                with EnergyMeter([gpu]) as meter:
                    t0 = time.monotonic()
                    _busy_until(t0 + seconds)
                    meter.wait_until_covered(time.monotonic(), timeout_s=1.0)
                    starts = t0 + np.arange(0.0, seconds - window_s, 0.25)
                    errs = []
                    for a in starts:
                        got = meter.energy_between(a, a + window_s)[gpu.info.device_id]
                        true = sim.profile_energy_j(0, a, a + window_s)
                        errs.append(abs(got - true) / true * 100)
                    provenance = gpu.info.provenance_label
                rows.append({
                    "source": label, "provenance": provenance, "profile": profile.name,
                    "window_s": window_s, "median_error_pct": round(float(np.median(errs)), 3),
                    "max_error_pct": round(max(errs), 3), "windows": len(errs),
                })  # fmt: skip
        finally:
            sim.uninstall()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", nargs="?", default="all",
                        choices=["overhead", "cost", "accuracy", "memory", "profiles",
                                 "timestamps", "windows", "all"])  # fmt: skip
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per profile")
    parser.add_argument("--python-sampler", action="store_true",
                        help="profiles: poll from Python (no native poller)")  # fmt: skip
    args = parser.parse_args()
    if args.python_sampler:
        os.environ["LIGHTNING_SUSTAIN_NATIVE_POLLER"] = "0"
    print(f"load average before: {os.getloadavg()}")
    print(f"machine: {os.uname().nodename}, {os.cpu_count()} cores, torch {torch.__version__}")
    if args.what in ("overhead", "all"):
        print("overhead (A/B interleaved):", json.dumps(bench_overhead(), indent=1))
        print("overhead (direct cost):", json.dumps(bench_cost(), indent=1))
    if args.what == "cost":
        print("overhead (direct cost):", json.dumps(bench_cost(), indent=1))
    if args.what in ("accuracy", "all"):
        print("accuracy (simulated device):", json.dumps(bench_accuracy(), indent=1))
    if args.what in ("memory", "all"):
        print("memory:", json.dumps(bench_memory(), indent=1))
    if args.what in ("profiles", "all"):
        rows = bench_profiles(seconds=args.seconds)
        print("profiles (SIMULATED device):", json.dumps(rows, indent=1))
        print_profiles_table(rows)
    if args.what in ("timestamps", "all"):
        print("timestamps (busy pure-Python main thread):",
              json.dumps(bench_timestamps(), indent=1))  # fmt: skip
    if args.what in ("windows", "all"):
        print("windows (busy pure-Python main thread):", json.dumps(bench_windows(), indent=1))
    print(f"load average after: {os.getloadavg()}")
    _ = resource


if __name__ == "__main__":
    main()
