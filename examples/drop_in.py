"""An existing-style Lightning script made sustainable by adding three lines.

    python examples/drop_in.py

The lines marked ``# + lightning_sustain`` are the whole change: energy and CO2e per step
in the logs, a budget that stops training before 0.01 kWh, and SHAP plots at the end.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_wine
from torch.utils.data import DataLoader, TensorDataset

from lightning_sustain import EnergyBudget, EnergyMonitor, ShapSummary  # + lightning_sustain


class WineClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(13, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loaders() -> tuple[DataLoader, DataLoader]:
    data = load_wine()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = order[:140], order[140:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=16, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=64),
    )


def main(max_epochs: int = 5, root: str = "drop_in_output") -> pl.Trainer:
    train, val = loaders()
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        default_root_dir=root,
        enable_progress_bar=False,
        callbacks=[
            EnergyMonitor(country="FR"),  # + lightning_sustain
            EnergyBudget(max_kwh=0.01),  # + lightning_sustain
            ShapSummary(num_samples=40, num_background=40),  # + lightning_sustain
        ],
    )
    trainer.fit(WineClassifier(), train, val)
    return trainer


if __name__ == "__main__":
    t = main()
    print("energy summary and report in", t.log_dir)
