"""``EncryptedShardDataModule``: train on AEAD-encrypted shards, plaintext only in memory.

Each DataLoader worker resolves the key reference itself, unwraps the data key, and
decrypts one frame at a time with ``pread``; decoded samples are copied into the batch,
the frame buffers go back to the reader's pool and are zeroed when the epoch ends. No
plaintext touches the disk.

Splitting: per epoch, the frames of a split are put in an order (a seeded permutation of
all frames of all shards when shuffling, storage order otherwise) that every rank
computes identically. Rank ``r`` of ``R`` takes the contiguous sample range
``[r*N, (r+1)*N)`` of that order with ``N = total // R`` (at most ``R - 1`` samples are
left out, so every rank yields the same number of batches and DDP cannot hang); its
batches are divided contiguously among its workers. No sample is yielded twice in an
epoch. Within a worker, samples are shuffled in a window of a few frames.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_sustain.data.audit import AuditSession, config_hash, wait_pending_records
from lightning_sustain.data.codec import Schema
from lightning_sustain.data.errors import DatasetNotFoundError, SchemaError
from lightning_sustain.data.keys import KeyProvider, KeyReference
from lightning_sustain.data.reader import (
    DEFAULT_BLOCK_NBYTES,
    DEFAULT_INFLIGHT,
    SplitReader,
    resolve_data_key,
    wipe,
)

__all__ = ["EncryptedShardDataModule", "EncryptedShardDataset", "EpochPlan", "plan_epoch"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochPlan:
    """What one worker of one rank reads in one epoch.

    Attributes:
        reads: ``(global_frame_index, first_row, stop_row)`` in reading order.
        num_samples: Samples this worker yields.
        num_batches: Batches this worker yields.
        rank_batches: Batches the whole rank yields (identical on every rank).
    """

    reads: tuple[tuple[int, int, int], ...]
    num_samples: int
    num_batches: int
    rank_batches: int


def rank_batches(total: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Number of batches each rank yields per epoch."""
    per_rank = total // world_size
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def plan_epoch(
    frame_samples: list[int] | np.ndarray,
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    worker_id: int,
    num_workers: int,
    batch_size: int,
    drop_last: bool,
    frame_blocks: list[int] | np.ndarray | None = None,
) -> EpochPlan:
    """Decide which frame rows one worker of one rank reads in an epoch (pure function).

    Args:
        frame_samples: Samples per frame, for all frames of the split in storage order.
        epoch: Epoch number (changes the permutation).
        seed: Base seed shared by all ranks.
        shuffle: Permute the frame order.
        rank: This process's rank.
        world_size: Number of ranks.
        worker_id: This DataLoader worker's id.
        num_workers: Workers per rank (1 if loading in the main process).
        batch_size: Samples per batch.
        drop_last: Drop the rank's last partial batch.
        frame_blocks: Read block of each frame (non-decreasing, as from
            :meth:`SplitReader.blocks`); shuffling permutes whole blocks and keeps the frames
            of a block together in storage order, so one ranged GET serves them. ``None``:
            every frame is its own block (the frame permutation of earlier releases).
    """
    if not 0 <= rank < world_size or not 0 <= worker_id < num_workers or batch_size < 1:
        raise ValueError(
            f"invalid split: rank {rank}/{world_size}, worker {worker_id}/{num_workers}, "
            f"batch_size {batch_size}"
        )
    counts = np.asarray(frame_samples, dtype=np.int64)
    order = np.arange(len(counts))
    if shuffle:
        rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch])
        if frame_blocks is None:
            order = rng.permutation(len(counts))
        else:
            blk = np.asarray(frame_blocks, dtype=np.int64)
            if blk.shape != counts.shape or (len(blk) and (blk[0] != 0 or np.any(
                    np.diff(blk) < 0) or np.any(np.diff(blk) > 1))):
                raise ValueError("frame_blocks must number the frames' blocks 0, 1, ... in "
                                 "storage order, one entry per frame")
            nblocks = int(blk[-1]) + 1 if len(blk) else 0
            place = np.empty(nblocks, dtype=np.int64)
            place[rng.permutation(nblocks)] = np.arange(nblocks)
            order = np.argsort(place[blk], kind="stable")
    cum = np.concatenate([[0], np.cumsum(counts[order])])
    total = int(cum[-1])
    per_rank = total // world_size
    nb = rank_batches(total, world_size, batch_size, drop_last)
    rank_samples = min(per_rank, nb * batch_size)
    b0 = worker_id * nb // num_workers
    b1 = (worker_id + 1) * nb // num_workers
    start = rank * per_rank + b0 * batch_size
    stop = rank * per_rank + min(b1 * batch_size, rank_samples)
    reads = []
    pos = start
    i = int(np.searchsorted(cum, start, side="right")) - 1
    while pos < stop:
        frame_start, frame_stop = int(cum[i]), int(cum[i + 1])
        a, b = pos - frame_start, min(stop, frame_stop) - frame_start
        if b > a:
            reads.append((int(order[i]), a, b))
        pos = frame_start + b
        i += 1
    return EpochPlan(tuple(reads), max(0, stop - start), b1 - b0, nb)


class EncryptedShardDataset(IterableDataset):
    """Iterable dataset yielding ready-made batches decrypted from one split.

    Normally built by :class:`EncryptedShardDataModule`. Holds only a key *reference*;
    the key is resolved in the process that iterates (each DataLoader worker).

    Args:
        root: Dataset root.
        split: Split name (= its directory under ``root``).
        key: Reference to the master key or password.
        num_samples: Samples of the split (from the manifest, for ``len``).
        batch_size: Samples per batch.
        shuffle: Shuffle frames across shards and samples within a window.
        seed: Base seed; must be equal on every rank.
        drop_last: Drop the rank's last partial batch.
        rank: This process's rank.
        world_size: Number of ranks.
        shuffle_window_frames: Frames whose samples are shuffled together in a worker.
        batch_format: ``"dict"`` or ``"tuple"``.
        tuple_keys: Field order of tuple batches.
        expected_version: Refuse other versions of the split.
        pin_dataset_id: Refuse a root holding another dataset (hex id).
        min_dataset_version: Refuse a dataset older than this version.
        audit_path: Access-audit file (default ``<root>/access-audit.jsonl``).
        audit_context: Purpose/run fields copied into each audit record.
    """

    def __init__(
        self,
        root: Any,
        split: str,
        key: KeyReference,
        *,
        num_samples: int,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        shuffle_window_frames: int = 4,
        batch_format: str = "dict",
        tuple_keys: list[str] | None = None,
        expected_version: int | None = None,
        pin_dataset_id: str | None = None,
        min_dataset_version: int | None = None,
        audit_path: str | None = None,
        audit_context: dict[str, Any] | None = None,
        read_block_nbytes: int = 0,
        fetch_inflight: int = DEFAULT_INFLIGHT,
    ):
        super().__init__()
        self.read_block_nbytes = int(read_block_nbytes)
        self.fetch_inflight = int(fetch_inflight)
        self.audit_path = audit_path
        self.audit_context = dict(audit_context or {})
        self.root = root
        self.split = split
        self.key = key
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.shuffle_window_frames = max(1, int(shuffle_window_frames))
        self.batch_format = batch_format
        self.tuple_keys = list(tuple_keys) if tuple_keys else None
        self.expected_version = expected_version
        self.pin_dataset_id = pin_dataset_id
        self.min_dataset_version = min_dataset_version
        self.epoch = 0
        self._local_iters = 0
        self._reader: SplitReader | None = None
        self._allow_plaintext = False  # benchmark baseline only; never set by users

    def __len__(self) -> int:
        return rank_batches(self.num_samples, self.world_size, self.batch_size, self.drop_last)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None  # holds the data key; every process opens its own
        state.pop("_audit_bind", None)
        return state

    def __repr__(self) -> str:
        return (
            f"EncryptedShardDataset(root={str(self.root)!r}, split={self.split!r}, "
            f"key={self.key!r}, "
            f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size})"
        )

    def _open(self) -> SplitReader:
        if self._reader is None:
            if self._allow_plaintext:
                self._reader = SplitReader(self.root, self.split, None, None, allow_plaintext=True)
            else:
                data_key, ds_id, key_id = resolve_data_key(self.root, self.key)
                self._reader = SplitReader(
                    self.root, self.split, data_key, ds_id, expected_version=self.expected_version,
                    pin_dataset_id=self.pin_dataset_id,
                    min_dataset_version=self.min_dataset_version,
                )
                self._audit_bind = (data_key, ds_id, key_id)
        return self._reader

    def _audit_session(self, worker_id: int) -> AuditSession | None:
        """One access-audit record per pass over the split (call site of data/audit.py)."""
        if self._allow_plaintext:
            return None
        session = AuditSession(self.root, "read", audit_path=self.audit_path,
                               context=dict(self.audit_context, worker=worker_id))
        # loading in the training process: append the record off the training thread (a
        # DataLoader worker appends it itself before it reports the end of its pass)
        session.background = get_worker_info() is None
        return session

    def _format(self, cols: dict[str, np.ndarray]) -> Any:
        tensors = {k: torch.from_numpy(v) for k, v in cols.items()}
        if self.batch_format == "tuple":
            return tuple(tensors[k] for k in (self.tuple_keys or list(tensors)))
        return tensors

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        if info is not None:
            _disable_core_dumps()
            epoch += self._local_iters  # persistent workers never see the main copy again
            self._local_iters += 1
        audit = self._audit_session(worker_id)
        try:
            reader = self._open()
        except BaseException as exc:
            if audit is not None:
                audit.finish(exc)
            raise
        if audit is not None:
            audit.bind(*self._audit_bind)
            audit.split(self.split, reader.manifest.dataset_version)
            reader.audit = audit
        units = reader.frame_units()
        blocks = reader.blocks(self.read_block_nbytes)[1] if self.read_block_nbytes > 0 else None
        plan = plan_epoch(
            [u[2] for u in units],
            epoch=epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
            worker_id=worker_id,
            num_workers=num_workers,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            frame_blocks=blocks,
        )
        rng = np.random.default_rng(
            [self.seed & 0xFFFFFFFF, epoch, self.rank, worker_id, 0x5EED]
        )
        bs = self.batch_size
        max_frame = max(u[2] for u in units)
        window = max(bs, self.shuffle_window_frames * max_frame) if self.shuffle else bs
        names = reader.schema.names
        chunks: list[dict[str, np.ndarray]] = []
        buffers: list[bytearray | np.ndarray] = []
        pending = 0
        remaining = plan.num_samples
        # a URL root: blocks of adjacent frames fetched ahead (one ranged GET each) while
        # this thread decrypts; a local root: pread frame by frame
        frames = reader.iter_frames([units[g][:2] for g, _, _ in plan.reads],
                                    block_nbytes=self.read_block_nbytes,
                                    inflight=self.fetch_inflight)
        try:
            for (_g, a, b), (cols, buf) in zip(plan.reads, frames, strict=True):
                buffers.append(buf)
                if reader.audit is not None:
                    reader.audit.rows(b - a)
                chunks.append({k: cols[k][a:b] for k in names})
                pending += b - a
                remaining -= b - a
                if pending < window and remaining > 0:
                    continue
                if len(chunks) == 1:
                    merged = {k: np.array(v) for k, v in chunks[0].items()}
                else:
                    merged = {k: np.concatenate([c[k] for c in chunks]) for k in names}
                chunks = []
                for item in buffers:
                    _release(reader, item)
                buffers = []
                n = pending
                idx = rng.permutation(n) if self.shuffle else None
                full = n if remaining == 0 else n - n % bs
                for s in range(0, full, bs):
                    e = min(s + bs, full)
                    if idx is None:
                        batch = {k: v[s:e].copy() for k, v in merged.items()}
                    else:
                        batch = {k: np.take(v, idx[s:e], axis=0) for k, v in merged.items()}
                    yield self._format(batch)
                if full < n:
                    keep = idx[full:] if idx is not None else np.arange(full, n)
                    rest = {k: np.take(v, keep, axis=0) for k, v in merged.items()}
                    chunks.append(rest)
                    buffers.extend(rest.values())
                    pending = n - full
                else:
                    pending = 0
                for v in merged.values():
                    wipe(v)
        except BaseException as exc:
            if reader.audit is not None:
                reader.audit.finish(exc)
            raise
        finally:
            frames.close()
            chunks = []
            for item in buffers:
                _release(reader, item)
            reader.wipe_pool()
            audit, reader.audit = reader.audit, None
            if audit is not None:
                audit.finish()



def _release(reader: SplitReader, item: bytearray | np.ndarray) -> None:
    """Zero a plaintext buffer; frame buffers go back to the reader's pool."""
    if isinstance(item, bytearray):
        reader.release(item)
    else:
        wipe(item)


def _disable_core_dumps() -> None:
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - non-POSIX
        pass


def _as_is(batch: Any) -> Any:
    """Batches are already formed (and tuples must stay tuples)."""
    return batch


class _EpochDataLoader(DataLoader):
    """DataLoader that tells its dataset which epoch starts before every ``iter()``."""

    def __iter__(self) -> Any:
        source = getattr(self, "_epoch_source", None)
        dm = source() if source is not None else None
        trainer = getattr(dm, "trainer", None) if dm is not None else None
        iters = getattr(self, "_iters", 0)
        self.dataset.epoch = int(trainer.current_epoch) if trainer is not None else iters
        object.__setattr__(self, "_iters", iters + 1)
        return super().__iter__()


class EncryptedShardDataModule(LightningDataModule):
    """LightningDataModule over encrypted shards written by :class:`ShardWriter`.

    The key is given only as a reference (exactly one of ``key_env``, ``key_file``,
    ``key_provider``) and resolved in each process that decrypts; ``setup`` checks it
    against the dataset's keyring and fails fast naming both key ids.

    Args:
        root: Dataset root (holds ``keyring.json`` and one directory per split).
        train_dir: Split used for fitting (its directory under ``root``).
        val_dir: Split used for validation, or ``None``.
        test_dir: Split used for testing, or ``None``.
        predict_dir: Split used for prediction, or ``None``.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (each decrypts its own part).
        shuffle: Shuffle training data across and within shards (reproducible under
            ``seed_everything``).
        key_env: Name of an environment variable holding the key (hex/base64) or password.
        key_file: Path of a file holding the key or password.
        key_provider: Object with ``get_key() -> bytes`` (e.g. a KMS client wrapper).
        seed: Shuffle seed; default ``PL_GLOBAL_SEED`` (set by ``seed_everything``), else a
            random seed broadcast from rank 0.
        drop_last: Drop the last partial training batch.
        batch_format: ``"dict"`` (dict of tensors) or ``"tuple"`` (tensors in
            ``tuple_keys`` order, for ``x, y = batch`` models).
        tuple_keys: Field order of tuple batches (default: schema order).
        shuffle_window_frames: Frames shuffled together within a worker (memory vs mixing).
        dataset_id: Pin the dataset (hex id printed by ``encrypt``/``verify``): a root
            holding another dataset is refused (guards against a replaced root).
        dataset_version: Pin the minimum dataset version (printed by ``encrypt``/
            ``verify``): an older dataset is refused (guards against a rolled-back root).
        pin_memory: Passed to the DataLoader.
        persistent_workers: Passed to the DataLoader; default (``None``): on for a URL root
            with workers (their filesystem and connections are reused across epochs).
        audit_path: Access-audit file (default ``<root>/access-audit.jsonl``); every
            ``setup`` and every pass of a worker over a split appends a record
            (:mod:`lightning_sustain.data.audit`).
        audit_purpose: Why the data is decrypted (e.g. a ticket or study id), recorded.
        storage_options: fsspec options of a URL ``root`` (``s3://bucket/prefix``,
            ``gs://...``): endpoint, region, ``config_kwargs``. Never credentials: keys such
            as ``secret``, ``key``, ``token``, ``password`` are refused; credentials come from
            the provider chain (env vars, ``~/.aws``, instance metadata).
        cache_dir: Local directory caching fetched ciphertext ranges of a URL root
            (ciphertext only; frames are authenticated on every read).
        storage_timeout_s: Connect/read timeout of one object-store request.
        storage_retries: Retries of a transient object-store failure (timeouts, 5xx).
        read_block_nbytes: Read block: adjacent frames of a shard, up to this many bytes,
            fetched with one ranged GET and kept together when shuffling (whole blocks are
            permuted; samples are mixed within ``shuffle_window_frames``). Default: 4 MiB
            for a URL root, 0 (every frame its own block, frame-level shuffle) for a local
            root. Each worker holds at most ``fetch_inflight + 1`` blocks of ciphertext.
        fetch_inflight: Read blocks fetched ahead per worker while it decrypts (URL root).

    A URL root is read with range requests (one per read block, never a whole shard
    larger than a block); every DataLoader worker opens its own filesystem
    (s3fs/aiohttp are not fork-safe). For a URL root the default
    ``audit_path`` is a local file (see docs/data-governance.md).
    """

    sensitive_data: ClassVar[bool] = True

    def __init__(
        self,
        root: str,
        train_dir: str | None = "train",
        val_dir: str | None = None,
        test_dir: str | None = None,
        predict_dir: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        shuffle: bool = True,
        key_env: str | None = None,
        key_file: str | None = None,
        key_provider: KeyProvider | None = None,
        seed: int | None = None,
        drop_last: bool = False,
        batch_format: Literal["dict", "tuple"] = "dict",
        tuple_keys: list[str] | None = None,
        shuffle_window_frames: int = 4,
        dataset_version: int | None = None,
        dataset_id: str | None = None,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        audit_path: str | None = None,
        audit_purpose: str | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        storage_timeout_s: float = 30.0,
        storage_retries: int = 3,
        read_block_nbytes: int | None = None,
        fetch_inflight: int = DEFAULT_INFLIGHT,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if batch_format not in ("dict", "tuple"):
            raise ValueError(f"batch_format must be 'dict' or 'tuple', got {batch_format!r}")
        if tuple_keys is not None and batch_format != "tuple":
            raise ValueError("tuple_keys needs batch_format='tuple'")
        if dataset_id is not None and not (
            isinstance(dataset_id, str) and len(dataset_id) == 32
            and all(c in "0123456789abcdef" for c in dataset_id)
        ):
            raise ValueError("dataset_id must be the 32 hex digits printed by encrypt/verify")
        if dataset_version is not None and (type(dataset_version) is not int
                                            or dataset_version < 0):
            raise ValueError(f"dataset_version must be an integer >= 0, got {dataset_version!r}")
        self._key = KeyReference(env=key_env, file=key_file, provider=key_provider)
        self.root = str(root)
        from lightning_sustain.data.storage import as_store, is_remote

        # validated here (secret-like storage options are refused at construction); the
        # filesystem itself is created lazily in the process that reads
        self._store: Any = (
            as_store(self.root, storage_options, cache_dir=cache_dir,
                     timeout_s=storage_timeout_s, retries=storage_retries)
            if is_remote(self.root) else str(as_store(self.root, storage_options))
            if self.root.startswith("file://") else self.root
        )
        self.splits = {
            "train": train_dir,
            "val": val_dir,
            "test": test_dir,
            "predict": predict_dir,
        }
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.batch_format = batch_format
        self.tuple_keys = list(tuple_keys) if tuple_keys is not None else None
        self.shuffle_window_frames = shuffle_window_frames
        self.dataset_version = dataset_version
        self.dataset_id = dataset_id
        self.pin_memory = pin_memory
        remote = is_remote(self.root)
        if persistent_workers is None:  # a URL root: keep workers, their connections, reused
            persistent_workers = remote
        self.persistent_workers = bool(persistent_workers) and num_workers > 0
        if read_block_nbytes is None:
            read_block_nbytes = DEFAULT_BLOCK_NBYTES if remote else 0
        if not 0 <= int(read_block_nbytes) <= 256 * 1024 * 1024:
            raise ValueError(f"read_block_nbytes must be in 0..256 MiB, got {read_block_nbytes}")
        if not 1 <= int(fetch_inflight) <= 64:
            raise ValueError(f"fetch_inflight must be in 1..64, got {fetch_inflight}")
        self.read_block_nbytes = int(read_block_nbytes)
        self.fetch_inflight = int(fetch_inflight)
        self.audit_path = audit_path
        self.audit_purpose = audit_purpose
        self.feature_names: list[str] | None = None
        self.schema: Schema | None = None
        self.key_id: str | None = None
        # masking rules applied when the shards were written (authenticated manifest record)
        self.masking: dict[str, Any] | None = None
        self._num_samples: dict[str, int] = {}
        self._seed: int | None = None
        # the provider object is not a hyperparameter (it may hold credentials)
        self.save_hyperparameters(ignore=["key_provider"])

    def __repr__(self) -> str:
        dirs = ", ".join(f"{k}={v!r}" for k, v in self.splits.items() if v)
        return (
            f"EncryptedShardDataModule(root={self.root!r}, {dirs}, key={self._key!r}, "
            f"batch_size={self.batch_size}, num_workers={self.num_workers})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["trainer"] = None
        return state

    # -- setup ----------------------------------------------------------------------------

    def _stages(self, stage: str | None) -> list[str]:
        return {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": ["test"],
            "predict": ["predict"],
            None: ["train", "val", "test", "predict"],
        }.get(stage, ["train", "val", "test", "predict"])

    def setup(self, stage: str | None = None) -> None:
        """Check the key against the keyring and open the manifests of the stage's splits.

        Raises:
            WrongKeyError: The key does not open the dataset (names both key ids).
            KeyReferenceError: The key variable/file/provider is missing.
            DatasetNotFoundError: A configured split does not exist.
            ShardError: Any manifest fails authentication or consistency checks.
        """
        audit = AuditSession(self._store, "setup", audit_path=self.audit_path,
                             context=self._audit_context())
        try:
            data_key, dataset_id, key_id = resolve_data_key(self._store, self._key)
        except BaseException as exc:
            audit.finish(exc)
            raise
        audit.bind(data_key, dataset_id, key_id)
        self.key_id = key_id
        wanted = [s for s in self._stages(stage) if self.splits.get(s)]
        if stage == "fit" and not self.splits.get("train"):
            raise ValueError("fitting needs train_dir")
        if stage in ("validate", "test", "predict") and not wanted:
            raise ValueError(f"stage {stage!r} needs {stage if stage != 'validate' else 'val'}_dir")
        try:
            for which in wanted:
                name = self.splits[which]
                assert name is not None
                with SplitReader(
                    self._store, name, data_key, dataset_id, pin_dataset_id=self.dataset_id,
                    min_dataset_version=self.dataset_version,
                ) as reader:
                    audit.split(name, reader.manifest.dataset_version)
                    schema = reader.schema
                    masking = reader.manifest.masking
                    self._num_samples[which] = len(reader)
                if self.schema is not None and schema.fields != self.schema.fields:
                    raise SchemaError(
                        f"split {name!r} has fields {schema.names}, other splits have "
                        f"{self.schema.names}"
                    )
                if self.schema is not None and masking != self.masking:
                    raise SchemaError(
                        f"split {name!r} was masked differently from the other splits "
                        f"({masking} vs {self.masking}); re-encrypt it with the same spec"
                    )
                if self.schema is None:
                    self.masking = masking
                    self.schema = schema
                    self.feature_names = (
                        list(schema.feature_names) if schema.feature_names is not None else None
                    )
        except BaseException as exc:
            audit.finish(exc)
            raise
        finally:
            del data_key
        audit.finish()
        if self.schema is not None and self.tuple_keys is not None:
            missing = [k for k in self.tuple_keys if k not in self.schema.names]
            if missing:
                raise SchemaError(
                    f"tuple_keys {missing} are not fields of the dataset; fields are "
                    f"{self.schema.names}"
                )
        self._seed = self._resolve_seed()
        logger.info("encrypted shards at %s opened with key id %s", self.root, key_id)

    def teardown(self, stage: str) -> None:
        """Wait until this process's access-audit records are in the chain.

        Raises:
            AuditError: A record of a pass could not be appended.
        """
        wait_pending_records()

    def _audit_context(self) -> dict[str, Any]:
        """Purpose and run of this decryption, for the access audit (no collective)."""
        trainer = self.trainer
        log_dir = None
        model_hparams = None
        if trainer is not None:
            logger0 = trainer.loggers[0] if trainer.loggers else None
            log_dir = getattr(logger0, "log_dir", None) or getattr(logger0, "save_dir", None)
            log_dir = str(log_dir or trainer.default_root_dir)
            module = getattr(trainer, "lightning_module", None)
            model_hparams = dict(getattr(module, "hparams", {}) or {})
        return {
            "purpose": self.audit_purpose,
            "run_id": os.environ.get("LIGHTNING_SUSTAIN_RUN_ID") or log_dir,
            "log_dir": log_dir,
            "config_hash": config_hash(dict(self.hparams), model_hparams),
            "rank": int(trainer.global_rank) if trainer is not None else None,
        }

    def _resolve_seed(self) -> int:
        if self.seed is not None:
            return int(self.seed)
        env = os.environ.get("PL_GLOBAL_SEED")
        if env is not None:
            return int(env)
        seed = int.from_bytes(os.urandom(4), "little")
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            seed = int(trainer.strategy.broadcast(seed, src=0))
        return seed

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # -- loaders ----------------------------------------------------------------------------

    def _loader(self, which: str, shuffle: bool, drop_last: bool) -> DataLoader:
        name = self.splits.get(which)
        if not name:
            raise DatasetNotFoundError(f"no {which}_dir configured")
        if which not in self._num_samples:
            self.setup({"train": "fit", "val": "validate"}.get(which, which))
        rank, world = self._rank_world()
        dataset = EncryptedShardDataset(
            self._store,
            name,
            self._key,
            num_samples=self._num_samples[which],
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self._seed if self._seed is not None else 0,
            drop_last=drop_last,
            rank=rank,
            world_size=world,
            shuffle_window_frames=self.shuffle_window_frames,
            batch_format=self.batch_format,
            tuple_keys=self.tuple_keys,
            pin_dataset_id=self.dataset_id,
            min_dataset_version=self.dataset_version,
            audit_path=self.audit_path,
            audit_context=self._audit_context(),
            read_block_nbytes=self.read_block_nbytes,
            fetch_inflight=self.fetch_inflight,
        )
        dataset._allow_plaintext = getattr(self, "_allow_plaintext", False)
        loader = _EpochDataLoader(
            dataset,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )
        object.__setattr__(loader, "_epoch_source", weakref.ref(self))
        return loader

    def train_dataloader(self) -> DataLoader:
        """Shuffled (if configured) batches of the training split."""
        return self._loader("train", self.shuffle, self.drop_last)

    def val_dataloader(self) -> DataLoader | list:
        """Batches of the validation split in storage order (``[]`` if none configured)."""
        return self._loader("val", False, False) if self.splits.get("val") else []

    def test_dataloader(self) -> DataLoader | list:
        """Batches of the test split in storage order (``[]`` if none configured)."""
        return self._loader("test", False, False) if self.splits.get("test") else []

    def predict_dataloader(self) -> DataLoader | list:
        """Batches of the predict split in storage order (``[]`` if none configured)."""
        return self._loader("predict", False, False) if self.splits.get("predict") else []
