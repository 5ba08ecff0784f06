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
