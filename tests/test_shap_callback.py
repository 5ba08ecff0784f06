"""ShapSummary in real Trainer runs: CSV and TensorBoard loggers, no logger, DDP (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sustain.callbacks.shap_summary import ShapSummary
from lightning_sustain.explain import capture_rng_state, load_summary, snapshot_module

FEATURES = [f"f{i}" for i in range(12)]


class TabularDM(pl.LightningDataModule):
    def __init__(self, sensitive: bool = False, val: bool = True, d: int = 12, n: int = 96):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, d, generator=g)
        self.y = (self.x[:, 0] + self.x[:, 1] > 0).long()
        self.sensitive_data = sensitive
        self.feature_names = FEATURES[:d]
        self.class_names = ["no", "yes"]
        self._val = val

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x[:64], self.y[:64]), batch_size=16, shuffle=True)

    def val_dataloader(self):
        if not self._val:
            return []
        return DataLoader(TensorDataset(self.x[64:], self.y[64:]), batch_size=16)


class Net(pl.LightningModule):
    """SiLU, LayerNorm, a reused ReLU and Dropout; logs like a real module."""

    def __init__(self, d: int = 12, k: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.silu = nn.SiLU()
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(16, k)

    def forward(self, x):
        h = self.act(self.fc2(self.act(self.fc1(x))))
        return self.head(self.drop(self.silu(self.norm(h))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Recorder(pl.Callback):
    """Snapshots the model and RNG state at on_train_end (placed before/after ShapSummary)."""

    def __init__(self) -> None:
        self.snapshot = None
        self.rng = None

    def on_train_end(self, trainer, pl_module):
        self.snapshot = snapshot_module(pl_module)
        self.rng = capture_rng_state()


def _rng_equal(a, b) -> bool:
    return (
        a.python == b.python
        and all(np.array_equal(x, y) for x, y in zip(a.numpy, b.numpy, strict=True))
        and torch.equal(a.torch_cpu, b.torch_cpu)
    )


def _trainer(tmp_path, callbacks, logger=False, **kw):
    return pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=kw.pop("max_epochs", 2),
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kw,
    )


def test_csv_logger_sensitive_data_model_and_rng_untouched(tmp_path):
    before, after = Recorder(), Recorder()
    shap_cb = ShapSummary(num_background=20, num_samples=16)
    trainer = _trainer(tmp_path, [before, shap_cb, after], logger=CSVLogger(tmp_path))
    model = Net()
    trainer.fit(model, datamodule=TabularDM(sensitive=True))

    out = Path(trainer.log_dir) / "shap"
    assert out == tmp_path / "lightning_logs" / "version_0" / "shap"
    summary = load_summary(out)
    assert summary["status"] == "ok"
    assert summary["explainer"] == "gradient"  # LayerNorm rules out DeepLIFT
    assert any("nn.LayerNorm" in r for r in summary["deep_unsupported"])
    # what a reader needs to reproduce and judge the values
    assert summary["background"]["size"] == 20 and summary["background"]["seed"] == 0
    assert len(summary["background"]["indices"]) == 20
    assert set(summary["background"]["indices"]) <= set(range(64))
    assert summary["nsamples"]["references_per_row"] == 20
    assert summary["additivity"]["within_target"] is True
    assert max(summary["additivity"]["relative_to_output_std"]) <= 0.01
    window = summary["context"]["window"]
    assert window["end_monotonic_s"] > window["start_monotonic_s"]
    assert summary["total_s"] >= summary["explain_s"] > 0 and summary["plot_s"] > 0
    assert shap_cb.energy_phase_windows() == [
        ("shap", window["start_monotonic_s"], window["end_monotonic_s"])
    ]
    assert [o["name"] for o in summary["outputs"]] == ["no", "yes"]
    assert {f["name"] for f in summary["outputs"][0]["top_features"]} <= set(FEATURES)
    assert summary["n_explained"] == 16 and summary["n_background"] == 20
    assert summary["context"]["explained_rows_from"] == "validation"
    assert summary["privacy"]["feature_values_written"] is False
    with np.load(out / "shap_values.npz") as npz:
        assert "data" not in npz.files
        assert npz["values"].shape == (16, 12, 2)
    for name in ("beeswarm_no.png", "bar_no.png", "beeswarm_yes.png", "bar_yes.png"):
        assert (out / name).stat().st_size > 1000
    assert "not written" in (out / "summary.md").read_text()
    # the trained model: weights, train/eval flags, requires_grad, hooks, attributes
    assert after.snapshot.differences(before.snapshot) == []
    assert before.snapshot.training["<root>"] is True
    assert _rng_equal(before.rng, after.rng)
    assert shap_cb.state_dict() == {"last_dir": str(out)}


class CNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(4 * 4 * 4, 4),
        )  # fmt: skip

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class GradFreeShap(ShapSummary):
    """Lightning may call hooks under inference_mode; the callback must cope."""

    def on_train_end(self, trainer, pl_module):
        with torch.inference_mode():
            super().on_train_end(trainer, pl_module)


def test_tensorboard_images_under_inference_mode(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x = torch.randn(48, 1, 8, 8)
    y = torch.randint(0, 4, (48,))
    dl = DataLoader(TensorDataset(x, y), batch_size=12)
    cb = GradFreeShap(num_background=8, num_samples=6, top_k_outputs=2, explainer="deep")
    logger = TensorBoardLogger(tmp_path)
    trainer = _trainer(tmp_path, [cb], logger=logger, max_epochs=1)
    trainer.fit(CNN(), dl, dl)

    out = Path(trainer.log_dir) / "shap"
    summary = load_summary(out)
    assert summary["explainer"] == "deep"  # Conv/ReLU/MaxPool/Linear: all supported
    assert summary["input_kind"] == "image"
    assert len(summary["outputs"]) == 2
    for o in summary["outputs"]:
        assert o["additivity_max_abs_error"] < 1e-4
        assert (out / o["plots"]["image"]).is_file() and (out / o["plots"]["bar"]).is_file()
    assert not list(out.glob("beeswarm_*"))
    acc = EventAccumulator(str(trainer.log_dir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    image_tags = set(acc.Tags()["images"])
    expected = {f"shap/image/{o['name']}" for o in summary["outputs"]}
    expected |= {f"shap/bar/{o['name']}" for o in summary["outputs"]}
    assert expected <= image_tags


class Scalar(pl.LightningModule):
    """Single output of shape (N,); parameters in a ModuleList."""

    def __init__(self, d: int = 12) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, 8), nn.Linear(8, 1)])

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x))).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y.float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_no_logger_single_output_two_instances(tmp_path):
    a = ShapSummary(num_background=10, num_samples=8, nsamples=4, dirname="shap_a",
                    explainer="gradient")  # fmt: skip
    b = ShapSummary(num_background=10, num_samples=8, dirname="shap_b", explainer="permutation",
                    npermutations=2, feature_names=[f"g{i}" for i in range(12)])  # fmt: skip
    assert a.state_key != b.state_key
    trainer = _trainer(tmp_path, [a, b], max_steps=3)
    trainer.fit(Scalar(), datamodule=TabularDM(val=False))
    sa, sb = load_summary(tmp_path / "shap_a"), load_summary(tmp_path / "shap_b")
    assert (sa["explainer"], sb["explainer"]) == ("gradient", "permutation")
    assert sa["context"]["explained_rows_from"].startswith("train")
    assert [o["name"] for o in sa["outputs"]] == ["output"]
    assert sb["outputs"][0]["top_features"][0]["name"].startswith("g")
    assert sb["privacy"]["feature_values_written"] is True
    with np.load(tmp_path / "shap_b" / "shap_values.npz") as npz:
        assert npz["values"].shape == (8, 12, 1) and npz["data"].shape == (8, 12)
        np.testing.assert_allclose(
            npz["values"].sum(1), npz["model_output"] - npz["base_values"], atol=1e-5
        )


def test_failure_warns_and_fit_completes(tmp_path):
    class TupleOut(Scalar):
        def forward(self, x):
            return super().forward(x), x

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self(x)[0], y.float())

    trainer = _trainer(tmp_path, [ShapSummary(num_background=4, num_samples=4)], max_steps=2)
    with pytest.warns(UserWarning, match="ShapSummary could not explain the model.*returned tuple"):
        trainer.fit(TupleOut(), datamodule=TabularDM(val=False))
    assert trainer.state.finished
    summary = json.loads((tmp_path / "shap" / "summary.json").read_text())
    assert summary["status"] == "failed" and "tuple" in summary["error"]


def test_init_validation():
    with pytest.raises(ValueError, match="explainer='kernel'"):
        ShapSummary(explainer="kernel")
    with pytest.raises(ValueError, match="num_samples=0"):
        ShapSummary(num_samples=0)
    with pytest.raises(ValueError, match="relative sub-directory"):
        ShapSummary(dirname="/etc")


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from lightning.pytorch.loggers import CSVLogger
    from lightning_sustain.callbacks.shap_summary import ShapSummary

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2))
        def forward(self, x):
            return self.net(x)
        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    if __name__ == "__main__":
        root = Path(sys.argv[1])
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 12, generator=g)
        y = (x[:, 0] > 0).long()
        cb = ShapSummary(num_background=16, num_samples=8)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3,
                             logger=CSVLogger(root), default_root_dir=root, callbacks=[cb],
                             enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        trainer.fit(M(), DataLoader(TensorDataset(x, y), batch_size=8))
        (root / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"ran": cb.artefacts is not None, "log_dir": trainer.log_dir}))
    """
)


def test_ddp_two_processes_write_once(tmp_path):
    script = tmp_path / "ddp_shap.py"
    script.write_text(DDP_SCRIPT)
    root = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(script), str(root)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["ran"] for r in ranks] == [True, False]
    assert ranks[0]["log_dir"] == ranks[1]["log_dir"]
    summaries = list(root.rglob("summary.json"))
    assert summaries == [Path(ranks[0]["log_dir"]) / "shap" / "summary.json"]
    summary = load_summary(summaries[0])
    assert summary["explainer"] == "deep" and summary["n_explained"] == 8
    assert len(list(root.rglob("shap_values.npz"))) == 1


FAST_DEV_RUN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sustain import ShapSummary

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        def forward(self, x):
            return self.net(x)
        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def loaded():
        return sorted(m for m in sys.modules if m.split(".")[0] in ("shap", "matplotlib"))

    root, fast = sys.argv[1], sys.argv[2] == "fast"
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    before = loaded()
    cb = ShapSummary(num_background=8, num_samples=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, fast_dev_run=fast, logger=False,
                         default_root_dir=root, callbacks=[cb], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(M(), DataLoader(TensorDataset(x, y), batch_size=16))
    after = loaded()
    print(json.dumps({"new": [m for m in after if m not in before],
                      "shap": "shap" in sys.modules, "ran": cb.artefacts is not None}))
    """
)


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_fast_dev_run_writes_nothing_and_imports_stay_lazy(tmp_path, mode):
    script = tmp_path / "fdr.py"
    script.write_text(FAST_DEV_RUN_SCRIPT)
    root = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(root), mode], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if mode == "fast":
        assert report == {"new": [], "shap": False, "ran": False}
        assert not (root / "shap").exists()
    else:
        # the explanation ran; a ReLU MLP (DeepLIFT rules, own plots) needs no shap at all
        assert report["ran"] is True
        assert report["shap"] is False
        assert (root / "shap" / "summary.json").is_file()


class HookedNet(Net):
    """Net with user hooks on every module and a registered buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.counts: dict[str, int] = {}
        for name, module in self.named_modules():
            module.register_forward_hook(self._count(f"fwd:{name}"))
            module.register_forward_pre_hook(self._count(f"pre:{name}"))
            module.register_full_backward_hook(self._count(f"bwd:{name}"))
        self.fc1.weight.register_hook(self._count("tensor:fc1.weight"))

    def _count(self, key):
        def hook(*args):
            self.counts[key] = self.counts.get(key, 0) + 1

        return hook

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("explainer", ["auto", "deep", "permutation"])
def test_hook_counts_identical_with_and_without_shap(tmp_path, explainer):
    def fit(callbacks):
        pl.seed_everything(0)
        model = HookedNet()
        trainer = _trainer(tmp_path / str(len(callbacks)), callbacks, max_epochs=1)
        trainer.fit(model, datamodule=TabularDM())
        return model

    without = fit([])
    with_shap = fit([ShapSummary(num_background=8, num_samples=4, explainer=explainer,
                                 npermutations=1)])  # fmt: skip
    assert sum(without.counts.values()) > 0
    assert with_shap.counts == without.counts
    assert with_shap.calls.item() == without.calls.item()
    summary = load_summary(tmp_path / "1" / "shap")
    assert summary["status"] == "ok"
    expected = "permutation" if explainer == "permutation" else "gradient"  # LayerNorm: no deep
    assert summary["explainer"] == expected


class DictDM(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.rows = [
            {"num": torch.randn(3, generator=g), "cat": torch.randn(2, generator=g), "y": i % 2}
            for i in range(48)
        ]

    def train_dataloader(self):
        return DataLoader(self.rows, batch_size=8)


class DictNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fa, self.fb = nn.Linear(3, 2), nn.Linear(2, 2)

    def forward(self, num, cat):
        return self.fa(num) + self.fb(cat)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["num"], batch["cat"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_dict_batches_with_input_keys(tmp_path):
    cb = ShapSummary(num_background=8, num_samples=6, input_keys=["num", "cat"])
    trainer = _trainer(tmp_path, [cb], max_steps=2)
    trainer.fit(DictNet(), datamodule=DictDM())
    summary = load_summary(tmp_path / "shap")
    assert summary["status"] == "ok", summary.get("error")
    assert [i["name"] for i in summary["inputs"]] == ["num", "cat"]
    assert summary["settings"]["keyword_inputs"] is True
    with np.load(tmp_path / "shap" / "shap_values.npz") as npz:
        assert npz["values__num"].shape == (6, 3, 2) and npz["values__cat"].shape == (6, 2, 2)
    with pytest.raises(ValueError, match="not both"):
        ShapSummary(input_key="num", input_keys=["cat"])
