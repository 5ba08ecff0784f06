"""lightning_sustain._compat: every private Lightning/SHAP name resolves, and none leaks out.

Part of ``make test-compat``, which runs this file against the oldest and the newest
Lightning 2.x we claim.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning
import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sustain import _compat
from tests.helpers import TinyClassifier, loader

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("lightning_sustain", "benchmarks", "examples", "tests")
# the two files allowed to name private Lightning/SHAP objects
COMPAT_FILE = ROOT / "lightning_sustain" / "_compat.py"
ALLOWED = {COMPAT_FILE, Path(__file__).resolve()}
PRIVATE_PACKAGES = ("lightning", "pytorch_lightning", "lightning_fabric", "shap")
# roots whose private attributes are Lightning's (trainer.fit_loop._x, strategy._x, ...)
LIGHTNING_OBJECTS = {"trainer", "fabric", "strategy", "fit_loop", "accelerator_connector"}


# -- every name resolves ------------------------------------------------------------------


@pytest.mark.parametrize("name", _compat.NAMES)
def test_every_compat_name_resolves_from_the_installed_packages(name: str) -> None:
    resolution = _compat.resolve(name)
    assert resolution.value is not None
    # a fallback works, but in the versions we claim the name must still be where we
    # look: a move means the table (and the fallback's contract) needs a look
    assert resolution.source != "fallback", (
        f"lightning {lightning.__version__} no longer has {name} at {_compat._LOCATIONS[name]}"
    )
    if not resolution.source.startswith("public:"):
        assert resolution.source in _compat._LOCATIONS[name]
    assert getattr(_compat, name) is resolution.value


def _instance(owner: str) -> object:
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    if owner == "lightning.fabric.strategies:DDPStrategy":
        from lightning.fabric.strategies import DDPStrategy as FabricDDPStrategy

        return FabricDDPStrategy(process_group_backend="gloo")
    if owner == "FabricSubprocessScriptLauncher":
        return _compat.FabricSubprocessScriptLauncher(LightningEnvironment(), 2, 1)
    if owner.endswith(":DDPStrategy"):
        return DDPStrategy(process_group_backend="gloo")
    if owner == "ChildProcessObserver":
        return _compat.ChildProcessObserver(main_pid=os.getpid(), child_processes=[])
    if owner == "SubprocessScriptLauncher":
        return _compat.SubprocessScriptLauncher(LightningEnvironment(), 2, 1)
    if owner == "MultiProcessingLauncher":
        return _compat.MultiProcessingLauncher(DDPStrategy(), start_method="spawn")
    raise AssertionError(f"no instance recipe for {owner}")


@pytest.mark.parametrize("owner", list(_compat.PRIVATE_MEMBERS))
def test_private_members_we_override_or_read_exist(owner: str) -> None:
    obj = _instance(owner)
    missing = [m for m in _compat.PRIVATE_MEMBERS[owner] if not hasattr(obj, m)]
    assert not missing, f"lightning {lightning.__version__}: {owner} lacks {missing}"


def test_unknown_name_is_an_attribute_error_and_missing_name_a_clear_import_error(
    monkeypatch,
) -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _compat.nope  # noqa: B018
    monkeypatch.setitem(
        _compat._LOCATIONS, "SubprocessScriptLauncher", ("lightning.nowhere:_Gone",)
    )
    with pytest.raises(ImportError, match=r"SubprocessScriptLauncher.*lightning>=2\.4"):
        _compat.resolve("SubprocessScriptLauncher")


# -- fallbacks keep the contract of what they replace ----------------------------------------


def _forced_fallback(monkeypatch, name: str) -> object:
    monkeypatch.setitem(_compat._LOCATIONS, name, ("lightning.nowhere:_Gone",))
    resolution = _compat.resolve(name)
    assert resolution.source == "fallback"
    return resolution.value


def test_registry_type_from_public_api_is_lightnings_registry_class() -> None:
    from lightning.fabric.strategies import registry
    from lightning.pytorch.strategies import StrategyRegistry

    resolution = _compat.resolve("StrategyRegistryType")
    assert resolution.source.startswith("public:")
    assert resolution.value is registry._StrategyRegistry
    assert isinstance(StrategyRegistry, resolution.value)


@given(num_processes=st.integers(1, 64), preset=st.one_of(st.none(), st.integers(1, 8)))
@settings(max_examples=30, deadline=None)
def test_thread_fallback_sets_what_lightning_sets(num_processes: int, preset: int | None) -> None:
    lightning_fn = _compat.resolve("set_num_threads_if_needed").value
    threads = torch.get_num_threads()
    saved = os.environ.get("OMP_NUM_THREADS")
    results = []
    try:
        for fn in (lightning_fn, _compat._set_num_threads_if_needed):
            os.environ.pop("OMP_NUM_THREADS", None)
            if preset is not None:
                os.environ["OMP_NUM_THREADS"] = str(preset)
            torch.set_num_threads(threads)
            fn(num_processes=num_processes)
            results.append((os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()))
    finally:
        torch.set_num_threads(threads)
        os.environ.pop("OMP_NUM_THREADS", None)
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved
    assert results[0] == results[1]
    if preset is None:
        assert int(results[1][0]) == max(1, len(os.sched_getaffinity(0)) // num_processes)
    else:
        assert results[1] == (str(preset), threads)
    with pytest.raises(ValueError, match="num_processes"):
        _compat._set_num_threads_if_needed(0)


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _exits(code: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    proc.wait(timeout=30)
    return proc


@pytest.mark.parametrize("which", ["lightning", "fallback"])
def test_observer_kills_the_job_when_a_child_fails_and_only_then(which: str) -> None:
    cls = (
        _compat.resolve("ChildProcessObserver").value
        if which == "lightning"
        else _compat._FallbackChildProcessObserver
    )
    # every child succeeded: done, nothing killed
    ok = [_exits(0), _exits(0)]
    main = _sleeper()  # stands in for the launching process
    try:
        assert cls(main_pid=main.pid, child_processes=ok)._run() is True
        assert main.poll() is None
        # one child still running, none failed: keep watching
        running = _sleeper()
        assert cls(main_pid=main.pid, child_processes=[ok[0], running])._run() is False
        assert main.poll() is None and running.poll() is None
        # one child failed: the other child and the launching process are killed
        failed = _exits(3)
        assert cls(main_pid=main.pid, child_processes=[failed, running])._run() is True
        assert running.wait(timeout=30) == -signal.SIGKILL
        assert main.wait(timeout=30) == -signal.SIGKILL
    finally:
        for proc in (main, locals().get("running")):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_register_ddp_comm_hook_registers_the_wrapped_hook(tmp_path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    calls: list[str] = []

    def hook(state, bucket):
        calls.append(f"hook:{state}")
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    def wrapper(inner):
        def wrapped(state, bucket):
            calls.append("wrapper")
            return inner(state, bucket)

        return wrapped

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        for kwargs, expected in (
            ({"ddp_comm_hook": None}, []),
            ({"ddp_comm_hook": hook, "ddp_comm_state": "s"}, ["hook:s"]),
            (
                {"ddp_comm_hook": hook, "ddp_comm_state": "s", "ddp_comm_wrapper": wrapper},
                ["wrapper", "hook:s"],
            ),
        ):
            calls.clear()
            model = DistributedDataParallel(torch.nn.Linear(4, 2))
            _compat.register_ddp_comm_hook(model, **kwargs)
            model(torch.randn(3, 4)).sum().backward()
            assert calls == expected
    finally:
        dist.destroy_process_group()


class _StopRecorder(pl.Callback):
    """At every batch end: our can_stop_early next to Lightning's own decision."""

    def __init__(self) -> None:
        self.pairs: list[tuple[bool, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        lightnings = "_can" + "_stop_early"  # the private property, read only here
        self.pairs.append((_compat.can_stop_early(trainer), getattr(trainer.fit_loop, lightnings)))


@pytest.mark.parametrize(
    "min_steps,min_epochs", [(None, None), (5, None), (None, 2), (7, 1), (2, 3)]
)
def test_can_stop_early_matches_lightning_at_every_step(tmp_path, min_steps, min_epochs) -> None:
    recorder = _StopRecorder()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=10,
        min_steps=min_steps,
        min_epochs=min_epochs,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyClassifier(), loader(n=96, batch_size=32))  # 3 steps an epoch
    assert len(recorder.pairs) == 10
    assert all(ours == theirs for ours, theirs in recorder.pairs), recorder.pairs
    decisions = [ours for ours, _ in recorder.pairs]
    if min_steps is None and min_epochs is None:
        assert all(decisions)
    else:
        assert not decisions[0] and decisions[-1]


# -- nothing outside _compat imports a private name --------------------------------------------


def private_uses(source: str, objects: bool = True) -> list[str]:
    """Private Lightning/SHAP names a module's source imports or reaches through a module.

    With ``objects``, also private attributes reached through a Lightning object by its
    usual name (``trainer.fit_loop._x``, ``self.trainer.strategy._y``): a heuristic, used
    on the package only (tests may read a strategy's private state to assert on it).
    """
    tree = ast.parse(source)
    found: list[str] = []
    module_aliases: dict[str, str] = {}  # local name -> dotted module

    def is_ours(dotted: str) -> bool:
        return dotted.split(".")[0] in PRIVATE_PACKAGES

    def private(parts: list[str]) -> bool:
        return any(p.startswith("_") and not p.startswith("__") for p in parts)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_ours(alias.name):
                    if private(alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
                    module_aliases[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else alias.name.split(".")[0]
                    )
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if is_ours(node.module):
                for alias in node.names:
                    if private([*node.module.split("."), alias.name]):
                        found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                    module_aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if is_ours(arg.value) and private(arg.value.split(".")):
                    found.append(f"line {node.lineno}: import_module({arg.value!r})")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain: list[str] = []
        cur: ast.AST = node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if not isinstance(cur, ast.Name):
            continue
        chain.reverse()
        rooted_module = cur.id in module_aliases
        rooted_object = objects and (
            cur.id in LIGHTNING_OBJECTS or any(c in LIGHTNING_OBJECTS for c in chain)
        )
        if (rooted_module or rooted_object) and private(chain):
            found.append(f"line {node.lineno}: {cur.id}.{'.'.join(chain)}")
    return sorted(set(found))


@pytest.mark.parametrize(
    "source,flagged",
    [
        ("from lightning.fabric.strategies import _StrategyRegistry", True),
        ("from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook", True),
        ("import lightning.fabric._graveyard", True),
        ("from shap.explainers._deep.deep_pytorch import op_handler", True),
        ("import shap\nshap.explainers._deep", True),
        ("import lightning.pytorch as pl\npl.trainer._x", True),
        ("from lightning.pytorch import strategies\nstrategies._StrategyRegistry", True),
        ("import importlib\nimportlib.import_module('lightning.fabric._x')", True),
        ("def f(trainer):\n    return trainer.fit_loop._can_stop_early", True),
        ("def f(self):\n    return self.trainer.strategy._launcher", True),
        ("from lightning.pytorch.strategies import DDPStrategy", False),
        ("import lightning.pytorch as pl\npl.Trainer.__init__", False),
        ("from lightning_sustain._compat import ChildProcessObserver as _Obs", False),
        ("def f(self):\n    return self._meter._streams", False),
    ],
)
def test_scanner_flags_private_uses(source: str, flagged: bool) -> None:
    assert bool(private_uses(source)) is flagged


def test_no_module_outside_compat_uses_a_private_lightning_or_shap_name() -> None:
    offenders: dict[str, list[str]] = {}
    files = [p for d in SCANNED for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts]
    assert len(files) > 40  # the scan saw the package, not an empty folder
    for path in files:
        if path.resolve() in ALLOWED:
            continue
        package = path.is_relative_to(ROOT / "lightning_sustain")
        uses = private_uses(path.read_text(encoding="utf-8"), objects=package)
        if uses:
            offenders[str(path.relative_to(ROOT))] = uses
    assert not offenders, (
        "Private Lightning/SHAP names outside lightning_sustain/_compat.py (add them there): "
        f"{offenders}"
    )


def test_importing_compat_imports_neither_lightning_nor_shap() -> None:
    # the package's __init__ registers the strategy (imports Lightning), so load the file alone
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(COMPAT_FILE)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['c'] = m\n"
        "spec.loader.exec_module(m)\n"
        "print(sorted(n for n in ('lightning', 'shap') if n in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
