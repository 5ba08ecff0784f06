"""Shared fixtures: the simulated NVML device driven through the real pynvml bindings."""

from __future__ import annotations

import pynvml
import pytest

from lightning_sustain.testing import SimulatedNVML


@pytest.fixture
def simulated_nvml():
    """Factory: install a SimulatedNVML (and pynvml.nvmlInit); undone at teardown."""
    created: list[SimulatedNVML] = []

    def factory(devices=1, **kwargs) -> SimulatedNVML:
        sim = SimulatedNVML(devices, **kwargs).install()
        created.append(sim)
        pynvml.nvmlInit()
        return sim

    yield factory
    for sim in reversed(created):
        pynvml.nvmlShutdown()
        sim.uninstall()


@pytest.fixture
def sim(simulated_nvml) -> SimulatedNVML:
    """Two default simulated H100s, 50 ms counter period, pynvml initialised."""
    return simulated_nvml(2, counter_period_s=0.05)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Undo every environment change a test makes.

    In-process DDP runs set MASTER_PORT, LOCAL_RANK, WORLD_SIZE and friends; left behind,
    a later test's DDP subprocess believes it is already a launched rank and waits forever
    for peers.
    """
    import os
    import signal

    saved = dict(os.environ)
    # Lightning's KeyboardInterrupt path sets SIGINT to SIG_IGN in the process (and our
    # guards install SIGTERM handlers); a child started later would inherit an ignored
    # SIGINT, so a test sending Ctrl-C to a job would see it run to the end
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        if signal.getsignal(sig) is not handler and handler is not None:
            signal.signal(sig, handler)
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
