"""Train a small classifier on scikit-learn's bundled breast-cancer data, measured.

    python examples/tabular_demo.py --output-dir demo_output

No download: the data ships with scikit-learn. On a machine without an NVIDIA GPU the
demo installs lightning_sustain's simulated GPU (everything it reports is labelled
"simulated") so the GPU path can be seen end to end; pass --no-simulated-gpu to measure
the CPU only.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_breast_cancer
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import BinaryAccuracy

from lightning_sustain import EnergyMonitor


class BreastCancerData(pl.LightningDataModule):
    """Standardised breast-cancer features (30) and labels, 80/20 split."""

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.feature_names: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        data = load_breast_cancer()
        x = torch.tensor(data.data, dtype=torch.float32)
        y = torch.tensor(data.target, dtype=torch.float32)
        self.feature_names = [str(n) for n in data.feature_names]
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(x), generator=g)
        cut = int(0.8 * len(x))
        train_idx, val_idx = order[:cut], order[cut:]
        mean, std = x[train_idx].mean(0), x[train_idx].std(0) + 1e-6
        x = (x - mean) / std
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class Classifier(pl.LightningModule):
    """A two-layer MLP; keeps the simulated GPU busy for ``busy_s`` per step if given."""

    def __init__(self, hidden: int = 32, lr: float = 1e-2, busy_s: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(30, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )
        self.val_acc = BinaryAccuracy()
        self.sim = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.sim is not None and self.hparams.busy_s:
            self.sim.busy(0, self.hparams.busy_s)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y.long())
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--no-simulated-gpu", action="store_true")
    parser.add_argument("--country", default="DE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pl.seed_everything(0)
    out = Path(args.output_dir)

    sim = None
    if not args.no_simulated_gpu:
        from lightning_sustain.energy.nvml import nvml_available

        if not nvml_available():
            from lightning_sustain.testing import SimulatedNVML

            sim = SimulatedNVML(1).install()
            print("No NVIDIA GPU here: using the SIMULATED GPU (figures labelled simulated).")

    model = Classifier(busy_s=0.004 if sim is not None else 0.0)
    model.sim = sim
    monitor = EnergyMonitor(country=args.country)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[monitor],
        logger=CSVLogger(out, name="tabular"),
        log_every_n_steps=5,
        enable_checkpointing=False,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=BreastCancerData())
    summary_path = Path(trainer.log_dir) / "energy_summary.json"
    summary = json.loads(summary_path.read_text())
    totals = summary["totals"]
    print()
    print(f"Trained {totals['steps']} steps in {time.perf_counter() - started:.1f} s")
    print(
        f"Energy: {totals['energy_kwh'] * 1000:.4f} Wh [{summary['provenance']}], "
        f"{totals['co2e_g']:.4f} g CO2e ({summary['carbon']['source']})"
    )
    print(f"Energy summary: {summary_path}")
    print(f"Per-step trace: {Path(trainer.log_dir) / 'energy_trace.csv'}")
    if sim is not None:
        sim.uninstall()


if __name__ == "__main__":
    main()
