"""A plain PyTorch loop (no Lightning) measured with EnergyRun; torchrun-ready.

    python examples/plain_torch.py
    torchrun --nproc_per_node=2 examples/plain_torch.py          # gloo on CPU, nccl on GPU

The same object the Lightning front ends use: one timestamp per step on the training
thread, sums over ranks through ``torch.distributed`` at log intervals and at the end,
the same trace, summary and report. Inference is a ``predict`` stage (energy per sample).
``--simulate-gpu-load SECONDS`` keeps the simulated GPU of each rank busy per step when
running under the simulated NVML device.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn

from lightning_sustain import EnergyRun
from lightning_sustain.energy.efficiency import count_step_flops


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--predict-batches", type=int, default=20)
    p.add_argument("--dirpath", default="out/plain_torch")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--cpu", default="auto", choices=["auto", "rapl", "estimate", "none"])
    p.add_argument("--simulate-gpu-load", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--intensity-file", default=None, help="grid carbon intensity (CSV/JSON)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(rank)
    sim = None
    if args.simulate_gpu_load > 0:
        from lightning_sustain.testing import SimulatedNVML

        sim = SimulatedNVML.attach()

    model: nn.Module = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 2)).to(device)
    # FLOPs of one training batch, counted once on a sample batch before DDP wraps the model
    flops = count_step_flops(model, torch.randn(args.batch_size, 32, device=device))
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    run = EnergyRun(
        args.dirpath,
        log_every_n_steps=args.log_every,
        cpu=args.cpu,
        report=False,
        intensity_file=args.intensity_file,
        flops_per_step=flops,
    )
    with run:  # the "fit" stage; an exception ends it as interrupted, no collective
        for step in range(args.steps):
            x = torch.randn(args.batch_size, 32, device=device)
            y = (x[:, 0] > 0).long()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if sim is not None:
                sim.busy(local_rank, args.simulate_gpu_load)
            metrics = run.step(samples=args.batch_size)
            if metrics is not None and rank == 0:
                print(f"step {step}: {metrics['energy/power_w']:.1f} W")

    model.eval()
    with run.stage("predict"), torch.no_grad():
        for _ in range(args.predict_batches):
            model(torch.randn(args.batch_size, 32, device=device))
            if sim is not None:
                sim.busy(local_rank, args.simulate_gpu_load)
            run.step(samples=args.batch_size)
    run.close()

    summary = run.summary
    if rank == 0 and summary is not None:
        t = summary["totals"]
        print(
            json.dumps(
                {
                    "provenance": summary["provenance"],
                    "world_size": summary["world_size"],
                    "steps": t["steps"],
                    "energy_j": round(t["energy_j"], 3),
                    "energy_per_sample_j": t["energy_per_sample_j"],
                    "predict_energy_per_sample_j": t["predict_energy_per_sample_j"],
                    "sci_per_inference_g": t["sci_per_inference_g"],
                    "j_per_tflop": t.get("j_per_tflop"),
                    "tflops_per_s_per_w": t.get("tflops_per_s_per_w"),
                    "samples_per_j": t.get("samples_per_j"),
                    "co2e_g": t["co2e_g"],
                    "co2e_time_resolved_g": t.get("co2e_time_resolved_g"),
                },
                indent=2,
            )
        )
    if distributed:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
