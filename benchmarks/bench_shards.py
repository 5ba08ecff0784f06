"""Encrypted shards: decrypt speed, end-to-end epoch throughput, worker memory.

Run:  .venv/bin/python benchmarks/bench_shards.py [--rounds 5] [--quick]

A/B pairs are measured side by side in one run, bare first then ours in every round;
medians, every round and the load average are printed. Targets (issue 14): our frame
path >= 0.9x bare ``AESGCM.decrypt`` on the same frames (in memory, and from the shard
files with the same reads); an epoch through the DataModule >= 0.95x the same DataModule
over unencrypted shards; worker peak RSS bounded by a few frames, not by shard size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
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
CHUNK = 16  # frames per bare/ours alternation


def median(xs):
    return statistics.median(xs)


def bench_decrypt(rounds: int, total_mb: int) -> None:
    """Frame path vs bare AES-GCM on the same frames, in memory (bare first, then ours)."""
    print(f"\n== frame path in memory, one core, {total_mb} MiB in {FRAME // 1024} KiB frames; "
          f"GB per CPU-second of this thread (load average {_load()}) ==")
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from lightning_sustain.data.format import FrameOpener, frame_aad_base

    aead = DataKey.generate().aead()
    fernet = Fernet(Fernet.generate_key())
    nframes = total_mb * 1024 * 1024 // FRAME
    plain = [os.urandom(FRAME) for _ in range(nframes)]
    ds_id, write_id = os.urandom(16), os.urandom(16)
    base = frame_aad_base(ds_id, write_id, 1, "train", 0)
    pos = struct.Struct("<IB")
    opener = FrameOpener(aead, base)
    aads = [frame_aad(ds_id, 1, "train", 0, i, i == nframes - 1, write_id)
            for i in range(nframes)]
    sealed = [seal_frame(aead, p, a) for p, a in zip(plain, aads, strict=True)]
    tokens = [fernet.encrypt(p) for p in plain[: max(1, nframes // 8)]]
    assert isinstance(aead, AESGCM)
    raw, ours, ours_wipe, fer = [], [], [], []
    last = nframes - 1
    buf = bytearray(FRAME)
    chunks = [range(i, min(i + CHUNK, nframes)) for i in range(0, nframes, CHUNK)]
    for rnd in range(rounds):
        # Chunks of frames alternate between the sides (bare first, then ours, then the old
        # path), each chunk cold for whichever side gets it, so load bursts on this shared
        # machine and cache warmth hit all sides alike. Times are this thread's CPU seconds.
        t_side = [0.0, 0.0, 0.0]
        n_side = [0, 0, 0]
        for c, chunk in enumerate(chunks):
            side = (c + rnd) % 3
            t = time.thread_time()
            if side == 0:  # bare: the cipher alone, AAD precomputed, fresh output bytes
                for i in chunk:
                    blob = sealed[i]
                    aead.decrypt(blob[:12], blob[12:], aads[i])
            elif side == 1:  # ours: what SplitReader does per frame (FrameOpener)
                for i in chunk:
                    blob = sealed[i]
                    opener.open_into(blob[:12], blob[12:], i, i == last, buf)
            else:  # the old path: open_frame, new AAD bytes, wipe every frame
                for i in chunk:
                    wipe(open_frame(aead, sealed[i], base + pos.pack(i, i == last), shard="s",
                                    frame=i, out=buf))
            t_side[side] += time.thread_time() - t
            n_side[side] += len(chunk) * FRAME
        wipe(buf)
        raw.append(n_side[0] / t_side[0] / 1e9)
        ours.append(n_side[1] / t_side[1] / 1e9)
        ours_wipe.append(n_side[2] / t_side[2] / 1e9)
        t = time.thread_time()
        for tok in tokens:
            fernet.decrypt(tok)
        fer.append(len(tokens) * FRAME / (time.thread_time() - t) / 1e9)
    r = median(ours) / median(raw)
    print(f"bare AESGCM.decrypt         : median {median(raw):6.2f} GB/s  (rounds {_fmt(raw)})")
    print(f"ours FrameOpener.open_into  : median {median(ours):6.2f} GB/s  (rounds {_fmt(ours)})")
    print(f"open_frame + wipe per frame : median {median(ours_wipe):6.2f} GB/s  "
          f"(rounds {_fmt(ours_wipe)})  (the old path, for comparison)")
    print(f"Fernet decrypt              : median {median(fer):6.3f} GB/s")
    best = max(ours) / max(raw)
    print(f"ratio ours/bare: median {r:.3f}, best-of-rounds {best:.3f}   target >= 0.9: "
          f"{'MET' if r >= 0.9 else 'MISSED'}")


def bench_frames_from_file(rounds: int, tmp: Path, key_file: str) -> None:
    """SplitReader.read_frame vs bare pread + AESGCM.decrypt of the same shard frames."""
    ref = KeyReference(file=key_file)
    n = (64 << 20) // 128
    _write(tmp / "frames", n, ref, plain=False)
    reader = open_split(tmp / "frames", "train", ref)
    units = reader.frame_units()
    shards = reader.manifest.shards
    m = reader.manifest
    aead = reader._aead
    paths = [reader.directory / s.file for s in shards]
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    jobs = [(fds[si], *shards[si].frames[fi][:2],
             frame_aad(m.dataset_id, m.dataset_version, "train", si, fi,
                       fi == len(shards[si].frames) - 1, m.write_id))
            for si, fi, _ in units]
    nbytes = sum(ln - 28 for _, _, ln, _ in jobs)
    print(f"\n== frame path from the shard files (page cache), {nbytes / 2**20:.0f} MiB, "
          f"{len(jobs)} frames of {FRAME // 1024} KiB, incl. decode; GB per thread CPU-second "
          f"(load average {_load()}) ==")
    bare, ours = [], []
    chunks = [range(i, min(i + CHUNK, len(jobs))) for i in range(0, len(jobs), CHUNK)]
    for rnd in range(rounds):
        t_side, n_side = [0.0, 0.0], [0, 0]
        for c, chunk in enumerate(chunks):  # alternating cold chunks, bare first
            side = (c + rnd) % 2
            t = time.thread_time()
            if side == 0:
                for j in chunk:
                    fd, off, ln, aad = jobs[j]
                    blob = os.pread(fd, ln, off)
                    aead.decrypt(blob[:12], blob[12:], aad)
            else:
                for j in chunk:
                    si, fi, _ = units[j]
                    _, buf = reader.read_frame(si, fi)
                    reader.release(buf)
            t_side[side] += time.thread_time() - t
            n_side[side] += sum(jobs[j][2] - 28 for j in chunk)
        reader.wipe_pool()
        bare.append(n_side[0] / t_side[0] / 1e9)
        ours.append(n_side[1] / t_side[1] / 1e9)
    for fd in fds:
        os.close(fd)
    reader.close()
    r = median(ours) / median(bare)
    print(f"bare pread + decrypt        : median {median(bare):6.2f} GB/s  (rounds {_fmt(bare)})")
    print(f"ours SplitReader.read_frame : median {median(ours):6.2f} GB/s  (rounds {_fmt(ours)})")
    print(f"ratio ours/bare: median {r:.3f}, best-of-rounds {max(ours) / max(bare):.3f}   "
          f"target >= 0.9: {'MET' if r >= 0.9 else 'MISSED'}")


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


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
          f"(30 float32 + int64 label), batch 256, 2 workers, shuffle (load average "
          f"{_load()}) ==")
    ref = KeyReference(file=key_file)
    _write(tmp / "enc", n, ref, plain=False)
    _write(tmp / "plain", n, None, plain=True)
    enc_loader = _loader(tmp / "enc", key_file, False, 256, 2)
    plain_loader = _loader(tmp / "plain", key_file, True, 256, 2)
    results = {"encrypted": [], "unencrypted": []}
    cpu = {"encrypted": [], "unencrypted": []}
    for _ in range(rounds):
        for name, loader in (("unencrypted", plain_loader), ("encrypted", enc_loader)):
            c0, t = _cpu_s(), time.perf_counter()
            count = sum(len(b["y"]) for b in loader)
            results[name].append(count / (time.perf_counter() - t))
            cpu[name].append(count / (_cpu_s() - c0))  # main + reaped worker processes
            assert count == n
    e, p = median(results["encrypted"]), median(results["unencrypted"])
    print(f"unencrypted : median {p:10.0f} samples/s  (rounds {_fmt(results['unencrypted'])})")
    print(f"encrypted   : median {e:10.0f} samples/s  (rounds {_fmt(results['encrypted'])})")
    print(f"ratio enc/plain (wall): median {e / p:.3f}, best-of-rounds "
          f"{max(results['encrypted']) / max(results['unencrypted']):.3f}   target >= 0.95: "
          f"{'MET' if e / p >= 0.95 else 'MISSED'}   (load average {_load()})")
    ce, cp = median(cpu["encrypted"]), median(cpu["unencrypted"])
    print(f"ratio enc/plain (samples per CPU-second, main + workers): median {ce / cp:.3f} "
          f"({cp:.0f} vs {ce:.0f} samples/CPU-s)")


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
        bench_frames_from_file(args.rounds, tmp, key_file)
        bench_epoch(args.rounds, 50_000 if args.quick else 400_000, tmp, key_file)
        bench_rss(tmp, key_file, [4, 16] if args.quick else [4, 32, 128])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
