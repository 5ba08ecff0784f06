"""Encrypted shards: decrypt speed, end-to-end epoch throughput, worker memory.

Run:  .venv/bin/python benchmarks/bench_shards.py [--rounds 5] [--quick]

A/B pairs are measured interleaved (A, B, A, B, ...) in one run; medians and ratios are
printed. Targets (issue 5): AES-256-GCM decryption >= 2 GB/s per core and >= 10x Fernet;
epoch samples/s with 2 workers >= 0.9x the same data unencrypted in the same format;
worker peak RSS bounded by a few frames, not by shard size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from cryptography.fernet import Fernet

from lightning_sustain.data.datamodule import EncryptedShardDataModule
from lightning_sustain.data.format import frame_aad, open_frame, seal_frame
from lightning_sustain.data.keys import DataKey, KeyReference, generate_key, write_key_file
from lightning_sustain.data.reader import open_split, wipe
from lightning_sustain.data.writer import write_arrays

FRAME = 64 * 1024


def median(xs):
    return statistics.median(xs)


def bench_decrypt(rounds: int, total_mb: int) -> None:
    print(f"\n== decryption, one core, {total_mb} MiB in {FRAME // 1024} KiB frames ==")
    aead = DataKey.generate().aead()
    fernet = Fernet(Fernet.generate_key())
    nframes = total_mb * 1024 * 1024 // FRAME
    plain = [os.urandom(FRAME) for _ in range(nframes)]
    aads = [frame_aad(b"\0" * 16, 1, "train", 0, i, i == nframes - 1) for i in range(nframes)]
    sealed = [seal_frame(aead, p, a) for p, a in zip(plain, aads, strict=True)]
    tokens = [fernet.encrypt(p) for p in plain]
    nbytes = nframes * FRAME
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    raw_aead = AESGCM(os.urandom(32))
    raw_sealed = [(n := os.urandom(12), raw_aead.encrypt(n, p, b"aad")) for p in plain]
    gcm, fer, raw = [], [], []
    for _ in range(rounds):
        t = time.perf_counter()
        for nonce, ct in raw_sealed:
            raw_aead.decrypt(nonce, ct, b"aad")
        raw.append(nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        buf = bytearray(FRAME)
        for blob, aad in zip(sealed, aads, strict=True):  # as SplitReader: reused, wiped
            wipe(open_frame(aead, blob, aad, shard="s", frame=0, out=buf))
        gcm.append(nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        for tok in tokens:
            fernet.decrypt(tok)
        fer.append(nbytes / (time.perf_counter() - t) / 1e9)
    print(f"AESGCM.decrypt (cipher): median {median(raw):6.2f} GB/s  (rounds {_fmt(raw)})")
    print(f"open_frame (+AAD, wipe)  : median {median(gcm):6.2f} GB/s  (rounds {_fmt(gcm)})")
    print(f"Fernet decrypt         : median {median(fer):6.3f} GB/s  (rounds {_fmt(fer)})")
    ratio = median(gcm) / median(fer)
    print(f"ratio GCM/Fernet       : {ratio:6.1f}x   target >= 10x: "
          f"{'MET' if ratio >= 10 else 'MISSED'}; GCM >= 2 GB/s: "
          f"{'MET' if median(gcm) >= 2 else 'MISSED'}")


def _fmt(xs):
    return ", ".join(f"{x:.3g}" for x in xs)


def _write(root: Path, n: int, ref, plain: bool, shard_mb: int = 64):
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((n, 30)).astype(np.float32),
            "y": rng.integers(0, 2, n).astype(np.int64)}
    return write_arrays(root, "train", data, ref, shard_nbytes=shard_mb << 20, progress=False,
                        _unencrypted_baseline=plain)


def _loader(root, key_file, plain, batch_size, workers):
    dm = EncryptedShardDataModule(str(root), key_file=key_file, batch_size=batch_size,
                                  num_workers=workers, shuffle=True, seed=0)
    if plain:  # same DataLoader and dataset code, frames stored without encryption
        dm._allow_plaintext = True
        from lightning_sustain.data.reader import SplitReader

        with SplitReader(root, "train", None, None, allow_plaintext=True) as r:
            dm._num_samples = {"train": len(r)}
        dm._seed = 0
    else:
        dm.setup("fit")
    return dm.train_dataloader()


def bench_epoch(rounds: int, n: int, tmp: Path, key_file: str) -> None:
    print(f"\n== end to end: one epoch through the DataModule, {n} samples "
          "(30 float32 + int64 label), batch 256, 2 workers, shuffle ==")
    ref = KeyReference(file=key_file)
    _write(tmp / "enc", n, ref, plain=False)
    _write(tmp / "plain", n, None, plain=True)
    enc_loader = _loader(tmp / "enc", key_file, False, 256, 2)
    plain_loader = _loader(tmp / "plain", key_file, True, 256, 2)
    results = {"encrypted": [], "unencrypted": []}
    for r in range(rounds):
        order = [("encrypted", enc_loader), ("unencrypted", plain_loader)]
        if r % 2:
            order.reverse()
        for name, loader in order:
            t = time.perf_counter()
            count = sum(len(b["y"]) for b in loader)
            results[name].append(count / (time.perf_counter() - t))
            assert count == n
    e, p = median(results["encrypted"]), median(results["unencrypted"])
    print(f"encrypted   : median {e:10.0f} samples/s  (rounds {_fmt(results['encrypted'])})")
    print(f"unencrypted : median {p:10.0f} samples/s  (rounds {_fmt(results['unencrypted'])})")
    print(f"ratio enc/plain: {e / p:.3f}   target >= 0.9: {'MET' if e / p >= 0.9 else 'MISSED'}")


def _rss_child(root: str, key_file: str, queue) -> None:
    """Run in a fresh (spawned) process: iterate a split like one DataLoader worker does."""
    from lightning_sustain.data.datamodule import EncryptedShardDataset
    from lightning_sustain.data.keys import KeyReference

    ref = KeyReference(file=key_file)
    with open_split(root, "train", ref) as r:
        n = len(r)
    ds = EncryptedShardDataset(root, "train", ref, num_samples=n, batch_size=256, shuffle=True,
                               seed=0)
    pid = os.getpid()
    rss0 = psutil.Process(pid).memory_info().rss
    hwm0 = _hwm(pid)
    peak = rss0
    count = 0
    for batch in ds:
        count += len(batch["y"])
        peak = max(peak, psutil.Process(pid).memory_info().rss)
    queue.put((count, rss0, peak, hwm0, _hwm(pid)))


def bench_rss(tmp: Path, key_file: str, shard_mbs: list[int]) -> None:
    import multiprocessing as mp

    print("\n== reader peak RSS growth vs shard size (one shard each, batch 256, shuffle "
          "window 4 frames; fresh spawned process per size, like one worker) ==")
    ref = KeyReference(file=key_file)
    record = 30 * 4 + 8
    ctx = mp.get_context("spawn")
    for mb in shard_mbs:
        n = (mb << 20) // record
        root = tmp / f"rss{mb}"
        _write(root, n, ref, plain=False, shard_mb=mb + 1)
        with open_split(root, "train", ref) as r:
            assert len(r.manifest.shards) == 1
            size = r.manifest.shards[0].size_bytes
        q = ctx.Queue()
        p = ctx.Process(target=_rss_child, args=(str(root), key_file, q))
        p.start()
        count, rss0, peak, hwm0, hwm1 = q.get(timeout=600)
        p.join()
        assert count == n
        grow = max(peak, hwm1) - rss0
        print(f"shard {size / 2**20:7.1f} MiB: RSS before iterating {rss0 / 2**20:6.1f} MiB, "
              f"peak growth {grow / 2**20:6.2f} MiB (= {grow / FRAME:5.1f} frames of 64 KiB)")


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        key_file = str(write_key_file(tmp / "master.key", generate_key()))
        bench_decrypt(args.rounds, 16 if args.quick else 128)
        bench_epoch(args.rounds, 50_000 if args.quick else 400_000, tmp, key_file)
        bench_rss(tmp, key_file, [4, 16] if args.quick else [4, 32, 128])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
