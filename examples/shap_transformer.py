"""Explain Lightning's demo Transformer with per-token SHAP values at its embedding layer.

    python examples/shap_transformer.py --output-dir demo_output

The model is ``lightning.pytorch.demos.Transformer`` (an encoder-decoder language model),
trained on synthetic token sequences with one rule: each sequence holds one "key" token
(``k1``..``k4``) among filler words, and the token after the sequence repeats the key. The
rule does not depend on positions (the demo's positional encoding adds the same vector at
every position). Nothing is downloaded.

``ShapSummary(input_keys=[0, 1])`` explains ``forward(inputs, decoder_inputs)``: both are
token ids, so attributions are computed at the output of the shared ``nn.Embedding``
(expected gradients along the path from background embeddings to the explained ones,
summed over the embedding dimension), for the log-probabilities of the next token
(``sequence_reduction="last"``) of the three tokens predicted most often. The artefacts in
``<log_dir>/shap/`` include ``tokens.md`` (each example with its top tokens marked) and
``tokens_<output>.png`` (the tokens that matter most overall); a model that learned the
rule puts its attribution on the key tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos import Transformer
from torch.utils.data import DataLoader, TensorDataset

from lightning_sustain import ShapSummary

BOS = 0
N_KEYS = 4  # token ids 1..4 are keys, the rest filler words


def synthetic_tokens(
    n: int, length: int = 8, vocab: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences of filler words with one key token; the next token repeats the key.

    Returns:
        ``(inputs, decoder_inputs, targets)``, each ``(n, length)``: the decoder sees
        ``BOS`` followed by the targets shifted right (no target leaks into its input).
    """
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(N_KEYS + 1, vocab, (n, length + 1), generator=g)
    keys = torch.randint(1, N_KEYS + 1, (n,), generator=g)
    where = torch.randint(0, length, (n,), generator=g)
    seq[torch.arange(n), where] = keys
    seq[:, length] = keys
    inputs, targets = seq[:, :length], seq[:, 1:]
    decoder_inputs = torch.cat([torch.full((n, 1), BOS), targets[:, :-1]], dim=1)
    return inputs, decoder_inputs, targets


class TokenData(pl.LightningDataModule):
    """Synthetic token sequences; ``token_names`` gives the explanation a vocabulary."""

    def __init__(self, n_train: int = 2048, n_val: int = 256, vocab: int = 16) -> None:
        super().__init__()
        self.vocab = vocab
        self.token_names = (
            ["<bos>"]
            + [f"k{i}" for i in range(1, N_KEYS + 1)]
            + [f"w{i}" for i in range(N_KEYS + 1, vocab)]
        )
        self.output_names = self.token_names  # the model's outputs are next-token log-probs
        self.train_set = TensorDataset(*synthetic_tokens(n_train, vocab=vocab, seed=0))
        self.val_set = TensorDataset(*synthetic_tokens(n_val, vocab=vocab, seed=1))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class TokenModel(pl.LightningModule):
    """``lightning.pytorch.demos.Transformer``, small, trained with next-token NLL."""

    def __init__(self, vocab: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = Transformer(
            vocab_size=vocab, ninp=32, nhead=2, nhid=64, nlayers=1, dropout=0.0
        )

    def forward(self, inputs: torch.Tensor, decoder_inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs, decoder_inputs)

    def training_step(self, batch, batch_idx):
        inputs, decoder_inputs, targets = batch
        loss = torch.nn.functional.nll_loss(self(inputs, decoder_inputs), targets.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, decoder_inputs, targets = batch
        logp = self(inputs, decoder_inputs).view(len(inputs), -1, self.hparams.vocab)
        self.log("val_last_acc", (logp[:, -1].argmax(-1) == targets[:, -1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def run(
    output_dir: str | Path,
    epochs: int = 12,
    num_samples: int = 8,
    num_background: int = 8,
    n_train: int = 2048,
) -> dict:
    """Train, explain and return the SHAP summary (also written under ``output_dir``)."""
    pl.seed_everything(0)
    shap = ShapSummary(
        input_keys=[0, 1],
        num_background=num_background,
        num_samples=num_samples,
        sequence_reduction="last",
        top_k_outputs=3,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[shap],
        logger=pl.loggers.CSVLogger(output_dir, name="shap_transformer"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TokenModel(), datamodule=TokenData(n_train=n_train))
    summary = json.loads((Path(shap.last_dir) / "summary.json").read_text())
    summary["val_last_acc"] = float(trainer.callback_metrics["val_last_acc"])
    summary["directory"] = shap.last_dir
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    summary = run(args.output_dir, args.epochs)
    print(f"next-token accuracy at the last position: {summary['val_last_acc']:.2f}")
    print(f"explainer: {summary['explainer']} at `{summary['embedding_layer']}`")
    worst = max(summary["additivity"]["relative_to_output_std"])
    print(f"additivity error: {100 * worst:.3g} % of std(f)")
    for out in summary["outputs"]:
        tops = ", ".join(f"{t['name']} ({t['mean_abs_shap']:.3g})" for t in out["top_features"][:3])
        print(f"{out['name']}: top positions {tops}")
    print(f"token renderings: {Path(summary['directory']) / 'tokens.md'}")


if __name__ == "__main__":
    main()
