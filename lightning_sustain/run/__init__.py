"""The measuring core: one run object for every loop (no Lightning import).

- :mod:`~lightning_sustain.run.energy_run`: :class:`EnergyRun` — step boundaries (``step``),
  stages and phases, log intervals, trace, summary writing, checkpoint state.
- :mod:`~lightning_sustain.run.summary`: per-rank records -> the job summary.
- :mod:`~lightning_sustain.run.distributed`: rank detection, cross-rank sums.
- :mod:`~lightning_sustain.run.devices`: which devices a process measures.
- :mod:`~lightning_sustain.run.carbon_time`: time-resolved CO2e of the run's energy curve.
"""

from lightning_sustain.run.distributed import RankInfo
from lightning_sustain.run.energy_run import METRIC_PREFIX, EnergyRun

__all__ = ["METRIC_PREFIX", "EnergyRun", "RankInfo"]
