"""Runs a script with the simulated GPU's ground truth sampled at every EnergyRun stage.

Used by the multi-process tests: ``python tests/truth_driver.py ARGS`` with
``DRIVEN_SCRIPT`` (the script to run) and ``TRUTH_DIR`` (where each process writes
``truth_<pid>.json``) in the environment. Child processes a launcher starts re-run this
driver (it stays ``sys.argv[0]``), so every rank is sampled. The samples are taken right
after a stage opens and right before it closes, on the device of the process's local rank.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

from lightning_sustain.run.energy_run import EnergyRun
from lightning_sustain.testing import SimulatedNVML

SIM = SimulatedNVML.attach()
EVENTS: list[dict] = []
_start, _end = EnergyRun.start_stage, EnergyRun.end_stage


def start_stage(self, stage="fit"):
    _start(self, stage)
    local = self.ranks.local_rank if self.ranks else 0
    EVENTS.append({"stage": stage, "rank": self.ranks.global_rank if self.ranks else 0,
                   "start_j": SIM.ground_truth_energy_j(local)})  # fmt: skip


def end_stage(self, *args, **kwargs):
    if self.current_stage is not None and EVENTS:
        local = self.ranks.local_rank if self.ranks else 0
        EVENTS[-1]["end_j"] = SIM.ground_truth_energy_j(local)
    return _end(self, *args, **kwargs)


def dump():
    path = os.path.join(os.environ["TRUTH_DIR"], f"truth_{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(EVENTS, f)


EnergyRun.start_stage = start_stage
EnergyRun.end_stage = end_stage
atexit.register(dump)
# exec, not runpy.run_path: runpy rewrites sys.argv[0], and launchers that re-run
# sys.argv for the other ranks (Lightning's, Fabric's) must re-run this driver
SCRIPT = os.path.abspath(os.environ["DRIVEN_SCRIPT"])
sys.path.insert(0, os.path.dirname(SCRIPT))
with open(SCRIPT, encoding="utf-8") as f:
    CODE = compile(f.read(), SCRIPT, "exec")
exec(CODE, {"__name__": "__main__", "__file__": SCRIPT})
