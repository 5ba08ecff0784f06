"""Encrypted shards: format, keys, writer and ``EncryptedShardDataModule``.

Public names are imported lazily so that ``import lightning_sustain.data`` does not pull
in Lightning until the DataModule is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "EncryptedShardDataModule": "lightning_sustain.data.datamodule",
    "EncryptedShardDataset": "lightning_sustain.data.datamodule",
    "KeyProvider": "lightning_sustain.data.keys",
    "KeyReference": "lightning_sustain.data.keys",
    "MasterKey": "lightning_sustain.data.keys",
    "generate_key": "lightning_sustain.data.keys",
    "write_key_file": "lightning_sustain.data.keys",
    "rotate_key": "lightning_sustain.data.keys",
    "ShardWriter": "lightning_sustain.data.writer",
    "WriteResult": "lightning_sustain.data.writer",
    "write_arrays": "lightning_sustain.data.writer",
    "write_csv": "lightning_sustain.data.writer",
    "write_npz": "lightning_sustain.data.writer",
    "write_torch_dataset": "lightning_sustain.data.writer",
    "SplitReader": "lightning_sustain.data.reader",
    "open_split": "lightning_sustain.data.reader",
    "verify_dataset": "lightning_sustain.data.reader",
    "VerifyReport": "lightning_sustain.data.reader",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        if name in ("errors", "codec", "format", "keys", "reader", "writer", "datamodule",
                    "commands", "storage"):
            return importlib.import_module(f"lightning_sustain.data.{name}")
        raise AttributeError(f"module 'lightning_sustain.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
