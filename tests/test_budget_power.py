"""PowerBudget with a real Trainer and the simulated NVML device (real pynvml bindings)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_sustain.callbacks.power_budget import PowerBudget, PowerBudgetError
from tests.helpers import TinyClassifier, loader

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _journal(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SUSTAIN_LIMIT_JOURNAL", str(tmp_path / "journal.json"))


def _trainer(tmp_path, callbacks, max_steps=6, **kwargs):
    return pl.Trainer(
        max_steps=max_steps,
        logger=kwargs.pop("logger", False),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


class LimitProbe(Callback):
    """Records the simulated device's limit at every batch start."""

    def __init__(self, sim):
        self.sim = sim
        self.limits: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.limits.append(self.sim.power_limit_w(0))


class Boom(TinyClassifier):
    def __init__(self, exc, at_step=2, **kwargs):
        super().__init__(**kwargs)
        self.exc, self.at_step = exc, at_step

    def training_step(self, batch, batch_idx):
        if batch_idx == self.at_step:
            raise self.exc
        return super().training_step(batch, batch_idx)


def test_hardware_sets_before_first_step_and_restores(sim, tmp_path, caplog):
    probe = LimitProbe(sim)
    budget = PowerBudget(watts=220, mode="hardware")
    with caplog.at_level(logging.INFO, logger="lightning_sustain"):
        _trainer(tmp_path, [budget, probe]).fit(TinyClassifier(sim=sim, busy_s=0.005), loader())
    assert probe.limits == [220.0] * 6, "the limit is in force from the first step"
    assert sim.power_limit_w(0) == 400.0
    assert sim.power_limit_w(1) == 400.0, "only this process's device is capped"
    assert sim.limit_set_count(0) == 2  # set once, restored once
    assert budget.report.mode == "hardware"
    assert budget.report.limits_w == {f"gpu:{sim.uuid(0)}": 220.0}
    assert any("hardware mode" in r.message for r in caplog.records)


def test_hardware_clamps_out_of_range_watts_with_a_warning(sim, tmp_path, caplog):
    probe = LimitProbe(sim)
    with caplog.at_level(logging.WARNING):
        _trainer(tmp_path, [PowerBudget(watts=40, mode="hardware"), probe], max_steps=2).fit(
            TinyClassifier(), loader()
        )
    assert probe.limits == [100.0, 100.0]
    assert sim.power_limit_w(0) == 400.0
    clamp = [r.message for r in caplog.records if "outside the range" in r.message]
    assert clamp and "watts=40" in clamp[0] and "[100, 400]" in clamp[0]


@pytest.mark.parametrize("exc", [RuntimeError("step failed"), KeyboardInterrupt()])
def test_hardware_restores_when_training_raises(sim, tmp_path, exc):
    model = Boom(exc, sim=sim, busy_s=0.005)
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        expected = SystemExit if isinstance(exc, KeyboardInterrupt) else RuntimeError
        with pytest.raises(expected):
            _trainer(tmp_path, [PowerBudget(watts=150, mode="hardware")]).fit(model, loader())
    finally:
        signal.signal(signal.SIGINT, previous_sigint)  # Lightning ignores SIGINT after Ctrl-C
    assert sim.power_limit_w(0) == 400.0


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning_sustain.budget.limits import ensure_sigterm_handler
    from lightning_sustain.callbacks.power_budget import PowerBudget
    from lightning_sustain.testing import SimulatedNVML
    from tests.helpers import TinyClassifier, loader

    sim = SimulatedNVML.attach()
    budget = {budget!r}
    order = {order!r}

    class Announce(Callback):
        def on_train_start(self, trainer, pl_module):
            if order == "after":  # our handler installed after Lightning's
                ensure_sigterm_handler()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 3:
                print("capped", sim.power_limit_w(0), flush=True)

        def on_exception(self, trainer, pl_module, exception):
            print("on_exception", type(exception).__name__, sim.power_limit_w(0), flush=True)

    callbacks = [Announce()]
    if budget:
        callbacks.insert(0, PowerBudget(watts=150, mode="hardware"))
    trainer = pl.Trainer(max_epochs=1000, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir={root!r}, callbacks=callbacks)
    trainer.fit(TinyClassifier(sim=sim, busy_s=0.005), loader())
    print("fit returned", trainer.state.status, flush=True)
    """
)


def _sigterm_run(sim, tmp_path, budget: bool, order: str) -> tuple[int, list[str]]:
    script = tmp_path / f"train_{budget}_{order}.py"
    script.write_text(CHILD.format(repo=str(REPO), root=str(tmp_path), budget=budget, order=order))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("capped"), proc.stderr.read() if not line else line
        assert sim.power_limit_w(0) == (150.0 if budget else 400.0)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out.split("\n")


@pytest.mark.parametrize("order", ["before", "after"])
def test_sigterm_ends_the_run_as_without_power_budget(sim, tmp_path, order):
    # Lightning's graceful path (SIGTERMException through on_exception) runs with and
    # without PowerBudget, whichever handler was installed first; the cap is gone before
    # on_exception runs, and the exit code is the same
    rc_with, out_with = _sigterm_run(sim, tmp_path, True, order)
    assert sim.power_limit_w(0) == 400.0
    rc_without, out_without = _sigterm_run(sim, tmp_path, False, order)
    assert rc_with == rc_without
    assert "on_exception SIGTERMException 400.0" in out_with
    assert "on_exception SIGTERMException 400.0" in out_without


def test_auto_falls_back_to_software_on_no_permission(sim, tmp_path, caplog):
    sim.set_limit_permitted(0, False)
    budget = PowerBudget(watts=200)
    with caplog.at_level(logging.INFO, logger="lightning_sustain.callbacks.power_budget"):
        _trainer(tmp_path, [budget], max_steps=3).fit(
            TinyClassifier(sim=sim, busy_s=0.005), loader()
        )
    chosen = [r.message for r in caplog.records if "mode (" in r.message]
    assert len(chosen) == 1
    assert "software mode" in chosen[0] and "NO_PERMISSION" in chosen[0]
    assert budget.report.mode == "software"
    assert sim.power_limit_w(0) == 400.0 and sim.limit_set_count(0) == 0


def test_hardware_mode_without_permission_is_a_clear_error(sim, tmp_path):
    sim.set_limit_permitted(0, False)
    budget = PowerBudget(watts=200, mode="hardware")
    with pytest.raises(PowerBudgetError, match="NO_PERMISSION.*mode='software'"):
        _trainer(tmp_path, [budget]).fit(TinyClassifier(), loader())
    assert sim.power_limit_w(0) == 400.0


def test_hardware_mode_with_a_lost_gpu_is_a_clear_error(sim, tmp_path):
    sim.set_fault(0, "gpu_lost")
    try:
        with pytest.raises(PowerBudgetError, match="mode='hardware'"):
            _trainer(tmp_path, [PowerBudget(watts=200, mode="hardware", nvml_devices=[0])]).fit(
                TinyClassifier(), loader()
            )
    finally:
        sim.set_fault(0, None)
    assert sim.power_limit_w(0) == 400.0


class GpuBusyDuringSteps(Callback):
    """The simulated GPU works from batch start to batch end (Lightning's overhead too).

    Listed before the PowerBudget, so the throttle's idle time is spent at idle power.
    """

    def __init__(self, sim):
        self.sim = sim
        self.samples: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sim.set_load(0, 1.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sim.set_load(0, 0.0)
        self.samples.append(self.sim.ground_truth_sample(0))


def test_software_mode_keeps_mean_power_near_budget(sim, tmp_path):
    busy = GpuBusyDuringSteps(sim)
    budget = PowerBudget(watts=200, mode="software")
    # 120 steps: the report's mean covers the whole run, warm-up before the throttle engages
    # included, which on a fast machine is a large share of a short run
    _trainer(tmp_path, [busy, budget], max_steps=120).fit(TinyClassifier(), loader(n=32 * 120))
    (t0, e0), (t1, e1) = busy.samples[15], busy.samples[-1]
    mean_w = (e1 - e0) / (t1 - t0)
    assert mean_w <= 200 * 1.05
    assert mean_w >= 200 * 0.8, "throttled far below the budget"
    # without the throttle the device would draw ~350 W: idle time was needed and inserted
    assert budget.report.throttled_s > 0.2 * (t1 - t0)
    assert budget.report.mode == "software"
    assert budget.report.mean_power_w == pytest.approx(200, rel=0.15)
    assert sim.limit_set_count(0) == 0, "software mode never touches the limit"


def test_software_mode_logs_its_metrics(sim, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv")
    _trainer(
        tmp_path, [PowerBudget(watts=200, mode="software")], max_steps=8, logger=logger,
        log_every_n_steps=2,
    ).fit(TinyClassifier(sim=sim, busy_s=0.005), loader())
    text = (Path(logger.log_dir) / "metrics.csv").read_text()
    for name in ("power_budget/limit_w", "power_budget/throttled_s", "power_budget/mean_power_w"):
        assert name in text


def test_software_mode_on_cpu_only(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("LIGHTNING_SUSTAIN_SIMNVML_STATE", raising=False)
    budget = PowerBudget(watts=5, cpu="estimate")
    with caplog.at_level(logging.INFO, logger="lightning_sustain.callbacks.power_budget"):
        _trainer(tmp_path, [budget], max_steps=3).fit(TinyClassifier(), loader())
    assert budget.report.mode == "software"
    assert any("no NVML GPU" in r.message for r in caplog.records)


def test_two_power_budgets_are_refused(sim, tmp_path):
    with pytest.raises(PowerBudgetError, match="2 PowerBudget callbacks"):
        _trainer(tmp_path, [PowerBudget(watts=200), PowerBudget(watts=300)]).fit(
            TinyClassifier(), loader()
        )
    assert sim.power_limit_w(0) == 400.0


def test_job_budget_is_split_per_rank():
    budget = PowerBudget(watts=600, per="job")
    assert budget.device_budget_w(world_size=2, devices_in_rank=1) == 300.0
    assert budget.device_budget_w(world_size=3, devices_in_rank=2) == 100.0
    assert PowerBudget(watts=600).device_budget_w(world_size=4, devices_in_rank=1) == 600.0


def test_set_rank_budget_w_reapplies_the_limit(sim, tmp_path):
    class Shift(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                budget.set_rank_budget_w(260.0)

    budget = PowerBudget(watts=200, mode="hardware")
    probe = LimitProbe(sim)
    _trainer(tmp_path, [budget, Shift(), probe], max_steps=4).fit(TinyClassifier(), loader())
    assert probe.limits == [200.0, 200.0, 260.0, 260.0]
    assert sim.power_limit_w(0) == 400.0
    with pytest.raises(RuntimeError, match="running fit"):
        budget.set_rank_budget_w(100.0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"watts": 0}, "watts"),
        ({"watts": -10}, "watts"),
        ({"watts": "lots"}, "watts"),
        ({"watts": 100, "per": "node"}, "per"),
        ({"watts": 100, "mode": "magic"}, "mode"),
        ({"watts": 100, "gpus": "all"}, "gpus"),
        ({"watts": 100, "window_s": 0}, "window_s"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PowerBudget(**kwargs)


def test_no_nvml_hardware_mode_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("LIGHTNING_SUSTAIN_SIMNVML_STATE", raising=False)
    budget = PowerBudget(watts=100, mode="hardware")
    with pytest.raises(PowerBudgetError, match="no NVML GPU"):
        _trainer(tmp_path, [budget]).fit(TinyClassifier(), loader())
    assert os.environ.get("LIGHTNING_SUSTAIN_SIMNVML_STATE") is None
