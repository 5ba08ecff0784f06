"""Encrypt scikit-learn's bundled breast-cancer data into train/val shards.

    python examples/tabular/prepare_data.py --root DIR --key-file KEY

The features are standardised with the training split's statistics and written straight
from memory: no plaintext copy ever touches the disk.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.datasets import load_breast_cancer

from lightning_sustain.data.keys import KeyReference
from lightning_sustain.data.writer import write_arrays


def encrypt_breast_cancer(root: str, key_file: str, seed: int = 0) -> dict[str, int]:
    """Write ``train`` and ``val`` splits; returns the sample count per split."""
    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    train, val = order[:cut], order[cut:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    key = KeyReference(file=key_file)
    names = [str(n) for n in data.feature_names]
    counts = {}
    for split, idx in (("train", train), ("val", val)):
        write_arrays(
            root, split, {"x": x[idx], "y": y[idx]}, key, feature_names=names, progress=False
        )
        counts[split] = len(idx)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--key-file", required=True)
    args = parser.parse_args()
    print(encrypt_breast_cancer(args.root, args.key_file))


if __name__ == "__main__":
    main()
