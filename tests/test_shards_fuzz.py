"""Hypothesis fuzzing of the shard reader: only documented exceptions, never a wrong sample."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lightning_sustain.data.codec import Schema, decode_frame
from lightning_sustain.data.errors import SampleDecodeError, ShardError
from lightning_sustain.data.format import MANIFEST_NAME
from lightning_sustain.data.keys import KeyReference, generate_key, write_key_file
from lightning_sustain.data.reader import open_split
from lightning_sustain.data.writer import write_arrays

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    key = write_key_file(base / "k", generate_key())
    ref = KeyReference(file=str(key))
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((120, 8)).astype(np.float32),
            "y": np.arange(120, dtype=np.int64)}
    write_arrays(base / "ds", "train", data, ref, frame_nbytes=512, shard_nbytes=2048,
                 progress=False)
    return base / "ds", ref, data


def _fresh(pristine, tmp_path_factory):
    src, ref, data = pristine
    dst = tmp_path_factory.mktemp("case") / "ds"
    shutil.copytree(src, dst)
    return dst, ref, data


def _read_everything(root, ref, data):
    """Read all frames; every sample returned must equal the original."""
    with open_split(root, "train", ref) as r:
        for si, fi, _ in r.frame_units():
            cols, _ = r.read_frame(si, fi)
            ids = cols["y"]
            np.testing.assert_array_equal(cols["x"], data["x"][ids])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=4),
       st.integers(0, 2))
def test_mutated_shard_bytes_are_rejected(pristine, tmp_path_factory, flips, shard_i):
    root, ref, data = _fresh(pristine, tmp_path_factory)
    path = root / "train" / f"shard-{shard_i:05d}.lss"
    original = path.read_bytes()
    raw = bytearray(original)
    for pos, mask in flips:
        raw[pos % len(raw)] ^= mask
    assume(bytes(raw) != original)  # two flips of one bit cancel out
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError):
        _read_everything(root, ref, data)


@FUZZ
@given(st.binary(min_size=0, max_size=4096))
def test_random_shard_contents(pristine, tmp_path_factory, blob):
    root, ref, data = _fresh(pristine, tmp_path_factory)
    (root / "train" / "shard-00001.lss").write_bytes(blob)
    with pytest.raises(ShardError):
        _read_everything(root, ref, data)


@FUZZ
@given(st.one_of(
    st.binary(max_size=600),
    st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
    st.integers(0, 10**6),
))
def test_mutated_or_random_manifest(pristine, tmp_path_factory, change):
    root, ref, data = _fresh(pristine, tmp_path_factory)
    path = root / "train" / MANIFEST_NAME
    original = path.read_bytes()
    raw = bytearray(original)
    if isinstance(change, bytes):
        raw = bytearray(change)
    elif isinstance(change, tuple):
        raw[change[0] % len(raw)] ^= change[1]
    else:
        raw = raw[: change % len(raw)]
    assume(bytes(raw) != original)
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError):
        _read_everything(root, ref, data)


@FUZZ
@given(st.one_of(st.text(max_size=300), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=20)))
def test_random_keyring(pristine, tmp_path_factory, doc):
    root, ref, data = _fresh(pristine, tmp_path_factory)
    text = doc if isinstance(doc, str) else json.dumps(doc)
    (root / "keyring.json").write_text(text)
    with pytest.raises(ShardError):
        _read_everything(root, ref, data)


SCHEMA = Schema.from_json({"fields": [
    {"name": "a", "dtype": "float32", "shape": [3], "kind": "array"},
    {"name": "b", "dtype": "bool", "shape": [], "kind": "scalar"},
    {"name": "c", "dtype": "int16", "shape": [2, 2], "kind": "array"},
]})


@FUZZ
@given(st.binary(max_size=2048), st.none() | st.integers(0, 2**32 - 1))
def test_decoder_on_untrusted_plaintext(blob, expected_n):
    """Even authenticated-but-malicious plaintext only decodes to schema-shaped arrays."""
    try:
        cols = decode_frame(SCHEMA, blob, expected_n)
    except SampleDecodeError:
        return
    n = len(cols["a"])
    assert n >= 1 and cols["a"].shape == (n, 3) and cols["c"].shape == (n, 2, 2)
    assert cols["b"].shape == (n,) and set(np.unique(cols["b"].view(np.uint8))) <= {0, 1}


# --- hostile input, format 2: keyring, dataset manifest, split manifest, shard headers -----
# Each case asserts that only our exceptions escape, and that time and memory stay bounded
# (a forged keyring once cost 15.7 s and 4.5 GiB per process).

import base64  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

from lightning_sustain.data.format import (  # noqa: E402
    _DATASET_AAD_PREFIX,
    _MANIFEST_AAD_PREFIX,
    DATASET_HEADER,
    DATASET_MANIFEST_NAME,
    MANIFEST_HEADER,
    SHARD_HEADER,
)
from lightning_sustain.data.reader import resolve_data_key, verify_dataset  # noqa: E402

MAX_CASE_S = 5.0
MAX_RSS_GROWTH = 512 << 20

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=25,
)
SCRYPT_INT = st.one_of(st.integers(-(2**70), 2**70), st.integers(0, 40).map(lambda k: 1 << k),
                       st.sampled_from([True, False, 1.5, "8", None, [8]]))


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bounded(root, ref, data, *, verify: bool = True) -> None:
    """Only ShardError escapes, each case finishes quickly (memory checked per test)."""
    t = time.perf_counter()
    try:
        _read_everything(root, ref, data)
    except ShardError:
        pass
    if verify:
        try:
            verify_dataset(root, ref)
        except ShardError:
            pass
    assert time.perf_counter() - t < MAX_CASE_S


@pytest.fixture(scope="module")
def rss_budget():
    start = _rss()
    yield
    assert _rss() - start < MAX_RSS_GROWTH


@FUZZ
@given(st.one_of(
    JSON,
    st.fixed_dictionaries({"name": st.just("scrypt"), "salt": st.sampled_from(
        [base64.b64encode(bytes(16)).decode(), "", "!!", base64.b64encode(bytes(100)).decode()]),
        "n": SCRYPT_INT, "r": SCRYPT_INT, "p": SCRYPT_INT}),
))
def test_hostile_keyring_kdf_and_documents(pristine, tmp_path_factory, rss_budget, doc):
    root, ref, data = _fresh(pristine, tmp_path_factory)
    ring = json.loads((root / "keyring.json").read_text())
    if isinstance(doc, dict) and doc.get("name") == "scrypt":
        ring["kdf"] = doc
    else:
        ring = doc
    (root / "keyring.json").write_text(json.dumps(ring))
    _bounded(root, ref, data)


def _reseal_dataset(root, ref, mutate):
    data_key, _, _ = resolve_data_key(root, ref)
    aead = data_key.aead()
    blob = (root / DATASET_MANIFEST_NAME).read_bytes()
    head = bytearray(blob[: DATASET_HEADER.size])
    nonce = bytes(head[40:52])
    body = json.loads(aead.decrypt(nonce, blob[DATASET_HEADER.size:],
                                   _DATASET_AAD_PREFIX + bytes(head)))
    new = mutate(body)
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    head[52:60] = (len(raw) + 16).to_bytes(8, "little")
    (root / DATASET_MANIFEST_NAME).write_bytes(
        bytes(head) + aead.encrypt(nonce, raw, _DATASET_AAD_PREFIX + bytes(head)))


@FUZZ
@given(st.one_of(
    st.binary(max_size=400),
    st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
    st.integers(0, 10**6),
    st.tuples(st.sampled_from(["dataset_version", "reserved_version", "splits", "train",
                               "version", "write_id", "num_samples"]), JSON),
    st.binary(max_size=300).map(lambda b: ("raw", b)),
))
def test_hostile_dataset_manifest(pristine, tmp_path_factory, rss_budget, change):
    """Tampered bytes, and bodies that authenticate (an insider with the key)."""
    root, ref, data = _fresh(pristine, tmp_path_factory)
    path = root / DATASET_MANIFEST_NAME
    raw = bytearray(path.read_bytes())
    if isinstance(change, bytes):
        path.write_bytes(change)
    elif isinstance(change, int):
        path.write_bytes(bytes(raw[: change % len(raw)]))
    elif change[0] == "raw":
        _reseal_dataset(root, ref, lambda body: change[1])
    elif isinstance(change[0], int):
        raw[change[0] % len(raw)] ^= change[1]
        path.write_bytes(bytes(raw))
    else:
        key, value = change

        def mutate(body):
            if key in body:
                body[key] = value
            elif key == "train":
                body["splits"]["train"] = value
            else:
                body["splits"]["train"][key] = value
            return body

        _reseal_dataset(root, ref, mutate)
    _bounded(root, ref, data)


def _reseal_manifest(root, ref, mutate):
    data_key, _, _ = resolve_data_key(root, ref)
    aead = data_key.aead()
    path = root / "train" / MANIFEST_NAME
    blob = path.read_bytes()
    head = bytearray(blob[: MANIFEST_HEADER.size])
    nonce = bytes(head[-20:-8])
    body = json.loads(aead.decrypt(nonce, blob[MANIFEST_HEADER.size:],
                                   _MANIFEST_AAD_PREFIX + bytes(head)))
    new = mutate(body)
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    head[-8:] = (len(raw) + 16).to_bytes(8, "little")
    path.write_bytes(bytes(head) + aead.encrypt(nonce, raw, _MANIFEST_AAD_PREFIX + bytes(head)))


@FUZZ
@given(st.one_of(
    st.tuples(st.sampled_from(["schema", "shards", "num_samples", "fields", "dtype", "shape",
                               "kind", "name", "feature_names", "frames", "file", "size_bytes",
                               "frame0"]), JSON),
    st.binary(max_size=300),
    st.integers(1, 200).map(lambda d: ("deep", d)),
))
def test_authenticated_but_malicious_split_manifest(pristine, tmp_path_factory, rss_budget,
                                                    change):
    root, ref, data = _fresh(pristine, tmp_path_factory)

    def mutate(body):
        if isinstance(change, bytes):
            return change
        key, value = change
        if key == "deep":
            return ("[" * value + "]" * value).encode()
        if key in body:
            body[key] = value
        elif key in ("fields", "feature_names"):
            body["schema"][key] = value
        elif key in ("dtype", "shape", "kind", "name"):
            body["schema"]["fields"][0][key] = value
        elif key == "frame0":
            body["shards"][0]["frames"][0] = value
        else:
            body["shards"][0][key] = value
        return body

    _reseal_manifest(root, ref, mutate)
    _bounded(root, ref, data)


@FUZZ
@given(st.binary(min_size=SHARD_HEADER.size, max_size=SHARD_HEADER.size), st.integers(0, 2),
       st.booleans())
def test_hostile_shard_headers(pristine, tmp_path_factory, rss_budget, header, shard_i, keep):
    """Random headers, or the real header with random bytes after the magic."""
    root, ref, data = _fresh(pristine, tmp_path_factory)
    path = root / "train" / f"shard-{shard_i:05d}.lss"
    raw = path.read_bytes()
    if keep:
        header = raw[:8] + header[8:]
    assume(header != raw[: SHARD_HEADER.size])
    path.write_bytes(header + raw[SHARD_HEADER.size:])
    with pytest.raises(ShardError):
        _read_everything(root, ref, data)
    _bounded(root, ref, data)
