"""Hostile storage and careless users: special files, forged parameters, concurrent writers,
passphrases where keys go, keys where references go, crash leftovers, worker errors."""

from __future__ import annotations

import base64
import json
import multiprocessing as mp
import os
import shutil
import signal
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from lightning_sustain.data.commands import main
from lightning_sustain.data.datamodule import EncryptedShardDataModule
from lightning_sustain.data.errors import (
    ConcurrentWriteError,
    FrameAuthenticationError,
    KeyFormatError,
    KeyReferenceError,
    KeyringError,
    ManifestError,
    ShardError,
    ShardHeaderError,
    ShardSwappedError,
    TruncatedShardError,
)
from lightning_sustain.data.format import (
    _MANIFEST_AAD_PREFIX,
    DATASET_MANIFEST_NAME,
    MANIFEST_HEADER,
    MANIFEST_NAME,
    open_frame,
)
from lightning_sustain.data.keys import (
    KEYRING_NAME,
    DataKey,
    KeyReference,
    generate_key,
    load_keyring,
    rotate_key,
    write_key_file,
)
from lightning_sustain.data.reader import open_split, resolve_data_key, verify_dataset
from lightning_sustain.data.writer import ShardWriter, write_arrays

KW = dict(frame_nbytes=1024, shard_nbytes=8192, progress=False)


def _data(n: int = 120, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 8)).astype(np.float32),
            "y": np.arange(n, dtype=np.int64)}


@pytest.fixture()
def ds(tmp_path):
    key = write_key_file(tmp_path / "k.key", generate_key())
    ref = KeyReference(file=str(key))
    root = tmp_path / "ds"
    write_arrays(root, "train", _data(600), ref, **KW)
    return root, ref


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block does not finish in time."""
    def boom(*_):
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _read_all(root, ref):
    with open_split(root, "train", ref) as r:
        for si, fi, _ in r.frame_units():
            r.read_frame(si, fi)


# --- special files: refused without blocking or reading them -----------------------------


@pytest.mark.parametrize("target", ["shard", "manifest", "keyring", "dataset", "keyfile"])
@pytest.mark.parametrize("kind", ["fifo", "dir", "devzero"])
def test_special_files_are_refused_quickly(ds, target, kind):
    root, ref = ds
    path = {"shard": root / "train" / "shard-00000.lss",
            "manifest": root / "train" / MANIFEST_NAME,
            "keyring": root / KEYRING_NAME,
            "dataset": root / DATASET_MANIFEST_NAME,
            "keyfile": Path(ref.file)}[target]
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    with deadline(20):
        with pytest.raises(ShardError) as ei:
            _read_all(root, ref)
        report_exc = None
        try:
            report = verify_dataset(root, ref)
            assert not report.ok
        except ShardError as exc:
            report_exc = exc
    text = str(ei.value)
    assert ("not a regular file" in text or "a FIFO" in text or "directory" in text
            or "device" in text), text
    if report_exc is not None:
        assert "regular file" in str(report_exc) or "FIFO" in str(report_exc)


def test_huge_key_file_and_keyring_are_not_read(ds, tmp_path):
    root, ref = ds
    big = tmp_path / "big.key"
    with open(big, "wb") as fh:
        fh.truncate(600 << 20)  # sparse: 600 MiB that would have to be read
    tracemalloc.start()
    with deadline(10), pytest.raises(KeyReferenceError, match="more than"):
        open_split(root, "train", KeyReference(file=str(big)))
    ring = root / KEYRING_NAME
    ring.unlink()
    with open(ring, "wb") as fh:
        fh.truncate(600 << 20)
    with deadline(10), pytest.raises(KeyringError, match="more than"):
        open_split(root, "train", ref)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 << 20


# --- forged scrypt parameters: bounded before any derivation -----------------------------


@pytest.mark.parametrize("n,r,p", [(1 << 22, 8, 1), (1 << 17, 64, 1), (1 << 17, -1, -1),
                                   (1 << 17, 2, 32), (2, 8, 1), (1 << 17, 8, 0),
                                   (True, 8, 1), (1.5, 8, 1), ("131072", 8, 1), (3 << 15, 8, 1)])
def test_forged_scrypt_parameters_are_refused_fast(tmp_path, n, r, p, monkeypatch):
    root = tmp_path / "pw"
    monkeypatch.setenv("LS_PW", "correct horse battery staple")
    write_arrays(root, "train", _data(), KeyReference(env="LS_PW"), password=True,
                 scrypt_n=1 << 14, **KW)
    doc = json.loads((root / KEYRING_NAME).read_text())
    doc["kdf"].update(n=n, r=r, p=p)
    (root / KEYRING_NAME).write_text(json.dumps(doc))
    t = time.perf_counter()
    with pytest.raises(KeyFormatError, match="outside the accepted window") as ei:
        open_split(root, "train", KeyReference(env="LS_PW"))
    assert time.perf_counter() - t < 2.0
    assert ei.value.shard == KEYRING_NAME


@pytest.mark.parametrize("n", [2, 1 << 10, 1 << 22, 100_000])
def test_scrypt_parameters_refused_when_writing(tmp_path, n, monkeypatch, capsys):
    monkeypatch.setenv("LS_PW", "correct horse battery staple")
    with pytest.raises(KeyFormatError, match="outside the accepted window"):
        ShardWriter(tmp_path / "d", "train", KeyReference(env="LS_PW"), password=True,
                    scrypt_n=n, progress=False)
    csv = tmp_path / "in.csv"
    csv.write_text("a,label\n1,0\n2,1\n")
    rc = main(["encrypt", "--input", str(csv), "--root", str(tmp_path / "e"), "--label",
               "label", "--password", "--scrypt-n", str(n), "--key-env", "LS_PW",
               "--no-progress"])
    assert rc == 2 and "outside the accepted window" in capsys.readouterr().err
    assert not (tmp_path / "e" / KEYRING_NAME).exists()


def test_deeply_nested_keyring_is_our_error(ds):
    root, ref = ds
    (root / KEYRING_NAME).write_text("[" * 20_000 + "]" * 20_000)
    with pytest.raises(KeyringError, match="nested"):
        open_split(root, "train", ref)


# --- concurrent writers: real processes --------------------------------------------------


def _writer_proc(root: str, key: str, split: str, seed: int, go, q) -> None:
    from lightning_sustain.data.keys import KeyReference
    from lightning_sustain.data.writer import write_arrays

    rng = np.random.default_rng(seed)
    data = {"x": rng.standard_normal((300, 8)).astype(np.float32),
            "y": np.arange(300, dtype=np.int64) + 10_000 * seed}
    go.wait(30)
    try:
        res = write_arrays(root, split, data, KeyReference(file=key), frame_nbytes=1024,
                           shard_nbytes=8192, progress=False)
        q.put(("ok", split, seed, res.dataset_version))
    except ConcurrentWriteError as exc:
        q.put(("conflict", split, seed, str(exc)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        q.put(("error", split, seed, repr(exc)))


def _race(tmp_path, jobs):
    key = str(write_key_file(tmp_path / "k.key", generate_key()))
    root = str(tmp_path / "ds")
    ctx = mp.get_context("fork")
    go, q = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer_proc, args=(root, key, split, seed, go, q))
             for split, seed in jobs]
    for p in procs:
        p.start()
    go.set()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    return root, KeyReference(file=key), results


@pytest.mark.parametrize("attempt", range(3))
def test_parallel_writers_of_two_splits_into_a_fresh_root_both_succeed(tmp_path, attempt):
    root, ref, results = _race(tmp_path, [("train", 1), ("val", 2)])
    assert sorted(r[0] for r in results) == ["ok", "ok"], results
    assert results[0][3] != results[1][3]  # two writes never share a version
    report = verify_dataset(root, ref)
    assert report.ok and report.splits == ["train", "val"], report.errors
    for split, seed in (("train", 1), ("val", 2)):
        with open_split(root, split, ref) as r:
            ys = np.concatenate([r.read_frame(si, fi)[0]["y"] for si, fi, _ in r.frame_units()])
        assert sorted(ys) == list(range(10_000 * seed, 10_000 * seed + 300))


def test_parallel_writers_of_one_split_never_corrupt_it(tmp_path):
    root, ref, results = _race(tmp_path, [("train", 1), ("train", 2), ("train", 3)])
    assert all(r[0] in ("ok", "conflict") for r in results), results
    winners = [r for r in results if r[0] == "ok"]
    assert winners
    assert all("re-run" in r[3] for r in results if r[0] == "conflict")
    report = verify_dataset(root, ref)
    assert report.ok, report.errors
    with open_split(root, "train", ref) as r:
        ys = np.concatenate([r.read_frame(si, fi)[0]["y"] for si, fi, _ in r.frame_units()])
    latest = max(winners, key=lambda w: w[3])
    assert sorted(ys) == list(range(10_000 * latest[2], 10_000 * latest[2] + 300))
    assert not list(Path(root).glob(".train.incomplete-*"))


# --- a passphrase is never a raw key -----------------------------------------------------


@pytest.mark.parametrize("secret", [
    b"a" * 32,                                    # 32 bytes of text
    b"Correct-Horse-Battery-Staple-And-More-Words-1",  # 43+ base64-alphabet characters
    b"correcthorsebatterystaplecorrecthorsebatterysta",
    bytes(range(32)).hex().encode(),              # bare hex: no marker
    base64.urlsafe_b64encode(bytes(range(32))).rstrip(b"="),
    b"lskey1:" + b"A" * 42,                       # marker, but not 32 bytes
    b"lskey1:" + base64.b64encode(bytes(31)),
    b"lskey1:" + b"g" * 64,
])
def test_passphrase_is_never_taken_as_a_raw_key(tmp_path, secret, monkeypatch):
    monkeypatch.setenv("LS_SECRET", secret.decode())
    (tmp_path / "secret.txt").write_bytes(secret + b"\n")
    for ref in (KeyReference(env="LS_SECRET"), KeyReference(file=str(tmp_path / "secret.txt"))):
        with pytest.raises(KeyFormatError, match="password=True") as ei:
            write_arrays(tmp_path / "d", "train", _data(), ref, **KW)
        assert secret.decode() not in str(ei.value)
    assert not (tmp_path / "d" / "train").exists()


def test_password_dataset_takes_any_text_through_scrypt(tmp_path, monkeypatch):
    monkeypatch.setenv("LS_PW", "a" * 32)
    write_arrays(tmp_path / "d", "train", _data(), KeyReference(env="LS_PW"), password=True,
                 scrypt_n=1 << 14, **KW)
    assert load_keyring(tmp_path / "d").uses_password
    with open_split(tmp_path / "d", "train", KeyReference(env="LS_PW")) as r:
        assert len(r) == 120


def test_old_keygen_files_keep_working_and_migrate(tmp_path, capsys, caplog):
    raw = generate_key()
    legacy = tmp_path / "old.key"
    legacy.write_bytes(base64.b64encode(raw) + b"\n")  # what keygen wrote before lskey1
    legacy.chmod(0o600)
    write_arrays(tmp_path / "d", "train", _data(), KeyReference(file=str(legacy)), **KW)
    assert "old unmarked format" in caplog.text
    assert main(["keygen", "--migrate", str(legacy)]) == 0
    assert legacy.read_bytes().startswith(b"lskey1:")
    with open_split(tmp_path / "d", "train", KeyReference(file=str(legacy))) as r:
        assert len(r) == 120
    out = capsys.readouterr().out
    assert base64.b64encode(raw).decode() not in out and raw.hex() not in out


# --- no secret in any message ------------------------------------------------------------


def test_key_given_as_a_reference_is_never_echoed(ds, capsys):
    root, ref = ds
    key_text = Path(ref.file).read_text().strip()
    raw = base64.b64decode(key_text.removeprefix("lskey1:"))
    forms = [key_text, raw.hex(), base64.b64encode(raw).decode(),
             key_text.removeprefix("lskey1:")]
    for value in forms:
        for kw in ("env", "file"):
            with pytest.raises(KeyReferenceError, match="value looks like a key, not a "
                               "reference") as ei:
                KeyReference(**{kw: value})
            assert all(f not in str(ei.value) for f in forms)
        with pytest.raises(KeyReferenceError, match="looks like a key"):
            EncryptedShardDataModule(str(root), key_env=value)
        rc = main(["verify", "--root", str(root), "--key-env", value])
        captured = capsys.readouterr()
        assert rc == 2 and "value looks like a key, not a reference" in captured.err
        assert all(f not in captured.err + captured.out for f in forms)


def test_ordinary_references_are_still_accepted():
    for name in ("LS_KEY", "MY_DATASET_MASTER_KEY_FOR_PRODUCTION_2024", "key"):
        assert KeyReference(env=name).env == name
    assert KeyReference(file="/etc/lightning/master.key").file


# --- crash leftovers, wiping, worker errors, messages ------------------------------------


def test_old_split_leftover_is_cleaned_by_the_next_write(ds):
    root, ref = ds
    leftover = root / ".train.old-0123456789ab"
    shutil.copytree(root / "train", leftover)
    report = verify_dataset(root, ref)
    assert report.ok and any("leftover" in w for w in report.warnings)
    write_arrays(root, "train", _data(), ref, **KW)
    assert not leftover.exists()


def test_live_writer_staging_is_not_removed_by_another_writer(ds):
    root, ref = ds
    first = ShardWriter(root, "train", ref, **KW)
    first.write_columns(_data())
    second = ShardWriter(root, "train", ref, **KW)  # cleans leftovers, not live staging
    assert first._staging.exists()
    second.write_columns(_data(60))
    second.commit()
    with pytest.raises(ConcurrentWriteError, match="re-run"):
        first.commit()  # an older version than the one committed meanwhile
    assert not first._staging.exists()
    with open_split(root, "train", ref) as r:
        assert len(r) == 60


def test_failed_decryption_wipes_the_output_buffer():
    aead = DataKey.generate().aead()
    nonce = os.urandom(12)
    plaintext = b"secret plaintext " * 1000
    blob = bytearray(nonce + aead.encrypt(nonce, plaintext, b"aad"))
    blob[-1] ^= 1  # tag broken: decrypt_into may have written the plaintext already
    out = bytearray(len(plaintext))
    with pytest.raises(FrameAuthenticationError):
        open_frame(aead, bytes(blob), b"aad", shard="s", frame=0, out=out)
    assert not any(out)


def test_failed_frame_in_the_reader_leaves_no_plaintext_in_its_pool(ds):
    root, ref = ds
    with open_split(root, "train", ref) as r:
        off, ln, _ = r.manifest.shards[0].frames[1]
    path = root / "train" / "shard-00000.lss"
    raw = bytearray(path.read_bytes())
    raw[off + ln - 1] ^= 1
    path.write_bytes(bytes(raw))
    with open_split(root, "train", ref) as r:
        with pytest.raises(FrameAuthenticationError):
            r.read_frame(0, 1)
        assert r._pool and not any(any(b) for b in r._pool)


def test_errors_keep_shard_and_frame_through_worker_processes(ds):
    root, ref = ds
    with open_split(root, "train", ref) as r:
        off, ln, _ = r.manifest.shards[1].frames[2]
    path = root / "train" / "shard-00001.lss"
    raw = bytearray(path.read_bytes())
    raw[off + 40] ^= 4
    path.write_bytes(bytes(raw))
    dm = EncryptedShardDataModule(str(root), key_file=ref.file, batch_size=8, num_workers=2,
                                  shuffle=False)
    dm.setup("fit")
    with pytest.raises(FrameAuthenticationError) as ei:
        for _ in dm.train_dataloader():
            pass
    assert ei.value.shard == "train/shard-00001.lss" and ei.value.frame == 2


def test_size_mismatched_swap_is_a_swap_not_a_truncation(ds):
    root, ref = ds
    a, b = root / "train" / "shard-00000.lss", root / "train" / "shard-00003.lss"
    assert a.stat().st_size != b.stat().st_size
    shutil.copy(b, a)
    with open_split(root, "train", ref) as r, pytest.raises(ShardSwappedError, match="#3"):
        r.read_frame(0, 0)
    # a real truncation is still called one
    shutil.copy(b, a.with_suffix(".bak"))
    (root / "train" / "shard-00003.lss").write_bytes(b.read_bytes()[:-5])
    with open_split(root, "train", ref) as r, pytest.raises(TruncatedShardError):
        r.read_frame(3, 0)


def test_directories_are_fsynced_after_replace(ds, monkeypatch):
    root, ref = ds
    import lightning_sustain.data.keys as keys_mod
    import lightning_sustain.data.writer as writer_mod

    synced = []
    real = keys_mod.fsync_dir

    def spy(path):
        synced.append(Path(path).resolve())
        real(path)

    monkeypatch.setattr(keys_mod, "fsync_dir", spy)
    monkeypatch.setattr(writer_mod, "_fsync_dir", spy)
    new = write_key_file(root.parent / "new.key", generate_key())
    assert root.parent.resolve() in synced
    synced.clear()
    rotate_key(root, ref, KeyReference(file=str(new)))
    assert root.resolve() in synced  # keyring.json replaced
    synced.clear()
    write_arrays(root, "train", _data(), KeyReference(file=str(new)), **KW)
    assert synced.count(root.resolve()) >= 2  # split rename and dataset.lsd replace


def test_restoring_an_old_keyring_reenables_the_old_key_as_documented(ds, tmp_path):
    root, ref = ds
    old_ring = (root / KEYRING_NAME).read_bytes()
    new = KeyReference(file=str(write_key_file(tmp_path / "n.key", generate_key())))
    rotate_key(root, ref, new)
    with pytest.raises(ShardError):
        open_split(root, "train", ref)
    (root / KEYRING_NAME).write_bytes(old_ring)
    with open_split(root, "train", ref) as r:  # the documented limit of rotation
        assert len(r) == 600
    doc = (Path(__file__).parents[1] / "docs" / "shard-format.md").read_text()
    assert "re-enables the rotated-away key" in doc


def test_manifest_type_confusion_is_our_error(ds):
    """An authenticated but malicious manifest (insider with the key): a list as dtype."""
    root, ref = ds
    data_key, ds_id, _ = resolve_data_key(root, ref)
    blob = (root / "train" / MANIFEST_NAME).read_bytes()
    head = bytearray(blob[: MANIFEST_HEADER.size])
    nonce = bytes(head[-20:-8])
    body = json.loads(data_key.aead().decrypt(nonce, blob[MANIFEST_HEADER.size:],
                                              _MANIFEST_AAD_PREFIX + bytes(head)))
    body["schema"]["fields"][0]["dtype"] = ["float32"]
    new_body = json.dumps(body).encode()
    head[-8:] = (len(new_body) + 16).to_bytes(8, "little")
    ct = data_key.aead().encrypt(nonce, new_body, _MANIFEST_AAD_PREFIX + bytes(head))
    (root / "train" / MANIFEST_NAME).write_bytes(bytes(head) + ct)
    with pytest.raises(ManifestError, match="dtype") as ei:
        open_split(root, "train", ref)
    assert ei.value.shard == f"train/{MANIFEST_NAME}"


def test_header_errors_name_the_shard(ds):
    root, ref = ds
    (root / "train" / "shard-00000.lss").write_bytes(b"short")
    with open_split(root, "train", ref) as r, pytest.raises((ShardHeaderError,
                                                             TruncatedShardError)) as ei:
        r.read_frame(0, 0)
    assert ei.value.shard == "train/shard-00000.lss"


def test_authenticated_non_boolean_byte_is_refused_and_wiped(tmp_path, monkeypatch):
    """An insider writes a bool column holding 2: the reader refuses it, zeroes the frame."""
    import lightning_sustain.data.writer as writer_mod
    from lightning_sustain.data.errors import SampleDecodeError

    real = writer_mod.encode_frame

    def evil(schema, cols, start, stop):
        raw = bytearray(real(schema, cols, start, stop))
        raw[-1 - (-(stop - start) % 8)] = 2  # last bool of the frame
        return bytes(raw)

    monkeypatch.setattr(writer_mod, "encode_frame", evil)
    ref = KeyReference(file=str(write_key_file(tmp_path / "k.key", generate_key())))
    write_arrays(tmp_path / "d", "train", {"x": np.ones((50, 4), np.float32),
                                           "b": np.ones(50, bool)}, ref, **KW)
    with open_split(tmp_path / "d", "train", ref) as r:
        with pytest.raises(SampleDecodeError, match="non-boolean") as ei:
            r.read_frame(0, 0)
        assert ei.value.frame == 0 and r._pool and not any(r._pool[-1])
