"""Audit appender run in spawned processes (imports only the audit module, so it starts fast)."""

from __future__ import annotations

import os

from lightning_sustain.data.audit import append_record


def appender(path, key, ds_id, n, barrier):
    """Wait for the others, then append ``n`` records."""
    barrier.wait(timeout=600)
    for i in range(n):
        append_record(path, {"action": "read", "dataset_id": ds_id, "samples": i,
                             "worker": os.getpid()}, key, fsync=False)
