"""EnergyRun without Lightning: stages, phases, summaries, resume, failures, hot path."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lightning_sustain.run.energy_run as energy_run_module
from lightning_sustain import EnergyRun
from lightning_sustain.report.trace import read_summary
from lightning_sustain.run import RankInfo
from tests.test_energy_layer import LinearDevice

POWER_W = 100.0


def make_run(tmp_path: Path | None, **kwargs) -> EnergyRun:
    kwargs.setdefault("log_every_n_steps", 5)
    kwargs.setdefault("report", False)
    return EnergyRun(
        tmp_path, devices=[LinearDevice(POWER_W, name=f"lin{time.monotonic_ns()}")],
        ranks=RankInfo(), **kwargs,
    )  # fmt: skip


def test_run_package_imports_no_lightning() -> None:
    root = Path(energy_run_module.__file__).parent
    for path in [*root.glob("*.py"), root.parent / "fabric.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names), (
                path,
                names,
            )


stage_ops = st.lists(
    st.tuples(
        st.sampled_from(["fit", "validate", "test", "predict"]),
        st.integers(0, 12),  # steps
        st.booleans(),  # a validation phase in the middle of fit
        st.integers(1, 3),  # accumulation
    ),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=stage_ops)
def test_any_stage_order_keeps_every_stage(tmp_path: Path, ops) -> None:
    out = tmp_path / f"run{time.monotonic_ns()}"
    run = make_run(out)
    expected_batches = expected_steps = 0
    expected_stage_samples: dict[str, int] = {}
    for stage, steps, with_validation, accumulate in ops:
        run.start_stage(stage)
        for i in range(steps):
            if stage == "fit" and with_validation and i == steps // 2:
                with run.phase_scope("validation"):
                    run.step(samples=3)
            run.step(samples=2, tokens=7, optimizer_step=(i + 1) % accumulate == 0)
            time.sleep(0.001)
        run.end_stage()
        if stage == "fit":
            expected_batches += steps
            expected_steps += steps // accumulate
        else:
            expected_stage_samples[stage] = expected_stage_samples.get(stage, 0) + 2 * steps
    run.close()
    summary = read_summary(out / "energy_summary.json")
    totals, phases = summary["totals"], summary["phases"]
    assert [s["stage"] for s in summary["stages"]] == [op[0] for op in ops]
    assert totals["batches"] == expected_batches and totals["steps"] == expected_steps
    assert totals["tokens"] == 7 * expected_batches
    for stage, samples in expected_stage_samples.items():
        assert phases[stage]["samples"] == samples
    stage_j = sum(phases[s]["energy_j"] for s in ("fit", "validate", "test", "predict"))
    assert totals["energy_j"] == pytest.approx(stage_j)
    # constant power: every stage's energy is power x its duration, exactly
    assert totals["energy_j"] == pytest.approx(POWER_W * totals["duration_s"], rel=1e-6)
    assert phases["fit"]["energy_j"] >= phases["train"]["energy_j"] + phases["validation"][
        "energy_j"] - 1e-9  # fmt: skip
    if expected_batches:
        rows = (out / "energy_trace.csv").read_text().splitlines()[1:]
        assert [int(r.split(",")[0]) for r in rows] == list(range(expected_batches))


def test_context_manager_and_resume_carry_totals(tmp_path: Path) -> None:
    run = make_run(tmp_path / "a")
    with run:
        for _ in range(8):
            run.step(samples=4)
            time.sleep(0.002)
    state = run.state_dict()
    first = run.summary["totals"]
    run.close()
    resumed = make_run(tmp_path / "b")
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives serialisation
    with resumed:
        for _ in range(4):
            resumed.step(samples=4)
            time.sleep(0.002)
    resumed.close()
    totals = read_summary(tmp_path / "b" / "energy_summary.json")["totals"]
    assert totals["steps"] == 12 and totals["samples"] == 48
    assert totals["energy_j"] > first["energy_j"]
    assert totals["duration_s"] == pytest.approx(
        first["duration_s"] + resumed.summary["phases"]["fit"]["duration_s"]
        - state["phases"]["fit"]["duration_s"]
    )  # fmt: skip
    assert totals["energy_j"] == pytest.approx(POWER_W * totals["duration_s"], rel=1e-6)
    rows = (tmp_path / "b" / "energy_trace.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(8, 12)), "numbered after the prior"


def test_state_dict_mid_stage_holds_the_stage_so_far(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    run.start_stage("fit")
    for _ in range(5):
        run.step()
        time.sleep(0.01)
    state = run.state_dict()
    fit = state["phases"]["fit"]
    assert state["optimizer_steps"] == 5
    assert sum(fit["device_energy_j"].values()) == pytest.approx(POWER_W * fit["duration_s"])
    assert fit["duration_s"] >= 0.05
    run.close()


def test_hot_path_only_records(tmp_path: Path, monkeypatch) -> None:
    run = make_run(tmp_path, log_every_n_steps=10_000)
    run.start_stage("fit")
    calls = []
    monkeypatch.setattr(run.accountant, "resolve", lambda *a, **k: calls.append(1) or [])
    monkeypatch.setattr(run.meter, "energy_at", lambda *a, **k: pytest.fail("read per step"))
    for _ in range(2000):
        assert run.step(samples=1) is None
    assert calls == [] and run.accountant.pending_steps == 2000
    monkeypatch.undo()
    run.close()
    assert run.summary["totals"]["batches"] == 2000


def test_failure_path_uses_no_collective_and_names_missing_ranks(
    tmp_path: Path, monkeypatch
) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective on the failure path")

    monkeypatch.setattr(energy_run_module, "all_gather_objects", forbidden)
    monkeypatch.setattr(energy_run_module, "all_reduce_sum", forbidden)
    run = EnergyRun(
        tmp_path, devices=[LinearDevice(POWER_W, name="fail")], report=False, sync=False,
        ranks=RankInfo(global_rank=0, world_size=2), log_every_n_steps=3,
    )  # fmt: skip
    run.start_stage("fit")
    for _ in range(7):
        run.step(samples=1)
        time.sleep(0.002)
    run.fail(RuntimeError("boom"))
    summary = read_summary(tmp_path / "energy_summary.json")
    assert summary["status"] == "interrupted: RuntimeError"
    assert summary["missing_ranks"] == [1] and "rank1:missing" in summary["failures"]
    assert summary["totals"]["batches"] == 7 and summary["incomplete"] is True
    assert json.loads((tmp_path / "energy_ranks" / "rank0.json").read_text())["status"].startswith(
        "interrupted")  # fmt: skip
    assert run.meter is None


def test_rank_records_are_written_at_log_intervals(tmp_path: Path) -> None:
    run = make_run(tmp_path, log_every_n_steps=2, rank_record_interval_s=0.0)
    run.start_stage("fit")
    for _ in range(4):
        run.step()
        time.sleep(0.01)
    record = json.loads((tmp_path / "energy_ranks" / "rank0.json").read_text())
    assert record["status"] == "running"
    assert sum(record["phases"]["fit"]["device_energy_j"].values()) > 0
    run.close()


def test_write_files_false_writes_nothing(tmp_path: Path) -> None:
    run = make_run(tmp_path / "x", write_files=False)
    with run:
        for _ in range(6):
            run.step()
    run.close()
    assert not (tmp_path / "x").exists() and run.summary["totals"]["batches"] == 6


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"pue": 0.5}, "pue"), ({"nvml_devices": "all"}, "nvml_devices"), ({"cpu": "gpu"}, "cpu"),
     ({"log_every_n_steps": 0}, "log_every_n_steps")],
)  # fmt: skip
def test_bad_settings_name_the_setting(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        EnergyRun(**kwargs)


def test_unknown_stage_and_bad_state_are_clear_errors(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    with pytest.raises(ValueError, match="stage must be one of"):
        run.start_stage("train")
    with pytest.raises(ValueError, match="not in a known format"):
        run.load_state_dict({"version": 99})
    run.close()


def test_a_pickled_run_opens_its_own_devices_and_keeps_totals(tmp_path: Path) -> None:
    """ddp_spawn pickles the Trainer's callbacks (and so their run) into every rank."""
    import pickle

    fresh = pickle.loads(pickle.dumps(make_run(tmp_path / "fresh")))
    with fresh:
        for _ in range(3):
            fresh.step(samples=2)
            time.sleep(0.002)
    assert fresh.summary["totals"]["steps"] == 3

    run = make_run(tmp_path / "used")
    with run:
        for _ in range(4):
            run.step(samples=2)
            time.sleep(0.002)
    first_j = run.summary["totals"]["energy_j"]
    run.start_stage("test")  # an open stage and live threads do not travel
    copy = pickle.loads(pickle.dumps(run))
    run.close()
    assert copy.current_stage is None and copy.meter is None
    with copy.stage("validate"):  # its own devices (here: none found, so 0 J added)
        copy.step(samples=2)
    totals = copy.summary["totals"]
    assert totals["steps"] == 4 and totals["energy_j"] == pytest.approx(first_j)
    assert [s["stage"] for s in copy.summary["stages"]][-1] == "validate"
