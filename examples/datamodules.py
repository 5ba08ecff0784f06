"""Plain (unencrypted) DataModules for the examples; data ships with scikit-learn."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from torch.utils.data import DataLoader, TensorDataset


class BreastCancerDataModule(pl.LightningDataModule):
    """Standardised breast-cancer features (30) and labels, 80/20 split.

    Args:
        batch_size: samples per batch (per process under DDP).
        seed: split seed.
    """

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.feature_names: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        data = load_breast_cancer()
        x = data.data.astype(np.float32)
        order = np.random.default_rng(self.seed).permutation(len(x))
        cut = int(0.8 * len(x))
        train, val = order[:cut], order[cut:]
        x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
        y = data.target.astype(np.int64)
        self.feature_names = [str(n) for n in data.feature_names]
        self.train_set = TensorDataset(torch.from_numpy(x[train]), torch.from_numpy(y[train]))
        self.val_set = TensorDataset(torch.from_numpy(x[val]), torch.from_numpy(y[val]))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=128)
