"""GPU check for a machine with a real NVIDIA GPU (never run in CI or tests).

    python benchmarks/gpu_check.py [--seconds 60] [--device 0] [--section all|monitor|fsdp]

1. Trains a small CNN on random data on CUDA for about ``--seconds`` with EnergyMonitor.
2. Cross-checks the NVML energy counter's total against power samples integrated over
   the same window (two independent NVML paths; expect agreement within a few percent).
3. Measures training throughput with and without the monitor, interleaved (A, B, A, B...).
4. Prints one table.
5. ``--section fsdp`` (also part of ``all``): EnergyMonitor under ``FSDPStrategy`` and
   ``ModelParallelStrategy`` (FSDP2 ``fully_shard``) on one GPU, about 30 s each; checks
   that the summary is written with the GPU's NVML counter, and that its energy lies
   inside an NVML counter window read around ``fit()`` (docs/strategies.md).

Every figure it prints comes from real hardware; nothing here is simulated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_sustain import EnergyMonitor  # noqa: E402


class Cnn(pl.LightningModule):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10),
        )  # fmt: skip

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int) -> DataLoader:
    x = torch.randn(n, 3, 64, 64)
    y = torch.randint(0, 10, (n,))
    return DataLoader(TensorDataset(x, y), batch_size=128, pin_memory=True)


class Timer(pl.Callback):
    def __init__(self) -> None:
        self.n, self.t0, self.t1 = 0, None, None

    def on_train_batch_end(self, trainer, *args):
        self.n += 1
        if self.n == 20:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.t1 = time.perf_counter()

    def steps_per_s(self) -> float:
        return (self.n - 20) / (self.t1 - self.t0)


def integrated_power_j(device: int, stop: threading.Event, out: dict) -> None:
    """Integrate nvmlDeviceGetPowerUsage (trapezoid, 10 ms) until ``stop`` is set."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(device)
    energy, last_t, last_p = 0.0, time.monotonic(), pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3
    out["start_counter_mj"] = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    while not stop.is_set():
        time.sleep(0.01)
        t, p = time.monotonic(), pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3
        energy += 0.5 * (p + last_p) * (t - last_t)
        last_t, last_p = t, p
    out["end_counter_mj"] = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    out["integrated_j"] = energy
    pynvml.nvmlShutdown()


def fit(steps: int, with_monitor: bool, root: str, device: int) -> tuple[float, dict | None]:
    timer = Timer()
    callbacks: list = [timer]
    if with_monitor:
        callbacks.append(EnergyMonitor(dirpath=root, report=False))
    trainer = pl.Trainer(
        accelerator="gpu", devices=[device], max_steps=steps, callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Cnn(), loader(steps * 128))
    summary = None
    if with_monitor:
        summary = json.loads((Path(root) / "energy_summary.json").read_text())
    return timer.steps_per_s(), summary


class ShardedMlp(pl.LightningModule):
    """An MLP built in ``configure_model``; FSDP2-sharded when the strategy has a mesh."""

    def __init__(self, width: int = 4096, fsdp2: bool = False) -> None:
        super().__init__()
        self.width, self.fsdp2, self.net = width, fsdp2, None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        w = self.width
        self.net = torch.nn.Sequential(
            torch.nn.Linear(w, w), torch.nn.ReLU(), torch.nn.Linear(w, w), torch.nn.ReLU(),
            torch.nn.Linear(w, 10),
        )  # fmt: skip
        if self.fsdp2:
            from torch.distributed.fsdp import fully_shard  # public from torch 2.6

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def counter_j(device: int) -> float:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(device)
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3
    finally:
        pynvml.nvmlShutdown()


def fsdp_check(device: int, steps: int = 2000, batch: int = 512) -> list[tuple[str, bool, str]]:
    """EnergyMonitor under FSDP and ModelParallel on one GPU; (check, passed, detail) rows."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    results: list[tuple[str, bool, str]] = []
    variants = {
        "fsdp": lambda: (FSDPStrategy(), False),
        "model_parallel": lambda: (
            ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
            True,
        ),
    }
    for name, make in variants.items():
        with tempfile.TemporaryDirectory() as root:
            try:
                strategy, fsdp2 = make()
                trainer = pl.Trainer(
                    accelerator="gpu", devices=[device], strategy=strategy, max_steps=steps,
                    callbacks=[EnergyMonitor(dirpath=root, report=False)], logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False,
                )  # fmt: skip
                # 32 batches, repeated: ~5 s of steps on an H100/H200 in fp32
                x, y = torch.randn(32 * batch, 4096), torch.randint(0, 10, (32 * batch,))
                before_j = counter_j(device)
                trainer.fit(ShardedMlp(fsdp2=fsdp2), DataLoader(TensorDataset(x, y), batch))
                torch.cuda.synchronize()
                window_j = counter_j(device) - before_j
                summary = json.loads((Path(root) / "energy_summary.json").read_text())
            except Exception as exc:  # report and go on with the next strategy
                results.append((f"{name}: fit with EnergyMonitor", False, repr(exc)[:200]))
                continue
            gpus = [d for d in summary["devices"] if d["kind"] == "gpu"]
            gpu_j = sum(d["fit_energy_j"] for d in gpus)
            ratio = gpu_j / window_j if window_j > 0 else float("nan")
            results += [
                (f"{name}: fit with EnergyMonitor", True, type(trainer.strategy).__name__),
                (f"{name}: world_size 1", summary["world_size"] == 1, str(summary["world_size"])),
                (
                    f"{name}: one GPU, NVML counter",
                    len(gpus) == 1 and gpus[0]["provenance"] == "counter",
                    ", ".join(f"{d['name']} [{d['provenance']}]" for d in gpus),
                ),
                (
                    f"{name}: steps counted",
                    summary["totals"]["steps"] == steps,
                    str(summary["totals"]["steps"]),
                ),
                # the fit lies inside the counter window read around it (set-up excluded)
                (
                    f"{name}: GPU fit energy / counter window in (0.6, 1.02]",
                    0.6 < ratio <= 1.02,
                    f"{gpu_j:.1f} J / {window_j:.1f} J = {ratio:.3f}",
                ),
            ]
    return results


def print_checks(results: list[tuple[str, bool, str]]) -> bool:
    width = max(len(k) for k, _, _ in results)
    print(f"\ngpu_check fsdp ({torch.cuda.get_device_name()}, torch {torch.__version__})")
    for key, passed, detail in results:
        print(f"  {'PASS' if passed else 'FAIL'}  {key:<{width}}  {detail}")
    return all(passed for _, passed, _ in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--section", choices=("all", "monitor", "fsdp"), default="all")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU; none is visible.")
    if args.section == "fsdp":
        sys.exit(0 if print_checks(fsdp_check(args.device)) else 1)
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as root:
        # calibrate the number of steps for the wanted duration
        probe, _ = fit(60, False, root, args.device)
        steps = max(200, int(probe * args.seconds))
        # 1+2: one long monitored run, with an independent integrated-power thread
        stop, cross = threading.Event(), {}
        thread = threading.Thread(target=integrated_power_j, args=(args.device, stop, cross))
        thread.start()
        time.sleep(0.5)
        _, summary = fit(steps, True, root, args.device)
        time.sleep(0.5)
        stop.set()
        thread.join()
        # 3: throughput, interleaved
        short = max(100, steps // 4)
        with_tp, without_tp = [], []
        for i in range(args.pairs):
            order = (True, False) if i % 2 == 0 else (False, True)
            for variant in order:
                tp, _ = fit(short, variant, root, args.device)
                (with_tp if variant else without_tp).append(tp)
    counter_j = (cross["end_counter_mj"] - cross["start_counter_mj"]) / 1e3
    gpu = next(d for d in summary["devices"] if d["kind"] == "gpu")
    rows = [
        ("GPU", gpu["name"]),
        ("provenance", gpu["provenance"]),
        ("training steps (monitored run)", summary["totals"]["steps"]),
        ("monitored fit energy, GPU (J)", f"{gpu['fit_energy_j']:.1f}"),
        ("counter total over window incl. margins (J)", f"{counter_j:.1f}"),
        ("integrated power over same window (J)", f"{cross['integrated_j']:.1f}"),
        ("integrated / counter", f"{cross['integrated_j'] / counter_j:.4f}"),
        ("throughput with monitor (steps/s, median)", f"{statistics.median(with_tp):.2f}"),
        ("throughput without (steps/s, median)", f"{statistics.median(without_tp):.2f}"),
        ("throughput ratio", f"{statistics.median(with_tp) / statistics.median(without_tp):.4f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\ngpu_check ({torch.cuda.get_device_name(args.device)}, torch {torch.__version__})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if args.section == "all" and not print_checks(fsdp_check(args.device)):
        sys.exit(1)


if __name__ == "__main__":
    main()
