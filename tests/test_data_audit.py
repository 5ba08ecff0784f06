"""Access audit: hash-chained, MACed JSONL records of every decryption."""

from __future__ import annotations

import base64
import json
import multiprocessing as mp
import os
import random
import signal
import time

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_sustain.data.audit import (
    AUDIT_FILE_NAME,
    AuditError,
    append_record,
    audit_key,
    read_records,
    verify_audit,
)
from lightning_sustain.data.commands import main
from lightning_sustain.data.datamodule import EncryptedShardDataModule
from lightning_sustain.data.errors import WrongKeyError
from lightning_sustain.data.keys import (
    KeyReference,
    MasterKey,
    generate_key,
    rotate_key,
    write_key_file,
)
from lightning_sustain.data.reader import open_split, resolve_data_key, verify_dataset
from lightning_sustain.data.writer import write_arrays
from tests._audit_worker import appender as _appender

N = 600


@pytest.fixture()
def ds(tmp_path):
    raw = generate_key()
    keyfile = write_key_file(tmp_path / "master.key", raw)
    ref = KeyReference(file=str(keyfile))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    kw = dict(frame_nbytes=1024, shard_nbytes=4096, progress=False)
    write_arrays(tmp_path / "ds", "train", {"x": x, "y": y}, ref, **kw)
    write_arrays(tmp_path / "ds", "val", {"x": x[:100], "y": y[:100]}, ref, **kw)
    return tmp_path / "ds", ref, raw, keyfile


def _keys(root, ref):
    dk, ds_id, _ = resolve_data_key(root, ref)
    return {ds_id.hex(): audit_key(dk, ds_id)}


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_with_workers_verify_open_rotate_are_recorded(ds, tmp_path, monkeypatch):
    root, ref, raw, keyfile = ds
    dm = EncryptedShardDataModule(str(root), val_dir="val", key_file=str(keyfile),
                                  batch_size=32, num_workers=2, batch_format="tuple",
                                  tuple_keys=["x", "y"], audit_purpose="study-42")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", default_root_dir=tmp_path / "run",
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(_Tiny(), dm)
    with open_split(root, "val", ref, audit_context={"purpose": "adhoc"}) as r:
        for i in range(40):
            r.read_sample(i)
    verify_dataset(root, ref)
    new = MasterKey(generate_key())
    rotate_key(root, ref, new)

    recs = read_records(root / AUDIT_FILE_NAME)
    assert all(isinstance(r, dict) for r in recs)
    by = {}
    for r in recs:
        by.setdefault(r["action"], []).append(r)
    assert {"setup", "read", "open", "verify", "rotate-key"} <= set(by)
    train_reads = [r for r in by["read"] if r["splits"] == ["train"]]
    # 2 epochs x 2 workers, each a separate process; together they read every sample twice
    assert len(train_reads) == 4 and len({r["pid"] for r in train_reads}) >= 2
    assert {r["worker"] for r in train_reads} == {0, 1}
    assert sum(r["samples"] for r in train_reads) == 2 * N
    for r in by["setup"] + by["read"]:
        assert r["purpose"] == "study-42" and r["outcome"] == "ok"
        assert r["log_dir"] and str(tmp_path / "run") in r["log_dir"]
        assert r["config_hash"] and len(r["config_hash"]) == 64
        assert r["dataset_version"] and set(r["dataset_version"]) <= {"train", "val"}
        assert all(type(v) is int and v >= 1 for v in r["dataset_version"].values())
    opened = by["open"][0]
    assert opened["samples"] >= 40 and opened["purpose"] == "adhoc"
    assert opened["shards"] and all(s.startswith("val/") for s in opened["shards"])
    assert by["verify"][0]["samples"] == N + 100
    assert by["rotate-key"][0]["new_key_id"] == new.key_id
    key_id = MasterKey(raw).key_id
    assert all(r["key_id"] == key_id for r in recs)
    text = (root / AUDIT_FILE_NAME).read_text()
    for secret in (raw.hex(), base64.b64encode(raw).decode(), new._key.hex()):
        assert secret not in text
    # the chain holds, with the MAC key derived from the data key (survives rotation)
    report = verify_audit(root / AUDIT_FILE_NAME, _keys(root, new))
    assert report.ok, report.errors
    assert report.authenticated == len(recs) and not report.unauthenticated


def _make_chain(root, ref, n=12):
    keys = _keys(root, ref)
    (ds_id, key), = keys.items()
    path = root / AUDIT_FILE_NAME
    for i in range(n):
        append_record(path, {"action": "read", "dataset_id": ds_id, "samples": i}, key,
                      fsync=False)
    return path, keys


TAMPERS = ["edit", "edit_rehash", "delete", "swap", "insert_copy", "forge_mac", "torn"]


@pytest.mark.parametrize("seed", range(6))
def test_any_edit_deletion_or_reordering_is_detected(ds, seed, capsys):
    root, ref, _, keyfile = ds
    path, keys = _make_chain(root, ref)
    assert verify_audit(path, keys).ok
    rng = random.Random(seed)
    lines = path.read_text().splitlines(keepends=True)
    for kind in TAMPERS:
        i = rng.randrange(len(lines) - 1)
        new = list(lines)
        rec = json.loads(new[i])
        if kind == "edit":
            rec["samples"] += 1
            new[i] = json.dumps(rec) + "\n"
        elif kind == "edit_rehash":  # attacker recomputes every hash after the edit
            from lightning_sustain.data.audit import _chain_hash

            rec["samples"] += 1000
            new[i] = json.dumps(rec) + "\n"
            prev = rec["prev"]
            for j in range(i, len(new)):
                r = json.loads(new[j])
                r["prev"] = prev
                body = {k: v for k, v in r.items() if k not in ("hash", "mac")}
                r["hash"] = prev = _chain_hash(prev, body)
                new[j] = json.dumps(r) + "\n"
        elif kind == "delete":
            del new[i]
        elif kind == "swap":
            new[i], new[i + 1] = new[i + 1], new[i]
        elif kind == "insert_copy":
            new.insert(i, new[i])
        elif kind == "forge_mac":
            rec["mac"] = "0" * 64
            new[i] = json.dumps(rec) + "\n"
        elif kind == "torn":
            new[i] = new[i][: len(new[i]) // 2] + "\n"
        path.write_text("".join(new))
        report = verify_audit(path, keys)
        assert not report.ok, kind
        assert main(["audit", "verify", "--root", str(root), "--key-file", str(keyfile)]) == 1
        assert "BROKEN: line" in capsys.readouterr().out
        path.write_text("".join(lines))
    assert verify_audit(path, keys).ok
    # a cut-off tail is only detectable against a head noted earlier
    head = verify_audit(path, keys).head
    path.write_text("".join(lines[:-2]))
    assert verify_audit(path, keys).ok
    assert not verify_audit(path, keys, expect_head=head).ok


def test_concurrent_processes_never_fork_the_chain(ds):
    root, ref, _, _ = ds
    (ds_id, key), = _keys(root, ref).items()
    path = root / AUDIT_FILE_NAME
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_appender, args=(path, key, ds_id, 40, barrier))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        assert p.exitcode == 0
    report = verify_audit(path, {ds_id: key})
    assert report.ok, report.errors[:3]
    recs = read_records(path)
    assert len(recs) == 160 and [r["seq"] for r in recs] == list(range(160))
    assert len({r["worker"] for r in recs}) == 4


def test_writer_killed_at_random_points_leaves_a_valid_chain(ds):
    root, ref, _, _ = ds
    (ds_id, key), = _keys(root, ref).items()
    path = root / AUDIT_FILE_NAME
    ctx = mp.get_context("spawn")
    rng = random.Random(1)
    for _ in range(2):
        barrier = ctx.Barrier(3)
        victim = ctx.Process(target=_appender, args=(path, key, ds_id, 100_000, barrier))
        other = ctx.Process(target=_appender, args=(path, key, ds_id, 30, barrier))
        victim.start()
        other.start()
        barrier.wait(timeout=600)  # both have started appending
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(30)
        other.join(600)
        assert other.exitcode == 0
    append_record(path, {"action": "read", "dataset_id": ds_id}, key)  # heals a torn tail
    report = verify_audit(path, {ds_id: key})
    assert report.ok, report.errors[:3]
    assert report.records > 60


def test_failed_key_is_recorded_without_mac_and_unwritable_audit_refuses(ds, tmp_path,
                                                                          monkeypatch):
    root, ref, _, _ = ds
    wrong = tmp_path / "wrong.key"
    write_key_file(wrong, generate_key())
    dm = EncryptedShardDataModule(str(root), key_file=str(wrong))
    with pytest.raises(WrongKeyError):
        dm.setup("fit")
    rec = read_records(root / AUDIT_FILE_NAME)[-1]
    assert rec["outcome"] == "error" and rec["mac"] is None
    assert rec["error"].startswith("WrongKeyError") and rec["dataset_id"]
    report = verify_audit(root / AUDIT_FILE_NAME, _keys(root, ref))
    assert report.ok and report.unauthenticated == [1]
    # no audit record, no decryption
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a directory is needed")
    dm = EncryptedShardDataModule(str(root), key_file=ref.file,
                                  audit_path=str(blocked / "audit.jsonl"))
    with pytest.raises(AuditError, match="audit"):
        dm.setup("fit")
    with pytest.raises(AuditError):
        open_split(root, "train", ref, audit_path=str(blocked / "a.jsonl")).close()


def test_audit_show_cli(ds, capsys):
    root, ref, _, keyfile = ds
    verify_dataset(root, ref, audit_context={"purpose": "release-check"})
    assert main(["audit", "show", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "verify" in out and "release-check" in out
    assert main(["audit", "verify", "--root", str(root)]) == 0
    assert "MACs not checked" in capsys.readouterr().out
    assert main(["audit", "verify", "--root", str(root), "--key-file", str(keyfile)]) == 0
    assert "OK: 1 record(s), 1 authenticated" in capsys.readouterr().out


def test_top_level_command_dispatches_audit(ds, capsys):
    from lightning_sustain.cli import main as top_main

    root, ref, _, keyfile = ds
    verify_dataset(root, ref)
    assert top_main(["audit", "verify", "--root", str(root), "--key-file", str(keyfile)]) == 0
    assert "OK: 1 record(s), 1 authenticated" in capsys.readouterr().out


def test_read_records_are_appended_off_the_training_thread_and_fail_closed(
        ds, tmp_path, monkeypatch):
    """A pass's record is appended by the process's audit writer thread, in order; the
    next audited operation waits for it and raises if it could not be appended."""
    import threading

    from lightning_sustain.data import audit as audit_mod
    from lightning_sustain.data.audit import AuditError

    root, ref, raw, keyfile = ds
    real = audit_mod.append_record
    threads: list[tuple[str, str]] = []

    def spy(path, record, key, fsync=True):
        threads.append((record["action"], threading.current_thread().name))
        return real(path, record, key, fsync=fsync)

    monkeypatch.setattr(audit_mod, "append_record", spy)
    dm = EncryptedShardDataModule(str(root), val_dir="val", key_file=str(keyfile),
                                  batch_size=32, batch_format="tuple", tuple_keys=["x", "y"])
    dm.setup("fit")
    path = root / AUDIT_FILE_NAME
    loader = dm.train_dataloader()
    for epoch in range(3):
        assert sum(1 for _ in loader) > 0
        audit_mod.wait_pending_records()
        reads = [r for r in read_records(path) if r["action"] == "read"]
        assert len(reads) == epoch + 1 and reads[-1]["samples"] == N
    assert [t for a, t in threads if a == "read"] and all(
        t.startswith("lss-audit") for a, t in threads if a == "read")
    assert all(t == threading.main_thread().name for a, t in threads if a == "setup")
    report = verify_audit(path, _keys(root, ref))
    assert report.ok and report.records == len(read_records(path))

    # the writer cannot append: the next pass refuses to decrypt anything
    def broken(path, record, key, fsync=True):
        raise AuditError(f"cannot append to the access audit file {str(path)!r} (test)",
                         shard=str(path))

    monkeypatch.setattr(audit_mod, "append_record", broken)
    assert sum(1 for _ in loader) > 0  # this pass's record fails in the background
    with pytest.raises(AuditError, match="cannot append"):
        next(iter(loader))
    monkeypatch.setattr(audit_mod, "append_record", real)
    assert sum(1 for _ in loader) > 0  # the failure was raised once; writing works again
    audit_mod.wait_pending_records()
    assert verify_audit(path, _keys(root, ref)).ok
