"""Lightning's child-process observer, restoring power limits before it kills a DDP job.

Shared by the Trainer's and Fabric's ``sustain_ddp`` launchers (both launch ranks as
subprocesses and watch them with Lightning's observer).
"""

from __future__ import annotations

import logging
import os

from lightning_sustain._compat import ChildProcessObserver as _ChildProcessObserver
from lightning_sustain.run.ddp_accounting import restore_node_limits

logger = logging.getLogger(__name__)


class RestoringProcessObserver(_ChildProcessObserver):
    """Lightning's child-process observer, restoring power limits before it kills the job.

    When a rank dies, Lightning's observer SIGKILLs every other rank and the launching
    process (a rank blocked in a collective would never see a gentler signal). Here the
    launching rank first restores its own limits, then kills and reaps the other ranks and
    restores the limits they journaled, and only then kills itself.
    """

    def _terminate_all(self) -> None:
        from lightning_sustain.budget import limits as _limits

        try:
            _limits._restore_all_guards()
        except Exception as exc:  # pragma: no cover - best effort before SIGKILL
            logger.warning("Restoring power limits before terminating failed: %s", exc)
        for proc in self._child_processes:
            proc.send_signal(self._termination_signal)
        for proc in self._child_processes:
            try:
                proc.wait(timeout=10)
            except Exception:  # pragma: no cover - a process that will not die
                continue
        restore_node_limits()
        os.kill(self._main_pid, self._termination_signal)
