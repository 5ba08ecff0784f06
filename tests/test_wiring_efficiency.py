"""Efficiency figures wired through EnergyRun, EnergyMonitor and the summary (issue 13).

FLOPs come from a Linear model, whose FLOPs are known analytically: forward ``2 B i o``,
backward (weight gradient only, the input needs none) another ``2 B i o``.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.loggers import CSVLogger

from lightning_sustain import EnergyMonitor, EnergyRun
from lightning_sustain.energy.carbon import resolve_carbon_intensity
from lightning_sustain.energy.efficiency import count_step_flops
from lightning_sustain.report.builder import _g, build_report
from lightning_sustain.report.trace import read_summary
from lightning_sustain.run import RankInfo
from lightning_sustain.run.summary import add_efficiency, build_summary, empty_phases
from tests.helpers import TinyClassifier, loader
from tests.test_energy_layer import LinearDevice


def _linear_train_flops(batch: int, in_features: int, out_features: int) -> int:
    return 4 * batch * in_features * out_features


def _check_figures(summary: dict, flops_per_step: int, rank_batches: int) -> None:
    """The summary's figures are the arithmetic of its own energy, time and counts."""
    train = summary["phases"]["train"]
    totals = summary["totals"]
    energy = train["energy_j"]
    tflop = flops_per_step * rank_batches / 1e12
    eff = summary["efficiency"]["train"]
    assert eff["flops_per_step"] == totals["flops_per_step"] == flops_per_step
    assert eff["steps"] == rank_batches
    assert eff["total_tflop"] == pytest.approx(tflop, rel=1e-12)
    assert totals["j_per_tflop"] == pytest.approx(energy / tflop, rel=1e-9)
    assert totals["tflops_per_s_per_w"] == pytest.approx(tflop / energy, rel=1e-9)
    assert eff["achieved_tflops_per_s"] == pytest.approx(tflop / train["duration_s"], rel=1e-9)
    assert totals["samples_per_j"] == pytest.approx(train["samples"] / energy, rel=1e-9)
    if train["tokens"]:
        assert totals["tokens_per_j"] == pytest.approx(train["tokens"] / energy, rel=1e-9)
    assert eff["method"]  # always stated
    assert eff["energy_provenance"] == summary["provenance"]


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 16),
    in_features=st.integers(1, 32),
    out_features=st.integers(1, 8),
    steps=st.integers(1, 12),
    seq=st.integers(1, 6),
)
def test_plain_run_figures_equal_energy_over_counted_flops(
    batch: int, in_features: int, out_features: int, steps: int, seq: int
) -> None:
    model = torch.nn.Linear(in_features, out_features)
    x = torch.randn(batch, in_features)
    flops = count_step_flops(model, x, tokens=batch * seq)
    assert flops.flops_per_step == _linear_train_flops(batch, in_features, out_features)
    run = EnergyRun(
        None, devices=[LinearDevice(50.0, name=f"e{time.monotonic_ns()}")], ranks=RankInfo(),
        report=False, log_every_n_steps=1000,
    )  # fmt: skip
    run.set_flops_per_step(flops)
    with run:
        for _ in range(steps):
            model(x).sum().backward()
            time.sleep(0.002)
            run.step(samples=batch, tokens=batch * seq)
    run.close()
    summary = run.summary
    assert summary["totals"]["tokens"] == steps * batch * seq
    _check_figures(summary, flops.flops_per_step, steps)
    # 50 W for every step: J per TFLOP = 50 W x step time / TFLOP per step
    assert summary["efficiency"]["train"]["mean_power_w"] == pytest.approx(50.0, rel=0.02)


def test_set_flops_per_step_refuses_bad_input() -> None:
    run = EnergyRun(None, devices=[], ranks=RankInfo(), report=False)
    with pytest.raises(ValueError, match="method="):
        run.set_flops_per_step(1000)
    with pytest.raises(ValueError, match="non-negative integer"):
        run.set_flops_per_step(-1, method="x")
    with pytest.raises(ValueError, match="phase"):
        run.set_flops_per_step(10, method="x", phase="validation")
    with pytest.raises(ValueError, match="flops"):
        EnergyMonitor(flops=-3)


def _record(rank: int, batches: int, energy_j: float, samples: int, tokens: int) -> dict:
    phases = empty_phases()
    for name in ("train", "fit"):
        phases[name].update(
            device_energy_j={f"gpu{rank}": energy_j}, duration_s=2.0, batches=batches,
            samples=samples, tokens=tokens,
        )  # fmt: skip
    return {"global_rank": rank, "phases": phases, "optimizer_steps": batches, "devices": []}


@settings(max_examples=20, deadline=None)
@given(
    per_rank=st.lists(
        st.tuples(st.integers(1, 50), st.floats(1.0, 1e4), st.integers(0, 500)),
        min_size=1,
        max_size=4,
    ),
    flops=st.integers(1, 10**12),
)
def test_ddp_figures_count_batches_summed_over_ranks(per_rank, flops: int) -> None:
    """Energy is summed over ranks, so FLOPs are too: steps = batches of every rank."""
    records = [
        _record(rank, batches, energy, 4 * batches, tokens)
        for rank, (batches, energy, tokens) in enumerate(per_rank)
    ]
    summary = build_summary(
        records, prior=None, carbon=resolve_carbon_intensity(None, None), pue=1.0,
        status="completed", resumed=False, world_size=len(records),
    )  # fmt: skip
    from lightning_sustain.energy.efficiency import StepFlops

    add_efficiency(summary, {"train": StepFlops(flops, True, 4, None, "analytic (test)")})
    rank_batches = sum(b for b, _, _ in per_rank)
    assert summary["totals"]["batches"] == max(b for b, _, _ in per_rank)  # per rank
    assert summary["phases"]["train"]["rank_batches"] == rank_batches
    _check_figures(summary, flops, rank_batches)


def test_resume_keeps_rank_batches_for_the_flop_total(tmp_path: Path) -> None:
    def make() -> EnergyRun:
        return EnergyRun(
            tmp_path, devices=[LinearDevice(80.0, name=f"r{time.monotonic_ns()}")],
            ranks=RankInfo(), report=False, log_every_n_steps=1000,
        )  # fmt: skip

    first = make()
    first.set_flops_per_step(1_000_000, method="analytic")
    with first:
        for _ in range(7):
            time.sleep(0.002)
            first.step(samples=2)
        state = first.state_dict()
    first.close()
    second = make()
    second.load_state_dict(state)
    second.set_flops_per_step(1_000_000, method="analytic")
    with second:
        for _ in range(5):
            time.sleep(0.002)
            second.step(samples=2)
    second.close()
    summary = second.summary
    assert summary["phases"]["train"]["rank_batches"] == 12
    _check_figures(summary, 1_000_000, 12)


# -- the Trainer front end ----------------------------------------------------------------
class _NoMatmul(TinyClassifier):
    """A training step with no matrix multiplication: FlopCounterMode finds nothing."""

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return (x * self.layer.weight[0, 0]).pow(2).mean()


def _fit(tmp_path: Path, monitor: EnergyMonitor, module=None, n: int = 320, **kw) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[monitor], enable_progress_bar=False, enable_checkpointing=False,
        default_root_dir=tmp_path, log_every_n_steps=3, **kw,
    )  # fmt: skip
    trainer.fit(module or TinyClassifier(), loader(n=n))
    return trainer


def test_trainer_counts_flops_of_the_real_first_batch(tmp_path: Path, simulated_nvml) -> None:
    sim = simulated_nvml(1, counter_period_s=0.02)
    monitor = EnergyMonitor(cpu="none", dirpath=str(tmp_path), report=False, tokens_per_sample=5)
    logger = CSVLogger(tmp_path, name="logs")
    # 10 steps of 0.1 s: the resolver runs on its own 0.5 s clock (a log interval wakes it
    # at most every 0.25 s), so a log interval carries figures once a fit lasts longer than
    # that; a 50 ms fit only has them in the summary.
    _fit(tmp_path, monitor, TinyClassifier(sim=sim, busy_s=0.1), logger=logger)
    summary = read_summary(tmp_path / "energy_summary.json")
    # TinyClassifier: Linear(16, 2) on batches of 32
    expected = _linear_train_flops(32, 16, 2)
    assert summary["efficiency"]["train"]["flops_per_step"] == expected
    assert "first train batch" in summary["efficiency"]["train"]["method"]
    assert summary["totals"]["tokens"] == 320 * 5
    _check_figures(summary, expected, 10)
    assert summary["provenance"] == "counter (simulated)"
    # log intervals carry the figures under the energy/ key scheme
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    logged = [r for r in rows if r.get("energy/j_per_tflop")]
    assert logged, "no log interval carried energy/j_per_tflop"
    assert all(float(r["energy/tokens_per_j"]) > 0 for r in logged)
    assert monitor.run.metrics["energy/j_per_tflop"] == pytest.approx(
        summary["totals"]["j_per_tflop"]
    )
    report = Path(build_report(tmp_path).markdown_path).read_text()
    assert f"| Energy per TFLOP | {_g(summary['totals']['j_per_tflop'])} J |" in report
    assert "FlopCounterMode" in report and "Tokens per J" in report


def test_trainer_flops_given_or_off(tmp_path: Path, simulated_nvml) -> None:
    simulated_nvml(1, counter_period_s=0.02)
    given_dir, off_dir = tmp_path / "given", tmp_path / "off"
    _fit(given_dir, EnergyMonitor(cpu="none", dirpath=str(given_dir), report=False, flops=123456),
         n=96, logger=False)  # fmt: skip
    summary = read_summary(given_dir / "energy_summary.json")
    assert summary["efficiency"]["train"]["method"].startswith("given by the user")
    _check_figures(summary, 123456, 3)
    _fit(off_dir, EnergyMonitor(cpu="none", dirpath=str(off_dir), report=False, flops=False),
         n=96, logger=False)  # fmt: skip
    summary = read_summary(off_dir / "energy_summary.json")
    assert summary["efficiency"] == {}
    assert summary["totals"].get("j_per_tflop") is None
    assert summary["totals"]["samples_per_j"] > 0  # no FLOPs needed for samples per J


def test_trainer_nothing_countable_is_a_warning_not_an_error(
    tmp_path: Path, simulated_nvml, caplog
) -> None:
    simulated_nvml(1, counter_period_s=0.02)
    monitor = EnergyMonitor(cpu="none", dirpath=str(tmp_path), report=False)
    with caplog.at_level(logging.WARNING):
        trainer = _fit(tmp_path, monitor, _NoMatmul(), n=96, logger=False)
    assert trainer.state.finished
    assert "no countable operation" in caplog.text
    summary = read_summary(tmp_path / "energy_summary.json")
    assert "train" not in summary["efficiency"]
    assert "no countable operation" in summary["efficiency"]["note"]


@pytest.mark.slow
def test_ddp_two_ranks_flops_counted_per_rank_and_summed(tmp_path: Path, simulated_nvml) -> None:
    """Real DDP (2 gloo processes): each rank counts its first batch; totals use rank-batches."""
    from lightning_sustain.testing import SimulatedDeviceSpec
    from tests.test_strategies_any import run_two_ranks

    simulated_nvml([SimulatedDeviceSpec(), SimulatedDeviceSpec()], counter_period_s=0.02)
    out = run_two_ranks(tmp_path, "ddp", max_steps=12, busy_s=0.02)
    summary = read_summary(out / "logs" / "version_0" / "energy_summary.json")
    assert summary["world_size"] == 2
    assert summary["totals"]["batches"] == 12 and summary["totals"]["steps"] == 12  # per rank
    # BusyModel: Linear(8, 2) on batches of 4, per rank
    _check_figures(summary, _linear_train_flops(4, 8, 2), 24)
    rows = list(csv.DictReader(open(out / "logs" / "version_0" / "metrics.csv")))
    assert any(r.get("energy/j_per_tflop") for r in rows)


def test_fabric_set_flops_per_step_and_tokens(tmp_path: Path) -> None:
    from lightning.fabric import Fabric

    from lightning_sustain import FabricEnergyMonitor

    monitor = FabricEnergyMonitor(
        str(tmp_path), log_every_n_steps=4, nvml_devices="none", cpu="estimate", report=False
    )
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[monitor])
    model = torch.nn.Linear(12, 3)
    x = torch.randn(6, 12)
    monitor.set_flops_per_step(count_step_flops(model, x, tokens=6 * 10))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    fabric.call("on_train_start")
    for step in range(9):
        fabric.backward(model(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
        # burn CPU (not sleep): the estimate counts CPU time in 10 ms clock ticks, and 9 tiny
        # steps alone may not reach one tick
        busy_until = time.process_time() + 0.004
        while time.process_time() < busy_until:
            pass
        fabric.call("on_train_batch_end", samples=6, tokens=60, step=step)
    fabric.call("on_train_end")
    monitor.close()
    summary = read_summary(tmp_path / "energy_summary.json")
    assert summary["provenance"] == "estimated"
    assert summary["totals"]["tokens"] == 9 * 60
    _check_figures(summary, _linear_train_flops(6, 12, 3), 9)
