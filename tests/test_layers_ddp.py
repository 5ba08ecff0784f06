"""Layers of the DDP and power-cap code: strategies import no callback, the core no Lightning.

An AST scan of every import (module level and inside functions, absolute and relative),
so an import added inside a method is caught as well as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_sustain"
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")


def imported_modules(path: Path, package: str | None = None) -> list[str]:
    """Every module a file imports, resolved to absolute dotted names.

    ``package`` is the file's package (default: from its place under the repository).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if package is None:
        package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                names.append(str(node.args[0].value))
    return names


@pytest.mark.parametrize(
    "source,expected",
    [
        ("from lightning_sustain.callbacks.power_budget import PowerBudget", True),
        ("def f():\n    from lightning_sustain.callbacks import EnergyMonitor", True),
        ("from ..callbacks import _devices", True),
        ("import lightning_sustain.callbacks._devices", True),
        ("from lightning_sustain.run.devices import open_rank_devices", False),
    ],
)
def test_scan_finds_callback_imports_anywhere(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    names = imported_modules(path, package="lightning_sustain.strategies")
    assert any(n.startswith("lightning_sustain.callbacks") for n in names) is expected


def test_strategies_import_no_callback():
    files = sorted((PACKAGE / "strategies").glob("*.py"))
    assert {p.name for p in files} >= {"sustain_ddp.py", "fabric_sustain_ddp.py"}
    offenders = {
        p.name: [n for n in imported_modules(p) if n.startswith("lightning_sustain.callbacks")]
        for p in files
    }
    assert not any(offenders.values()), offenders


@pytest.mark.parametrize(
    "module",
    [
        "budget/power_cap.py",
        "budget/rank_power.py",
        "run/ddp_accounting.py",
        "run/ddp_summary.py",
        "run/wait_clock.py",
    ],
)
def test_core_modules_import_neither_lightning_nor_callbacks(module):
    names = imported_modules(PACKAGE / module)
    assert names, "the scan read the file"
    bad = [
        n
        for n in names
        if n.split(".")[0] in LIGHTNING
        or n.startswith(("lightning_sustain.callbacks", "lightning_sustain.strategies"))
    ]
    assert not bad, (module, bad)


def test_budget_layer_imports_no_run_layer():
    # data flows one way: the run layer uses budget/, never the reverse
    for path in sorted((PACKAGE / "budget").glob("*.py")):
        bad = [n for n in imported_modules(path) if n.startswith("lightning_sustain.run")]
        assert not bad, (path.name, bad)
