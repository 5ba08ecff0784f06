"""Read blocks: the block-level shuffle plan, and coalesced, pipelined fetches from S3.

The S3 tests run against the moto server and fault proxy of ``test_data_storage`` (same
fixtures, loopback only).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sustain.data import open_split, write_arrays
from lightning_sustain.data.datamodule import plan_epoch
from lightning_sustain.data.errors import (
    FrameAuthenticationError,
    MissingShardError,
)
from tests import test_data_storage as _st
from tests.test_data_storage import (
    BUCKET,
    _client,
    _data,
    _key_of,
    _opts,
    _range_sizes,
    _url,
    _write,
)

# the moto server, fault proxy and loopback guard of test_data_storage
s3, proxy, key, _loopback_only = _st.s3, _st.proxy, _st.key, _st._loopback_only

pytest.importorskip("s3fs")


# -- the plan ---------------------------------------------------------------------------------


def _blocks_from_sizes(sizes: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(sizes)), sizes)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=25),
    counts_seed=st.integers(0, 2**16),
    world=st.integers(1, 3),
    workers=st.integers(1, 3),
    bs=st.integers(1, 40),
    drop_last=st.booleans(),
    epoch=st.integers(0, 5),
)
def test_block_plan_reads_every_sample_once_and_keeps_blocks_together(
        sizes, counts_seed, world, workers, bs, drop_last, epoch):
    blocks = _blocks_from_sizes(sizes)
    counts = np.random.default_rng(counts_seed).integers(1, 30, len(blocks))
    seen = []
    batches = []
    for rank in range(world):
        nb = 0
        for w in range(workers):
            p = plan_epoch(counts, epoch=epoch, seed=3, shuffle=True, rank=rank,
                           world_size=world, worker_id=w, num_workers=workers, batch_size=bs,
                           drop_last=drop_last, frame_blocks=blocks)
            nb += p.num_batches
            for g, a, b in p.reads:
                start = int(counts[:g].sum())
                seen.extend(range(start + a, start + b))
            # within a worker: a block's frames are read in one run, in storage order
            gs = [g for g, _, _ in p.reads]
            runs: list[int] = []
            for prev, g in zip([None, *gs], gs, strict=False):
                if prev is None or blocks[g] != blocks[prev]:
                    assert blocks[g] not in runs, "a block is read in two separate runs"
                    runs.append(int(blocks[g]))
                else:
                    assert g in (prev, prev + 1), "frames of a block out of storage order"
        batches.append(nb)
    assert len(seen) == len(set(seen))
    assert len(set(batches)) == 1
    total = int(counts.sum())
    expected = (total // world // bs * bs if drop_last else total // world) * world
    assert len(seen) == expected


def test_block_plan_of_single_frame_blocks_is_the_frame_permutation():
    counts = np.random.default_rng(0).integers(1, 50, 40)
    kw = dict(shuffle=True, rank=0, world_size=1, worker_id=0, num_workers=1, batch_size=8,
              drop_last=False)
    for epoch in range(4):
        assert (plan_epoch(counts, epoch=epoch, seed=9, **kw).reads
                == plan_epoch(counts, epoch=epoch, seed=9, frame_blocks=np.arange(40),
                              **kw).reads)
    blocks = _blocks_from_sizes([5, 5, 10, 10, 10])
    orders = {tuple(g for g, _, _ in plan_epoch(counts, epoch=e, seed=9, frame_blocks=blocks,
                                               **kw).reads) for e in range(6)}
    assert len(orders) > 1  # blocks are permuted per epoch


@pytest.mark.parametrize("bad", [[1, 1, 2], [0, 2, 2], [0, 1, 0], [0, 0]])
def test_block_plan_refuses_malformed_blocks(bad):
    with pytest.raises(ValueError, match="frame_blocks"):
        plan_epoch([3, 3, 3], epoch=0, seed=0, shuffle=True, rank=0, world_size=1,
                   worker_id=0, num_workers=1, batch_size=2, drop_last=False,
                   frame_blocks=bad)


# -- fetching blocks from S3 ------------------------------------------------------------------


def _units(reader):
    return [(si, fi) for si, fi, _ in reader.frame_units()]


@pytest.mark.parametrize("block", [0, 1500, 3000, 5000, 1 << 22])
@pytest.mark.parametrize("inflight", [1, 3])
def test_iter_frames_equals_read_frame_and_bounds_gets_and_memory(s3, proxy, key, block,
                                                                  inflight):
    url = _url("blocks")
    _write(url, key, s3, n=900)
    opts = _opts(proxy.endpoint)
    with open_split(url, "train", key, storage_options=opts) as reader:
        units = _units(reader)
        rng = np.random.default_rng(block + inflight)
        blocks, of = reader.blocks(block)
        # frames of one block stay together; the block order is random (a plan's shape)
        order = rng.permutation(len(blocks))
        units = sorted(units, key=lambda u: int(np.where(order == of[
            reader._first_frame[u[0]] + u[1]])[0][0]))
        expect = []
        for si, fi in units:
            cols, buf = reader.read_frame(si, fi)
            expect.append({k: np.array(v) for k, v in cols.items()})
            del cols
            reader.release(buf)
        proxy.requests.clear()
        got = []
        for cols, buf in reader.iter_frames(units, block_nbytes=block, inflight=inflight):
            got.append({k: np.array(v) for k, v in cols.items()})
            del cols
            reader.release(buf)
        max_frame = max(ln for s in reader.manifest.shards for _, ln, _ in s.frames)
        max_block = max(b[4] for b in blocks)
        peak = reader.peak_ciphertext_nbytes
    assert len(got) == len(expect)
    for a, b in zip(got, expect, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    sizes = _range_sizes(proxy)
    assert len(sizes) == len(blocks)  # one ranged GET per block
    assert max(sizes) <= max(block, max_frame) and max(sizes) == max_block
    assert peak <= (inflight + 1) * max_block


def test_object_replaced_during_pipelined_read_fails_authentication(s3, key):
    url = _url("replace-blk")
    _write(url, key, s3, n=900)
    opts = _opts(s3["direct"])
    with open_split(url, "train", key, storage_options=opts) as reader:
        units = [(0, fi) for fi in range(len(reader.manifest.shards[0].frames))]
        blocks, of = reader.blocks(1500)
        nblocks = len({int(of[fi]) for _, fi in units})
        per_block = max(b[2] - b[1] for b in blocks)
        assert nblocks >= 4
        it = reader.iter_frames(units, block_nbytes=1500, inflight=1)
        _, buf = next(it)
        reader.release(buf)
        _write(url, key, s3, seed=5, n=900)  # another write replaces every object
        read = 1
        with pytest.raises(FrameAuthenticationError) as err:
            for _, buf in it:
                reader.release(buf)
                read += 1
        # at most inflight + 1 = 2 blocks were fetched before the replacement: the frames
        # read after it come from them (the old, authentic version) or fail
        assert err.value.shard == "train/shard-00000.lss" and 1 <= err.value.frame
        assert read <= 2 * per_block + 1


def test_missing_object_and_transient_errors_in_fetch_threads(s3, proxy, key):
    url = _url("fetch-faults")
    _write(url, key, s3, n=900)
    with open_split(url, "train", key, storage_options=_opts(proxy.endpoint)) as reader:
        units = _units(reader)
        proxy.fail_next = 2  # transient 503s in a fetch thread are retried
        n = 0
        for _, buf in reader.iter_frames(units, block_nbytes=3000, inflight=3):
            reader.release(buf)
            n += 1
        assert n == len(units)
        assert sum(1 for r in proxy.requests if r[0] == "GET") >= 2
    _client(s3).delete_object(Bucket=BUCKET, Key=_key_of(url, "train/shard-00002.lss"))
    with open_split(url, "train", key, storage_options=_opts(s3["direct"])) as reader:
        with pytest.raises(MissingShardError) as err:
            for _, buf in reader.iter_frames(_units(reader), block_nbytes=3000):
                reader.release(buf)
    assert err.value.shard == "train/shard-00002.lss" and url in str(err.value)


def test_abandoned_iteration_leaves_no_fetch_running(s3, key):
    url = _url("abandon")
    _write(url, key, s3, n=900)
    with open_split(url, "train", key, storage_options=_opts(s3["direct"])) as reader:
        it = reader.iter_frames(_units(reader), block_nbytes=1500, inflight=4)
        _, buf = next(it)
        reader.release(buf)
        it.close()
    # close() shut the fetch pool down: no thread of it remains
    for t in threading.enumerate():
        if t.name.startswith("lss-fetch"):
            t.join(timeout=10)
            assert not t.is_alive()


def test_local_root_iter_frames_reads_frames(tmp_path):
    from lightning_sustain.data import MasterKey

    k = MasterKey(os.urandom(32))
    write_arrays(tmp_path / "ds", "train", _data(300), k, frame_nbytes=1024, progress=False)
    with open_split(tmp_path / "ds", "train", k) as reader:
        units = _units(reader)
        n = 0
        for cols, buf in reader.iter_frames(units):
            n += len(cols["y"])
            del cols
            reader.release(buf)
    assert n == 300 and reader.peak_ciphertext_nbytes == 0


def _child_iterates(reader, units, queue) -> None:
    try:
        n = 0
        for cols, buf in reader.iter_frames(units, block_nbytes=3000):
            n += len(cols["y"])
            del cols
            reader.release(buf)
        queue.put(n)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put(repr(exc))


def test_forked_process_makes_its_own_fetch_pool(s3, key):
    """A reader used before a fork (its pool's threads do not survive it) still reads."""
    import multiprocessing

    url = _url("fork-pool")
    _write(url, key, s3, n=600)
    with open_split(url, "train", key, storage_options=_opts(s3["direct"])) as reader:
        units = _units(reader)
        for _, buf in reader.iter_frames(units, block_nbytes=3000):
            reader.release(buf)
        assert reader._executor is not None
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child_iterates, args=(reader, units, queue))
        child.start()
        got = queue.get(timeout=120)
        child.join(timeout=60)
    assert got == 600 and child.exitcode == 0
