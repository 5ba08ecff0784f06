"""LightningCLI selects SustainDDPStrategy by its registered name and by class path in YAML."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_sustain.strategies import register_strategies
from lightning_sustain.strategies.sustain_ddp import SustainDDPStrategy
from lightning_sustain.testing import SimulatedDeviceSpec
from tests.helpers import TinyClassifier, loader
from tests.test_ddp_strategy import check_ok, run_ddp


class CliModel(TinyClassifier):
    def __init__(self, in_features: int = 16):
        super().__init__(in_features=in_features)

    def train_dataloader(self):
        return loader(n=64, batch_size=8)


@pytest.fixture
def single_process_group(monkeypatch):
    """In-process DDP with one rank: clean up the process group and its env afterwards."""
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_cli_selects_spawn_strategy_by_name_and_trains_two_ranks(tmp_path, simulated_nvml):
    simulated_nvml([SimulatedDeviceSpec(), SimulatedDeviceSpec(speed=0.5)], counter_period_s=0.02)
    args = [
        "fit",
        "--trainer.strategy=sustain_ddp_spawn",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.max_steps=6",
        "--trainer.log_every_n_steps=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.logger=false",
        "--model.busy_s=0.02",
    ]
    proc = run_ddp(tmp_path, {"cli_args": args})
    check_ok(proc)
    out = tmp_path / "out"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["strategy"] for r in ranks] == ["SustainDDPStrategy"] * 2
    assert [r["start_method"] for r in ranks] == ["spawn", "spawn"]
    summary = json.loads((out / "ddp_summary.json").read_text())
    assert [r["local_rank"] for r in summary["ranks"]] == [0, 1]
    assert summary["total"]["energy_j"] == pytest.approx(
        sum(r["energy_j"] for r in summary["ranks"])
    )


@pytest.mark.parametrize(
    "class_path",
    [
        "lightning_sustain.SustainDDPStrategy",
        "lightning_sustain.strategies.sustain_ddp.SustainDDPStrategy",
    ],
)
def test_cli_selects_strategy_by_class_path_in_yaml(tmp_path, single_process_group, class_path):
    register_strategies()
    config = tmp_path / "cli.yaml"
    config.write_text(
        f"""
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 3
  logger: false
  enable_progress_bar: false
  enable_checkpointing: false
  default_root_dir: {tmp_path}
  strategy:
    class_path: {class_path}
    init_args:
      log_every_n_steps: 1
      target_slack: 0.1
      find_unused_parameters: true
      output_dir: {tmp_path / "ddp"}
"""
    )
    cli = LightningCLI(CliModel, args=["fit", "--config", str(config)])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, SustainDDPStrategy)
    assert strategy.log_every_n_steps == 1
    assert strategy.target_slack == 0.1
    # DDP keyword arguments pass through (jsonargparse resolves them from **kwargs)
    assert strategy._ddp_kwargs["find_unused_parameters"] is True
    assert cli.trainer.global_step == 3
    summary = json.loads((tmp_path / "ddp" / "ddp_summary.json").read_text())
    assert summary["world_size"] == 1
    assert summary["ranks"][0]["steps"] == 3


def test_cli_selects_strategy_by_name_in_process(tmp_path, single_process_group):
    register_strategies()
    cli = LightningCLI(
        CliModel,
        args=[
            "fit",
            "--trainer.strategy=sustain_ddp",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.max_steps=2",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert isinstance(cli.trainer.strategy, SustainDDPStrategy)
    assert cli.trainer.strategy._start_method == "popen"
    assert (tmp_path / "ddp_summary.json").exists()


def test_import_lightning_sustain_registers_the_names(tmp_path):
    # a fresh interpreter: nothing but `import lightning_sustain`
    import subprocess
    import sys

    code = (
        "import lightning_sustain\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "print(sorted(n for n in StrategyRegistry if n.startswith('sustain')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['sustain_ddp', 'sustain_ddp_spawn']"


def test_registration_is_idempotent():
    from lightning.pytorch.strategies import StrategyRegistry

    register_strategies()
    register_strategies()
    strategy = StrategyRegistry.get("sustain_ddp_spawn")
    assert isinstance(strategy, SustainDDPStrategy)
    assert strategy._start_method == "spawn"
    assert isinstance(
        pl.Trainer(strategy="sustain_ddp", accelerator="cpu", devices=2, logger=False).strategy,
        SustainDDPStrategy,
    )


PLAIN_CLI = """
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset


class Model(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x = torch.randn(64, 4)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


cli = LightningCLI(Model, run=False)
print("strategy", type(cli.trainer.strategy).__name__)
"""


@pytest.mark.parametrize(
    ("strategy_yaml", "callbacks", "works"),
    [
        ("\n    class_path: lightning_sustain.SustainDDPStrategy", True, True),
        pytest.param(
            "\n    class_path: lightning_sustain.SustainDDPStrategy",
            False,
            True,
            marks=pytest.mark.slow,
        ),
        # a short name needs lightning_sustain imported first (here nothing imports it)
        (" sustain_ddp", False, False),
    ],
)
def test_plain_user_cli_without_importing_lightning_sustain(
    tmp_path, strategy_yaml, callbacks, works
):
    # a user's own LightningCLI script that never imports lightning_sustain: the
    # class_path YAML documented in docs/ddp.md and the README works, the short name does not
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(PLAIN_CLI)
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  devices: 1\n  logger: false\n"
        f"  strategy:{strategy_yaml}\n"
        + (
            "  callbacks:\n    - class_path: lightning_sustain.EnergyMonitor\n"
            "      init_args: {cpu: none, trace: false}\n"
            if callbacks
            else ""
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])),
    )
    if works:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "strategy SustainDDPStrategy" in proc.stdout
    else:
        assert proc.returncode != 0
        assert "sustain_ddp" in proc.stderr
