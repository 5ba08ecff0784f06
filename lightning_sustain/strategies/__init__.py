"""Lightning strategies for the Trainer and Fabric, and the registration of their names.

:class:`SustainDDPStrategy` (Trainer) and :class:`FabricSustainDDPStrategy` (Fabric) are
both ``sustain_ddp`` in their registries.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FabricSustainDDPStrategy", "SustainDDPStrategy", "register_strategies"]


def register_strategies() -> None:
    """Register ``sustain_ddp`` and ``sustain_ddp_spawn`` in Lightning's strategy registries.

    Idempotent: names already registered are left as they are. Called by
    ``import lightning_sustain`` so that ``Trainer(strategy="sustain_ddp")``,
    ``--trainer.strategy=sustain_ddp`` and ``Fabric(strategy="sustain_ddp")`` work.
    """
    from lightning.fabric.strategies import STRATEGY_REGISTRY as FABRIC_STRATEGY_REGISTRY
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_sustain.strategies.fabric_sustain_ddp import FabricSustainDDPStrategy
    from lightning_sustain.strategies.sustain_ddp import SustainDDPStrategy

    SustainDDPStrategy.register_strategies(StrategyRegistry)
    FabricSustainDDPStrategy.register_strategies(FABRIC_STRATEGY_REGISTRY)


def __getattr__(name: str) -> Any:
    if name == "FabricSustainDDPStrategy":
        from lightning_sustain.strategies.fabric_sustain_ddp import FabricSustainDDPStrategy

        return FabricSustainDDPStrategy
    if name == "SustainDDPStrategy":
        from lightning_sustain.strategies.sustain_ddp import SustainDDPStrategy

        return SustainDDPStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
