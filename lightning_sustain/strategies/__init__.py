"""Lightning strategies: :class:`SustainDDPStrategy` and the registration of its names."""

from __future__ import annotations

from typing import Any

__all__ = ["SustainDDPStrategy", "register_strategies"]


def register_strategies() -> None:
    """Register ``sustain_ddp`` and ``sustain_ddp_spawn`` in Lightning's strategy registry.

    Idempotent: names already registered are left as they are. Called by
    ``import lightning_sustain`` so that ``Trainer(strategy="sustain_ddp")`` and
    ``--trainer.strategy=sustain_ddp`` work.
    """
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_sustain.strategies.sustain_ddp import SustainDDPStrategy

    SustainDDPStrategy.register_strategies(StrategyRegistry)


def __getattr__(name: str) -> Any:
    if name == "SustainDDPStrategy":
        from lightning_sustain.strategies.sustain_ddp import SustainDDPStrategy

        return SustainDDPStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
