"""Masking and pseudonymisation at encryption time (lightning_sustain/data/masking.py)."""

from __future__ import annotations

import hmac
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sustain.data.commands import main
from lightning_sustain.data.datamodule import EncryptedShardDataModule
from lightning_sustain.data.errors import ManifestAuthenticationError
from lightning_sustain.data.keys import MasterKey, generate_key
from lightning_sustain.data.masking import (
    MaskingError,
    MaskingSpec,
    masked_feature_labels,
    pseudonymise_values,
)
from lightning_sustain.data.reader import open_split, resolve_data_key
from lightning_sustain.data.writer import ShardWriter, write_arrays


@pytest.fixture()
def key():
    return MasterKey(generate_key())


def _all(reader):
    rows = [reader.read_sample(i) for i in range(len(reader))]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def _table(n=500, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(50, 20, size=(n, 3)).astype("float64"),
        "pid": rng.integers(0, 40, size=n),
        "y": rng.integers(0, 2, size=n),
    }


SPEC = {
    "pid": "pseudonymise",
    "zip": "drop",
    "age": {"op": "generalise", "width": 10},
    "bmi": {"op": "noise", "distribution": "laplace", "scale": 2.0, "seed": 7},
}


def test_rules_applied_and_recorded(tmp_path, key):
    data = _table()
    write_arrays(tmp_path, "train", data, key, feature_names=["age", "bmi", "zip"],
                 masking=SPEC, progress=False)
    with open_split(tmp_path, "train", key) as r:
        assert r.schema.feature_names == ("age", "bmi")
        got = _all(r)
        record = r.manifest.masking
    assert [(f["name"], f["op"]) for f in record["fields"]] == [
        ("pid", "pseudonymise"), ("zip", "drop"), ("age", "generalise"), ("bmi", "noise")]
    assert all("seed" not in f for f in record["fields"])
    # drop: the zip column is gone entirely
    assert got["x"].shape == (500, 2)
    # generalise: lower bucket edge of width 10
    np.testing.assert_array_equal(got["x"][:, 0], np.floor(data["x"][:, 0] / 10) * 10)
    # noise: changed, centred, Laplace spread ~ scale * sqrt(2)
    diff = got["x"][:, 1] - data["x"][:, 1]
    assert np.all(diff != 0) and abs(diff.mean()) < 0.5 and 2.0 < diff.std() < 3.7
    # pseudonymise: same id -> same token, different ids -> different tokens, ids gone
    assert got["pid"].dtype == np.int64
    pairs = set(zip(data["pid"].tolist(), got["pid"].tolist(), strict=True))
    assert len(pairs) == len(set(data["pid"].tolist())) == len(set(got["pid"].tolist()))
    assert not np.intersect1d(got["pid"], data["pid"]).size
    np.testing.assert_array_equal(got["y"], data["y"])


def test_tokens_stable_within_dataset_across_splits_and_rotation(tmp_path, key):
    ids = np.array([3, 14, 15, 92, 65])
    write_arrays(tmp_path, "train", {"pid": ids, "y": ids}, key, masking={"pid": "pseudonymise"},
                 progress=False)
    from lightning_sustain.data.keys import rotate_key

    new = MasterKey(generate_key())
    rotate_key(tmp_path, key, new)
    write_arrays(tmp_path, "val", {"pid": ids[::-1], "y": ids[::-1]}, new,
                 masking={"pid": "pseudonymise"}, progress=False)
    with open_split(tmp_path, "train", new) as a, open_split(tmp_path, "val", new) as b:
        ta, tb = _all(a), _all(b)
    assert dict(zip(ta["y"], ta["pid"], strict=True)) == dict(zip(tb["y"], tb["pid"],
                                                                   strict=True))
    # another dataset under the same master key: unlinkable tokens
    write_arrays(tmp_path / "other", "train", {"pid": ids, "y": ids}, new,
                 masking={"pid": "pseudonymise"}, progress=False)
    with open_split(tmp_path / "other", "train", new) as c:
        assert not np.intersect1d(_all(c)["pid"], ta["pid"]).size


def test_token_is_hmac_under_hkdf_label(tmp_path, key):
    write_arrays(tmp_path, "train", {"pid": np.array([42]), "y": np.array([0])}, key,
                 masking={"pid": "pseudonymise"}, progress=False)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    dk, ds_id, _ = resolve_data_key(tmp_path, key)
    kp = HKDF(hashes.SHA256(), 32, ds_id, b"lightning-sustain/v1/pseudonymise").derive(dk._key)
    want = int.from_bytes(hmac.digest(kp, b"42", "sha256")[:8], "big") & ((1 << 63) - 1)
    with open_split(tmp_path, "train", key) as r:
        assert r.read_sample(0)["pid"] == want
    # the token is not the plain data key / master key HMAC
    assert want != int.from_bytes(hmac.digest(dk._key, b"42", "sha256")[:8], "big") & (
        (1 << 63) - 1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.integers(-(2**62), 2**62), st.text(min_size=1, max_size=20)),
                min_size=1, max_size=50))
def test_pseudonymise_is_a_function_of_the_value(values):
    key = b"k" * 32
    arr = np.array([str(v) for v in values])
    toks = pseudonymise_values(key, arr)
    for v, t in zip(arr.tolist(), toks.tolist(), strict=True):
        assert t == pseudonymise_values(key, np.array([v]))[0]
        assert 0 <= t < 2**63
    ints = [v for v in values if isinstance(v, int)]
    if ints:  # 123, "123" and 123.0 agree
        a = pseudonymise_values(key, np.array(ints))
        np.testing.assert_array_equal(a, pseudonymise_values(key, np.array([str(i) for i in ints])))
    assert not np.array_equal(toks, pseudonymise_values(b"j" * 32, arr))


def test_noise_is_seeded_and_independent_of_chunking(tmp_path, key):
    x = np.linspace(0, 1, 300)
    spec = {"v": {"op": "noise", "distribution": "gaussian", "scale": 0.5, "seed": 3}}
    write_arrays(tmp_path / "a", "train", {"v": x}, key, masking=spec, progress=False)
    with ShardWriter(tmp_path / "b", "train", key, masking=spec, progress=False) as w:
        for start in range(0, 300, 37):  # uneven chunks, and one sample at a time
            w.write_columns({"v": x[start:start + 20]})
            for i in range(start + 20, min(start + 37, 300)):
                w.write({"v": x[i]})
    with open_split(tmp_path / "a", "train", key) as a, open_split(tmp_path / "b", "train",
                                                                   key) as b:
        va, vb = _all(a)["v"], _all(b)["v"]
    np.testing.assert_allclose(va, vb)
    assert 0.4 < np.std(va - x) < 0.6


def test_generalise_edges_and_dates(tmp_path, key):
    age = np.array([3, 17, 18, 64, 65, 90, -1])
    ts = np.array([1715955000, 1717322400, 1704067199])  # 2024-05-17, 2024-06-02, 2023-12-31
    write_arrays(tmp_path, "train", {"age": age, "y": age}, key,
                 masking={"age": {"op": "generalise", "edges": [0, 18, 65]}}, progress=False)
    write_arrays(tmp_path, "val", {"age": ts, "y": ts}, key,
                 masking={"age": {"op": "generalise", "date": "month"}}, progress=False)
    with open_split(tmp_path, "train", key) as r:
        assert _all(r)["age"].tolist() == [0, 0, 18, 18, 65, 65, 0]
    with open_split(tmp_path, "val", key) as r:
        got = _all(r)["age"].astype("datetime64[s]").astype(str).tolist()
    assert got == ["2024-05-01T00:00:00", "2024-06-01T00:00:00", "2023-12-01T00:00:00"]


def test_csv_text_identifiers_and_cli(tmp_path, capsys, key):
    src = tmp_path / "p.csv"
    src.write_text("patient,visit,age,label\nA-17,2024-05-17,33,1\nB-2,2024-06-02T10:00:00,71,0\n"
                   " A-17 ,2023-01-09,45,1\n")
    keyfile = tmp_path / "k.key"
    assert main(["keygen", "--out", str(keyfile)]) == 0
    spec = tmp_path / "mask.json"
    spec.write_text(json.dumps({"patient": "pseudonymise",
                                "visit": {"op": "generalise", "date": "year"},
                                "age": {"op": "generalise", "width": 25}}))
    root = tmp_path / "ds"
    rc = main(["encrypt", "--input", str(src), "--root", str(root), "--label", "label",
               "--mask", str(spec), "--key-file", str(keyfile), "--no-progress"])
    assert rc == 0, capsys.readouterr()
    from lightning_sustain.data.keys import KeyReference

    with open_split(root, "train", KeyReference(file=str(keyfile))) as r:
        got = _all(r)
        assert r.schema.feature_names == ("visit", "age")
    assert got["patient"][0] == got["patient"][2] != got["patient"][1]
    assert got["x"][:, 1].tolist() == [25, 50, 25]
    assert got["x"][:, 0].astype("int64").astype("datetime64[s]").astype(str).tolist() == [
        "2024-01-01T00:00:00", "2024-01-01T00:00:00", "2023-01-01T00:00:00"]
    # bad specs: clear usage errors, nothing written
    for bad, words in [
        ('{"patient": "pseudonymise", "nosuch": "drop"}', "unknown field"),
        ('[{"name": "age", "op": "drop"}, {"name": "age", "op": "noise", "scale": 1}]',
         "masked twice"),
        ('{"age": {"op": "generalise", "width": -1}}', "width must be > 0"),
        ('{"age": "hash"}', "op must be one of"),
        ('{"age": "drop"}', "column 'patient' has non-numeric cells"),
    ]:
        rc = main(["encrypt", "--input", str(src), "--root", str(tmp_path / "bad"),
                   "--label", "label", "--mask", bad, "--key-file", str(keyfile),
                   "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and words in err, (bad, err)
    assert not (tmp_path / "bad" / "train").exists()


def test_bad_specs_raise(tmp_path, key):
    with pytest.raises(MaskingError, match="masked twice"):
        MaskingSpec.parse([{"name": "a", "op": "drop"}, {"name": "a", "op": "pseudonymise"}])
    with pytest.raises(MaskingError, match="unknown parameter"):
        MaskingSpec.parse({"a": {"op": "noise", "scale": 1, "sigma": 2}})
    with pytest.raises(MaskingError, match="exactly one of"):
        MaskingSpec.parse({"a": {"op": "generalise", "width": 1, "date": "day"}})
    with pytest.raises(MaskingError, match="increase strictly"):
        MaskingSpec.parse({"a": {"op": "generalise", "edges": [1, 1]}})
    with pytest.raises(MaskingError, match=r"unknown field\(s\) \['b'\]"):
        write_arrays(tmp_path, "train", {"a": np.arange(3)}, key, masking={"b": "drop"},
                     progress=False)
    with pytest.raises(MaskingError, match="drops every field"):
        write_arrays(tmp_path, "train", {"a": np.arange(3)}, key, masking={"a": "drop"},
                     progress=False)
    assert not (tmp_path / "train").exists()


def test_masking_record_is_authenticated(tmp_path, key):
    write_arrays(tmp_path, "train", {"a": np.arange(10.0), "y": np.arange(10)}, key,
                 masking={"a": {"op": "noise", "scale": 1}}, progress=False)
    path = tmp_path / "train" / "manifest.lsm"
    blob = bytearray(path.read_bytes())
    blob[-20] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(ManifestAuthenticationError):
        open_split(tmp_path, "train", key)


def test_datamodule_exposes_masking_and_shap_labels(tmp_path, key, monkeypatch):
    data = _table(64)
    write_arrays(tmp_path, "train", data, key, feature_names=["age", "bmi", "zip"],
                 masking=SPEC, progress=False)
    write_arrays(tmp_path, "val", data, key, feature_names=["age", "bmi", "zip"],
                 masking={"zip": "drop"}, progress=False)
    monkeypatch.setenv("LS_TEST_KEY", "lskey1:" + key._key.hex())
    dm = EncryptedShardDataModule(str(tmp_path), key_env="LS_TEST_KEY", val_dir=None)
    dm.setup("fit")
    assert [f["name"] for f in dm.masking["fields"]] == ["pid", "zip", "age", "bmi"]
    assert masked_feature_labels(dm.feature_names, dm.masking) == [
        "age [generalised]", "bmi [noised]"]
    dm2 = EncryptedShardDataModule(str(tmp_path), key_env="LS_TEST_KEY", val_dir="val")
    with pytest.raises(Exception, match="masked differently"):
        dm2.setup("fit")


def test_shap_summary_names_masked_features(tmp_path, key, monkeypatch):
    import lightning.pytorch as pl
    import torch

    from lightning_sustain.callbacks.shap_summary import ShapSummary

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int64")
    names = ["age", "bmi", "zip", "score"]
    spec = {"age": {"op": "generalise", "width": 0.5}, "bmi": {"op": "noise", "scale": 0.1},
            "zip": "drop"}
    for split in ("train", "val"):
        write_arrays(tmp_path / "ds", split, {"x": x, "y": y}, key, feature_names=names,
                     masking=spec, progress=False)
    monkeypatch.setenv("LS_TEST_KEY", "lskey1:" + key._key.hex())

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.layer(x)

        def training_step(self, batch, i):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = EncryptedShardDataModule(str(tmp_path / "ds"), val_dir="val", key_env="LS_TEST_KEY",
                                  batch_format="tuple", tuple_keys=["x", "y"])
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0,
                         callbacks=[ShapSummary(num_background=16, num_samples=8)])
    trainer.fit(Net(), dm)
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert summary["status"] == "ok", summary
    got = {f["name"] for f in summary["outputs"][0]["top_features"]}
    assert got == {"age [generalised]", "bmi [noised]", "score"}
