"""The ``lightning-sustain`` command line (also ``python -m lightning_sustain``).

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands with our
callbacks addressable by short class name (``--trainer.callbacks+=EnergyMonitor``), our
strategy by its registered name (``--trainer.strategy=sustain_ddp``) and our DataModule
as a data class (``--data=EncryptedShardDataModule``). ``keygen``, ``encrypt``,
``verify``, ``rotate-key``, ``report`` and ``restore-limits`` are plain tools.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch.cli import LightningCLI

logger = logging.getLogger(__name__)

SHARD_COMMANDS = ("keygen", "encrypt", "verify", "rotate-key", "audit")
TOOL_COMMANDS = (*SHARD_COMMANDS, "report", "restore-limits")
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

# Modules imported before parsing so jsonargparse can resolve our classes by short name.
_PLUGIN_MODULES = (
    "lightning_sustain.callbacks.energy_monitor",
    "lightning_sustain.callbacks.power_budget",
    "lightning_sustain.callbacks.energy_budget",
    "lightning_sustain.callbacks.shap_summary",
    "lightning_sustain.strategies.sustain_ddp",
    "lightning_sustain.data.datamodule",
)


def import_plugins() -> None:
    """Import every plugin module so LightningCLI knows our classes by short name."""
    for name in _PLUGIN_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # pragma: no cover - a broken install
            logger.warning("lightning_sustain plugin %s could not be imported: %s", name, exc)


class SustainCLI(LightningCLI):
    """LightningCLI with lightning_sustain's plugins registered.

    Any LightningModule and LightningDataModule importable by class path can be used
    (``--model=my_pkg.MyModel``), as with ``LightningCLI(subclass_mode_model=True)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import_plugins()
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)


def _restore_limits_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-sustain restore-limits",
        description="Release GPU power caps whose owner process no longer runs (from this "
        "host's journal), showing what is restored and whose cap it was; with --all, also "
        "lift the caps of live owners and reset every GPU to its default limit.",
    )
    parser.add_argument(
        "--all", action="store_true", help="reset every GPU to its default, live owners too"
    )
    args = parser.parse_args(list(argv))
    from lightning_sustain.budget.limits import journal_entries, journal_path, reap_dead_owners
    from lightning_sustain.energy.errors import EnergyMeasurementError, PowerLimitError
    from lightning_sustain.energy.nvml import NvmlGpu, nvml_init, nvml_shutdown

    try:
        pynvml = nvml_init()
        count = pynvml.nvmlDeviceGetCount()
        nvml_shutdown()
        gpus = [NvmlGpu(i) for i in range(count)]
    except EnergyMeasurementError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"journal: {journal_path()}")
    changed = 0
    try:
        for result in reap_dead_owners(gpus):
            changed += 1
            owners = ", ".join(o.describe() for o in result.owners)
            what = "its original limit" if result.original else "the lowest live cap"
            print(
                f"{result.uuid}: set to {result.limit_w:.0f} W ({what}); cap was held by "
                f"{owners}, which no longer runs"
            )
        live = journal_entries()
        for gpu in gpus:
            entry = live.get(gpu.uuid)
            if entry is None:
                continue
            owners = ", ".join(o.describe() for o in entry["owners"])
            if not args.all:
                print(
                    f"{gpu.uuid}: capped at {gpu.power_limit_w():.0f} W by live {owners}: "
                    "left alone (use --all to lift it)"
                )
        if args.all:
            from lightning_sustain.budget.limits import forget_owners

            for gpu in gpus:
                entry = live.get(gpu.uuid)
                default_w = gpu.default_power_limit_w()
                gpu.set_power_limit_w(default_w)
                changed += 1
                whose = (
                    f"; lifted the caps of {', '.join(o.describe() for o in entry['owners'])}"
                    if entry
                    else ""
                )
                print(f"{gpu.uuid}: set to its default {default_w:.0f} W{whose}")
            forget_owners([gpu.uuid for gpu in gpus])
    except PowerLimitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for gpu in gpus:
            gpu.close()
    print(f"restored {changed} GPU power limit(s)")
    return 0


def _tool(name: str) -> Callable[[list[str]], int]:
    if name in SHARD_COMMANDS:
        from lightning_sustain.data.commands import main as shard_main

        return lambda argv: shard_main([name, *argv])
    if name == "report":
        from lightning_sustain.report.builder import report_main

        return report_main
    return _restore_limits_main


def _usage() -> str:
    return (
        "usage: lightning-sustain {fit,validate,test,predict} [LightningCLI options]\n"
        "       lightning-sustain {keygen,encrypt,verify,rotate-key} [options]\n"
        "       lightning-sustain audit {show,verify} --root DIR [options]\n"
        "       lightning-sustain report RUN_DIR [options]\n"
        "       lightning-sustain restore-limits [--all]\n\n"
        "Add --help after a command for its options."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (tools) or 0 after a Lightning run."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        print("\nLightning subcommands:", ", ".join(LIGHTNING_COMMANDS))
        print("Tools:", ", ".join(TOOL_COMMANDS))
        return 0 if args else 2
    if args[0] in TOOL_COMMANDS:
        return int(_tool(args[0])(args[1:]) or 0)
    SustainCLI(args=args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
