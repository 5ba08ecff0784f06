"""EncryptedShardDataModule: splitting, shuffling, workers, DDP, Trainer and key hygiene."""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_sustain.data import reader as reader_mod
from lightning_sustain.data.datamodule import (
    EncryptedShardDataModule,
    EncryptedShardDataset,
    plan_epoch,
)
from lightning_sustain.data.errors import (
    DatasetNotFoundError,
    KeyReferenceError,
    SchemaError,
    WrongKeyError,
)
from lightning_sustain.data.keys import KeyProvider, KeyReference, generate_key, write_key_file
from lightning_sustain.data.reader import open_split
from lightning_sustain.data.writer import write_arrays

N = 1000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    base = tmp_path_factory.mktemp("dm")
    raw = generate_key()
    key = write_key_file(base / "master.key", raw)
    ref = KeyReference(file=str(key))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 6)).astype(np.float32)
    idx = np.arange(N, dtype=np.int64)
    kw = dict(frame_nbytes=1024, shard_nbytes=8192, progress=False)  # 32 per frame, 7 frames
    write_arrays(base / "ds", "train", {"x": x, "idx": idx}, ref,
                 feature_names=[f"f{i}" for i in range(6)], **kw)
    write_arrays(base / "ds", "val", {"x": x[:100], "idx": idx[:100]}, ref, **kw)
    return base / "ds", str(key), raw, x


def _ids(loader):
    out = []
    for batch in loader:
        ids = batch["idx"] if isinstance(batch, dict) else batch[1]
        out.append(ids.numpy())
    return out


# --- pure split logic ----------------------------------------------------------------------


@pytest.mark.parametrize("world,workers,bs,drop_last", [(1, 1, 7, False), (2, 3, 5, False),
                                                       (3, 2, 16, True), (4, 1, 1, False),
                                                       (2, 4, 64, False)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_plan_is_disjoint_and_balanced(world, workers, bs, drop_last, shuffle):
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 40, 57)
    seen = []
    rank_batch_counts = []
    rank_samples = []
    for rank in range(world):
        nb = 0
        ns = 0
        for w in range(workers):
            p = plan_epoch(counts, epoch=3, seed=11, shuffle=shuffle, rank=rank, world_size=world,
                           worker_id=w, num_workers=workers, batch_size=bs, drop_last=drop_last)
            for g, a, b in p.reads:
                start = int(np.sum(counts[:g]))
                seen.extend(range(start + a, start + b))
            assert p.num_samples == sum(b - a for _, a, b in p.reads)
            nb += p.num_batches
            ns += p.num_samples
            if w < workers - 1:  # only a rank's last worker may hold a partial batch
                assert p.num_samples == p.num_batches * bs
        rank_batch_counts.append(nb)
        rank_samples.append(ns)
    total = int(counts.sum())
    assert len(seen) == len(set(seen))  # no sample twice
    assert len(set(rank_batch_counts)) == 1  # DDP cannot hang
    assert len(set(rank_samples)) == 1
    expected = (total // world // bs * bs if drop_last else total // world) * world
    assert len(seen) == expected and total - len(seen) < world * (bs if drop_last else 1)


def test_plan_depends_on_epoch_and_seed_only():
    counts = [10] * 30
    kw = dict(shuffle=True, rank=0, world_size=1, worker_id=0, num_workers=1, batch_size=4,
              drop_last=False)
    a = plan_epoch(counts, epoch=0, seed=5, **kw).reads
    assert a == plan_epoch(counts, epoch=0, seed=5, **kw).reads
    assert a != plan_epoch(counts, epoch=1, seed=5, **kw).reads
    assert a != plan_epoch(counts, epoch=0, seed=6, **kw).reads
    with pytest.raises(ValueError, match="invalid split"):
        plan_epoch(counts, epoch=0, seed=0, shuffle=False, rank=2, world_size=2, worker_id=0,
                   num_workers=1, batch_size=1, drop_last=False)


# --- DataModule ----------------------------------------------------------------------------


def test_setup_exposes_schema_and_flags(dataset):
    root, key, _, _ = dataset
    dm = EncryptedShardDataModule(str(root), val_dir="val", key_file=key, batch_size=32)
    assert EncryptedShardDataModule.sensitive_data is True
    assert dm.feature_names is None
    dm.setup("fit")
    assert dm.feature_names == [f"f{i}" for i in range(6)]
    assert dm.schema.names == ["x", "idx"] and dm.key_id
    assert len(dm.train_dataloader()) == -(-N // 32)


def test_multi_worker_epoch_yields_every_sample_once(dataset):
    root, key, _, x = dataset
    dm = EncryptedShardDataModule(str(root), key_file=key, batch_size=50, num_workers=2, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = []
    for batch in loader:
        batches.append(batch)
        np.testing.assert_array_equal(batch["x"].numpy(), x[batch["idx"].numpy()])
    ids = np.concatenate([b["idx"].numpy() for b in batches])
    assert sorted(ids.tolist()) == list(range(N))
    assert len(batches) == len(loader) == N // 50
    assert all(len(b["idx"]) == 50 for b in batches)
    assert batches[0]["x"].dtype == torch.float32 and batches[0]["idx"].dtype == torch.int64


def test_shuffle_mixes_shards_and_is_reproducible(dataset):
    root, key, _, _ = dataset

    def epochs(seed_everything):
        pl.seed_everything(seed_everything)
        dm = EncryptedShardDataModule(str(root), key_file=key, batch_size=64, num_workers=0)
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [np.concatenate(_ids(loader)) for _ in range(2)]

    e0, e1 = epochs(123)
    f0, f1 = epochs(123)
    g0, _ = epochs(7)
    np.testing.assert_array_equal(e0, f0)
    np.testing.assert_array_equal(e1, f1)
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, g0)
    assert sorted(e0.tolist()) == list(range(N))
    # the first batch draws from several shards
    with open_split(root, "train", KeyReference(file=key)) as r:
        bounds = np.cumsum([s.num_samples for s in r.manifest.shards])
    assert len(bounds) >= 4
    assert len(set(np.searchsorted(bounds, e0[:64], side="right").tolist())) > 1


def test_val_is_ordered_and_tuple_format(dataset):
    root, key, _, x = dataset
    dm = EncryptedShardDataModule(str(root), val_dir="val", key_file=key, batch_size=30,
                                  batch_format="tuple", tuple_keys=["x", "idx"])
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    xb, ib = batches[0]
    assert isinstance(batches[0], tuple) and ib.tolist() == list(range(30))
    np.testing.assert_array_equal(xb.numpy(), x[:30])
    assert [len(b[1]) for b in batches] == [30, 30, 30, 10]
    assert dm.test_dataloader() == []


def test_ranks_split_without_overlap(dataset):
    root, key, _, _ = dataset
    ref = KeyReference(file=key)
    per_rank = []
    for rank in range(3):
        ds = EncryptedShardDataset(str(root), "train", ref, num_samples=N, batch_size=16,
                                   shuffle=True, seed=9, rank=rank, world_size=3)
        ids = _ids(ds)
        assert len(ids) == len(ds)
        per_rank.append(np.concatenate(ids))
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == N // 3
    allids = np.concatenate(per_rank)
    assert len(np.unique(allids)) == len(allids) == N - N % 3


def test_frame_buffers_are_wiped(dataset, monkeypatch):
    root, key, _, _ = dataset
    buffers = []
    orig = reader_mod.SplitReader.read_frame

    def spy(self, si, fi):
        cols, buf = orig(self, si, fi)
        buffers.append(buf)
        return cols, buf

    monkeypatch.setattr(reader_mod.SplitReader, "read_frame", spy)
    ds = EncryptedShardDataset(str(root), "train", KeyReference(file=key), num_samples=N,
                               batch_size=64, shuffle=True, seed=1)
    n = sum(len(b["idx"]) for b in ds)
    assert n == N and buffers
    assert all(not any(b) for b in buffers)  # every decrypted frame zeroed after use


def test_wrong_or_missing_key_fails_fast(dataset, monkeypatch, tmp_path):
    root, _, _, _ = dataset
    other = write_key_file(tmp_path / "other.key", generate_key())
    dm = EncryptedShardDataModule(str(root), key_file=str(other))
    with pytest.raises(WrongKeyError, match="key id"):
        dm.setup("fit")
    monkeypatch.delenv("LS_MISSING", raising=False)
    with pytest.raises(KeyReferenceError, match="LS_MISSING"):
        EncryptedShardDataModule(str(root), key_env="LS_MISSING").setup("fit")
    with pytest.raises(KeyReferenceError, match="exactly one"):
        EncryptedShardDataModule(str(root))
    with pytest.raises(DatasetNotFoundError, match="no complete split 'nope'"):
        EncryptedShardDataModule(str(root), train_dir="nope", key_file=dataset[1]).setup("fit")
    with pytest.raises(SchemaError, match=r"\['label'\]"):
        EncryptedShardDataModule(str(root), key_file=dataset[1], batch_format="tuple",
                                 tuple_keys=["x", "label"]).setup("fit")


class _Tiny(pl.LightningModule):
    def __init__(self, n_features: int = 30, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(n_features, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.net(x).argmax(1) == y).float().mean()
        self.log("val_acc", acc, batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def _breast_cancer(tmp_path, ref):
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = ((d.data - d.data.mean(0)) / d.data.std(0)).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    root = tmp_path / "bc"
    names = list(d.feature_names)
    write_arrays(root, "train", {"x": x[:450], "y": y[:450]}, ref, feature_names=names,
                 frame_nbytes=2048, progress=False)
    write_arrays(root, "val", {"x": x[450:], "y": y[450:]}, ref, feature_names=names,
                 progress=False)
    return root, names


def test_trainer_fits_breast_cancer_from_encrypted_shards(tmp_path):
    key = write_key_file(tmp_path / "k", generate_key())
    root, names = _breast_cancer(tmp_path, KeyReference(file=str(key)))
    dm = EncryptedShardDataModule(str(root), val_dir="val", key_file=str(key), batch_size=32,
                                  num_workers=2, batch_format="tuple", tuple_keys=["x", "y"],
                                  seed=0)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(_Tiny(), dm)
    assert trainer.callback_metrics["val_acc"] > 0.9
    assert trainer.datamodule.feature_names == names
    assert getattr(trainer.datamodule, "sensitive_data", False) is True


def test_key_never_leaks_after_lightning_cli_fit(tmp_path, monkeypatch, caplog, capfd):
    raw = generate_key()
    monkeypatch.setenv("LS_LEAK_KEY", "lskey1:" + base64.b64encode(raw).decode())
    root, _ = _breast_cancer(tmp_path, KeyReference(env="LS_LEAK_KEY"))
    out = tmp_path / "run"
    caplog.set_level(logging.DEBUG)
    cli = LightningCLI(
        _Tiny,
        EncryptedShardDataModule,
        args=[
            "fit",
            f"--data.root={root}", "--data.val_dir=val", "--data.key_env=LS_LEAK_KEY",
            "--data.batch_size=64", "--data.num_workers=1", "--data.batch_format=tuple",
            "--data.tuple_keys=[x, y]",
            "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
            "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={out}",
        ],
        save_config_kwargs={"overwrite": True},
    )
    dm = cli.datamodule
    (out / "dm.pkl").write_bytes(pickle.dumps(dm))
    (out / "repr.txt").write_text(repr(dm) + repr(dm.train_dataloader().dataset))
    (out / "captured.txt").write_text(caplog.text + "".join(capfd.readouterr()))
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "hparams.yaml", "metrics.csv", "dm.pkl"} <= names
    assert any(p.suffix == ".ckpt" for p in files)
    ckpt = torch.load(next(p for p in files if p.suffix == ".ckpt"), weights_only=False)
    assert ckpt["datamodule_hyper_parameters"]["key_env"] == "LS_LEAK_KEY"
    forms = [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw),
             base64.urlsafe_b64encode(raw), base64.b64encode(raw).rstrip(b"=")]
    for p in files:
        blob = p.read_bytes()
        for form in forms:
            assert form not in blob, f"key material found in {p}"
    config = next(p for p in files if p.name == "config.yaml").read_text()
    assert "key_env: LS_LEAK_KEY" in config


def test_key_provider_objects_travel_without_the_key(dataset):
    root, key, raw, _ = dataset
    dm = EncryptedShardDataModule(str(root), key_provider=FileProvider(key), batch_size=100,
                                  num_workers=2, shuffle=False)
    dm.setup("fit")
    assert sum(len(b["idx"]) for b in dm.train_dataloader()) == N
    assert "key_provider" not in dm.hparams
    blob = pickle.dumps(dm)
    assert raw not in blob and base64.b64encode(raw) not in blob


class FileProvider(KeyProvider):
    """Reads the key when asked; holds only the path."""

    def __init__(self, path: str):
        self.path = path

    def get_key(self) -> bytes:
        return Path(self.path).read_bytes()

    def __repr__(self) -> str:
        return f"FileProvider({self.path!r})"


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, json, numpy as np, torch, lightning.pytorch as pl
    from lightning_sustain.data.datamodule import EncryptedShardDataModule

    root, key, out = sys.argv[1:4]

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(6, 1)
            self.ids = []

        def training_step(self, batch, i):
            self.ids.append(batch["idx"].tolist())
            return self.l(batch["x"]).pow(2).mean()

        def on_train_end(self):
            with open(f"{out}/rank{self.global_rank}.json", "w") as fh:
                json.dump({"ids": self.ids, "seed": self.trainer.datamodule._seed}, fh)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    if __name__ == "__main__":
        dm = EncryptedShardDataModule(root, key_file=key, batch_size=32, num_workers=2)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1,
                             logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(M(), dm)
    """
)


def test_real_ddp_two_processes_split_shards(dataset, tmp_path):
    root, key, _, _ = dataset
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PL_GLOBAL_SEED"}
    proc = subprocess.run([sys.executable, str(script), str(root), key, str(tmp_path)],
                          timeout=240, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["seed"] == r1["seed"]  # random seed broadcast from rank 0
    assert len(r0["ids"]) == len(r1["ids"]) == -(-(N // 2) // 32)
    # access audit (issue 16): both ranks and their 4 worker processes appended to one
    # intact chain
    from lightning_sustain.data.audit import AUDIT_FILE_NAME, read_records, verify_audit

    assert verify_audit(root / AUDIT_FILE_NAME).ok
    reads = [r for r in read_records(root / AUDIT_FILE_NAME)
             if r["action"] == "read" and r["splits"] == ["train"]]
    assert {r["worker"] for r in reads if r["rank"] == 1} == {0, 1}
    ids0 = [i for b in r0["ids"] for i in b]
    ids1 = [i for b in r1["ids"] for i in b]
    assert len(ids0) == len(ids1) == N // 2
    assert not set(ids0) & set(ids1) and len(set(ids0) | set(ids1)) == N
