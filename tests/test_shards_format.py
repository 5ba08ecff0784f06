"""Format, keys, writer and tamper detection of the encrypted shard format."""

from __future__ import annotations

import base64
import dataclasses
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_sustain.data.codec import (
    Schema,
    decode_frame,
    encode_frame,
    frame_nbytes,
    infer_schema,
)
from lightning_sustain.data.errors import (
    DatasetNotFoundError,
    EmptyDatasetError,
    FrameAuthenticationError,
    KeyFormatError,
    KeyReferenceError,
    KeyringError,
    ManifestAuthenticationError,
    ManifestError,
    MissingShardError,
    PathTraversalError,
    SchemaError,
    ShardError,
    ShardHeaderError,
    ShardSwappedError,
    StaleShardError,
    TruncatedShardError,
    UnsupportedFormatError,
    WrongKeyError,
)
from lightning_sustain.data.format import (
    MANIFEST_HEADER,
    MANIFEST_NAME,
    SHARD_HEADER,
    Manifest,
    ShardInfo,
)
from lightning_sustain.data.keys import (
    KeyProvider,
    KeyReference,
    MasterKey,
    generate_key,
    load_keyring,
    rotate_key,
    write_key_file,
)
from lightning_sustain.data.reader import SplitReader, open_split, resolve_data_key, verify_dataset
from lightning_sustain.data.writer import (
    ShardWriter,
    write_arrays,
    write_csv,
    write_npz,
    write_torch_dataset,
)

N = 600


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 30)).astype(np.float32)
    y = rng.integers(0, 2, n).astype(np.int64)
    idx = np.arange(n, dtype=np.int64)
    return {"x": x, "y": y, "idx": idx}


@pytest.fixture()
def keyfile(tmp_path):
    return str(write_key_file(tmp_path / "master.key", generate_key()))


@pytest.fixture()
def ds(tmp_path, keyfile):
    """Dataset with train and val splits, several shards of several frames each."""
    root = tmp_path / "ds"
    ref = KeyReference(file=keyfile)
    data = _data()
    kw = dict(frame_nbytes=4096, shard_nbytes=20_000, progress=False)
    write_arrays(root, "train", data, ref, feature_names=[f"f{i}" for i in range(30)], **kw)
    write_arrays(root, "val", _data(200, seed=1), ref, **kw)
    return root, ref, data


def _read_all(root, ref, split="train"):
    with open_split(root, split, ref) as r:
        cols = [r.read_frame(si, fi)[0] for si, fi, _ in r.frame_units()]
        return {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


# --- round trip ----------------------------------------------------------------------------


def test_roundtrip_shards_frames_and_random_access(ds):
    root, ref, data = ds
    with open_split(root, "train", ref) as r:
        assert len(r) == N
        assert len(r.manifest.shards) > 2 and r.num_frames > len(r.manifest.shards)
        assert r.schema.feature_names == tuple(f"f{i}" for i in range(30))
        for i in (0, 1, 137, N - 1):
            s = r.read_sample(i)
            np.testing.assert_array_equal(s["x"], data["x"][i])
            assert s["y"] == data["y"][i] and s["idx"] == i
        with pytest.raises(IndexError):
            r.read_sample(N)
    got = _read_all(root, ref)
    for k in data:
        np.testing.assert_array_equal(got[k], data[k])


def test_no_plaintext_on_disk(ds):
    root, _, data = ds
    needle = data["x"][5].tobytes()[:16]
    for p in root.rglob("*"):
        if p.is_file():
            blob = p.read_bytes()
            assert needle not in blob, p
            assert b'"fields"' not in blob and b"float32" not in blob, p  # schema encrypted


def test_codec_roundtrip_tensors_scalars_and_bool():
    sample = {"img": torch.arange(6, dtype=torch.uint8).reshape(2, 3), "w": 0.5, "flag": True,
              "c": np.complex64(1 + 2j)}
    schema = infer_schema(sample)
    assert [f.kind for f in schema.fields] == ["tensor", "scalar", "scalar", "scalar"]
    cols = {"img": np.stack([np.arange(6, dtype=np.uint8).reshape(2, 3)] * 3),
            "w": np.array([0.5, 1.5, 2.5]), "flag": np.array([True, False, True]),
            "c": np.array([1 + 2j] * 3, dtype=np.complex64)}
    out = decode_frame(schema, encode_frame(schema, cols, 0, 3), 3)
    for k in cols:
        np.testing.assert_array_equal(out[k], cols[k])
    assert Schema.from_json(schema.to_json()) == schema


@pytest.mark.parametrize(
    "sample, match",
    [({"s": "text"}, "str cannot be stored"), ({"o": np.array([object()])}, "not supported"),
     ({}, "non-empty"), ({"b": torch.zeros(2, dtype=torch.bfloat16)}, "bfloat16")],
)
def test_codec_rejects_unsupported_values(sample, match):
    with pytest.raises(SchemaError, match=match):
        infer_schema(sample)


def test_writer_rejects_inconsistent_shapes(tmp_path, keyfile):
    w = ShardWriter(tmp_path / "d", "train", KeyReference(file=keyfile), progress=False,
                    frame_nbytes=256)
    with pytest.raises(SchemaError, match="same shape per field"):
        with w:
            for i in range(100):
                w.write({"x": np.zeros(3 if i < 50 else 4, np.float32)})
    assert not (tmp_path / "d" / "train").exists()


def test_torch_dataset_npz_and_csv_inputs(tmp_path, keyfile):
    ref = KeyReference(file=keyfile)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, i):
            return torch.full((4,), float(i)), i % 3

    r = write_torch_dataset(tmp_path / "a", "train", DS(), ref, progress=False)
    assert r.num_samples == 50
    with open_split(tmp_path / "a", "train", ref) as rd:
        s = rd.read_sample(7)
        np.testing.assert_array_equal(s["x"], np.full(4, 7.0, np.float32))
        assert s["y"] == 1

    np.savez(tmp_path / "in.npz", x=np.ones((20, 2), np.float32), y=np.arange(20))
    assert write_npz(tmp_path / "b", "train", tmp_path / "in.npz", ref, progress=False
                     ).num_samples == 20

    (tmp_path / "in.csv").write_text("a,b,label\n1,2,0\n3,4,1\n5.5,6,1\n")
    write_csv(tmp_path / "c", "train", tmp_path / "in.csv", ref, label_column="label",
              progress=False)
    with open_split(tmp_path / "c", "train", ref) as rd:
        assert rd.schema.feature_names == ("a", "b")
        s = rd.read_sample(2)
        np.testing.assert_array_equal(s["x"], np.array([5.5, 6], np.float32))
        assert s["y"] == 1
    (tmp_path / "bad.csv").write_text("a,label\n1,x\n")
    with pytest.raises(SchemaError, match="not a number"):
        write_csv(tmp_path / "d", "train", tmp_path / "bad.csv", ref, label_column="label",
                  progress=False)
    with pytest.raises(SchemaError, match="label column 'nope'"):
        write_csv(tmp_path / "d", "train", tmp_path / "in.csv", ref, label_column="nope",
                  progress=False)


# --- keys --------------------------------------------------------------------------------


def test_key_objects_never_reveal_or_pickle_the_key(tmp_path):
    raw = generate_key()
    mk = MasterKey(raw)
    for text in (repr(mk), str(mk)):
        assert raw.hex() not in text and base64.b64encode(raw).decode() not in text
        assert mk.key_id in text
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(mk)
    with pytest.raises(KeyFormatError, match="32 bytes"):
        MasterKey(b"short")


@pytest.mark.parametrize("encoding", ["prefixed-b64", "prefixed-hex", "legacy-b64-file"])
def test_key_file_and_env_encodings(tmp_path, monkeypatch, encoding):
    raw = generate_key()
    enc = {"prefixed-b64": b"lskey1:" + base64.b64encode(raw),
           "prefixed-hex": b"lskey1:" + raw.hex().encode(),
           "legacy-b64-file": base64.b64encode(raw)}[encoding]
    (tmp_path / "k").write_bytes(enc + b"\n")
    root = tmp_path / "d"
    write_arrays(root, "train", _data(10), KeyReference(file=str(tmp_path / "k")),
                 progress=False)
    monkeypatch.setenv("LS_TEST_KEY", enc.decode())
    if encoding == "legacy-b64-file":  # the old keygen format is read from key files only
        with pytest.raises(KeyFormatError, match="key format"):
            open_split(root, "train", KeyReference(env="LS_TEST_KEY"))
    else:
        with open_split(root, "train", KeyReference(env="LS_TEST_KEY")) as r:
            assert len(r) == 10
    with open_split(root, "train", MasterKey(raw)) as r:
        assert len(r) == 10


def test_missing_key_env_and_file(ds, monkeypatch):
    root, _, _ = ds
    monkeypatch.delenv("LS_NOPE", raising=False)
    with pytest.raises(KeyReferenceError, match="'LS_NOPE' is not set"):
        open_split(root, "train", KeyReference(env="LS_NOPE"))
    with pytest.raises(KeyReferenceError, match="does not exist"):
        open_split(root, "train", KeyReference(file=str(root / "nope.key")))
    with pytest.raises(KeyReferenceError, match="exactly one"):
        KeyReference()
    with pytest.raises(KeyReferenceError, match="exactly one"):
        KeyReference(env="A", file="b")


def test_malformed_key_material_names_source_not_material(tmp_path, ds):
    root, _, _ = ds
    (tmp_path / "bad.key").write_bytes(b"not-a-key-at-all-but-secretish")
    with pytest.raises(KeyFormatError) as ei:
        open_split(root, "train", KeyReference(file=str(tmp_path / "bad.key")))
    assert "secretish" not in str(ei.value) and "bad.key" in str(ei.value)


def test_wrong_key_names_both_key_ids(ds):
    root, ref, _ = ds
    other = MasterKey(generate_key())
    expected = load_keyring(root).key_id
    with pytest.raises(WrongKeyError) as ei:
        open_split(root, "train", other)
    assert other.key_id in str(ei.value) and expected in str(ei.value)


def test_key_provider(ds, keyfile):
    root, _, data = ds

    class FileProvider(KeyProvider):
        def __init__(self, path):
            self.path = path

        def get_key(self):
            return Path(self.path).read_bytes()

    with open_split(root, "train", KeyReference(provider=FileProvider(keyfile))) as r:
        assert r.read_sample(3)["idx"] == 3

    class Broken(KeyProvider):
        def get_key(self):
            raise RuntimeError("kms down")

    with pytest.raises(KeyReferenceError, match="Broken failed"):
        open_split(root, "train", KeyReference(provider=Broken()))
    with pytest.raises(KeyReferenceError, match="no get_key"):
        KeyReference(provider=object())


def test_rotate_rewraps_without_touching_shards(ds, tmp_path):
    root, ref, data = ds
    before = {p: p.read_bytes() for p in root.rglob("*.lss")}
    new_file = write_key_file(tmp_path / "new.key", generate_key())
    new = KeyReference(file=str(new_file))
    ring = rotate_key(root, ref, new)
    assert ring.key_id == MasterKey(
        base64.b64decode(new_file.read_bytes().strip().removeprefix(b"lskey1:"))).key_id
    assert {p: p.read_bytes() for p in root.rglob("*.lss")} == before
    np.testing.assert_array_equal(_read_all(root, new)["x"], data["x"])
    with pytest.raises(WrongKeyError):
        open_split(root, "train", ref)


def test_password_dataset_with_scrypt(tmp_path, monkeypatch):
    monkeypatch.setenv("LS_PW", "correct horse battery staple")
    root = tmp_path / "pw"
    write_arrays(root, "train", _data(30), KeyReference(env="LS_PW"), password=True,
                 scrypt_n=1 << 14, progress=False)
    ring = load_keyring(root)
    assert ring.uses_password and len(base64.b64decode(ring.kdf["salt"])) == 16
    with open_split(root, "train", KeyReference(env="LS_PW")) as r:
        assert r.read_sample(29)["idx"] == 29
    monkeypatch.setenv("LS_PW", "wrong password")
    with pytest.raises(WrongKeyError, match="wrong password"):
        open_split(root, "train", KeyReference(env="LS_PW"))


def test_keyring_tampered(ds):
    root, ref, _ = ds
    doc = (root / "keyring.json").read_text()
    # same key id, modified wrapped key: authentication of the wrap fails
    ring = load_keyring(root)
    ct = bytearray(ring.wrapped)
    ct[0] ^= 1
    (root / "keyring.json").write_text(doc.replace(
        base64.b64encode(ring.wrapped).decode(), base64.b64encode(bytes(ct)).decode()))
    with pytest.raises(KeyringError, match="failed authentication"):
        open_split(root, "train", ref)
    (root / "keyring.json").write_text("{not json")
    with pytest.raises(KeyringError, match="not valid JSON"):
        open_split(root, "train", ref)
    (root / "keyring.json").unlink()
    with pytest.raises(KeyringError, match="not an encrypted dataset root"):
        open_split(root, "train", ref)


# --- atomic writing and versions ---------------------------------------------------------


def test_interrupted_write_leaves_no_split(tmp_path, keyfile):
    root = tmp_path / "d"
    ref = KeyReference(file=keyfile)

    class Failing(torch.utils.data.Dataset):
        def __len__(self):
            return 500

        def __getitem__(self, i):
            if i == 300:
                raise OSError("disk gone")
            return {"x": np.full(30, i, np.float32)}

    write_arrays(root, "val", _data(5), ref, progress=False)
    with pytest.raises(OSError, match="disk gone"):
        write_torch_dataset(root, "train", Failing(), ref, frame_nbytes=1024, progress=False)
    assert not (root / "train").exists()
    assert not list(root.glob(".train.incomplete-*"))
    with pytest.raises(DatasetNotFoundError, match="interrupted write"):
        open_split(root, "train", ref)


def test_killed_write_leaves_no_split(tmp_path, keyfile):
    root = tmp_path / "d"
    write_arrays(root, "val", _data(5), KeyReference(file=keyfile), progress=False)
    script = tmp_path / "kill.py"
    script.write_text(
        "import os, numpy as np\n"
        "from lightning_sustain.data.keys import KeyReference\n"
        "from lightning_sustain.data.writer import ShardWriter\n"
        f"w = ShardWriter({str(root)!r}, 'train', KeyReference(file={keyfile!r}),"
        " frame_nbytes=1024, shard_nbytes=4096, progress=False)\n"
        "for i in range(400):\n"
        "    w.write({'x': np.full(30, i, np.float32)})\n"
        "os._exit(3)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], timeout=120)
    assert proc.returncode == 3
    assert list(root.glob(".train.incomplete-*"))  # staging left behind, hidden
    assert not (root / "train").exists()
    with pytest.raises(DatasetNotFoundError):
        open_split(root, "train", KeyReference(file=keyfile))
    report = verify_dataset(root, KeyReference(file=keyfile), ["train"])
    assert not report.ok and any("interrupted" in w for w in report.warnings)
    write_arrays(root, "train", _data(5), KeyReference(file=keyfile), progress=False)
    assert not list(root.glob(".train.incomplete-*"))  # cleaned by the next write


def test_empty_dataset_refused(tmp_path, keyfile):
    with pytest.raises(EmptyDatasetError, match="no samples"):
        with ShardWriter(tmp_path / "d", "train", KeyReference(file=keyfile), progress=False):
            pass
    assert not (tmp_path / "d" / "train").exists()


def test_versions_bump_and_refuse_going_back(ds):
    root, ref, _ = ds
    # the fixture wrote train (version 1) then val (version 2): versions count per dataset
    r = write_arrays(root, "train", _data(50), ref, progress=False)
    assert r.dataset_version == 3 and r.generation == 3
    with pytest.raises(ValueError, match="already exists at version 3"):
        write_arrays(root, "train", _data(50), ref, dataset_version=3, progress=False)
    with open_split(root, "train", ref, expected_version=3) as rd:
        assert len(rd) == 50
    with pytest.raises(StaleShardError, match="expected version 4"):
        open_split(root, "train", ref, expected_version=4)


# --- tamper cases: each raises a specific exception naming shard and frame -----------------


def _shard(root, split="train", i=0):
    return root / split / f"shard-{i:05d}.lss"


def _frames(root, ref, split="train", si=0):
    with open_split(root, split, ref) as r:
        return r.manifest.shards[si].frames


def test_flipped_bit_in_frame(ds):
    root, ref, _ = ds
    off, length, _ = _frames(root, ref, si=1)[2]
    _flip(_shard(root, i=1), off + length // 2, 3)
    with open_split(root, "train", ref) as r:
        r.read_frame(1, 1)  # untouched frames still read
        with pytest.raises(FrameAuthenticationError) as ei:
            r.read_frame(1, 2)
    assert ei.value.shard == "train/shard-00001.lss" and ei.value.frame == 2
    assert "frame 2" in str(ei.value) and "shard-00001" in str(ei.value)
    report = verify_dataset(root, ref)
    assert not report.ok and report.first_error.frame == 2


@pytest.mark.parametrize("field_offset", [0, 12, 40, SHARD_HEADER.size - 1])
def test_flipped_bit_in_header(ds, field_offset):
    root, ref, _ = ds
    _flip(_shard(root, i=2), field_offset)
    with open_split(root, "train", ref) as r:
        with pytest.raises(ShardHeaderError) as ei:
            r.read_frame(2, 0)
    assert ei.value.shard == "train/shard-00002.lss" and ei.value.frame is None


@pytest.mark.parametrize("where", ["body", "header-version", "tag"])
def test_flipped_bit_in_manifest(ds, where):
    root, ref, _ = ds
    path = root / "train" / MANIFEST_NAME
    offset = {"body": MANIFEST_HEADER.size + 5, "header-version": 32,
              "tag": path.stat().st_size - 1}[where]
    _flip(path, offset)
    with pytest.raises(ManifestAuthenticationError) as ei:
        open_split(root, "train", ref)
    assert ei.value.shard == f"train/{MANIFEST_NAME}"


def test_truncated_shard(ds):
    root, ref, _ = ds
    frames = _frames(root, ref)
    path = _shard(root)
    with open(path, "r+b") as fh:
        fh.truncate(frames[1][0] + 10)
    with open_split(root, "train", ref) as r:
        with pytest.raises(TruncatedShardError) as ei:
            r.read_frame(0, 0)
    assert ei.value.frame == 1 and "truncated from frame 1" in str(ei.value)


def test_appended_bytes(ds):
    root, ref, _ = ds
    with open(_shard(root), "ab") as fh:
        fh.write(b"\0" * 100)
    with open_split(root, "train", ref) as r, pytest.raises(ManifestError, match="appended"):
        r.read_frame(0, 0)


def test_reordered_frames(ds):
    root, ref, _ = ds
    frames = _frames(root, ref)
    (o0, l0, _), (o1, l1, _) = frames[0], frames[1]
    assert l0 == l1
    raw = bytearray(_shard(root).read_bytes())
    raw[o0:o0 + l0], raw[o1:o1 + l1] = raw[o1:o1 + l1], raw[o0:o0 + l0]
    _shard(root).write_bytes(bytes(raw))
    with open_split(root, "train", ref) as r, pytest.raises(FrameAuthenticationError) as ei:
        r.read_frame(0, 0)
    assert ei.value.frame == 0


def test_shard_swapped_between_splits(ds):
    root, ref, _ = ds
    shutil.copy(_shard(root, "val", 0), _shard(root, "train", 0))
    with open_split(root, "train", ref) as r, pytest.raises(ShardSwappedError) as ei:
        r.read_frame(0, 0)
    assert "split 'val'" in str(ei.value) and ei.value.shard == "train/shard-00000.lss"


def test_shard_swapped_within_split(ds):
    root, ref, _ = ds
    shutil.copy(_shard(root, "train", 1), _shard(root, "train", 0))
    with open_split(root, "train", ref) as r, pytest.raises(ShardSwappedError, match="#1"):
        r.read_frame(0, 0)


def test_forged_header_still_fails_frame_authentication(ds):
    """An attacker rewrites the plaintext header to match: the AAD still binds the frames."""
    root, ref, _ = ds
    train_header = _shard(root, "train", 0).read_bytes()[: SHARD_HEADER.size]
    val = _shard(root, "val", 0).read_bytes()
    forged = train_header + val[SHARD_HEADER.size:]
    _shard(root, "train", 0).write_bytes(forged[: _shard(root).stat().st_size])
    with open_split(root, "train", ref) as r, pytest.raises(FrameAuthenticationError) as ei:
        r.read_frame(0, 0)
    assert ei.value.frame == 0


def test_shard_swapped_between_datasets(ds, tmp_path):
    root, ref, _ = ds
    other = tmp_path / "other"
    write_arrays(other, "train", _data(), ref, frame_nbytes=4096, shard_nbytes=20_000,
                 progress=False)
    shutil.copy(_shard(other), _shard(root))
    with open_split(root, "train", ref) as r, pytest.raises(ShardSwappedError,
                                                          match="another dataset"):
        r.read_frame(0, 0)
    # a whole split directory copied from the other dataset
    shutil.rmtree(root / "val")
    shutil.copytree(other / "train", root / "val")
    with pytest.raises(ShardSwappedError, match="another dataset"):
        open_split(root, "val", ref)


def test_split_directories_swapped(ds):
    root, ref, _ = ds
    os.rename(root / "train", root / "tmp")
    os.rename(root / "val", root / "train")
    with pytest.raises(ShardSwappedError, match="split 'val', expected 'train'"):
        open_split(root, "train", ref)


def test_shard_from_older_version(ds):
    root, ref, _ = ds
    old = _shard(root).read_bytes()
    write_arrays(root, "train", _data(), ref, frame_nbytes=4096, shard_nbytes=20_000,
                 progress=False)
    _shard(root).write_bytes(old)
    with open_split(root, "train", ref) as r, pytest.raises(StaleShardError) as ei:
        r.read_frame(0, 0)
    assert "version 1" in str(ei.value) and "version 3" in str(ei.value)
    assert "an old shard was put back" in str(ei.value)


def test_missing_shard(ds):
    root, ref, _ = ds
    _shard(root, i=1).unlink()
    with open_split(root, "train", ref) as r, pytest.raises(MissingShardError) as ei:
        r.read_frame(1, 0)
    assert ei.value.shard == "train/shard-00001.lss"


def _rewrite_manifest(root, ref, split, mutate):
    """Re-encrypt a manifest with the real data key (an insider / buggy writer)."""
    data_key, ds_id, _ = resolve_data_key(root, ref)
    with SplitReader(root, split, data_key, ds_id) as r:
        m = r.manifest
    m2 = mutate(m)
    m2 = dataclasses.replace(m2, write_id=m.write_id)
    (root / split / MANIFEST_NAME).write_bytes(m2.encode(data_key.aead()))


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/shard-00000.lss",
                                  "shard-00000.lss/../../x"])
def test_manifest_path_traversal(ds, name):
    root, ref, _ = ds

    def mutate(m):
        s = m.shards[0]
        return Manifest(m.dataset_id, m.dataset_version, m.split, m.cipher, m.num_samples,
                        m.schema, (ShardInfo(name, s.num_samples, s.size_bytes, s.frames),
                                   *m.shards[1:]))

    _rewrite_manifest(root, ref, "train", mutate)
    with pytest.raises(PathTraversalError) as ei:
        open_split(root, "train", ref)
    assert "refusing" in str(ei.value)


def test_empty_manifest_refused_on_load(ds):
    root, ref, _ = ds
    _rewrite_manifest(root, ref, "train", lambda m: Manifest(
        m.dataset_id, m.dataset_version, m.split, m.cipher, 0, m.schema, ()))
    with pytest.raises(EmptyDatasetError, match="no samples"):
        open_split(root, "train", ref)


def test_dropped_last_frame_detected(ds):
    """A manifest and file that both omit a shard's last frame disagree with its header."""
    root, ref, _ = ds
    last_offset = _frames(root, ref)[-1][0]

    def mutate(m):
        s = m.shards[0]
        frames = s.frames[:-1]
        short = ShardInfo(s.file, sum(f[2] for f in frames), last_offset, frames)
        return Manifest(m.dataset_id, m.dataset_version, m.split, m.cipher,
                        m.num_samples - s.frames[-1][2], m.schema, (short, *m.shards[1:]))

    _rewrite_manifest(root, ref, "train", mutate)
    with open(_shard(root), "r+b") as fh:
        fh.truncate(last_offset)
    with open_split(root, "train", ref) as r:
        with pytest.raises(ShardHeaderError, match="modified") as ei:
            r.read_frame(0, 0)
    assert ei.value.shard == "train/shard-00000.lss"


def test_error_messages_never_contain_key(ds, keyfile):
    root, ref, _ = ds
    raw = base64.b64decode(Path(keyfile).read_bytes().strip().removeprefix(b"lskey1:"))
    _flip(_shard(root), SHARD_HEADER.size + 40)
    errors = []
    for call in (lambda: open_split(root, "train", MasterKey(generate_key())),
                 lambda: open_split(root, "train", ref).read_frame(0, 0)):
        with pytest.raises(ShardError) as ei:
            call()
        errors.append(ei.value)
    for e in errors:
        text = str(e) + repr(e) + repr(pickle.loads(pickle.dumps(e)))
        for form in (raw.hex(), base64.b64encode(raw).decode(), repr(raw)):
            assert form not in text
    again = pickle.loads(pickle.dumps(errors[1]))
    assert type(again) is FrameAuthenticationError and again.frame == 0


def test_frame_layout_is_documented_size(ds):
    root, ref, _ = ds
    with open_split(root, "train", ref) as r:
        s = r.manifest.shards[0]
        assert s.frames[0][0] == SHARD_HEADER.size == 128
        assert _shard(root).stat().st_size == s.size_bytes
        for _off, ln, n in s.frames:
            assert ln == 12 + 16 + frame_nbytes(r.schema, n)
        # columns: u32 count padded to 8, then x (n*120 B), y (n*8), idx (n*8), each padded
        n = s.frames[0][2]
        assert frame_nbytes(r.schema, n) == 8 + -(-n * 120 // 8) * 8 + 16 * n
    head = (root / "train" / MANIFEST_NAME).read_bytes()[:MANIFEST_HEADER.size]
    assert head[:8] == b"LSMANIF\x00" and struct.unpack_from("<H", head, 8)[0] == 2
    assert _shard(root).read_bytes()[:8] == b"LSSHARD\x00"


def test_unencrypted_baseline_is_refused_by_readers(ds):
    """Downgrade: a split rewritten without encryption is not accepted as a dataset."""
    root, ref, _ = ds
    write_arrays(root, "train", _data(20), None, progress=False, _unencrypted_baseline=True)
    with pytest.raises(UnsupportedFormatError, match="stored unencrypted"):
        open_split(root, "train", ref)
