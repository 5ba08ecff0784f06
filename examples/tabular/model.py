"""The breast-cancer classifier of the tabular example (batches are ``(x, y)`` tuples)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torchmetrics.classification import BinaryAccuracy


class BreastCancerClassifier(pl.LightningModule):
    """A small MLP on the 30 breast-cancer features, with torchmetrics accuracy.

    Args:
        in_features: number of input features.
        hidden: hidden layer width.
        lr: Adam learning rate.
    """

    def __init__(self, in_features: int = 30, hidden: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(in_features, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 1),
        )
        self.val_acc = BinaryAccuracy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.binary_cross_entropy_with_logits(self(x), y.float())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log(
            "val_loss", torch.nn.functional.binary_cross_entropy_with_logits(self(x), y.float())
        )
        self.val_acc(self(x), y.long())
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
