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
- ``process``: whole-process CPU time per step (every thread: sampler, native poller,
  resolver) of a ~1 ms CPU training step: bare Lightning, Lightning + EnergyMonitor, and
  Lightning + a Zeus ``ZeusMonitor`` window opened and closed every step, interleaved in
  rounds (the order rotates); per-thread CPU from ``/proc/self/task/*/schedstat`` states
  where the extra goes (training thread, sampler, native poller, resolver) per step and
  per second. Zeus (``pip install zeus``, the ``bench`` extra) is measured against the same
  simulated NVML device through its real pynvml path, ``sync_execution=False`` (no CUDA
  here; on a GPU a synchronising window costs more); without Zeus its column is skipped
  with a message.
- ``frontends``: the same simulated workload driven through Trainer, Fabric and a plain
  loop with deadline-paced steps (every step lasts the same wall time in every loop), on
  several power profiles: energy attributed to the training steps (sum of per-step
  energy, per step and per sample) compared across loops and against ground truth over
  the same step boundaries, and each run's total against ground truth over its own
  window.
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
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import pynvml  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_sustain import EnergyMonitor, EnergyRun, FabricEnergyMonitor  # noqa: E402
from lightning_sustain.run.distributed import RankInfo  # noqa: E402
from lightning_sustain.testing import SimulatedNVML  # noqa: E402
from tests.frontends import PACED_LOOPS, run_paced  # noqa: E402


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


def thread_cpu_s() -> dict[int, float]:
    """CPU seconds of every thread of this process so far (``/proc/self/task/*/schedstat``)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0]) / 1e9
        except (OSError, ValueError):
            continue
    return out


def thread_names() -> dict[int, str]:
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


class CpuClock(pl.Callback):
    """Process, per-thread and wall time from the 100th step on (skips warm-up)."""

    def __init__(self) -> None:
        self.n = 0

    def on_train_batch_end(self, trainer, *args):
        self.n += 1
        if self.n == 100:
            self.start = (time.process_time(), time.perf_counter(), thread_cpu_s())
        elif self.n > 100 and trainer.global_step >= trainer.max_steps - 1:
            self.end = (time.process_time(), time.perf_counter(), thread_cpu_s())
            self.names = thread_names()

    def per_step_us(self) -> tuple[float, float]:
        n = self.n - 100
        return ((self.end[0] - self.start[0]) / n * 1e6, (self.end[1] - self.start[1]) / n * 1e6)

    def threads(self) -> dict[str, float]:
        """CPU seconds per thread role over the measured steps."""
        main = threading.main_thread().native_id
        roles: dict[str, float] = {}
        for tid, c1 in self.end[2].items():
            used = c1 - self.start[2].get(tid, 0.0)
            if tid == main:
                role = "training_thread"
            else:
                name = self.names.get(tid)
                # a thread Python does not know is native: our C poller (the bare
                # column shows what else would land here)
                role = {"lightning-sustain-meter": "sampler",
                        "lightning-sustain-resolver": "resolver"}.get(
                    name or "", "native_poller" if name is None else "other_python")  # fmt: skip
            roles[role] = roles.get(role, 0.0) + used
        return roles


class ZeusPerStep(pl.Callback):
    """A Zeus measurement window opened and closed around every training step."""

    def __init__(self) -> None:
        from zeus.monitor import ZeusMonitor

        # the simulated NVML device through Zeus's own pynvml path; no CPU (RAPL) part
        self.monitor = ZeusMonitor(gpu_indices=[0], cpu_indices=[])
        self.energy_j = 0.0

    def on_train_batch_start(self, *args, **kwargs):
        # no CUDA here: a synchronising window (Zeus's default on a GPU) costs more
        self.monitor.begin_window("step", sync_execution=False)

    def on_train_batch_end(self, *args, **kwargs):
        self.energy_j += self.monitor.end_window("step", sync_execution=False).total_energy


def zeus_importable() -> str | None:
    """None when Zeus can be used, else why not."""
    try:
        import zeus.monitor  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure skips the column
        return f"{type(exc).__name__}: {exc}"
    return None


def one_fit(steps: int, variant: str, root: str) -> dict:
    """One fit of ``steps`` steps: ``bare``, ``ours`` (EnergyMonitor) or ``zeus``."""
    clock = CpuClock()
    callbacks: list = [clock]
    if variant == "ours":
        callbacks.append(EnergyMonitor(cpu="none", dirpath=root, report=False))
    elif variant == "zeus":
        callbacks.append(ZeusPerStep())
    trainer = pl.Trainer(
        max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        log_every_n_steps=50,
    )  # fmt: skip
    with warnings.catch_warnings():
        # Zeus warns that a window shorter than the counter period measured zero energy
        warnings.filterwarnings("ignore", message="The energy consumption of one or more GPUs")
        trainer.fit(Model(), data(steps))
    cpu_us, wall_us = clock.per_step_us()
    n = clock.n - 100
    seconds = clock.end[1] - clock.start[1]
    threads = clock.threads()
    return {
        "cpu_us": cpu_us,
        "wall_us": wall_us,
        "thread_us": {k: v / n * 1e6 for k, v in threads.items()},
        "thread_ms_per_s": {k: v / seconds * 1e3 for k, v in threads.items()},
    }


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
                    now = (
                        monitor.hook_cpu_s,
                        background_cpu_s(),
                        background_cpu_s(("lightning-sustain-meter",)),
                        time.perf_counter(),
                    )
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


def bench_process(rounds: int = 7, steps: int = 1600) -> dict:
    """Bare Lightning vs EnergyMonitor vs a Zeus window per step, interleaved in rounds."""
    torch.set_num_threads(1)
    sim = SimulatedNVML(1, counter_period_s=0.1).install()
    pynvml.nvmlInit()
    why_no_zeus = zeus_importable()
    variants = ["bare", "ours"] + ([] if why_no_zeus else ["zeus"])
    got: dict[str, list[dict]] = {v: [] for v in variants}
    load_before = load()
    try:
        with tempfile.TemporaryDirectory() as root:
            for v in variants:  # warm-up (imports, first compile of paths)
                one_fit(300, v, root)
            for i in range(rounds):
                order = variants[i % len(variants) :] + variants[: i % len(variants)]
                for v in order:
                    got[v].append(one_fit(steps, v, root))
    finally:
        pynvml.nvmlShutdown()
        sim.uninstall()
    out: dict = {"load_before": load_before, "load_after": load(), "rounds": rounds,
                 "measured_steps_per_fit": steps - 100}  # fmt: skip
    if why_no_zeus:
        out["zeus"] = f"SKIPPED: Zeus is not importable ({why_no_zeus}); pip install zeus"
    for v in variants:
        out[f"{v}_process_cpu_us_per_step"] = spread([r["cpu_us"] for r in got[v]])
        out[f"{v}_wall_us_per_step"] = spread([r["wall_us"] for r in got[v]])
    for v in variants[1:]:
        # paired: each round's fit minus the same round's bare fit
        extra = [r["cpu_us"] - b["cpu_us"] for r, b in zip(got[v], got["bare"], strict=True)]
        out[f"{v}_extra_process_cpu_us_per_step"] = spread(extra)
        main = [r["thread_us"]["training_thread"] - b["thread_us"]["training_thread"]
                for r, b in zip(got[v], got["bare"], strict=True)]  # fmt: skip
        out[f"{v}_extra_training_thread_cpu_us_per_step"] = spread(main)
    roles = ("sampler", "native_poller", "resolver", "other_python")
    for v in variants:  # bare too: threads of its own (none expected) show up there
        for role in roles:
            per_step = [r["thread_us"].get(role, 0.0) for r in got[v]]
            if max(per_step) > 0:
                out[f"{v}_{role}_cpu_us_per_step"] = spread(per_step)
                out[f"{v}_{role}_cpu_ms_per_s"] = spread(
                    [r["thread_ms_per_s"].get(role, 0.0) for r in got[v]]
                )
    # the attributed extra: training-thread difference (paired) + our threads' own CPU
    attributed = [
        r["thread_us"]["training_thread"]
        - b["thread_us"]["training_thread"]
        + sum(r["thread_us"].get(role, 0.0) for role in roles)
        for r, b in zip(got["ours"], got["bare"], strict=True)
    ]
    out["ours_attributed_extra_cpu_us_per_step"] = spread(attributed)
    return out


def print_process_table(out: dict) -> None:
    variants = [v for v in ("bare", "ours", "zeus") if f"{v}_process_cpu_us_per_step" in out]
    print(f"\nprocess CPU per step (SIMULATED NVML), {out['rounds']} interleaved rounds, "
          f"load {out['load_before']} -> {out['load_after']}")  # fmt: skip
    print("| | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))

    def cell(key: str) -> str:
        v = out.get(key)
        return "-" if v is None else f"{v['median']} ({v['min']}..{v['max']})"

    print(
        "| process CPU us/step, median (min..max) | "
        + " | ".join(cell(f"{v}_process_cpu_us_per_step") for v in variants)
        + " |"
    )
    print(
        "| extra vs bare (paired) | - | "
        + " | ".join(cell(f"{v}_extra_process_cpu_us_per_step") for v in variants[1:])
        + " |"
    )
    print("| training thread extra (paired) | - | "
          + " | ".join(cell(f"{v}_extra_training_thread_cpu_us_per_step")
                       for v in variants[1:]) + " |")  # fmt: skip
    for role in ("sampler", "native_poller", "resolver"):
        print(
            f"| {role} thread us/step ; ms/s | "
            + " | ".join(
                f"{cell(f'{v}_{role}_cpu_us_per_step')} ; {cell(f'{v}_{role}_cpu_ms_per_s')}"
                for v in variants
            )
            + " |"
        )
    print(
        f"| ours attributed extra (training thread + own threads) | - | "
        f"{cell('ours_attributed_extra_cpu_us_per_step')} |"
    )
    if "zeus" in out:
        print(out["zeus"])


# -- front ends -------------------------------------------------------------------------
def frontend_profiles() -> list:
    from lightning_sustain.testing import PowerProfile

    # "load": power follows the simulated work (busy part of each step, idle else);
    # the others follow wall time whatever the loop does
    return [None, PowerProfile.constant(300.0),
            PowerProfile.square(1.0, low_w=80.0, high_w=400.0)]  # fmt: skip


def bench_frontends(
    steps: int = 125, step_s: float = 0.04, busy_s: float = 0.02, repeats: int = 2
) -> dict:
    """Trainer vs Fabric vs plain loop: same deadline-paced workload, several profiles.

    ``steps * step_s`` is a whole number of the square wave's periods, so the energy of
    the training steps does not depend on the wave's phase at the start.
    """
    torch.set_num_threads(1)
    sim = SimulatedNVML(1, counter_period_s=0.1).install()
    pynvml.nvmlInit()
    rows: dict = {"load_before": load(), "steps": steps, "step_s": step_s}
    try:
        for profile in frontend_profiles():
            name = (
                f"load (busy {busy_s * 1e3:.0f} ms of each step)"
                if profile is None
                else profile.name
            )
            if profile is not None:
                sim.set_power_profile(0, profile)
            per: dict[str, dict[str, list[float]]] = {}
            for _ in range(repeats):
                for loop in PACED_LOOPS:
                    with tempfile.TemporaryDirectory() as root:
                        got = run_paced(loop, sim, steps, step_s,
                                        busy_s if profile is None else 0.0, root)  # fmt: skip
                    t = got.summary["totals"]
                    train_j = t["train_energy_j"]
                    r = per.setdefault(loop, {})
                    for key, value in (
                        ("train_energy_j", train_j),
                        ("train_over_truth", train_j / got.pace.steps_truth_j),
                        ("j_per_sample", train_j / t["samples"]),
                        ("steps_duration_s", got.pace.steps_duration_s),
                        ("truth_steps_energy_j", got.pace.steps_truth_j),
                        ("total_over_truth", t["energy_j"] / got.run_truth_j),
                        ("total_energy_j", t["energy_j"]),
                    ):
                        r.setdefault(key, []).append(value)
            if profile is not None:
                sim.set_power_profile(0, None)
            block: dict = {loop: {k: spread(v) for k, v in r.items()} for loop, r in per.items()}
            for key in ("train_energy_j", "j_per_sample", "total_energy_j",
                        "truth_steps_energy_j", "steps_duration_s"):  # fmt: skip
                meds = [per[loop][key] for loop in PACED_LOOPS]
                med = [statistics.median(v) for v in meds]
                block[f"max_pairwise_{key}_difference_pct"] = round(
                    100 * (max(med) - min(med)) / min(med), 3
                )
            rows[name] = block
    finally:
        pynvml.nvmlShutdown()
        sim.uninstall()
    rows["load_after"] = load()
    return rows


def print_frontends_table(rows: dict) -> None:
    print(
        f"\nfront ends (SIMULATED NVML), {rows['steps']} deadline-paced steps of "
        f"{rows['step_s'] * 1e3:.0f} ms, load {rows['load_before']} -> {rows['load_after']}"
    )
    print(
        "| profile | loop | steps energy / truth (same boundaries) | steps energy J | "
        "truth J | steps wall s | J per sample | run total / truth (own window) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, block in rows.items():
        if not isinstance(block, dict) or "trainer" not in block:
            continue
        for loop in PACED_LOOPS:
            b = block[loop]
            print(
                f"| {name} | {loop} | {b['train_over_truth']['median']} | "
                f"{b['train_energy_j']['median']} | {b['truth_steps_energy_j']['median']} | "
                f"{b['steps_duration_s']['median']} | {b['j_per_sample']['median']} | "
                f"{b['total_over_truth']['median']} |"
            )
        print(
            f"| {name} | max difference between loops | - | "
            f"{block['max_pairwise_train_energy_j_difference_pct']} % | "
            f"{block['max_pairwise_truth_steps_energy_j_difference_pct']} % | "
            f"{block['max_pairwise_steps_duration_s_difference_pct']} % | "
            f"{block['max_pairwise_j_per_sample_difference_pct']} % | "
            f"run totals {block['max_pairwise_total_energy_j_difference_pct']} % |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all",
                        choices=["hotpath", "direct", "process", "frontends", "all"])  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer repeats (CI smoke)")
    parser.add_argument("--rounds", type=int, default=7, help="process: interleaved rounds")
    args = parser.parse_args()
    out: dict = {}
    if args.what in ("hotpath", "all"):
        out["hotpath"] = bench_hotpath(calls=20_000 if args.quick else 100_000)
    if args.what in ("direct", "all"):
        out["direct"] = bench_direct(steps=1000 if args.quick else 2000)
    if args.what in ("process", "all"):
        out["process"] = bench_process(rounds=2 if args.quick else args.rounds)
    if args.what in ("frontends", "all"):
        out["frontends"] = bench_frontends(repeats=1 if args.quick else 2)
    print(json.dumps(out, indent=2))
    if "process" in out:
        print_process_table(out["process"])
    if "frontends" in out:
        print_frontends_table(out["frontends"])


if __name__ == "__main__":
    main()
