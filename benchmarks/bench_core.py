"""The measuring core (issue 13): hot-path cost, whole-process CPU, front-end agreement.

Run:  .venv/bin/python benchmarks/bench_core.py [hotpath|process|frontends|all]

Everything runs on CPU against the simulated NVML device (1 GPU), so every energy figure
printed here is SIMULATED. Timings on a shared machine are noisy: A and B are interleaved,
medians and spreads are quoted, and the load average is printed next to them.

- ``hotpath``: what :meth:`EnergyRun.step` costs the training thread, directly (a tight
  loop of calls), with and without its log-interval work amortised; and the same for the
  Trainer and Fabric adapters' per-step hooks.
- ``direct``: the monitor's own CPU per step in a real Trainer run, attributed: the
  training thread's time in its hooks plus its sampler and resolver threads' CPU.
- ``process``: whole-process CPU time per step (every thread, the sampler included) of a
  ~1.3 ms CPU training step, bare Lightning vs Lightning + EnergyMonitor, interleaved;
  and the sampler thread's CPU per second.
- ``frontends``: the same simulated workload driven through Trainer, Fabric and a plain
  loop; each total against the simulated device's ground truth over the same stage.

Zeus is not installed here (not in the package index this project may use offline, and it
needs an NVIDIA driver for its windows), so no Zeus column is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import pynvml  # noqa: E402
import torch  # noqa: E402
from lightning.fabric import Fabric  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_sustain import EnergyMonitor, EnergyRun, FabricEnergyMonitor  # noqa: E402
from lightning_sustain.run.distributed import RankInfo  # noqa: E402
from lightning_sustain.testing import SimulatedNVML  # noqa: E402


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


# -- hot path ---------------------------------------------------------------------------
def bench_hotpath(calls: int = 100_000, repeats: int = 5) -> dict:
    sim = SimulatedNVML(1, counter_period_s=0.1).install()
    pynvml.nvmlInit()
    results: dict = {"load_before": load()}
    try:
        for label, every in (("record_only", 10**9), ("log_every_50", 50)):
            per_call, wall = [], []
            for _ in range(repeats):
                with tempfile.TemporaryDirectory() as root:
                    run = EnergyRun(root, cpu="none", log_every_n_steps=every, report=False,
                                    trace=True, ranks=RankInfo())  # fmt: skip
                    run.start_stage("fit")
                    step = run.step
                    t0, w0 = time.thread_time(), time.perf_counter()
                    for _ in range(calls):
                        step(32)
                    per_call.append((time.thread_time() - t0) / calls * 1e6)
                    wall.append((time.perf_counter() - w0) / calls * 1e6)
                    run.close()
            # thread CPU time: what the training thread itself spends; wall time also
            # holds waits for the CPU and the GIL on a loaded machine
            results[f"energy_run_step_thread_cpu_us_{label}"] = spread(per_call)
            results[f"energy_run_step_wall_us_{label}"] = spread(wall)
        # the adapters' per-step hooks, called directly as their loops call them
        per_call = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as root:
                monitor = FabricEnergyMonitor(root, cpu="none", log_every_n_steps=50, report=False)
                monitor.run.ranks = RankInfo()
                monitor.on_train_start()
                hook = monitor.on_train_batch_end
                t0 = time.thread_time()
                for i in range(calls):
                    hook(samples=32, tokens=32 * 64, step=i)
                per_call.append((time.thread_time() - t0) / calls * 1e6)
                monitor.close()
        results["fabric_hook_thread_cpu_us_log_every_50"] = spread(per_call)
    finally:
        pynvml.nvmlShutdown()
        sim.uninstall()
    results["load_after"] = load()
    return results


# -- whole process ----------------------------------------------------------------------
class Model(pl.LightningModule):
    def __init__(self, width: int = 160, sim: SimulatedNVML | None = None, busy_s: float = 0.0):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
            torch.nn.ReLU(), torch.nn.Linear(width, 2),
        )  # fmt: skip
        self.sim, self.busy_s = sim, busy_s

    def training_step(self, batch, batch_idx):
        if self.sim is not None and self.busy_s:
            self.sim.busy(0, self.busy_s)
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def data(n_batches: int, batch: int = 64) -> DataLoader:
    x = torch.randn(n_batches * batch, 64)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=batch)


class CpuClock(pl.Callback):
    """Process CPU and wall time from the 100th step on (skips warm-up)."""

    def __init__(self) -> None:
        self.n = 0
        self.cpu = self.wall = (0.0, 0.0)

    def on_train_batch_end(self, trainer, *args):
        self.n += 1
        now = (time.process_time(), time.perf_counter())
        if self.n == 100:
            self.start = now
        self.end = now

    def per_step_us(self) -> tuple[float, float]:
        n = self.n - 100
        return ((self.end[0] - self.start[0]) / n * 1e6, (self.end[1] - self.start[1]) / n * 1e6)


def one_fit(steps: int, with_monitor: bool, root: str) -> tuple[float, float]:
    clock = CpuClock()
    callbacks: list = [clock]
    if with_monitor:
        callbacks.append(EnergyMonitor(cpu="none", dirpath=root, report=False))
    trainer = pl.Trainer(
        max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        log_every_n_steps=50,
    )  # fmt: skip
    trainer.fit(Model(), data(steps))
    return clock.per_step_us()


def sampler_cpu_per_s(seconds: float = 3.0) -> float:
    import psutil

    run = EnergyRun(None, cpu="none", ranks=RankInfo())
    run.open()
    time.sleep(0.2)
    ids = {t.native_id for t in threading.enumerate() if t.name == "lightning-sustain-meter"}

    def cpu() -> float:
        return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)

    c0 = cpu()
    time.sleep(seconds)
    used = cpu() - c0
    run.close()
    return used / seconds


class ThreadTimedMonitor(EnergyMonitor):
    """EnergyMonitor adding up the training thread's CPU time spent in its per-step hooks."""

    hook_cpu_s = 0.0

    def on_train_batch_start(self, *args, **kwargs):
        t0 = time.thread_time()
        super().on_train_batch_start(*args, **kwargs)
        self.hook_cpu_s += time.thread_time() - t0

    def on_train_batch_end(self, *args, **kwargs):
        t0 = time.thread_time()
        super().on_train_batch_end(*args, **kwargs)
        self.hook_cpu_s += time.thread_time() - t0


class ThreadTimedEmpty(pl.Callback):
    """Control: the same timing around hooks that only take a timestamp."""

    hook_cpu_s = 0.0

    def on_train_batch_start(self, *args, **kwargs):
        t0 = time.thread_time()
        self.t = time.monotonic()
        self.hook_cpu_s += time.thread_time() - t0

    def on_train_batch_end(self, *args, **kwargs):
        t0 = time.thread_time()
        self.t = time.monotonic()
        self.hook_cpu_s += time.thread_time() - t0


def control_hooks_cpu_us(steps: int) -> float:
    """Training-thread CPU per step the timing method itself reports for empty hooks."""
    with tempfile.TemporaryDirectory() as root:
        control = ThreadTimedEmpty()
        pl.Trainer(
            max_steps=steps, callbacks=[control], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        ).fit(Model(), data(steps))  # fmt: skip
    return control.hook_cpu_s / steps * 1e6


def background_cpu_s(names: tuple[str, ...] = ("lightning-sustain-resolver",)) -> float:
    """CPU seconds of the named threads so far (psutil, per thread)."""
    import psutil

    ids = {t.native_id for t in threading.enumerate() if t.name in names}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)


def bench_direct(steps: int = 2000) -> dict:
    """The monitor's own CPU per step, attributed: its hooks + its background threads.

    Unlike the A/B difference of process CPU, this does not drown in the noise of a loaded
    machine; it misses only indirect costs (cache, GIL hand-overs).
    """
    torch.set_num_threads(1)
    sim = SimulatedNVML(1, counter_period_s=0.1).install()
    pynvml.nvmlInit()
    marks: dict = {}
    try:
        with tempfile.TemporaryDirectory() as root:
            monitor = ThreadTimedMonitor(cpu="none", dirpath=root, report=False)
            clock = CpuClock()

            class Mark(pl.Callback):
                def on_train_batch_end(self, trainer, *args):
                    now = (monitor.hook_cpu_s, background_cpu_s(),
                           background_cpu_s(("lightning-sustain-meter",)), time.perf_counter())
                    if clock.n == 100:
                        marks["h0"], marks["b0"], marks["s0"], marks["t0"] = now
                    marks["h1"], marks["b1"], marks["s1"], marks["t1"] = now  # fmt: skip

            trainer = pl.Trainer(
                max_steps=steps, callbacks=[clock, monitor, Mark()], logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=root, log_every_n_steps=50,
            )  # fmt: skip
            trainer.fit(Model(), data(steps))
    finally:
        pynvml.nvmlShutdown()
        sim.uninstall()
    n = clock.n - 100
    hooks_us = (marks["h1"] - marks["h0"]) / n * 1e6
    background_us = (marks["b1"] - marks["b0"]) / n * 1e6
    sampler_per_s = (marks["s1"] - marks["s0"]) / (marks["t1"] - marks["t0"])
    cpu_us, wall_us = clock.per_step_us()
    control_us = control_hooks_cpu_us(steps)
    return {
        "load": load(),
        "step_process_cpu_us": round(cpu_us, 1),
        "step_wall_us": round(wall_us, 1),
        "training_thread_hooks_cpu_us_per_step": round(hooks_us, 2),
        # the same timing around empty hooks in the same loop: the method's own floor
        "control_empty_hooks_cpu_us_per_step": round(control_us, 2),
        "hooks_minus_control_us_per_step": round(hooks_us - control_us, 2),
        "resolver_thread_cpu_us_per_step": round(background_us, 2),
        "sampler_thread_cpu_s_per_s": round(sampler_per_s, 5),
        # the sampler's cost is per second, not per step: at a 1.3 ms step it adds
        "sampler_cpu_us_per_1p3ms_step": round(sampler_per_s * 1300, 2),
        "monitor_extra_cpu_us_per_1p3ms_step": round(
            hooks_us - control_us + background_us + sampler_per_s * 1300, 2
        ),
    }


def bench_process(pairs: int = 5, steps: int = 1600) -> dict:
    torch.set_num_threads(1)
    sim = SimulatedNVML(1, counter_period_s=0.1).install()
    pynvml.nvmlInit()
    bare_cpu, with_cpu, bare_wall, with_wall, extra = [], [], [], [], []
    load_before = load()
    try:
        with tempfile.TemporaryDirectory() as root:
            one_fit(300, True, root)  # warm-up (imports, first compile of paths)
            for i in range(pairs):
                order = (False, True) if i % 2 == 0 else (True, False)
                got = {}
                for with_monitor in order:
                    got[with_monitor] = one_fit(steps, with_monitor, root)
                bare_cpu.append(got[False][0])
                with_cpu.append(got[True][0])
                bare_wall.append(got[False][1])
                with_wall.append(got[True][1])
                extra.append(got[True][0] - got[False][0])
        sampler = sampler_cpu_per_s()
    finally:
        pynvml.nvmlShutdown()
        sim.uninstall()
    return {
        "load_before": load_before,
        "load_after": load(),
        "bare_step_wall_us": spread(bare_wall),
        "bare_process_cpu_us_per_step": spread(bare_cpu),
        "with_monitor_process_cpu_us_per_step": spread(with_cpu),
        "extra_process_cpu_us_per_step_paired": spread(extra),
        "sampler_thread_cpu_s_per_s": round(sampler, 5),
    }


# -- front ends -------------------------------------------------------------------------
class Truth:
    """Ground truth sampled right after each EnergyRun stage opens and before it closes."""

    def __init__(self, sim: SimulatedNVML) -> None:
        self.sim, self.events = sim, []
        start, end = EnergyRun.start_stage, EnergyRun.end_stage
        truth = self

        def start_stage(run, stage="fit"):
            start(run, stage)
            truth.events.append([stage, truth.sim.ground_truth_energy_j(0)])

        def end_stage(run, *a, **k):
            if run.current_stage is not None:
                truth.events[-1].append(truth.sim.ground_truth_energy_j(0))
            return end(run, *a, **k)

        EnergyRun.start_stage, EnergyRun.end_stage = start_stage, end_stage
        self._restore = (start, end)

    def total_j(self) -> float:
        return sum(e[2] - e[1] for e in self.events if len(e) == 3)

    def close(self) -> None:
        EnergyRun.start_stage, EnergyRun.end_stage = self._restore


def frontend_trainer(sim, steps, busy_s, root) -> dict:
    monitor = EnergyMonitor(cpu="none", dirpath=root, report=False)
    trainer = pl.Trainer(
        max_steps=steps, callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        log_every_n_steps=10,
    )  # fmt: skip
    trainer.fit(Model(sim=sim, busy_s=busy_s), data(steps))
    return monitor.summary


def frontend_fabric(sim, steps, busy_s, root) -> dict:
    monitor = FabricEnergyMonitor(root, cpu="none", log_every_n_steps=10, report=False)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[monitor])
    net = Model().net  # the same network, as a plain module
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    model, optimizer = fabric.setup(net, optimizer)
    fabric.call("on_train_start")
    for i, (x, y) in enumerate(data(steps)):
        sim.busy(0, busy_s)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        fabric.call("on_train_batch_end", samples=x.shape[0], step=i)
    fabric.call("on_train_end")
    monitor.close()
    return monitor.summary


def frontend_plain(sim, steps, busy_s, root) -> dict:
    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    run = EnergyRun(root, cpu="none", log_every_n_steps=10, report=False)
    with run:
        for x, y in data(steps):
            sim.busy(0, busy_s)
            loss = torch.nn.functional.cross_entropy(model.net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.step(samples=x.shape[0])
    run.close()
    return run.summary


def bench_frontends(steps: int = 100, busy_s: float = 0.02, repeats: int = 3) -> dict:
    torch.set_num_threads(1)
    sim = SimulatedNVML(1, counter_period_s=0.1).install()
    pynvml.nvmlInit()
    rows: dict = {"load_before": load()}
    try:
        for name, fn in (("trainer", frontend_trainer), ("fabric", frontend_fabric),
                         ("plain", frontend_plain)):  # fmt: skip
            ratios, energies = [], []
            for _ in range(repeats):
                truth = Truth(sim)
                try:
                    with tempfile.TemporaryDirectory() as root:
                        summary = fn(sim, steps, busy_s, root)
                finally:
                    truth.close()
                measured = summary["totals"]["energy_j"]
                ratios.append(measured / truth.total_j())
                energies.append(measured)
            rows[name] = {
                "measured_over_truth": spread(ratios),
                "energy_j": spread(energies),
                "provenance": summary["provenance"],
                "steps": summary["totals"]["steps"],
            }
    finally:
        pynvml.nvmlShutdown()
        sim.uninstall()
    meds = {k: rows[k]["energy_j"]["median"] for k in ("trainer", "fabric", "plain")}
    rows["max_pairwise_energy_difference_pct"] = round(
        100 * (max(meds.values()) - min(meds.values())) / min(meds.values()), 3
    )
    rows["load_after"] = load()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all",
                        choices=["hotpath", "direct", "process", "frontends", "all"])  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer repeats (CI smoke)")
    args = parser.parse_args()
    out: dict = {}
    if args.what in ("hotpath", "all"):
        out["hotpath"] = bench_hotpath(calls=20_000 if args.quick else 100_000)
    if args.what in ("direct", "all"):
        out["direct"] = bench_direct(steps=1000 if args.quick else 2000)
    if args.what in ("process", "all"):
        out["process"] = bench_process(pairs=2 if args.quick else 5)
    if args.what in ("frontends", "all"):
        out["frontends"] = bench_frontends(repeats=1 if args.quick else 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
