"""Encrypted shards from a local S3-compatible server vs the same shards on local disk.

Run:  .venv/bin/python benchmarks/bench_storage.py [--rounds 5] [--samples 40000]

Target (issue 16): an epoch through ``EncryptedShardDataModule`` (2 DataLoader workers)
from moto's S3 server on 127.0.0.1 reaches >= 0.8x the samples/s of the same shards read
from local disk. The same ciphertext is written to both roots (one local write, uploaded
object by object). Local and S3 epochs alternate in every round (order flipped each
round); medians, spread (min..max) of each side and of the per-round ratio, and the load
average are printed. Needs ``moto[server]``, ``s3fs`` and ``boto3`` (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lightning_sustain.data.datamodule import EncryptedShardDataModule
from lightning_sustain.data.keys import generate_key, write_key_file
from lightning_sustain.data.writer import write_arrays

BUCKET = "bench-storage"


def epoch(dm: EncryptedShardDataModule) -> tuple[int, float]:
    """One pass over the train loader; returns (samples, seconds)."""
    loader = dm.train_dataloader()
    n = 0
    t0 = time.perf_counter()
    for batch in loader:
        n += len(batch["y"])
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=40_000)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--frame-kib", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--persistent", action="store_true",
                    help="persistent DataLoader workers (no per-epoch worker start)")
    args = ap.parse_args()

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",  # noqa: S106
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    import socket
    import subprocess
    import sys

    import boto3

    # the server in its own process, as a real store would be (not sharing our GIL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit("moto server did not start") from None
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    opts = {"client_kwargs": {"endpoint_url": endpoint}}

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        key_file = tmp_path / "master.key"
        write_key_file(key_file, generate_key())
        os.environ["XDG_STATE_HOME"] = str(tmp_path / "state")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(args.samples, args.features)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        from lightning_sustain.data.keys import KeyReference

        local = tmp_path / "local"
        write_arrays(local, "train", {"x": x, "y": y}, KeyReference(file=str(key_file)),
                     frame_nbytes=args.frame_kib * 1024, progress=False)
        # the same bytes in the bucket: identical ciphertext on both sides
        for p in sorted(local.rglob("*")):
            rel = p.relative_to(local).as_posix()
            if p.is_file() and not rel.startswith(".") and "audit" not in rel:
                client.put_object(Bucket=BUCKET, Key=f"ds/{rel}", Body=p.read_bytes())
        url = f"s3://{BUCKET}/ds"

        def make(root: str, **kw) -> EncryptedShardDataModule:
            dm = EncryptedShardDataModule(root, key_file=str(key_file), batch_size=256,
                                          num_workers=args.workers, shuffle=True, seed=0,
                                          persistent_workers=args.persistent,
                                          audit_path=str(tmp_path / "audit.jsonl"), **kw)
            dm.setup("fit")
            return dm

        dms = {"local": make(str(local)), "s3": make(url, storage_options=opts)}
        for dm in dms.values():  # warm-up (imports, worker start)
            epoch(dm)
        # ceiling: the server alone (every frame range fetched concurrently, no decryption)
        from lightning_sustain.data.reader import SplitReader, resolve_data_key
        from lightning_sustain.data.storage import RemoteStore

        store = RemoteStore(url, opts)
        data_key, ds_id, _ = resolve_data_key(store, KeyReference(file=str(key_file)))
        with SplitReader(store, "train", data_key, ds_id) as reader:
            items = [(reader.shard_name(si), *reader._frames[si][fi][:2])
                     for si, fi, _ in reader.frame_units()]
        t0 = time.perf_counter()
        for i in range(0, len(items), 16):
            store.read_ranges(items[i:i + 16])
        raw = args.samples / (time.perf_counter() - t0)
        rates: dict[str, list[float]] = {"local": [], "s3": []}
        ratios = []
        for r in range(args.rounds):
            order = ["local", "s3"] if r % 2 == 0 else ["s3", "local"]
            got = {}
            for name in order:
                n, dt = epoch(dms[name])
                assert n == args.samples, (name, n)
                got[name] = n / dt
                rates[name].append(got[name])
            ratios.append(got["s3"] / got["local"])
            print(f"round {r}: local {got['local']:9.0f} samples/s   s3 {got['s3']:9.0f} "
                  f"samples/s   ratio {ratios[-1]:.2f}   load {os.getloadavg()[0]:.2f}")
    server.terminate()
    server.wait(timeout=30)

    def summary(xs: list[float]) -> str:
        return f"median {statistics.median(xs):9.0f}  (min {min(xs):.0f} .. max {max(xs):.0f})"

    print(f"\nsamples {args.samples} x {args.features} float32, frame {args.frame_kib} KiB, "
          f"{args.workers} workers, {args.rounds} rounds (interleaved)")
    print(f"local disk     : {summary(rates['local'])} samples/s")
    print(f"moto S3 (lo)   : {summary(rates['s3'])} samples/s")
    print(f"ratio s3/local : median {statistics.median(ratios):.2f}  (min {min(ratios):.2f} .. "
          f"max {max(ratios):.2f})   target >= 0.80")
    print(f"server ceiling : {raw:9.0f} samples/s (ranges fetched, 16 at a time, one process, "
          "no decryption)")
    print(f"load average   : {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
