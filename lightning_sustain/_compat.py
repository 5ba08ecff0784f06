"""The one module that touches private Lightning and SHAP names.

Lightning's private names (``lightning.*._name``) and SHAP's private modules
(``shap.explainers._deep``) change without notice between releases. Every use of them in
this package goes through this module, so a Lightning or SHAP upgrade is checked in one
place (``tests/test_compat.py``, ``make test-compat``), and nothing else in the package
imports a private name (an AST scan in the same test enforces it).

Names are resolved lazily, on first access (``from lightning_sustain._compat import X``
works as usual): importing this module imports neither Lightning nor SHAP, so the
Lightning-free layers (``energy/``, ``budget/``, ``explain/``) may use it.

Each name lists, in order, where it is looked up; when none is found, a fallback of ours
with the same contract is used where one can be written (a copy of a small function, or
the public API it wraps), and otherwise an :class:`ImportError` names the versions this
package supports. :data:`PRIVATE_MEMBERS` lists the private *members* of public Lightning
classes that the package overrides or reads (``DDPStrategy._configure_launcher`` ...), so
the compatibility test checks them too.

Names that have a public replacement use it directly and are kept here only so the call
sites stay unchanged:

- ``register_ddp_comm_hook``: ``DistributedDataParallel.register_comm_hook`` (torch public
  API) instead of ``lightning.pytorch.overrides.distributed._register_ddp_comm_hook``.
- ``can_stop_early``: the fit loop's public ``min_epochs``/``min_steps`` and progress
  counters instead of ``trainer.fit_loop._can_stop_early``.
- ``StrategyRegistryType``: the class of the public ``StrategyRegistry`` instance instead
  of the private ``_StrategyRegistry`` class.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    import lightning.pytorch as pl
    from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

SUPPORTED = "lightning>=2.4,<3 (tested by `make test-compat` on the oldest and newest 2.x)"

# name here -> where it is looked up, in order ("module:attribute")
_LOCATIONS: dict[str, tuple[str, ...]] = {
    # the thread that SIGKILLs a DDP job when one of its child processes dies
    "ChildProcessObserver": (
        "lightning.fabric.strategies.launchers.subprocess_script:_ChildProcessObserver",
    ),
    # the Trainer's DDP launchers (subclassed by SustainDDPStrategy)
    "SubprocessScriptLauncher": (
        "lightning.pytorch.strategies.launchers.subprocess_script:_SubprocessScriptLauncher",
        "lightning.pytorch.strategies.launchers:_SubprocessScriptLauncher",
    ),
    "MultiProcessingLauncher": (
        "lightning.pytorch.strategies.launchers.multiprocessing:_MultiProcessingLauncher",
        "lightning.pytorch.strategies.launchers:_MultiProcessingLauncher",
    ),
    # Fabric's DDP subprocess launcher (subclassed by FabricSustainDDPStrategy's launcher)
    "FabricSubprocessScriptLauncher": (
        "lightning.fabric.strategies.launchers.subprocess_script:_SubprocessScriptLauncher",
        "lightning.fabric.strategies.launchers:_SubprocessScriptLauncher",
    ),
    # OMP_NUM_THREADS / torch threads per process, as Lightning's launchers set them
    "set_num_threads_if_needed": (
        "lightning.fabric.utilities.distributed:_set_num_threads_if_needed",
    ),
    # (no SHAP private name is used any more: explain/deeplift.py carries its own DeepLIFT
    # rules, checked against shap.DeepExplainer in tests/test_shap_explain.py)
}

# private members of public (or above) classes that the package overrides or reads;
# "class name in this module or module:Class" -> member names
PRIVATE_MEMBERS: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.strategies:DDPStrategy": (
        "_configure_launcher",  # overridden: our launchers restore power limits
        "_register_ddp_hooks",  # overridden: the wait clock's comm hook
        "_start_method",
        "_launcher",
        "_ddp_comm_hook",
        "_ddp_comm_state",
        "_ddp_comm_wrapper",
    ),
    "ChildProcessObserver": (
        "_terminate_all",
        "_child_processes",
        "_termination_signal",
        "_main_pid",
    ),
    "SubprocessScriptLauncher": ("_call_children_scripts", "procs", "cluster_environment"),
    "FabricSubprocessScriptLauncher": ("_call_children_scripts", "procs", "cluster_environment"),
    "lightning.fabric.strategies:DDPStrategy": (
        "_configure_launcher",  # overridden: the launcher's observer restores power limits
        "_launcher",
        "_start_method",
    ),
    # _wrapping_function: overridden, so a spawned rank's failure reaches the strategy
    "MultiProcessingLauncher": ("procs", "_wrapping_function", "_strategy"),
}


@dataclass(frozen=True)
class Resolution:
    """Where a compatibility name came from.

    Attributes:
        name: the name in this module.
        source: ``"module:attribute"`` it was found at, ``"public: ..."`` for a name
            built from public API, or ``"fallback"`` for ours.
        value: the object.
    """

    name: str
    source: str
    value: Any


def _lookup(location: str) -> Any:
    module_name, _, attribute = location.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute)


# -- fallbacks: ours, same contract --------------------------------------------------------


def _set_num_threads_if_needed(num_processes: int = 1) -> None:
    """Give each of ``num_processes`` local processes an equal share of the CPUs.

    Like Lightning's launchers: only when ``OMP_NUM_THREADS`` is unset, and it is set after.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    num_threads = max(1, (cpus or 1) // num_processes)
    torch.set_num_threads(num_threads)
    os.environ["OMP_NUM_THREADS"] = str(num_threads)


class _FallbackChildProcessObserver(threading.Thread):
    """Watches the child ranks of a DDP job; kills the whole job when one of them failed.

    Same constructor and members as Lightning's private observer (``_child_processes``,
    ``_main_pid``, ``_termination_signal``, ``_terminate_all``), used where Lightning no
    longer has it.
    """

    def __init__(
        self, main_pid: int, child_processes: list[subprocess.Popen], sleep_period: float = 5
    ) -> None:
        super().__init__(daemon=True, name="child-process-observer")
        self._main_pid = main_pid
        self._child_processes = child_processes
        self._sleep_period = sleep_period
        # SIGTERM does not stop a process blocked in a collective
        self._termination_signal = signal.SIGTERM if sys.platform == "win32" else signal.SIGKILL
        self._finished = False

    def run(self) -> None:
        """Poll the children until all succeeded or one failed."""
        while not self._finished:
            time.sleep(self._sleep_period)
            self._finished = self._run()

    def _run(self) -> bool:
        """One pass over the children; True when there is nothing left to watch."""
        for proc in self._child_processes:
            proc.poll()
        codes = [proc.returncode for proc in self._child_processes]
        if all(code == 0 for code in codes):
            return True
        for rank, proc in enumerate(self._child_processes, start=1):
            if proc.returncode:
                logger.info(
                    "[rank: %d] Child process with PID %d terminated with code %d; terminating "
                    "all other processes.",
                    rank,
                    proc.pid,
                    proc.returncode,
                )
                self._terminate_all()
                return True
        return False

    def _terminate_all(self) -> None:
        """Kill every child and the launching process."""
        for proc in self._child_processes:
            proc.send_signal(self._termination_signal)
        os.kill(self._main_pid, self._termination_signal)


def _strategy_registry_type() -> type:
    from lightning.pytorch.strategies import StrategyRegistry

    return type(StrategyRegistry)


# names built from public API only (no private lookup): name -> (how, factory)
_PUBLIC: dict[str, tuple[str, Callable[[], Any]]] = {
    # the registry class, for the type of Strategy.register_strategies(cls, registry)
    "StrategyRegistryType": (
        "public: type(lightning.pytorch.strategies.StrategyRegistry)",
        _strategy_registry_type,
    ),
}

_FALLBACKS: dict[str, Callable[[], Any]] = {
    "ChildProcessObserver": lambda: _FallbackChildProcessObserver,
    "set_num_threads_if_needed": lambda: _set_num_threads_if_needed,
}


# -- public replacements of private Lightning helpers ------------------------------------


def register_ddp_comm_hook(
    model: DistributedDataParallel,
    ddp_comm_state: Optional[object] = None,
    ddp_comm_hook: Optional[Callable] = None,
    ddp_comm_wrapper: Optional[Callable] = None,
) -> None:
    """Register a DDP communication hook, optionally wrapped (e.g. fp16 compression).

    The same contract as Lightning's private ``_register_ddp_comm_hook``, on torch's public
    :meth:`~torch.nn.parallel.DistributedDataParallel.register_comm_hook`.

    Args:
        model: the wrapped model.
        ddp_comm_state: the hook's state (PowerSGD state, ...), or None.
        ddp_comm_hook: ``hook(state, bucket) -> Future``; nothing is registered when None.
        ddp_comm_wrapper: applied to the hook first when given.
    """
    if ddp_comm_hook is None:
        return
    hook = ddp_comm_wrapper(ddp_comm_hook) if ddp_comm_wrapper is not None else ddp_comm_hook
    logger.debug("Registering DDP comm hook %s.", getattr(hook, "__qualname__", hook))
    model.register_comm_hook(state=ddp_comm_state, hook=hook)


def can_stop_early(trainer: pl.Trainer) -> bool:
    """Whether ``trainer.should_stop`` would end fit now (``min_epochs``/``min_steps`` met).

    Lightning's fit loop decides this in a private property; this reads the same public
    counters: the processed epochs against ``min_epochs`` and the global step against
    ``min_steps``.

    Args:
        trainer: the running Trainer.

    Returns:
        True when neither ``min_epochs`` nor ``min_steps`` holds fit open.
    """
    loop = trainer.fit_loop
    min_epochs = loop.min_epochs
    min_steps = loop.min_steps
    met_epochs = loop.epoch_progress.current.processed >= min_epochs if min_epochs else True
    met_steps = trainer.global_step >= min_steps if min_steps else True
    return bool(met_epochs and met_steps)


# -- resolution ------------------------------------------------------------------------------


def resolve(name: str) -> Resolution:
    """Find a compatibility name in the installed Lightning/SHAP, else our fallback.

    Args:
        name: a key of the compatibility table (see :data:`NAMES`).

    Returns:
        Where it came from and the object.

    Raises:
        ImportError: neither the installed packages nor this module provide it; the
            message names the supported versions.
        KeyError: ``name`` is not a compatibility name.
    """
    if name in _PUBLIC:
        how, factory = _PUBLIC[name]
        return Resolution(name, how, factory())
    errors: list[str] = []
    for location in _LOCATIONS[name]:
        try:
            return Resolution(name, location, _lookup(location))
        except (ImportError, AttributeError) as exc:
            errors.append(f"{location}: {exc}")
    fallback = _FALLBACKS.get(name)
    if fallback is not None:
        logger.debug("Using lightning_sustain's own %s (%s).", name, "; ".join(errors))
        return Resolution(name, "fallback", fallback())
    raise ImportError(
        f"lightning_sustain needs {name} from Lightning/SHAP and found it nowhere "
        f"({'; '.join(errors)}). Supported: {SUPPORTED}; install a supported version, or "
        "report the version you use."
    )


NAMES: tuple[str, ...] = (*_LOCATIONS, *_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in NAMES:
        value = resolve(name).value
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *NAMES})
