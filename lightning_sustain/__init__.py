"""lightning_sustain: measurable, governable PyTorch Lightning training.

Public names are imported lazily. The one import-time side effect is registering the
``sustain_ddp`` and ``sustain_ddp_spawn`` strategy names with Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY_EXPORTS: dict[str, str] = {
    "EnergyMonitor": "lightning_sustain.callbacks.energy_monitor",
    "EnergyMeter": "lightning_sustain.energy.meter",
    "EnergyRun": "lightning_sustain.run.energy_run",
    "FabricEnergyMonitor": "lightning_sustain.fabric",
    "EncryptedShardDataModule": "lightning_sustain.data.datamodule",
    "ShardWriter": "lightning_sustain.data.writer",
    "KeyProvider": "lightning_sustain.data.keys",
    "KeyReference": "lightning_sustain.data.keys",
    "SustainDDPStrategy": "lightning_sustain.strategies.sustain_ddp",
    "FabricSustainDDPStrategy": "lightning_sustain.strategies.fabric_sustain_ddp",
    "PowerCapController": "lightning_sustain.budget.power_cap",
    "PowerBudget": "lightning_sustain.callbacks.power_budget",
    "EnergyBudget": "lightning_sustain.callbacks.energy_budget",
    "BudgetExceeded": "lightning_sustain.callbacks.energy_budget",
    "ShapSummary": "lightning_sustain.callbacks.shap_summary",
    "PowerLimitOptimizer": "lightning_sustain.callbacks.power_limit_optimizer",
    "SoftwareThrottle": "lightning_sustain.budget.throttle",
    "PowerLimitGuard": "lightning_sustain.budget.limits",
    "CarbonAwareController": "lightning_sustain.callbacks.carbon_aware",
    "TimeSeriesIntensity": "lightning_sustain.energy.intensity",
    "build_report": "lightning_sustain.report.builder",
    "ReportResult": "lightning_sustain.report.builder",
    "ReportInputError": "lightning_sustain.report.builder",
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


def _register_strategies() -> None:
    # The one import-time side effect: Trainer(strategy="sustain_ddp") must work after
    # `import lightning_sustain`.
    from lightning_sustain.strategies import register_strategies

    register_strategies()


_register_strategies()
