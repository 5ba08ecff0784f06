"""Encrypted shards in object storage, against a real S3-compatible server on 127.0.0.1.

moto's server mode is started once per session; a small fault-injecting HTTP proxy on
127.0.0.1 sits in front of it (latency, transient and permanent 5xx). Every socket
connection of the tests is checked to go to a loopback address.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from lightning_sustain.data import (  # noqa: E402
    EncryptedShardDataModule,
    MasterKey,
    ShardWriter,
    open_split,
    verify_dataset,
    write_arrays,
)
from lightning_sustain.data.commands import main as cli_main  # noqa: E402
from lightning_sustain.data.errors import (  # noqa: E402
    ConcurrentWriteError,
    FrameAuthenticationError,
    KeyringError,
    MissingShardError,
    ShardError,
)
from lightning_sustain.data.keys import write_key_file  # noqa: E402
from lightning_sustain.data.storage import (  # noqa: E402
    RemoteStore,
    StorageCredentialsError,
    StorageUnavailableError,
    check_storage_options,
)

BUCKET = "ls-test-bucket"
FAKE_SECRET = "dummy-secret-Zq81"  # noqa: S105 - a dummy value that must never be echoed

# -- loopback guard -------------------------------------------------------------------------

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


_real_getaddrinfo = socket.getaddrinfo
VIOLATIONS: list[str] = []  # checked after every test (errors in threads are swallowed)


def _is_loopback(host) -> bool:
    if host in ("localhost", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_address(address) -> None:
    if isinstance(address, tuple) and address and not _is_loopback(address[0]):
        VIOLATIONS.append(f"connect {address[0]}")
        raise OSError(f"test traffic to a non-loopback address: {address[0]}")


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _is_loopback(host if not isinstance(host, bytes) else host.decode()):
        VIOLATIONS.append(f"resolve {host}")
        raise OSError(f"test tried to resolve a non-loopback name: {host}")
    return _real_getaddrinfo(host, *args, **kwargs)


def _guarded_connect(self, address):
    _check_address(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    _check_address(address)
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch, tmp_path):
    # the default audit file of a remote root is local, under XDG_STATE_HOME
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", _guarded_getaddrinfo)
    VIOLATIONS.clear()
    yield
    assert not VIOLATIONS, f"traffic outside 127.0.0.1: {VIOLATIONS}"


# -- servers ---------------------------------------------------------------------------------


class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of moto: counts requests, injects latency and 5xx."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.delay_s = 0.0
        self.fail_next = 0
        self.fail_always = False
        self.fail_status = 503
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _do(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                with proxy.lock:
                    proxy.requests.append((self.command, self.path, self.headers.get("Range")))
                    fail = proxy.fail_always or proxy.fail_next > 0
                    if proxy.fail_next > 0:
                        proxy.fail_next -= 1
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                if fail:
                    code = "ServiceUnavailable" if proxy.fail_status == 503 else "InternalError"
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               "<Message>injected</Message></Error>").encode()
                    self.send_response(proxy.fail_status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                length = None
                for k, v in resp.getheaders():
                    lk = k.lower()
                    if lk == "content-length":
                        length = v
                    elif lk not in ("transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length",
                                 length if self.command == "HEAD" and length else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _do

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.delay_s, self.fail_next, self.fail_always, self.fail_status = 0.0, 0, False, 503
            self.requests.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def s3():
    """moto in server mode on 127.0.0.1 with a bucket, and a fault proxy in front of it."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
        "AWS_CONFIG_FILE": "/nonexistent/config",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.update(env)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    direct = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=direct).create_bucket(Bucket=BUCKET)
    proxy = FaultProxy(port)
    try:
        yield {"direct": direct, "proxy": proxy}
    finally:
        proxy.close()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def proxy(s3):
    s3["proxy"].reset()
    yield s3["proxy"]
    s3["proxy"].reset()


def _opts(endpoint: str, timeout_s: float | None = None) -> dict:
    opts: dict = {"client_kwargs": {"endpoint_url": endpoint}}
    if timeout_s is not None:
        opts["config_kwargs"] = {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                 "retries": {"max_attempts": 1}}
    return opts


def _client(s3):
    return boto3.client("s3", endpoint_url=s3["direct"])


def _url(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{os.urandom(4).hex()}"


def _data(n: int = 600, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int64)
    return {"x": x, "y": y}


@pytest.fixture
def key() -> MasterKey:
    return MasterKey(os.urandom(32))


def _write(url, key, s3, *, split="train", n=600, seed=0, **kw):
    return write_arrays(url, split, _data(n, seed), key, frame_nbytes=1024,
                        shard_nbytes=8 * 1024, progress=False,
                        storage_options=_opts(s3["direct"]), **kw)


def _range_sizes(proxy) -> list[int]:
    """Bytes asked for by each shard GET through the proxy (every one must be ranged)."""
    gets = [r for r in proxy.requests if r[0] == "GET" and ".lss" in r[1]]
    assert all(r[2] and r[2].startswith("bytes=") for r in gets), gets
    out = []
    for _, _, rng in gets:
        a, b = (int(v) for v in rng[len("bytes="):].split("-"))
        out.append(b - a + 1)
    return out


def _key_of(url: str, rel: str) -> str:
    return url.split(f"s3://{BUCKET}/", 1)[1] + "/" + rel


# -- writing, verifying, training ----------------------------------------------------------


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
        self.seen = 0

    def training_step(self, batch, batch_idx):
        self.seen += len(batch["y"])
        return torch.nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        acc = (self.net(batch["x"]).argmax(1) == batch["y"]).float().mean()
        self.log("val_acc", acc, batch_size=len(batch["y"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def test_write_verify_train_from_s3_with_range_reads(s3, proxy, key, tmp_path):
    url = _url("train")
    res = _write(url, key, s3, n=800)
    _write(url, key, s3, split="val", n=200, seed=1)
    assert res.root == url and res.num_shards > 1 and res.num_frames > res.num_shards
    listed = {o["Key"] for o in _client(s3).list_objects_v2(Bucket=BUCKET,
                                                           Prefix=_key_of(url, ""))["Contents"]}
    assert _key_of(url, "dataset.lsd") in listed and _key_of(url, "keyring.json") in listed
    audit = tmp_path / "audit.jsonl"
    block = 3000  # bytes: 2 frames of ~1 KiB of ciphertext, less than a shard of ~8 KiB
    report = verify_dataset(url, key, audit_path=str(audit), read_block_nbytes=block,
                            storage_options=_opts(proxy.endpoint))
    assert report.ok, report.errors
    assert report.samples == 1000 and report.frames >= res.num_frames
    # frames fetched with range reads of adjacent frames, at most one read block each
    # (several frames per GET), never a whole shard larger than a block
    with open_split(url, "train", key, storage_options=_opts(s3["direct"])) as reader:
        max_frame = max(ln for s in reader.manifest.shards for _, ln, _ in s.frames)
        shard_nbytes = min(s.size_bytes for s in reader.manifest.shards)
    assert shard_nbytes > block and max_frame < block
    sizes = _range_sizes(proxy)
    assert sizes and max(sizes) <= block and max(sizes) > max_frame

    # training: default read blocks (4 MiB) cover these small shards' frames in one GET each
    proxy.requests.clear()
    key_file = tmp_path / "master.key"
    write_key_file(key_file, key._key)
    dm = EncryptedShardDataModule(url, val_dir="val", key_file=str(key_file), batch_size=50,
                                  num_workers=2, seed=0, audit_path=str(audit),
                                  storage_options=_opts(proxy.endpoint))
    model = _Tiny()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, dm)
    assert model.seen == 2 * 800
    assert trainer.callback_metrics["val_acc"] > 0.8
    sizes = _range_sizes(proxy)
    assert sizes and max(sizes) <= 4 * 1024 * 1024 and max(sizes) > max_frame
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    reads = [r for r in records if r["action"] == "read" and r["splits"] == ["train"]]
    assert sum(r["samples"] for r in reads) == 2 * 800
    assert all(r["root"] == url for r in records)


def test_tampered_object_names_shard_and_frame(s3, key):
    url = _url("tamper")
    _write(url, key, s3)
    rng = random.Random(7)
    client = _client(s3)
    with open_split(url, "train", key, storage_options=_opts(s3["direct"])) as reader:
        units = [(si, fi) for si, fi, _ in reader.frame_units()]
        frames = reader.manifest.shards
    for _ in range(4):
        si, fi = rng.choice(units)
        off, length, _ = frames[si].frames[fi]
        obj_key = _key_of(url, f"train/{frames[si].file}")
        original = client.get_object(Bucket=BUCKET, Key=obj_key)["Body"].read()
        blob = bytearray(original)
        pos = off + rng.randrange(length)
        blob[pos] ^= 1 << rng.randrange(8)
        client.put_object(Bucket=BUCKET, Key=obj_key, Body=bytes(blob))
        with open_split(url, "train", key, storage_options=_opts(s3["direct"])) as reader:
            with pytest.raises(FrameAuthenticationError) as err:
                reader.read_frame(si, fi)
        assert err.value.shard == f"train/{frames[si].file}" and err.value.frame == fi
        report = verify_dataset(url, key, storage_options=_opts(s3["direct"]))
        assert not report.ok and report.first_error.frame == fi
        assert report.first_error.shard == f"train/{frames[si].file}"
        client.put_object(Bucket=BUCKET, Key=obj_key, Body=original)  # restore for next round
    assert verify_dataset(url, key, storage_options=_opts(s3["direct"])).ok


def test_any_flipped_byte_of_any_object_is_detected(s3, key):
    """Property over the whole root: a flipped bit in any object never verifies clean."""
    url = _url("anybyte")
    _write(url, key, s3, n=300)
    client = _client(s3)
    prefix = _key_of(url, "")
    objects = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET,
                                                              Prefix=prefix)["Contents"])
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    for _ in range(8):
        obj = rng.choice(objects)
        original = client.get_object(Bucket=BUCKET, Key=obj)["Body"].read()
        blob = bytearray(original)
        pos = rng.randrange(len(blob))
        blob[pos] ^= 1 << rng.randrange(8)
        client.put_object(Bucket=BUCKET, Key=obj, Body=bytes(blob))
        try:
            report = verify_dataset(url, key, storage_options=_opts(s3["direct"]))
        except ShardError:
            pass
        else:
            assert not report.ok, f"flip at {obj}:{pos} verified clean"
        finally:
            client.put_object(Bucket=BUCKET, Key=obj, Body=original)
    assert verify_dataset(url, key, storage_options=_opts(s3["direct"])).ok


def test_missing_objects_are_clear_errors(s3, key):
    url = _url("missing")
    _write(url, key, s3)
    client = _client(s3)
    client.delete_object(Bucket=BUCKET, Key=_key_of(url, "train/shard-00001.lss"))
    with open_split(url, "train", key, storage_options=_opts(s3["direct"])) as reader:
        reader.read_frame(0, 0)
        with pytest.raises(MissingShardError, match="does not exist") as err:
            reader.read_frame(1, 0)
    assert err.value.shard == "train/shard-00001.lss" and url in str(err.value)
    client.delete_object(Bucket=BUCKET, Key=_key_of(url, "keyring.json"))
    with pytest.raises(KeyringError, match="not an encrypted dataset root"):
        verify_dataset(url, key, storage_options=_opts(s3["direct"]))


def test_object_replaced_mid_epoch_is_detected(s3, key, tmp_path):
    url = _url("replace")
    _write(url, key, s3)
    opts = _opts(s3["direct"])
    reader = open_split(url, "train", key, storage_options=opts)
    with reader:
        reader.read_frame(0, 0)
        # another write of the split replaces its objects while this reader is mid-epoch
        _write(url, key, s3, seed=3)
        with pytest.raises(ShardError) as err:
            for fi in range(1, len(reader.manifest.shards[0].frames)):
                reader.read_frame(0, fi)
    assert isinstance(err.value, FrameAuthenticationError)
    assert err.value.shard == "train/shard-00000.lss" and err.value.frame == 1
    # a fresh reader sees the new version, consistently
    assert verify_dataset(url, key, storage_options=opts).ok


def test_concurrent_writer_is_refused(s3, key, tmp_path, monkeypatch):
    import tempfile

    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    url = _url("concurrent")
    _write(url, key, s3)
    assert not list(staging.iterdir())  # the local ciphertext staging is removed
    slow = ShardWriter(url, "train", key, frame_nbytes=1024, progress=False,
                       storage_options=_opts(s3["direct"]))
    slow.write_columns(_data(100, 5))
    _write(url, key, s3, split="val", seed=4)  # another writer commits meanwhile
    with pytest.raises(ConcurrentWriteError, match="changed by another writer"):
        slow.commit()
    assert not list(staging.iterdir())  # also after a refused commit
    assert verify_dataset(url, key, storage_options=_opts(s3["direct"])).ok


# -- faults: latency, retries, unreachable, credentials --------------------------------------


def test_slow_server_training_completes_and_timeouts_bound_it(s3, proxy, key, tmp_path):
    url = _url("slow")
    _write(url, key, s3, n=300)
    proxy.delay_s = 0.05
    key_file = tmp_path / "k"
    write_key_file(key_file, key._key)
    dm = EncryptedShardDataModule(url, key_file=str(key_file), batch_size=100, num_workers=0,
                                  audit_path=str(tmp_path / "a.jsonl"), storage_timeout_s=5,
                                  storage_options=_opts(proxy.endpoint))
    model = _Tiny()
    t0 = time.monotonic()
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(model, dm)
    assert model.seen == 300 and time.monotonic() - t0 < 120
    # a server slower than the configured timeout: a clear error in bounded time
    proxy.delay_s = 1.5
    store = RemoteStore(url, _opts(proxy.endpoint), timeout_s=0.3, retries=1,
                        retry_backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="too slow") as err:
        store.read_range("train/shard-00000.lss", 0, 64)
    assert time.monotonic() - t0 < 2 * 1.5 + 2
    assert url in str(err.value) and FAKE_SECRET not in str(err.value)


@pytest.mark.parametrize("status", [500, 503])
def test_transient_5xx_is_retried_permanent_is_clear(s3, proxy, key, status):
    url = _url("retry")
    _write(url, key, s3)
    proxy.fail_status = status
    store = RemoteStore(url, _opts(proxy.endpoint, timeout_s=5), retries=3,
                        retry_backoff_s=0.01)
    expect = _client(s3).get_object(Bucket=BUCKET, Key=_key_of(url, "train/shard-00000.lss"),
                                    Range="bytes=10-99")["Body"].read()
    proxy.requests.clear()
    proxy.fail_next = 2
    assert store.read_range("train/shard-00000.lss", 10, 90) == expect
    assert len(proxy.requests) == 3  # two injected failures, then success
    proxy.fail_always = True
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError) as err:
        store.read_range("train/shard-00000.lss", 10, 90)
    assert time.monotonic() - t0 < 10
    assert url in str(err.value) and FAKE_SECRET not in str(err.value)
    # and through the reader: a permanent failure during a read names the URL
    with pytest.raises(StorageUnavailableError):
        verify_dataset(url, key, storage_options=_opts(proxy.endpoint, timeout_s=5))


def test_unreachable_store_is_clear_and_bounded(key):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"s3://{BUCKET}/nowhere"
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="unreachable") as err:
        verify_dataset(url, key, storage_options=_opts(f"http://127.0.0.1:{port}", 2))
    assert time.monotonic() - t0 < 20
    assert url in str(err.value)


def test_missing_credentials_are_clear(s3, key, monkeypatch, tmp_path):
    url = _url("creds")
    _write(url, key, s3)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageCredentialsError, match="provider chain") as err:
        verify_dataset(url, key, storage_options=_opts(s3["direct"]))
    assert url in str(err.value)
    dm = EncryptedShardDataModule(url, key_env="NO_SUCH_VAR_FOR_KEY",
                                  storage_options=_opts(s3["direct"]),
                                  audit_path=str(tmp_path / "a.jsonl"))
    with pytest.raises(StorageCredentialsError):
        dm.setup("fit")


@pytest.mark.parametrize("bad", [
    {"key": "AKIA..."}, {"secret": "x"}, {"token": "t"}, {"password": "p"},
    {"client_kwargs": {"aws_secret_access_key": "x"}},
    {"client_kwargs": {"aws_session_token": "x"}},
    {"config_kwargs": {"nested": {"private_key": "x"}}},
])
def test_secrets_in_storage_options_are_refused(bad, tmp_path):
    with pytest.raises(ValueError, match="provider chain") as err:
        check_storage_options(bad)
    assert "AKIA" not in str(err.value) and "'x'" not in str(err.value)
    with pytest.raises(ValueError, match="credential"):
        EncryptedShardDataModule(f"s3://{BUCKET}/x", key_env="K", storage_options=bad)
    check_storage_options({"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"},
                           "config_kwargs": {"read_timeout": 3}})


# -- ciphertext cache -----------------------------------------------------------------------


def test_cache_holds_ciphertext_only_and_is_authenticated(s3, proxy, key, tmp_path):
    url = _url("cache")
    data = _data(600, 9)
    res = write_arrays(url, "train", data, key, frame_nbytes=1024, progress=False,
                       storage_options=_opts(s3["direct"]))
    cache = tmp_path / "cache"
    key_file = tmp_path / "k"
    write_key_file(key_file, key._key)

    def epoch() -> int:
        dm = EncryptedShardDataModule(url, key_file=str(key_file), batch_size=100,
                                      num_workers=2, cache_dir=str(cache),
                                      audit_path=str(tmp_path / "a.jsonl"),
                                      storage_options=_opts(proxy.endpoint))
        model = _Tiny()
        pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(model, dm)
        return model.seen

    assert epoch() == 600
    first = sum(1 for r in proxy.requests if r[0] == "GET" and ".lss" in r[1])
    files = [p for p in cache.rglob("*") if p.is_file()]
    # every frame's ciphertext cached, by read block (adjacent frames of a shard)
    with open_split(url, "train", key, storage_options=_opts(s3["direct"])) as reader:
        frame_nbytes = sum(ln for s in reader.manifest.shards for _, ln, _ in s.frames)
    assert first > 0 and len(files) >= res.num_shards
    assert sum(p.stat().st_size for p in files) >= frame_nbytes
    # no plaintext: scan every cache file for every 8-byte run of the samples
    plain = data["x"].tobytes()
    needles = {plain[i:i + 8] for i in range(0, len(plain) - 8, 4)}
    blob = b"".join(p.read_bytes() for p in files)
    assert blob and not any(n in blob for n in needles)
    proxy.requests.clear()
    assert epoch() == 600
    assert not [r for r in proxy.requests if r[0] == "GET" and ".lss" in r[1] and r[2]]
    # a tampered cache entry is caught by authentication like a tampered object
    victim = sorted(files)[len(files) // 2]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0x40
    victim.write_bytes(bytes(raw))
    with pytest.raises(FrameAuthenticationError):
        _read_all_cached(url, key, s3, cache)


def _read_all_cached(url, key, s3, cache):
    from lightning_sustain.data.reader import SplitReader, resolve_data_key

    store = RemoteStore(url, _opts(s3["direct"]), cache_dir=str(cache))
    data_key, ds_id, _ = resolve_data_key(store, key)
    with SplitReader(store, "train", data_key, ds_id) as reader:
        for _, buf in reader.iter_frames([(si, fi) for si, fi, _ in reader.frame_units()]):
            reader.release(buf)


# -- CLI ------------------------------------------------------------------------------------


def test_cli_encrypt_and_verify_s3(s3, tmp_path, capsys):
    url = _url("cli")
    key_file = tmp_path / "k"
    write_key_file(key_file, os.urandom(32))
    src = tmp_path / "d.npz"
    np.savez(src, **_data(200))
    opts = json.dumps(_opts(s3["direct"]))
    assert cli_main(["encrypt", "--root", url, "--split", "train", "--input", str(src),
                     "--key-file", str(key_file), "--no-progress",
                     "--storage-options", opts]) == 0
    assert cli_main(["verify", "--root", url, "--key-file", str(key_file),
                     "--audit-path", str(tmp_path / "a.jsonl"),
                     "--storage-options", opts]) == 0
    bad = json.dumps({"secret": FAKE_SECRET})
    assert cli_main(["verify", "--root", url, "--key-file", str(key_file),
                     "--storage-options", bad]) == 2
    err = capsys.readouterr().err
    assert "provider chain" in err and FAKE_SECRET not in err


def test_rotate_key_on_object_storage(s3, key, tmp_path, capsys):
    from lightning_sustain.data import rotate_key
    from lightning_sustain.data.errors import WrongKeyError

    url = _url("rotate")
    _write(url, key, s3, n=300)
    opts = _opts(s3["direct"])
    client = _client(s3)
    before = {o["Key"]: o["ETag"] for o in client.list_objects_v2(
        Bucket=BUCKET, Prefix=_key_of(url, ""))["Contents"]}
    new = MasterKey(os.urandom(32))
    audit = tmp_path / "a.jsonl"
    ring = rotate_key(url, key, new, storage_options=opts, audit_path=str(audit))
    assert ring.key_id == new.key_id
    assert verify_dataset(url, new, storage_options=opts).ok
    with pytest.raises(WrongKeyError):
        verify_dataset(url, key, storage_options=opts)
    after = {o["Key"]: o["ETag"] for o in client.list_objects_v2(
        Bucket=BUCKET, Prefix=_key_of(url, ""))["Contents"]}
    # only keyring.json changed: no shard, manifest or dataset manifest was rewritten
    changed = {k for k in before if before[k] != after.get(k)} | (set(after) - set(before))
    assert changed == {_key_of(url, "keyring.json")}
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["action"] for r in records] == ["rotate-key"] and records[0]["outcome"] == "ok"

    # through the CLI, back to a key file
    key_file, new_file = tmp_path / "new.key", tmp_path / "newer.key"
    write_key_file(key_file, new._key)
    newer = os.urandom(32)
    write_key_file(new_file, newer)
    assert cli_main(["rotate-key", "--root", url, "--key-file", str(key_file),
                     "--new-key-file", str(new_file), "--audit-path", str(audit),
                     "--storage-options", json.dumps(opts)]) == 0
    assert MasterKey(newer).key_id in capsys.readouterr().out
    assert verify_dataset(url, MasterKey(newer), storage_options=opts).ok


def test_rotate_key_on_object_storage_refuses_a_concurrent_rotation(s3, key, monkeypatch):
    from lightning_sustain.data import keys as keys_mod
    from lightning_sustain.data import rotate_key

    url = _url("rotate-race")
    _write(url, key, s3, n=100)
    opts = _opts(s3["direct"])
    other = MasterKey(os.urandom(32))
    real = keys_mod._rewrap

    def racing(ring, old, new, pw, where):
        out = real(ring, old, new, pw, where)
        monkeypatch.setattr(keys_mod, "_rewrap", real)
        rotate_key(url, key, other, storage_options=opts)  # another rotation wins meanwhile
        return out

    monkeypatch.setattr(keys_mod, "_rewrap", racing)
    with pytest.raises(ConcurrentWriteError, match="changed by another rotation"):
        rotate_key(url, key, MasterKey(os.urandom(32)), storage_options=opts)
    assert verify_dataset(url, other, storage_options=opts).ok  # the winner is intact


def test_gs_url_without_gcsfs_names_the_package_to_install(tmp_path, monkeypatch):
    """gs:// goes through the same fsspec path; without gcsfs the error says what to do."""
    import importlib
    import sys

    registry = importlib.import_module("fsspec.registry")._registry
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if gcsfs were not installed
    for proto in ("gs", "gcs"):
        monkeypatch.delitem(registry, proto, raising=False)
    key_file = tmp_path / "k"
    write_key_file(key_file, os.urandom(32))
    dm = EncryptedShardDataModule("gs://some-bucket/ds", key_file=str(key_file),
                                  audit_path=str(tmp_path / "a.jsonl"))
    with pytest.raises(ShardError, match=r"pip install gcsfs") as err:
        dm.setup("fit")
    assert "gs://some-bucket/ds" in str(err.value)
    with pytest.raises(ShardError, match=r"install gcsfs .* to use gs:// roots"):
        verify_dataset("gs://some-bucket/ds", MasterKey(os.urandom(32)),
                       audit_path=str(tmp_path / "a.jsonl"))
    assert cli_main(["verify", "--root", "gs://some-bucket/ds", "--key-file", str(key_file),
                     "--audit-path", str(tmp_path / "a.jsonl")]) != 0


# -- fork safety ----------------------------------------------------------------------------


def _child_reads(store: RemoteStore, parent_fs_id: int, queue) -> None:
    try:
        fs = store.fs
        data = store.read_small("keyring.json", 1 << 16, label="keyring.json",
                                error=ShardError)
        queue.put((id(fs) != parent_fs_id, len(data)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put((False, repr(exc)))


def test_each_process_opens_its_own_filesystem(s3, key):
    import multiprocessing
    import pickle

    url = _url("fork")
    _write(url, key, s3, n=100)
    store = RemoteStore(url, _opts(s3["direct"]))
    parent_fs = store.fs
    clone = pickle.loads(pickle.dumps(store))
    assert clone._fs is None and clone.fs is not parent_fs  # pickles never carry the fs
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_reads, args=(store, id(parent_fs), queue))
    proc.start()
    fresh, size = queue.get(timeout=60)
    proc.join(timeout=60)
    assert fresh is True and isinstance(size, int) and size > 0
