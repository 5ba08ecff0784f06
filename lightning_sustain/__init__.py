"""lightning_sustain: measurable, governable PyTorch Lightning training.

Public names are imported lazily so that ``import lightning_sustain`` stays cheap and
``lightning_sustain.energy`` never pulls in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY_EXPORTS: dict[str, str] = {
    "EnergyMonitor": "lightning_sustain.callbacks.energy_monitor",
    "EnergyMeter": "lightning_sustain.energy.meter",
    "EncryptedShardDataModule": "lightning_sustain.data.datamodule",
    "ShardWriter": "lightning_sustain.data.writer",
    "KeyProvider": "lightning_sustain.data.keys",
    "KeyReference": "lightning_sustain.data.keys",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lightning_sustain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
