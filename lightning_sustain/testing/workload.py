"""A callback that keeps a simulated GPU busy during training steps (demos and CI).

On a machine without an NVIDIA GPU, a model trained on CPU leaves the simulated GPU idle;
``SimulatedGpuLoad`` gives it a workload: during every training step the simulated
device of this process's local rank draws its busy power for ``busy_s`` seconds (stretched
by a power cap exactly as :meth:`SimulatedNVML.busy` models it). Everything measured from it
is labelled simulated.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_sustain.energy.estimate import validate_positive
from lightning_sustain.testing.simulated_nvml import SimulatedNVML


class SimulatedGpuLoad(Callback):
    """Drive the simulated GPU's load from the training loop.

    Args:
        busy_s: nominal simulated GPU time per training step, in seconds (at full speed,
            uncapped).
        index: simulated device index; ``None`` uses the process's local rank.

    Raises:
        ValueError: ``busy_s`` is negative or not a number.
    """

    def __init__(self, busy_s: float = 0.005, index: int | None = None) -> None:
        super().__init__()
        self.busy_s = validate_positive("busy_s", busy_s, allow_zero=True)
        self.index = index
        self._sim: SimulatedNVML | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._sim is None:
            self._sim = SimulatedNVML.attach()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._sim is not None and self.busy_s > 0:
            index = trainer.local_rank if self.index is None else self.index
            self._sim.busy(index, self.busy_s)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._sim is not None:
            self._sim.close()
            self._sim = None
