"""Benchmarks for SustainDDPStrategy (2 DDP processes on CPU, gloo).

1. Overhead: step time of ``sustain_ddp`` with an EnergyMonitor against stock ``ddp``
   without one, on the same 2-process CPU run (an MLP; two simulated GPUs are installed so
   that both the monitor and the strategy sample NVML devices as they would on GPUs).
   Target: <= 1.02x.
2. Power shifting on a heterogeneous simulated pair (speeds 1.0 and 0.6; each step keeps
   the rank's simulated GPU busy for a fixed amount of nominal work): total GPU energy
   (simulator ground truth) and step time with and without shifting.
   Targets: energy >= 10% lower, step time <= 2% longer.

Runs are interleaved (A, B, A, B, ...) and medians are printed with their ratios.

    .venv/bin/python benchmarks/bench_ddp.py [--repeats 3] [--steps 150] [--part all]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# -- worker (runs inside each DDP rank) ------------------------------------------------------
def worker(config_path: str) -> None:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_sustain  # noqa: F401  (registers sustain_ddp)
    from lightning_sustain.callbacks.energy_monitor import EnergyMonitor
    from lightning_sustain.strategies.sustain_ddp import SustainDDPStrategy
    from lightning_sustain.testing import SimulatedNVML

    cfg = json.loads(Path(config_path).read_text())
    out = Path(cfg["out"])

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            width = cfg["width"]
            self.net = torch.nn.Sequential(
                torch.nn.Linear(128, width),
                torch.nn.ReLU(),
                torch.nn.Linear(width, width),
                torch.nn.ReLU(),
                torch.nn.Linear(width, 10),
            )
            self._sim = None

        def training_step(self, batch, batch_idx):
            if cfg["busy_s"] > 0:
                if self._sim is None:
                    self._sim = SimulatedNVML.attach()
                self._sim.busy(self.trainer.local_rank, cfg["busy_s"])
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(cfg["batch"] * (cfg["steps"] + 2) * 2, 128, generator=g)
            return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=cfg["batch"])

    class Clock(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.sim = SimulatedNVML.attach()
            self.gt0 = self.sim.ground_truth_sample(trainer.local_rank)
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.starts.append(time.monotonic())

        def on_train_end(self, trainer, pl_module):
            end = time.monotonic()
            gt1 = self.sim.ground_truth_sample(trainer.local_rank)
            steps = [b - a for a, b in zip(self.starts, self.starts[1:] + [end], strict=True)]
            warm = steps[cfg["warmup"] :]
            record = {
                "rank": trainer.global_rank,
                "median_step_s": statistics.median(warm),
                "mean_step_s": statistics.fmean(warm),
                "energy_j": gt1[1] - self.gt0[1],
                "duration_s": gt1[0] - self.gt0[0],
                "final_limit_w": self.sim.power_limit_w(trainer.local_rank),
            }
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    if cfg["variant"] == "ddp":
        strategy = "ddp"
        callbacks = [Clock()]
    else:
        strategy = SustainDDPStrategy(**cfg["strategy"])
        callbacks = [Clock()]
        if cfg["monitor"]:
            callbacks.insert(0, EnergyMonitor(trace=False, progress_bar=False))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=cfg["steps"],
        log_every_n_steps=50,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    trainer.fit(Model())


# -- driver ----------------------------------------------------------------------------------
def run(cfg: dict, workdir: Path) -> list[dict]:
    out = workdir / f"run-{time.monotonic_ns()}"
    out.mkdir()
    cfg = dict(cfg, out=str(out))
    path = out / "config.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["LIGHTNING_SUSTAIN_LIMIT_JOURNAL"] = str(workdir / "journal.json")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"run failed:\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def overhead(repeats: int, steps: int, workdir: Path) -> None:
    from lightning_sustain.testing import SimulatedNVML

    base = {"steps": steps, "warmup": 10, "batch": 64, "width": 512, "busy_s": 0.0}
    variants = {
        "ddp": dict(base, variant="ddp"),
        "sustain_ddp+monitor": dict(base, variant="sustain", monitor=True, strategy={}),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    ratios: list[float] = []
    with SimulatedNVML(2, counter_period_s=0.1):
        for i in range(repeats):
            order = list(variants) if i % 2 == 0 else list(reversed(variants))
            pair = {}
            for name in order:
                ranks = run(variants[name], workdir)
                pair[name] = max(r["median_step_s"] for r in ranks)
                times[name].append(pair[name])
            ratios.append(pair["sustain_ddp+monitor"] / pair["ddp"])
            print(
                f"  pair {i + 1}: ddp {pair['ddp'] * 1e3:.2f} ms  sustain_ddp+monitor "
                f"{pair['sustain_ddp+monitor'] * 1e3:.2f} ms  ratio {ratios[-1]:.3f}",
                flush=True,
            )
    a = statistics.median(times["ddp"])
    b = statistics.median(times["sustain_ddp+monitor"])
    print(f"overhead: median step ddp {a * 1e3:.2f} ms, sustain_ddp+monitor {b * 1e3:.2f} ms")
    print(
        f"overhead: ratio of medians {b / a:.3f}x, median of paired ratios "
        f"{statistics.median(ratios):.3f}x (target <= 1.02x)"
    )


def hot_path(steps: int) -> None:
    """The wait-measurement hook against DDP's built-in all-reduce, in one process.

    Two identical DDP models in one gloo process group (world size 1), stepped alternately,
    so that machine noise hits both alike: the difference is what the timed Python hook
    adds to every step.
    """
    import torch
    import torch.distributed as dist

    from lightning_sustain.run.wait_clock import WaitClock

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29613")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)

        def mlp() -> torch.nn.Module:
            return torch.nn.Sequential(
                torch.nn.Linear(128, 512),
                torch.nn.ReLU(),
                torch.nn.Linear(512, 512),
                torch.nn.ReLU(),
                torch.nn.Linear(512, 10),
            )

        stock = torch.nn.parallel.DistributedDataParallel(mlp())
        timed = torch.nn.parallel.DistributedDataParallel(mlp())
        clock = WaitClock(None)
        timed.register_comm_hook(None, clock.timed_allreduce)  # what the strategy registers
        x = torch.randn(64, 128)
        samples: dict[str, list[float]] = {"stock": [], "timed": []}
        for i in range(steps):
            order = (("stock", stock), ("timed", timed))
            for name, model in order if i % 2 == 0 else reversed(order):
                t0 = time.perf_counter()
                model(x).sum().backward()
                if model is timed:
                    clock.close_step()
                samples[name].append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
        a = statistics.median(samples["stock"][20:])
        b = statistics.median(samples["timed"][20:])
        print(
            f"hot path: median forward+backward+all-reduce {a * 1e3:.3f} ms built-in, "
            f"{b * 1e3:.3f} ms with the timed hook: +{(b - a) * 1e6:.0f} us per step "
            f"({b / a:.3f}x)"
        )
    finally:
        dist.destroy_process_group()


def shifting(repeats: int, steps: int, workdir: Path) -> None:
    from lightning_sustain.testing import SimulatedDeviceSpec, SimulatedNVML

    base = {
        "steps": steps,
        "warmup": 5,
        "batch": 16,
        "width": 64,
        "busy_s": 0.05,
        "variant": "sustain",
        "monitor": False,
    }
    variants = {
        "no shifting": dict(base, strategy={}),
        "shifting": dict(
            base,
            strategy={
                "job_power_budget_w": 800.0,
                "shift_every_n_steps": 5,
                "log_every_n_steps": 10,
            },
        ),
    }
    energy: dict[str, list[float]] = {k: [] for k in variants}
    step: dict[str, list[float]] = {k: [] for k in variants}
    mean_s: dict[str, list[float]] = {k: [] for k in variants}
    e_ratios: list[float] = []
    s_ratios: list[float] = []
    specs = [SimulatedDeviceSpec(speed=1.0), SimulatedDeviceSpec(speed=0.6)]
    with SimulatedNVML(specs, counter_period_s=0.05) as sim:
        for i in range(repeats):
            order = list(variants) if i % 2 == 0 else list(reversed(variants))
            pair_e, pair_s = {}, {}
            for name in order:
                ranks = run(variants[name], workdir)
                pair_e[name] = sum(r["energy_j"] for r in ranks)
                # the job's step time (median over steps after warm-up; the ranks agree)
                pair_s[name] = max(r["median_step_s"] for r in ranks)
                mean_s[name].append(max(r["mean_step_s"] for r in ranks))
                energy[name].append(pair_e[name])
                step[name].append(pair_s[name])
                assert sim.power_limit_w(0) == 400.0 and sim.power_limit_w(1) == 400.0
                if name == "shifting":
                    limits = [r["final_limit_w"] for r in ranks]
                    print(f"    shifting run: limits at train end (before restore) {limits} W")
            e_ratios.append(pair_e["shifting"] / pair_e["no shifting"])
            s_ratios.append(pair_s["shifting"] / pair_s["no shifting"])
            print(
                f"  pair {i + 1}: energy {pair_e['no shifting']:.1f} J -> "
                f"{pair_e['shifting']:.1f} J ({e_ratios[-1]:.3f}x), "
                f"step {pair_s['no shifting'] * 1e3:.1f} ms -> "
                f"{pair_s['shifting'] * 1e3:.1f} ms ({s_ratios[-1]:.3f}x)",
                flush=True,
            )
    en, es = statistics.median(energy["no shifting"]), statistics.median(energy["shifting"])
    sn, ss = statistics.median(step["no shifting"]), statistics.median(step["shifting"])
    print(
        f"shifting: median GPU energy {en:.1f} J -> {es:.1f} J: {100 * (1 - es / en):.1f}% lower "
        f"(paired median {100 * (1 - statistics.median(e_ratios)):.1f}%; target >= 10%)"
    )
    print(
        f"shifting: median step {sn * 1e3:.1f} ms -> {ss * 1e3:.1f} ms: {ss / sn:.3f}x "
        f"(paired median {statistics.median(s_ratios):.3f}x; target <= 1.02x)"
    )
    mn, ms = statistics.median(mean_s["no shifting"]), statistics.median(mean_s["shifting"])
    print(
        f"shifting: mean step (incl. hiccups) {mn * 1e3:.1f} ms -> {ms * 1e3:.1f} ms: "
        f"{ms / mn:.3f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--part", choices=["all", "overhead", "hot-path", "shifting"], default="all"
    )
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        workdir = Path(tmp)
        if args.part in ("all", "overhead"):
            print(f"overhead ({args.repeats} interleaved pairs, {args.steps} steps each):")
            overhead(args.repeats, args.steps, workdir)
        if args.part in ("all", "hot-path"):
            hot_path(2000)
        if args.part in ("all", "shifting"):
            print(f"power shifting ({args.repeats} interleaved pairs, {args.steps} steps each):")
            shifting(args.repeats, args.steps, workdir)


if __name__ == "__main__":
    main()
