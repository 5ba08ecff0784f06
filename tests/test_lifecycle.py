"""Every Lightning lifecycle keeps what earlier stages recorded (issue 10).

Real Trainer runs on CPU driving the simulated GPU through the real pynvml bindings.
Each stage's energy in the summary is checked against the simulated device's ground
truth and against the summary of the previous stage: nothing is truncated or lost.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_sustain import EnergyMonitor
from lightning_sustain.report.trace import read_summary
from tests.helpers import TinyClassifier, loader

STAGE_HOOKS = ("fit", "validation", "test", "predict")
REL = 0.04  # stage ends: idle power between the monitor's marks and the truth callback's
# Interpolating a 20 ms counter at a stage boundary that follows a busy step can misplace
# up to (busy - idle power) x one counter period: the bound for short stages.
BOUNDARY_J = (350.0 - 70.0) * 0.02


class PredictingClassifier(TinyClassifier):
    def predict_step(self, batch, batch_idx):
        x, _ = batch
        if self._sim is not None and self._busy_s > 0:
            self._sim.busy(self._sim_index, self._busy_s)
        return self.layer(x).argmax(-1)


class TruthStart(pl.Callback):
    """Placed after the monitor: reads ground truth right after the monitor opened a stage."""

    def __init__(self, sim, log):
        self.sim, self.events = sim, log

    def _mark(self, stage):
        self.events.append((stage, "start", self.sim.ground_truth_energy_j(0)))

    def on_fit_start(self, trainer, pl_module):
        self._mark("fit")

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            self._mark("validate")

    def on_test_start(self, trainer, pl_module):
        self._mark("test")

    def on_predict_start(self, trainer, pl_module):
        self._mark("predict")


class TruthEnd(pl.Callback):
    """Placed before the monitor: reads ground truth right before the monitor closes a stage."""

    def __init__(self, sim, log):
        self.sim, self.events = sim, log

    def _mark(self, stage):
        self.events.append((stage, "end", self.sim.ground_truth_energy_j(0)))

    def on_fit_end(self, trainer, pl_module):
        self._mark("fit")

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            self._mark("validate")

    def on_test_end(self, trainer, pl_module):
        self._mark("test")

    def on_predict_end(self, trainer, pl_module):
        self._mark("predict")

    def on_exception(self, trainer, pl_module, exception):
        self._mark("fit")


def truth_by_stage(log) -> dict[str, list[float]]:
    """Ground-truth joules of each stage occurrence, in order."""
    out: dict[str, list[float]] = {}
    starts: dict[str, float] = {}
    for stage, kind, energy in log:
        if kind == "start":
            starts[stage] = energy
        else:
            out.setdefault(stage, []).append(energy - starts.pop(stage))
    return out


@pytest.fixture
def setup(tmp_path, simulated_nvml):
    sim = simulated_nvml(1, counter_period_s=0.02)
    log: list = []
    monitor = EnergyMonitor(cpu="none", dirpath=str(tmp_path / "run"), report=False)

    def make_trainer(max_epochs=1, callbacks=(), monitor=monitor, **kwargs):
        kwargs.setdefault("enable_checkpointing", False)
        return pl.Trainer(
            max_epochs=max_epochs,
            callbacks=[TruthEnd(sim, log), monitor, TruthStart(sim, log), *callbacks],
            logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path, log_every_n_steps=3, **kwargs,
        )  # fmt: skip

    model = PredictingClassifier(sim=sim, busy_s=0.01)
    return sim, log, monitor, make_trainer, model, tmp_path / "run"


def summary_of(run_dir: Path) -> dict:
    return read_summary(run_dir / "energy_summary.json")


def trace_rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader((run_dir / "energy_trace.csv").open()))


def phase_j(summary, name) -> float:
    return summary["phases"][name]["energy_j"]


@pytest.mark.parametrize("second", ["test", "validate", "predict"])
def test_fit_then_other_stage_keeps_fit(setup, second) -> None:
    sim, log, monitor, make_trainer, model, run_dir = setup
    trainer = make_trainer()
    trainer.fit(model, loader(n=320), loader(n=64))
    after_fit = summary_of(run_dir)
    rows_after_fit = trace_rows(run_dir)
    getattr(trainer, second)(model, loader(n=256))
    after = summary_of(run_dir)
    truth = truth_by_stage(log)
    stage = second

    # the fit is untouched
    for key in ("fit_energy_j", "train_energy_j", "steps", "batches", "samples"):
        assert after["totals"][key] == after_fit["totals"][key], key
    assert trace_rows(run_dir) == rows_after_fit, "the trace is never truncated"
    assert len(rows_after_fit) == 10
    # the new stage is measured and added to the headline totals
    # a short stage has two boundaries, each misplacing up to BOUNDARY_J
    assert phase_j(after, stage) == pytest.approx(truth[stage][0], rel=REL, abs=2 * BOUNDARY_J)
    assert phase_j(after, "fit") == pytest.approx(truth["fit"][0], rel=REL, abs=2 * BOUNDARY_J)
    assert after["totals"]["energy_j"] == pytest.approx(
        after_fit["totals"]["energy_j"] + phase_j(after, stage)
    )
    assert after["totals"]["duration_s"] > after_fit["totals"]["duration_s"]
    assert after["phases"][stage]["batches"] == 8 and after["phases"][stage]["samples"] == 256
    assert [s["stage"] for s in after["stages"]] == ["fit", stage]
    if stage == "predict":
        totals = after["totals"]
        assert totals["predict_samples"] == 256
        assert totals["predict_energy_per_sample_j"] == pytest.approx(phase_j(after, stage) / 256)
        assert totals["sci_per_inference_g"] > 0


def test_second_fit_adds_to_the_first(setup) -> None:
    sim, log, monitor, make_trainer, model, run_dir = setup
    trainer = make_trainer(max_epochs=1)
    trainer.fit(model, loader(n=320))
    first = summary_of(run_dir)
    trainer.fit_loop.max_epochs = 2  # train on
    trainer.fit(model, loader(n=320))
    second = summary_of(run_dir)
    truth = truth_by_stage(log)
    assert trainer.global_step == 20
    assert second["totals"]["steps"] == 20 and second["totals"]["batches"] == 20
    assert second["totals"]["fit_energy_j"] == pytest.approx(sum(truth["fit"]), rel=REL)
    assert second["totals"]["fit_energy_j"] > first["totals"]["fit_energy_j"] * 1.5
    rows = trace_rows(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(20)), "second fit appended, numbered on"
    assert second["totals"]["duration_s"] == pytest.approx(
        first["totals"]["duration_s"]
        + second["phases"]["fit"]["duration_s"]
        - first["phases"]["fit"]["duration_s"]
    )


def test_resume_totals_cover_the_whole_training(setup, tmp_path) -> None:
    sim, log, monitor, make_trainer, model, run_dir = setup
    saved: list[float] = []

    class TruthAtSave(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            saved.append(sim.ground_truth_energy_j(0))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer = make_trainer(max_epochs=1, callbacks=[ckpt, TruthAtSave()], enable_checkpointing=True)
    trainer.fit(model, loader(n=320))
    first_start = truth_by_stage(log)  # fit of run 1 (whole)
    path = tmp_path / "ckpt" / "epoch=0-step=8.ckpt"
    state = torch.load(path, weights_only=False)["callbacks"][monitor.state_key]
    # stored continuously: a mid-fit checkpoint already holds the fit's energy so far
    assert state["optimizer_steps"] == 8
    fit_j_at_save = sum(state["phases"]["fit"]["device_energy_j"].values())
    start_of_run1 = [e for s, k, e in log if s == "fit" and k == "start"][0]
    # the saved figure is measured up to the counter's last update (it lags by up to one
    # update: one boundary's error), the truth up to the save itself
    assert fit_j_at_save == pytest.approx(saved[1] - start_of_run1, rel=REL, abs=BOUNDARY_J)

    log.clear()
    resumed_monitor = EnergyMonitor(cpu="none", dirpath=str(run_dir.parent / "run2"), report=False)
    trainer2 = make_trainer(max_epochs=2, monitor=resumed_monitor)
    trainer2.fit(model, loader(n=320), ckpt_path=path)
    summary = summary_of(run_dir.parent / "run2")
    truth2 = truth_by_stage(log)["fit"][0]
    totals = summary["totals"]
    assert summary["resumed"] is True
    assert totals["steps"] == trainer2.global_step == 20
    assert totals["batches"] == 20
    assert totals["fit_energy_j"] == pytest.approx(
        fit_j_at_save + truth2, rel=REL, abs=2 * BOUNDARY_J
    )
    assert totals["energy_j"] == pytest.approx(totals["fit_energy_j"])
    assert totals["energy_kwh"] == pytest.approx(totals["energy_j"] / 3.6e6)
    assert totals["duration_s"] > state["phases"]["fit"]["duration_s"]
    assert first_start["fit"][0] > fit_j_at_save  # run 1 went on after its last checkpoint


def test_interrupted_fit_keeps_fit_and_other_energy(setup) -> None:
    sim, log, monitor, make_trainer, model, run_dir = setup

    class Stop(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 6:
                sim.busy(0, 0.1)  # outside any step: "other" energy
                raise KeyboardInterrupt

    trainer = make_trainer(max_epochs=1, callbacks=[Stop()])
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after KeyboardInterrupt
        trainer.fit(model, loader(n=320))
    summary = summary_of(run_dir)
    truth = truth_by_stage(log)
    totals = summary["totals"]
    assert summary["status"].startswith("interrupted")
    assert totals["steps"] == trainer.global_step == 7
    assert totals["fit_energy_j"] == pytest.approx(truth["fit"][0], rel=REL)
    assert totals["other_energy_j"] > 0.1 * 250  # the 0.1 s busy at ~350 W
    assert totals["duration_s"] >= summary["phases"]["train"]["duration_s"] + 0.1


def test_fast_dev_run_writes_nothing(setup) -> None:
    sim, log, monitor, make_trainer, model, run_dir = setup
    trainer = make_trainer(fast_dev_run=2)
    trainer.fit(model, loader(n=320), loader(n=64))
    trainer.test(model, loader(n=64))
    assert not run_dir.exists(), sorted(run_dir.rglob("*"))
    assert monitor.summary is not None and monitor.summary["totals"]["steps"] == 2


def test_accumulation_counts_optimizer_steps(setup) -> None:
    sim, log, monitor, make_trainer, model, run_dir = setup
    trainer = make_trainer(max_epochs=2, accumulate_grad_batches=4)
    trainer.fit(model, loader(n=512))
    totals = summary_of(run_dir)["totals"]
    assert trainer.global_step == 8
    assert totals["steps"] == 8 and totals["batches"] == 32
    assert totals["energy_per_step_j"] == pytest.approx(totals["train_energy_j"] / 8)


def test_energy_metrics_are_monitorable(setup, tmp_path) -> None:
    sim, log, monitor, make_trainer, model, run_dir = setup
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="energy/train_energy_kwh", mode="min")
    trainer = make_trainer(max_epochs=3, callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(model, loader(n=320))
    assert "energy/energy_kwh" in trainer.callback_metrics
    assert float(trainer.callback_metrics["energy/energy_kwh"]) > 0
    assert ckpt.best_model_path, "ModelCheckpoint monitored energy/train_energy_kwh"
    # cumulative energy only grows, so the best (lowest) is the first epoch's checkpoint
    assert "epoch=0" in Path(ckpt.best_model_path).name
    assert "energy/power_w" in trainer.progress_bar_metrics


def test_early_stopping_on_an_energy_threshold(setup) -> None:
    sim, log, monitor, make_trainer, model, run_dir = setup
    # stop once the run's energy is above 1 J: mode="max" with a stopping threshold
    stop = EarlyStopping(monitor="energy/energy_kwh", stopping_threshold=1.0 / 3.6e6,
                         mode="max", check_on_train_epoch_end=True, patience=100)  # fmt: skip
    trainer = make_trainer(max_epochs=20, callbacks=[stop])
    trainer.fit(model, loader(n=320))
    assert trainer.current_epoch < 19 and trainer.should_stop
    assert json.loads((run_dir / "energy_summary.json").read_text())["totals"]["steps"] < 200


DDP_SCRIPT = '''
import json, os, sys
import torch
import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset
from lightning_sustain import EnergyMonitor
from lightning_sustain.testing import SimulatedNVML

OUT, FAIL_STEP = sys.argv[1], int(sys.argv[2])


class Busy(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 2)
        self.sim = None

    def _busy(self):
        if self.sim is None:
            self.sim = SimulatedNVML.attach()
        self.sim.busy(self.trainer.local_rank, 0.01)

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and batch_idx == FAIL_STEP:
            raise RuntimeError("injected failure on rank 1")
        self._busy()
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def test_step(self, batch, batch_idx):
        self._busy()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4)


trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, accumulate_grad_batches=2,
    callbacks=[EnergyMonitor(cpu="none", dirpath=OUT, report=False, log_every_n_steps=2)],
    logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False,
)
model = Busy()
trainer.fit(model, data(128))
if FAIL_STEP < 0:
    trainer.test(model, data(64))
with open(os.path.join(OUT, "steps_rank%d.json" % trainer.global_rank), "w") as f:
    json.dump({"global_step": trainer.global_step}, f)
'''


@pytest.mark.slow
def test_ddp_two_ranks_fit_then_test(tmp_path: Path, simulated_nvml) -> None:
    from tests.frontends import run_driven, truth_events, truth_j

    simulated_nvml(2, counter_period_s=0.02)
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    proc = run_driven(script, [str(out), "-1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(out)
    totals = summary["totals"]
    events = truth_events(tmp_path)
    steps = {json.loads(p.read_text())["global_step"] for p in out.glob("steps_rank*.json")}
    # 128 samples / 2 ranks / batch 4 = 16 batches per rank; accumulate 2 -> 8 steps
    assert steps == {8} and totals["steps"] == 8 and totals["batches"] == 16
    assert totals["samples"] == 128
    assert summary["world_size"] == 2 and [r["global_rank"] for r in summary["ranks"]] == [0, 1]
    for rank in (0, 1):
        assert summary["ranks"][rank]["train_energy_j"] > 0
        expected = truth_j(events, "fit", rank) + truth_j(events, "test", rank)
        # two stages, two boundaries each
        assert summary["ranks"][rank]["energy_j"] == pytest.approx(
            expected, rel=REL, abs=4 * BOUNDARY_J
        )
    assert totals["fit_energy_j"] == pytest.approx(truth_j(events, "fit"), rel=REL)
    # 2 ranks x 2 boundaries of a ~0.15 s stage
    assert totals["test_energy_j"] == pytest.approx(truth_j(events, "test"), abs=4 * BOUNDARY_J)
    assert [s["stage"] for s in summary["stages"]] == ["fit", "test"]


@pytest.mark.slow
def test_ddp_rank_failure_keeps_every_ranks_last_energy(tmp_path: Path, simulated_nvml) -> None:
    from tests.frontends import run_driven

    simulated_nvml(2, counter_period_s=0.02)
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    proc = run_driven(script, [str(out), "9"], tmp_path, timeout_s=240)
    assert proc.returncode != 0
    summary = summary_of(out)
    assert summary["status"].startswith("interrupted")
    # both ranks' energy is in the job summary: rank 1's own record at its failure, rank
    # 0's last log-interval record (or its own at its end); none is missing
    assert summary["missing_ranks"] == []
    by_rank = {r["global_rank"]: r for r in summary["ranks"]}
    assert set(by_rank) == {0, 1}
    assert by_rank[1]["batches"] == 9
    assert all(r["train_energy_j"] > 0 for r in by_rank.values())
