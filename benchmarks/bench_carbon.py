"""Carbon-aware training benchmark (issue 15).

Run:  .venv/bin/python benchmarks/bench_carbon.py [power|pause|all]
      [--pairs 3] [--steps 240] [--busy-s 0.1] [--period-s 30] [--pause-runs 20]

Everything runs on CPU against the simulated NVML device and a SYNTHETIC diurnal
intensity trace (sinusoid + 5 % noise, peak/trough 3x) whose "day" is compressed to
``--period-s`` seconds, so every energy and CO2e figure printed here is SIMULATED.
The device model: a busy device under a cap L draws L and its work stretches by
(busy/L)^(1/3) (docs/budgets.md).

- power: pairs of real Trainer runs, interleaved: the same workload uncapped (no
  controller) and under CarbonAwareController(mode="power", max_slowdown=0.05). Each run
  gets the same trace anchored at its own start (same phase); pairs differ in phase.
  CO2e is time-resolved from the simulated device's ground-truth energy per step.
  Printed per pair and as medians: CO2e reduction, wall-time ratio, and the largest
  projected slowdown of any decision (must be <= the bound).
- pause: 20 randomised runs of CarbonAwareController(mode="pause") (random phase,
  threshold, deadline between --min-slack and 4 x a calibrated uncapped run, on_pause
  wait or stop-and-requeue); the deadline must be met in every run. A miss in a run that
  never paused is counted separately: the uncapped run itself was too slow.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import pynvml  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_sustain.budget.carbon import plan_power, time_scale  # noqa: E402
from lightning_sustain.callbacks.carbon_aware import CarbonAwareController  # noqa: E402
from lightning_sustain.energy.intensity import (  # noqa: E402
    TimeSeriesIntensity,
    time_resolved_co2e,
)
from lightning_sustain.testing import SimulatedNVML  # noqa: E402
from lightning_sustain.testing.grid import diurnal_intensity, write_intensity_csv  # noqa: E402


class Model(pl.LightningModule):
    def __init__(self, sim, busy_s):
        super().__init__()
        self.layer = torch.nn.Linear(16, 2)
        self.sim, self.busy_s = sim, busy_s

    def training_step(self, batch, batch_idx):
        self.sim.busy(0, self.busy_s)
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def data(steps: int) -> DataLoader:
    x = torch.randn(steps * 8, 16)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


class GroundTruth(Callback):
    """Ground-truth (unix time, cumulative J) at fit start, every batch end and fit end."""

    def __init__(self, sim):
        self.sim = sim
        self.samples: list[tuple[float, float]] = []

    def _sample(self):
        mono, energy = self.sim.ground_truth_sample(0)
        self.samples.append((mono + (time.time() - time.monotonic()), energy))

    def on_train_start(self, *args):
        self._sample()

    def on_train_batch_end(self, *args):
        self._sample()

    def on_train_end(self, *args):
        self._sample()


def co2e_of(samples, provider) -> float:
    t = np.asarray([s[0] for s in samples])
    e = np.asarray([s[1] for s in samples])
    return time_resolved_co2e(t[:-1], t[1:], np.diff(e), provider).total_co2e_g


def trainer(root, callbacks, steps):
    return pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=callbacks,
    )


def trace_for(start, duration_s, period_s, phase, seed):
    return diurnal_intensity(
        start - 1.0,
        duration_s * 3 + 10,
        period_s=period_s,
        swing=3.0,
        noise=0.05,
        phase=phase,
        resolution_s=period_s / 96,
        seed=seed,
    )


def run_power(args, sim, root: Path) -> None:
    print(
        f"\n== power mode: {args.pairs} interleaved pairs, {args.steps} steps x "
        f"{args.busy_s} s nominal, day = {args.period_s} s, max_slowdown 0.05 (SIMULATED)"
    )
    print(f"   load before: {os.getloadavg()}")
    rows = []
    for pair in range(args.pairs):
        phase = 2 * math.pi * pair / max(1, args.pairs)
        result = {}
        order = ["uncapped", "carbon"] if pair % 2 == 0 else ["carbon", "uncapped"]
        for kind in order:
            start = time.time()
            series = trace_for(start, args.steps * args.busy_s * 3, args.period_s, phase, pair)
            path = write_intensity_csv(series, root / f"trace-{pair}-{kind}.csv")
            truth = GroundTruth(sim)
            callbacks: list[Callback] = [truth]
            controller = None
            if kind == "carbon":
                controller = CarbonAwareController(
                    intensity_file=str(path),
                    max_slowdown=0.05,
                    min_limit_fraction=0.5,
                    warmup_steps=5,
                    decide_every_s=args.period_s / 60,
                    busy_power_w=args.busy_power_w or None,
                    dirpath=str(root / f"run-{pair}"),
                )
                callbacks.append(controller)
            t0 = time.monotonic()
            trainer(root, callbacks, args.steps).fit(Model(sim, args.busy_s), data(args.steps))
            wall = time.monotonic() - t0
            provider = TimeSeriesIntensity(series)
            co2 = co2e_of(truth.samples, provider)
            energy = truth.samples[-1][1] - truth.samples[0][1]
            result[kind] = (wall, co2, energy, controller)
            assert sim.power_limit_w(0) == 400.0, "limit not restored"
        wall_u, co2_u, e_u, _ = result["uncapped"]
        wall_c, co2_c, e_c, ctl = result["carbon"]
        max_proj = max(d.projected_slowdown for d in ctl.log.decisions)
        capped = sum(1 for d in ctl.log.decisions if (d.limit_fraction or 1) < 1)
        rows.append(
            (
                pair,
                1 - co2_c / co2_u,
                wall_c / wall_u - 1,
                1 - e_c / e_u,
                max_proj,
                capped,
                len(ctl.log.decisions),
                wall_u,
                wall_c,
                co2_c,
                co2_u,
            )
        )
        print(
            f"   pair {pair}: CO2e {co2_u:.4f} -> {co2_c:.4f} g ({1 - co2_c / co2_u:+.1%} saved), "
            f"wall {wall_u:.1f} -> {wall_c:.1f} s ({wall_c / wall_u - 1:+.1%}), energy "
            f"{e_u:.0f} -> {e_c:.0f} J, max projected slowdown {max_proj:.3f}, "
            f"{capped}/{len(ctl.log.decisions)} decisions capped; load {os.getloadavg()[0]:.2f}"
        )
    print("\n   | pair | CO2e saved | wall-time change | energy saved | max projected slowdown |")
    print("   |---|---|---|---|---|")
    for r in rows:
        print(f"   | {r[0]} | {r[1]:.1%} | {r[2]:+.1%} | {r[3]:.1%} | {r[4]:.3f} |")
    saved = [r[1] for r in rows]
    slower = [r[2] for r in rows]
    print(
        f"   median CO2e saved {statistics.median(saved):.1%} (range {min(saved):.1%}.."
        f"{max(saved):.1%}); median wall-time change {statistics.median(slower):+.1%} (range "
        f"{min(slower):+.1%}..{max(slower):+.1%}); max projected slowdown of any decision "
        f"{max(r[4] for r in rows):.3f} (bound 0.05)"
    )
    pooled_saved = 1 - sum(r[9] for r in rows) / sum(r[10] for r in rows)
    pooled_slower = sum(r[8] for r in rows) / sum(r[7] for r in rows) - 1
    print(
        f"   pooled over pairs (ratio of sums): CO2e saved {pooled_saved:.1%}, wall-time "
        f"change {pooled_slower:+.1%}"
    )
    print(f"   load after: {os.getloadavg()}")


def replay(provider, start, work_s, bound, low, dt, margin=0.1):
    """The controller's planner against the device model on a simulated clock (no noise).

    Always-busy device; power at cap c is c x busy power, work rate c^(1/3); re-plans
    every dt like the callback; returns (slowdown, CO2e saved, max projected slowdown).
    """
    t, done, lost, co2 = start, 0.0, 0.0, 0.0
    allowed_total = bound * (1 - margin) * work_s
    max_projected = 0.0
    while done < work_s - 1e-9:
        plan = plan_power(
            provider,
            t,
            remaining_work_s=work_s - done,
            allowed_lost_s=allowed_total - lost,
            min_fraction=low,
            hold_s=dt,
        )
        max_projected = max(max_projected, (lost + plan.projected_lost_s) / work_s)
        scale = float(time_scale(plan.fraction, 1 / 3))
        step = min(dt, (work_s - done) * scale)
        co2 += provider.mean_intensity(t, t + step)[0] * plan.fraction * step
        done += step / scale
        lost += step * (1 - 1 / scale)
        t += step
    base = provider.mean_intensity(start, start + work_s)[0] * work_s
    return (t - start) / work_s - 1, 1 - co2 / base, max_projected


def run_replay(args) -> None:
    print(
        "\n== power mode, planner replayed against the device model (simulated clock, no "
        "machine noise; always-busy GPU, perf exponent 1/3, min cap 0.5, max_slowdown 0.05)"
    )
    print("   | swing | runs | CO2e saved (median, range) | slowdown (max) | max projected |")
    print("   |---|---|---|---|---|")
    for swing in (2.0, 3.0, 5.0):
        rows = []
        for k in range(8):
            series = diurnal_intensity(
                0.0,
                20 * args.period_s,
                period_s=args.period_s,
                swing=swing,
                noise=0.05,
                phase=2 * math.pi * k / 8,
                resolution_s=args.period_s / 96,
                seed=k,
            )
            provider = TimeSeriesIntensity(series)
            rows.append(
                replay(
                    provider,
                    0.0,
                    8 * args.period_s * 0.3 + args.period_s,
                    0.05,
                    0.5,
                    args.period_s / 60,
                )
            )
        saved = [r[1] for r in rows]
        print(
            f"   | {swing:g}x | {len(rows)} | {statistics.median(saved):.1%} "
            f"({min(saved):.1%}..{max(saved):.1%}) | {max(r[0] for r in rows):+.2%} | "
            f"{max(r[2] for r in rows):.3f} |"
        )


def run_pause(args, sim, root: Path) -> None:
    print(f"\n== pause mode: {args.pause_runs} randomised runs (SIMULATED)")
    print(f"   load before: {os.getloadavg()}")
    rng = random.Random(15)
    steps, busy = 30, 0.03
    # calibrate the uncapped wall time of this workload
    t0 = time.monotonic()
    trainer(root, [], steps).fit(Model(sim, busy), data(steps))
    base_s = time.monotonic() - t0
    met, paused, infeasible, rows = 0, 0, 0, []
    for run in range(args.pause_runs):
        period = rng.uniform(6.0, 12.0)
        phase = rng.uniform(0, 2 * math.pi)
        threshold = rng.uniform(250.0, 380.0)
        slack = rng.uniform(args.min_slack, 4.0)
        on_pause = rng.choice(["wait", "stop"])
        start = time.time()
        series = diurnal_intensity(
            start - 1,
            120,
            period_s=period,
            swing=3.0,
            noise=0.05,
            phase=phase,
            resolution_s=period / 96,
            seed=run,
        )
        path = write_intensity_csv(series, root / f"pause-{run}.csv")
        deadline = start + slack * base_s + (1.0 if on_pause == "stop" else 0.0)
        kwargs = dict(
            mode="pause",
            intensity_file=str(path),
            pause_above_g_per_kwh=threshold,
            deadline=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(deadline))
            + f".{int((deadline % 1) * 1e6):06d}+00:00",
            on_pause=on_pause,
            resume_overhead_s=1.0,
            warmup_steps=3,
            decide_every_s=0.2,
            dirpath=str(root / f"pause-run-{run}"),
            checkpoint_dir=str(root / f"pause-ckpt-{run}"),
        )
        ckpt = None
        pauses = 0
        while True:
            controller = CarbonAwareController(**kwargs)
            t = trainer(root, [controller], steps)
            t.fit(Model(sim, busy), data(steps), ckpt_path=ckpt)
            if controller.status.get("status") != "paused_for_carbon":
                break
            pauses += 1
            ckpt = controller.status["checkpoint"]
            time.sleep(max(0.0, controller.status["resume_at_unix_s"] - time.time()))
        end = time.time()
        waits = sum(1 for d in controller.log.decisions if d.action == "pause_wait")
        ok = end <= deadline and t.global_step == steps
        if not ok and pauses + waits == 0:
            infeasible += 1  # it never paused: the uncapped run itself was too slow
        met += ok
        paused += (pauses + waits) > 0
        rows.append(
            (run, on_pause, threshold, slack, pauses + waits, end - start, deadline - start, ok)
        )
    print(
        "   | run | on_pause | threshold g/kWh | deadline (x uncapped) | pauses | wall s "
        "| deadline s | met |"
    )
    print("   |---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"   | {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.2f} | {r[4]} | {r[5]:.1f} "
            f"| {r[6]:.1f} | {r[7]} |"
        )
    print(
        f"   deadlines met: {met}/{args.pause_runs} (misses without any pause: {infeasible}); "
        f"runs that paused at least once: {paused}; "
        f"uncapped run {base_s:.1f} s"
    )
    print(f"   load after: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "what", nargs="?", default="all", choices=["power", "pause", "replay", "all"]
    )
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--busy-s", type=float, default=0.1)
    parser.add_argument("--period-s", type=float, default=30.0)
    parser.add_argument("--pause-runs", type=int, default=20)
    parser.add_argument(
        "--min-slack",
        type=float,
        default=1.5,
        help="shortest deadline, as a multiple of the calibrated uncapped run",
    )
    parser.add_argument(
        "--busy-power-w",
        type=float,
        default=350.0,
        help="busy power given to the controller (the simulated device's, as nvidia-smi "
        "would show uncapped); 0: the controller's default (the default power limit, 400 W)",
    )
    args = parser.parse_args()
    if args.what in ("replay", "all"):
        run_replay(args)
        if args.what == "replay":
            return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["LIGHTNING_SUSTAIN_LIMIT_JOURNAL"] = str(root / "journal.json")
        sim = SimulatedNVML(1, counter_period_s=0.05).install()
        pynvml.nvmlInit()
        try:
            if args.what in ("power", "all"):
                run_power(args, sim, root)
            if args.what in ("pause", "all"):
                run_pause(args, sim, root)
        finally:
            pynvml.nvmlShutdown()
            sim.uninstall()


if __name__ == "__main__":
    main()
