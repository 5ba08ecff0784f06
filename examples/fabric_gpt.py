"""A litgpt-style pretraining loop on Lightning Fabric, measured: energy per token.

    python examples/fabric_gpt.py --steps 40                       # one process
    python examples/fabric_gpt.py --devices 2 --strategy ddp       # two processes (gloo on CPU)

A tiny GPT trains on synthetic tokens, then generates tokens (inference, measured as the
``predict`` stage). ``FabricEnergyMonitor`` is an ordinary Fabric callback: the loop calls
``fabric.call("on_train_batch_end", samples=..., tokens=...)``; Fabric tells it the ranks
and device at ``fabric.setup`` and each optimizer step. The FLOPs of one training batch are
counted once on a sample batch (``count_step_flops``) before training, so the summary also
has J per TFLOP, TFLOP/s per W and tokens per J. The summary (energy per token, per
generated token, SCI per inference, efficiency) lands in ``--dirpath``; ``--intensity-file``
adds time-resolved CO2e from a grid carbon-intensity file.

On a machine without a GPU, run it under the simulated NVML device with
``--simulate-gpu-load 0.01`` to keep each rank's simulated GPU busy during each step
(the figures are then labelled simulated).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_sustain import FabricEnergyMonitor
from lightning_sustain.energy.efficiency import count_step_flops


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A decoder-only transformer (GPT-2 shape, a few hundred thousand parameters)."""

    def __init__(self, vocab: int = 256, block: int = 64, d_model: int = 64, n_layer: int = 2):
        super().__init__()
        self.block = block
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(block, d_model)
        self.blocks = nn.ModuleList(Block(d_model, 4) for _ in range(n_layer))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=idx.device), diagonal=1)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x, mask)
        return self.head(self.ln(x))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
        for _ in range(new_tokens):
            logits = self(idx[:, -self.block :])[:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
        return idx


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--generate-batches", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--dirpath", default="out/fabric_gpt")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--cpu", default="auto", choices=["auto", "rapl", "estimate", "none"])
    p.add_argument("--simulate-gpu-load", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--intensity-file", default=None, help="grid carbon intensity (CSV/JSON)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    monitor = FabricEnergyMonitor(
        args.dirpath,
        log_every_n_steps=args.log_every,
        cpu=args.cpu,
        report=False,
        intensity_file=args.intensity_file,
    )
    fabric = Fabric(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        callbacks=[monitor],
    )
    fabric.launch()
    fabric.seed_everything(1234 + fabric.global_rank)
    sim = None
    if args.simulate_gpu_load > 0:
        from lightning_sustain.testing import SimulatedNVML

        sim = SimulatedNVML.attach()

    model = TinyGPT(block=args.block)
    # FLOPs of one training batch (forward and backward), counted once on a sample batch of
    # the training shape, on the plain module before Fabric wraps it
    sample = torch.randint(0, 256, (args.batch_size, args.block))
    monitor.set_flops_per_step(count_step_flops(model, sample, tokens=sample.numel()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model, optimizer = fabric.setup(model, optimizer)  # the monitor learns ranks and device
    model.mark_forward_method("generate")  # inference through the strategy's wrapper

    fabric.call("on_train_start")
    model.train()
    for step in range(args.steps):
        tokens = torch.randint(0, 256, (args.batch_size, args.block + 1), device=fabric.device)
        x, y = tokens[:, :-1], tokens[:, 1:]
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sim is not None:
            sim.busy(fabric.local_rank, args.simulate_gpu_load)
        fabric.call("on_train_batch_end", samples=x.shape[0], tokens=x.numel(), step=step)
    fabric.call("on_train_end")

    # inference: greedy generation, measured per generated token
    model.eval()
    fabric.call("on_predict_start")
    for _ in range(args.generate_batches):
        prompt = torch.randint(0, 256, (args.batch_size, 8), device=fabric.device)
        model.generate(prompt, args.new_tokens)
        if sim is not None:
            sim.busy(fabric.local_rank, args.simulate_gpu_load)
        fabric.call(
            "on_predict_batch_end",
            samples=prompt.shape[0],
            tokens=prompt.shape[0] * args.new_tokens,
        )
    fabric.call("on_predict_end")
    monitor.close()

    summary = monitor.summary
    if fabric.global_rank == 0 and summary is not None:
        t = summary["totals"]
        print(
            json.dumps(
                {
                    "provenance": summary["provenance"],
                    "world_size": summary["world_size"],
                    "steps": t["steps"],
                    "tokens": t["tokens"],
                    "energy_j": round(t["energy_j"], 3),
                    "train_energy_per_token_j": t["energy_per_token_j"],
                    "generated_tokens": t["predict_tokens"],
                    "energy_per_generated_token_j": t["predict_energy_per_token_j"],
                    "sci_per_token_g": t["sci_per_token_g"],
                    "flops_per_step": t.get("flops_per_step"),
                    "j_per_tflop": t.get("j_per_tflop"),
                    "tflops_per_s_per_w": t.get("tflops_per_s_per_w"),
                    "tokens_per_j": t.get("tokens_per_j"),
                    "co2e_g": t["co2e_g"],
                    "co2e_time_resolved_g": t.get("co2e_time_resolved_g"),
                    "summary": os.path.join(args.dirpath, "energy_summary.json"),
                },
                indent=2,
            )
        )
    return summary


if __name__ == "__main__":
    main()
