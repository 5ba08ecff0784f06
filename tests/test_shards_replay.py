"""No version is ever reused: each way an old frame, shard, manifest or split could come back.

Every write binds a random write id into every frame and the authenticated dataset
manifest (``dataset.lsd``) keeps the versions, so deleting, corrupting or crashing a
split cannot make an old shard authenticate again, and pins catch a rolled-back root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_sustain.data.errors import (
    FrameAuthenticationError,
    ManifestError,
    MissingShardError,
    RollbackError,
    ShardError,
    ShardHeaderError,
    ShardSwappedError,
    StaleShardError,
)
from lightning_sustain.data.format import DATASET_MANIFEST_NAME, MANIFEST_NAME, SHARD_HEADER
from lightning_sustain.data.keys import KeyReference, generate_key, write_key_file
from lightning_sustain.data.reader import open_split, verify_dataset
from lightning_sustain.data.writer import write_arrays

KW = dict(frame_nbytes=1024, shard_nbytes=8192, progress=False)


def _data(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 8)).astype(np.float32),
            "y": np.arange(n, dtype=np.int64) + 1000 * seed}


@pytest.fixture()
def ref(tmp_path):
    return KeyReference(file=str(write_key_file(tmp_path / "k.key", generate_key())))


def _read_all(root, ref, **pins):
    with open_split(root, "train", ref, **pins) as r:
        return np.concatenate([r.read_frame(si, fi)[0]["y"].copy()
                               for si, fi, _ in r.frame_units()])


def _put_back_old_shard(root: Path, old: bytes, *, forge_header: bool) -> None:
    """The attack: an old shard file in the place of the current one."""
    path = root / "train" / "shard-00000.lss"
    if forge_header:  # keep the current plaintext header, old frames behind it
        old = path.read_bytes()[: SHARD_HEADER.size] + old[SHARD_HEADER.size :]
    path.write_bytes(old)


def _assert_old_shard_refused(root, ref, old: bytes, old_version: int) -> None:
    for forge in (False, True):
        _put_back_old_shard(root, old, forge_header=forge)
        with pytest.raises((StaleShardError, FrameAuthenticationError, ShardHeaderError)):
            _read_all(root, ref)
        report = verify_dataset(root, ref)
        assert not report.ok
    with open_split(root, "train", ref) as r:
        assert r.manifest.dataset_version > old_version


def test_delete_split_and_reencrypt(tmp_path, ref):
    root = tmp_path / "ds"
    first = write_arrays(root, "train", _data(200, 1), ref, **KW)
    old = (root / "train" / "shard-00000.lss").read_bytes()
    shutil.rmtree(root / "train")
    second = write_arrays(root, "train", _data(200, 2), ref, **KW)
    assert second.dataset_version > first.dataset_version
    assert second.write_id != first.write_id
    _assert_old_shard_refused(root, ref, old, first.dataset_version)


def test_corrupted_manifest_then_reencrypt(tmp_path, ref):
    root = tmp_path / "ds"
    first = write_arrays(root, "train", _data(200, 1), ref, **KW)
    old = (root / "train" / "shard-00000.lss").read_bytes()
    manifest = root / "train" / MANIFEST_NAME
    raw = bytearray(manifest.read_bytes())
    raw[40] ^= 1  # the version field of the plaintext header
    manifest.write_bytes(bytes(raw))
    second = write_arrays(root, "train", _data(200, 2), ref, **KW)
    assert second.dataset_version == first.dataset_version + 1
    _assert_old_shard_refused(root, ref, old, first.dataset_version)


def test_corrupted_or_deleted_dataset_manifest_stops_writers_and_readers(tmp_path, ref):
    root = tmp_path / "ds"
    write_arrays(root, "train", _data(50, 1), ref, **KW)
    dm = root / DATASET_MANIFEST_NAME
    good = dm.read_bytes()
    dm.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ManifestError, match="dataset manifest failed authentication"):
        write_arrays(root, "train", _data(50, 2), ref, **KW)
    with pytest.raises(ManifestError):
        _read_all(root, ref)
    dm.unlink()
    with pytest.raises(ManifestError, match="missing"):
        write_arrays(root, "train", _data(50, 2), ref, **KW)
    with pytest.raises(ManifestError, match="missing"):
        _read_all(root, ref)
    report = verify_dataset(root, ref)
    assert not report.ok and DATASET_MANIFEST_NAME in report.errors[0]
    dm.write_bytes(good)
    assert len(_read_all(root, ref)) == 50


_CRASH = """
import os, sys, numpy as np
from lightning_sustain.data.keys import KeyReference
from lightning_sustain.data.writer import write_arrays
import lightning_sustain.data.writer as w
crash_after = int(sys.argv[3])
calls = []
real_rename = os.rename
def rename(a, b):
    real_rename(a, b)
    calls.append(b)
    if len(calls) == crash_after:
        os._exit(9)
w.os.rename = rename
rng = np.random.default_rng(2)
write_arrays(sys.argv[1], "train", {"x": rng.standard_normal((200, 8)).astype(np.float32),
             "y": np.arange(200, dtype=np.int64) + 2000}, KeyReference(file=sys.argv[2]),
             frame_nbytes=1024, shard_nbytes=8192, progress=False)
"""


@pytest.mark.parametrize("crash_after", [1, 2])
def test_crash_between_renames(tmp_path, ref, crash_after):
    """A writer killed after the first rename (old split moved aside) or after the second
    (new split in place, dataset manifest not yet updated)."""
    root = tmp_path / "ds"
    first = write_arrays(root, "train", _data(200, 1), ref, **KW)
    old = (root / "train" / "shard-00000.lss").read_bytes()
    script = tmp_path / "crash.py"
    script.write_text(_CRASH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(script), str(root), ref.file, str(crash_after)],
                          env=env, timeout=120, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    if crash_after == 1:
        assert not (root / "train").exists() and list(root.glob(".train.old-*"))
        with pytest.raises(MissingShardError, match="deleted"):
            _read_all(root, ref)
    else:
        with pytest.raises(RollbackError, match="interrupted"):
            _read_all(root, ref)
    report = verify_dataset(root, ref)
    assert not report.ok
    # the next write cleans the leftovers and never reuses a version
    third = write_arrays(root, "train", _data(200, 3), ref, **KW)
    assert not list(root.glob(".train.old-*")) and not list(root.glob(".train.incomplete-*"))
    assert third.dataset_version > first.dataset_version + 1  # the crashed write's too
    assert set(_read_all(root, ref)) == set(range(3000, 3200))
    _assert_old_shard_refused(root, ref, old, first.dataset_version)


def test_rolled_back_split_is_detected(tmp_path, ref):
    """A whole old split directory (manifest and shards together) put back."""
    root = tmp_path / "ds"
    write_arrays(root, "train", _data(100, 1), ref, **KW)
    shutil.copytree(root / "train", tmp_path / "old-train")
    write_arrays(root, "train", _data(100, 2), ref, **KW)
    shutil.rmtree(root / "train")
    shutil.copytree(tmp_path / "old-train", root / "train")
    with pytest.raises(RollbackError, match="old manifest .*put back"):
        _read_all(root, ref)
    assert not verify_dataset(root, ref).ok


def test_old_manifest_with_current_shards_is_named_as_such(tmp_path, ref):
    root = tmp_path / "ds"
    write_arrays(root, "train", _data(100, 1), ref, **KW)
    old_manifest = (root / "train" / MANIFEST_NAME).read_bytes()
    old_dm = (root / DATASET_MANIFEST_NAME).read_bytes()
    write_arrays(root, "train", _data(100, 2), ref, **KW)
    (root / "train" / MANIFEST_NAME).write_bytes(old_manifest)
    with pytest.raises(RollbackError, match="old manifest"):
        _read_all(root, ref)
    # and with the old dataset manifest too (a full rollback except the shards)
    (root / DATASET_MANIFEST_NAME).write_bytes(old_dm)
    with pytest.raises(StaleShardError, match="an old manifest was put back"):
        _read_all(root, ref)


def test_deleted_split_or_manifest_fails_verify(tmp_path, ref):
    root = tmp_path / "ds"
    write_arrays(root, "train", _data(50, 1), ref, **KW)
    write_arrays(root, "val", _data(50, 2), ref, **KW)
    assert verify_dataset(root, ref).ok
    (root / "val" / MANIFEST_NAME).unlink()
    report = verify_dataset(root, ref)
    assert not report.ok and "val" in report.splits and "deleted" in report.errors[0]
    shutil.rmtree(root / "val")
    report = verify_dataset(root, ref)
    assert not report.ok and "'val' is listed" in report.errors[0]


def test_unlisted_split_directory_fails_verify(tmp_path, ref):
    root = tmp_path / "ds"
    other = tmp_path / "other"
    write_arrays(root, "train", _data(50, 1), ref, **KW)
    write_arrays(other, "val", _data(50, 2), ref, **KW)
    shutil.copytree(other / "val", root / "val")
    report = verify_dataset(root, ref)
    assert not report.ok and any("does not list it" in e for e in report.errors)


def test_pins_detect_rolled_back_or_replaced_root(tmp_path, ref):
    root = tmp_path / "ds"
    write_arrays(root, "train", _data(100, 1), ref, **KW)
    shutil.copytree(root, tmp_path / "snapshot")
    res = write_arrays(root, "train", _data(100, 2), ref, **KW)
    pins = dict(pin_dataset_id=res.dataset_id, min_dataset_version=res.generation)
    assert len(_read_all(root, ref, **pins)) == 100
    assert verify_dataset(root, ref, **pins).ok
    # the whole root rolled back to the snapshot: consistent in itself, but older
    shutil.rmtree(root)
    shutil.copytree(tmp_path / "snapshot", root)
    assert len(_read_all(root, ref)) == 100  # without a pin it cannot be told
    with pytest.raises(RollbackError, match="pinned minimum"):
        _read_all(root, ref, **pins)
    assert not verify_dataset(root, ref, **pins).ok
    # the whole root replaced by another dataset encrypted with the same master key
    shutil.rmtree(root)
    other = write_arrays(root, "train", _data(100, 3), ref, **KW)
    for _ in range(3):  # even at a higher version
        other = write_arrays(root, "train", _data(100, 3), ref, **KW)
    assert other.generation > res.generation
    with pytest.raises(ShardSwappedError, match="replaced"):
        _read_all(root, ref, **pins)


def test_pins_through_the_datamodule(tmp_path, ref):
    from lightning_sustain.data.datamodule import EncryptedShardDataModule

    root = tmp_path / "ds"
    res = write_arrays(root, "train", _data(100, 1), ref, **KW)
    ok = EncryptedShardDataModule(str(root), key_file=ref.file, dataset_id=res.dataset_id,
                                  dataset_version=res.generation, batch_size=10)
    ok.setup("fit")
    assert sum(len(b["y"]) for b in ok.train_dataloader()) == 100
    stale = EncryptedShardDataModule(str(root), key_file=ref.file, dataset_id=res.dataset_id,
                                     dataset_version=res.generation + 1, batch_size=10)
    with pytest.raises(RollbackError):
        stale.setup("fit")
    with pytest.raises(ValueError, match="32 hex"):
        EncryptedShardDataModule(str(root), key_file=ref.file, dataset_id="nope")


def test_every_error_is_a_shard_error():
    for cls in (RollbackError, StaleShardError, ShardSwappedError, MissingShardError):
        assert issubclass(cls, ShardError)
