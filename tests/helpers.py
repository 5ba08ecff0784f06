"""Small models and data shared by the tests (no test functions here)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class TinyClassifier(pl.LightningModule):
    """A linear classifier; optionally keeps a simulated GPU busy during each step."""

    def __init__(self, in_features: int = 16, sim=None, sim_index: int = 0, busy_s: float = 0.0):
        super().__init__()
        self.layer = torch.nn.Linear(in_features, 2)
        self._sim = sim
        self._sim_index = sim_index
        self._busy_s = busy_s

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self._sim is not None and self._busy_s > 0:
            self._sim.busy(self._sim_index, self._busy_s)
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.layer(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.cross_entropy(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n: int = 256, in_features: int = 16, batch_size: int = 32, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)
