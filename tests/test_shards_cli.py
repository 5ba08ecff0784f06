"""The keygen / encrypt / verify / rotate-key commands."""

from __future__ import annotations

import base64
import stat
import subprocess
import sys

import numpy as np
import pytest

from lightning_sustain.data.commands import main
from lightning_sustain.data.keys import KeyReference, MasterKey
from lightning_sustain.data.reader import open_split


@pytest.fixture()
def csv_file(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["a,b,c,label"] + [
        f"{rng.random():.6f},{rng.random():.6f},{i},{i % 2}" for i in range(300)
    ]
    path = tmp_path / "in.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _keygen(tmp_path, capsys, name="k.key"):
    path = tmp_path / name
    assert main(["keygen", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    text = path.read_bytes().strip()
    assert text.startswith(b"lskey1:")
    raw = base64.b64decode(text.removeprefix(b"lskey1:"), validate=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert MasterKey(raw).key_id in out
    assert raw.hex() not in out and base64.b64encode(raw).decode() not in out
    return path, raw


def test_keygen_refuses_overwrite(tmp_path, capsys):
    path, raw = _keygen(tmp_path, capsys)
    assert main(["keygen", "--out", str(path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert base64.b64decode(path.read_bytes().strip().removeprefix(b"lskey1:")) == raw


def test_encrypt_verify_tamper_rotate(tmp_path, capsys, csv_file, monkeypatch):
    key, raw = _keygen(tmp_path, capsys)
    root = tmp_path / "ds"
    rc = main(["encrypt", "--input", str(csv_file), "--root", str(root), "--label", "label",
               "--key-file", str(key), "--frame-kib", "1", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "encrypted 300 samples" in out and MasterKey(raw).key_id in out
    with open_split(root, "train", KeyReference(file=str(key))) as r:
        assert r.schema.feature_names == ("a", "b", "c")
        s = r.read_sample(17)
        assert s["y"] == 1 and s["x"][2] == 17.0

    assert main(["verify", "--root", str(root), "--key-file", str(key)]) == 0
    assert "OK:" in capsys.readouterr().out

    # corrupt frame 2 of shard 0: verify exits 1 and names shard and frame
    with open_split(root, "train", KeyReference(file=str(key))) as r:
        off, ln, _ = r.manifest.shards[0].frames[2]
    path = root / "train" / "shard-00000.lss"
    blob = bytearray(path.read_bytes())
    blob[off + ln - 3] ^= 0x10
    path.write_bytes(bytes(blob))
    assert main(["verify", "--root", str(root), "--key-file", str(key)]) == 1
    out = capsys.readouterr().out
    assert "first bad: train/shard-00000.lss frame 2" in out
    blob[off + ln - 3] ^= 0x10  # restore
    path.write_bytes(bytes(blob))

    # rotate to a key given through an environment variable
    new_raw = MasterKey(bytes(range(32)))
    monkeypatch.setenv("LS_NEW_KEY", "lskey1:" + bytes(range(32)).hex())
    assert main(["rotate-key", "--root", str(root), "--key-file", str(key),
                 "--new-key-env", "LS_NEW_KEY"]) == 0
    assert new_raw.key_id in capsys.readouterr().out
    assert main(["verify", "--root", str(root), "--key-env", "LS_NEW_KEY"]) == 0
    capsys.readouterr()
    assert main(["verify", "--root", str(root), "--key-file", str(key)]) == 2
    err = capsys.readouterr().err
    assert "wrong master key" in err and MasterKey(raw).key_id in err and new_raw.key_id in err


def test_encrypt_npz_and_bad_inputs(tmp_path, capsys, monkeypatch):
    key, _ = _keygen(tmp_path, capsys)
    np.savez(tmp_path / "a.npz", x=np.zeros((10, 3), np.float32), y=np.arange(10))
    assert main(["encrypt", "--input", str(tmp_path / "a.npz"), "--root", str(tmp_path / "d"),
                 "--split", "val", "--key-file", str(key), "--no-progress"]) == 0
    capsys.readouterr()
    (tmp_path / "x.txt").write_text("nope")
    assert main(["encrypt", "--input", str(tmp_path / "x.txt"), "--root", str(tmp_path / "e"),
                 "--key-file", str(key)]) == 2
    assert ".csv or .npz" in capsys.readouterr().err
    monkeypatch.delenv("LS_UNSET", raising=False)
    assert main(["verify", "--root", str(tmp_path / "d"), "--key-env", "LS_UNSET"]) == 2
    assert "LS_UNSET" in capsys.readouterr().err
    assert main(["verify", "--root", str(tmp_path / "d")]) == 2  # no key reference: usage


def test_password_dataset_via_env(tmp_path, capsys, csv_file, monkeypatch):
    monkeypatch.setenv("LS_PW", "hunter2-but-longer")
    root = tmp_path / "pw"
    assert main(["encrypt", "--input", str(csv_file), "--root", str(root), "--label", "label",
                 "--password", "--scrypt-n", "16384", "--key-env", "LS_PW",
                 "--no-progress"]) == 0
    assert main(["verify", "--root", str(root), "--key-env", "LS_PW"]) == 0
    monkeypatch.setenv("LS_PW", "wrong")
    assert main(["verify", "--root", str(root), "--key-env", "LS_PW"]) == 2
    assert "wrong password" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lightning_sustain.data", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for cmd in ("keygen", "encrypt", "verify", "rotate-key"):
        assert cmd in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "lightning_sustain.data", "keygen", "--out",
                           str(tmp_path / "k")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "k").exists()
