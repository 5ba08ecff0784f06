"""Random-access reading and verification of one split of an encrypted dataset.

A :class:`SplitReader` decrypts one frame at a time with ``os.pread``: memory use is a few
frames whatever the shard size, and plaintext exists only in buffers the caller wipes.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import struct
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag

from lightning_sustain.data.audit import AuditSession, audited
from lightning_sustain.data.codec import Schema
from lightning_sustain.data.errors import (
    DatasetNotFoundError,
    EmptyDatasetError,
    ManifestError,
    MissingShardError,
    PathTraversalError,
    RollbackError,
    SampleDecodeError,
    ShardError,
    ShardHeaderError,
    ShardSwappedError,
    TruncatedShardError,
    UnsupportedFormatError,
)
from lightning_sustain.data.format import (
    CIPHER_AES_256_GCM,
    CIPHER_NONE,
    DATASET_MANIFEST_NAME,
    FRAME_OVERHEAD,
    MANIFEST_NAME,
    MAX_MANIFEST_NBYTES,
    NONCE_NBYTES,
    SHARD_HEADER,
    DatasetManifest,
    FrameOpener,
    Manifest,
    ShardHeader,
    _frame_failed,
    check_split_name,
    decode_manifest,
    frame_aad_base,
    load_dataset_manifest,
    parse_manifest_header,
    read_regular_file,
)
from lightning_sustain.data.keys import DataKey, KeyReference, MasterKey, load_keyring
from lightning_sustain.data.storage import RemoteObject, RemoteStore, as_store, is_remote

__all__ = ["DEFAULT_BLOCK_NBYTES", "DEFAULT_INFLIGHT", "SplitReader", "VerifyReport", "open_split",
           "verify_dataset"]

logger = logging.getLogger(__name__)

_MAX_OPEN_FILES = 16
_POOL_SIZE = 16
#: bytes of adjacent frames fetched from object storage with one ranged GET (a read block)
DEFAULT_BLOCK_NBYTES = 4 * 1024 * 1024
#: read blocks fetched ahead of the one being decrypted (per reader, i.e. per worker)
DEFAULT_INFLIGHT = 3
_U32 = struct.Struct("<I")


_ndarray = np.ndarray


def _layout(schema: Schema, n: int) -> tuple:
    """Where each field's column lies in a frame of ``n`` samples, and the bool fields."""
    out = []
    pos = 8
    for f in schema.fields:
        out.append((f.name, f.np_dtype, pos, (n, *f.shape)))
        pos = (pos + n * f.nbytes + 7) // 8 * 8
    return tuple(out), tuple(f.name for f in schema.fields if f.dtype == "bool")


def _check_entry(dm: DatasetManifest, split: str, manifest: Manifest, mname: str) -> None:
    """The split's manifest must be the one the dataset manifest lists."""
    entry = dm.splits.get(split)
    if entry is None:
        raise RollbackError(
            f"split {split!r} is not listed in {DATASET_MANIFEST_NAME}: it was left by a write "
            "that was interrupted before its commit, or copied in from elsewhere; re-run the "
            "write of this split",
            shard=mname,
        )
    if manifest.dataset_version < entry.version:
        raise RollbackError(
            f"split manifest is version {manifest.dataset_version}, {DATASET_MANIFEST_NAME} "
            f"records version {entry.version}: an old manifest (or the whole old split) was "
            "put back; restore the current split",
            shard=mname,
        )
    if manifest.dataset_version > entry.version:
        raise RollbackError(
            f"split manifest is version {manifest.dataset_version}, newer than the version "
            f"{entry.version} that {DATASET_MANIFEST_NAME} records: the write of this split "
            f"was interrupted before its commit, or an old {DATASET_MANIFEST_NAME} was put "
            "back; re-run the write of this split",
            shard=mname,
        )
    if manifest.write_id != entry.write_id:
        raise RollbackError(
            f"split manifest was produced by another write of version {entry.version} than "
            f"the one {DATASET_MANIFEST_NAME} records (an earlier or interrupted write); "
            "restore the current split or re-run its write",
            shard=mname,
        )


def wipe(buf: bytearray | np.ndarray | None) -> None:
    """Overwrite a plaintext buffer with zeros."""
    if buf is None:
        return
    if isinstance(buf, np.ndarray):
        if buf.flags.writeable and buf.size:
            buf.fill(0)
        return
    if len(buf):
        np.frombuffer(buf, dtype=np.uint8).fill(0)


def check_dataset(
    dm: DatasetManifest | None,
    *,
    dataset_id: str | bytes | None = None,
    min_dataset_version: int | None = None,
) -> DatasetManifest:
    """Check the dataset manifest against the user's pins.

    Args:
        dm: The authenticated dataset manifest, or ``None`` if ``dataset.lsd`` is missing.
        dataset_id: Pinned dataset id (hex or 16 bytes): detects a replaced root.
        min_dataset_version: Pinned minimum dataset version: detects a rolled-back root.

    Raises:
        ManifestError: ``dataset.lsd`` is missing.
        ShardSwappedError: The root holds another dataset than the pinned one.
        RollbackError: The dataset is older than the pinned version.
    """
    if dm is None:
        raise ManifestError(
            f"{DATASET_MANIFEST_NAME} is missing: it was deleted, or the dataset was written "
            "by format 1 (re-encrypt it); restore it from a trusted copy",
            shard=DATASET_MANIFEST_NAME,
        )
    if dataset_id is not None:
        want = bytes.fromhex(dataset_id) if isinstance(dataset_id, str) else bytes(dataset_id)
        if want != dm.dataset_id:
            raise ShardSwappedError(
                f"the root holds dataset {dm.dataset_id.hex()}, pinned is {want.hex()}: the "
                "whole root was replaced (or the pin is wrong)",
                shard=DATASET_MANIFEST_NAME,
            )
    if min_dataset_version is not None and dm.dataset_version < min_dataset_version:
        raise RollbackError(
            f"dataset is at version {dm.dataset_version}, pinned minimum is "
            f"{min_dataset_version}: the root was rolled back to an older state; restore "
            "the current one",
            shard=DATASET_MANIFEST_NAME,
        )
    return dm


def resolve_data_key(
    root: str | os.PathLike[str], key: KeyReference | MasterKey
) -> tuple[DataKey, bytes, str]:
    """Load the keyring of ``root`` and unwrap its data key.

    Returns:
        ``(data_key, dataset_id, key_id)``.
    """
    ring = load_keyring(root)
    master = key if isinstance(key, MasterKey) else ring.master_key(key)
    return ring.unwrap(master, str(root)), ring.dataset_id, ring.key_id


class SplitReader:
    """Authenticated random access to the frames and samples of one split.

    Args:
        root: Dataset root (holding ``keyring.json``).
        split: Split name; its directory is ``root / (directory or split)``.
        data_key: The unwrapped data key (``None`` only with ``allow_plaintext``).
        dataset_id: Dataset id from the keyring (``None`` only with ``allow_plaintext``).
        directory: Split directory relative to ``root`` if it differs from ``split``.
        expected_version: Refuse a split of another version.
        allow_plaintext: Accept the unencrypted benchmark baseline format.
        pin_dataset_id: Refuse a root holding another dataset (hex id or bytes).
        min_dataset_version: Refuse a dataset older than this version (rollback guard).

    Attributes:
        audit: Access-audit session fed with every decrypted frame (set by
            :func:`open_split` and the DataModule); its record is appended on ``close``.

    Raises:
        DatasetNotFoundError: No manifest in the split directory.
        EmptyDatasetError: The split holds no samples.
        ShardError: Any authentication or consistency failure of the manifest.
    """

    audit: AuditSession | None = None

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        data_key: DataKey | None,
        dataset_id: bytes | None,
        *,
        directory: str | None = None,
        expected_version: int | None = None,
        allow_plaintext: bool = False,
        pin_dataset_id: str | bytes | None = None,
        min_dataset_version: int | None = None,
    ):
        check_split_name(split)
        self.split = split
        self._store: RemoteStore | None = as_store(root) if is_remote(root) else None
        if self._store is not None:
            self.root: Any = self._store
            rel = posixpath.normpath(directory or split)
            if rel.startswith(("..", "/")) or "://" in rel:
                raise PathTraversalError(f"split directory {directory!r} is outside root {root!s}")
            self.directory: Any = self._store.display(rel)
        else:
            self.root = Path(root)
            self.directory = self.root / (directory or split)
            rel = os.path.relpath(self.directory, self.root)
            if rel.startswith("..") or os.path.isabs(rel):
                raise PathTraversalError(f"split directory {directory!r} is outside root {root!s}")
        self._rel = rel
        mname = f"{rel}/{MANIFEST_NAME}"
        aead = data_key.aead() if data_key is not None else None
        dm = load_dataset_manifest(self.root, aead, dataset_id)
        if dm is None and allow_plaintext and data_key is None:
            dm = None  # baseline written without a dataset manifest: nothing to pin
        else:
            dm = check_dataset(dm, dataset_id=pin_dataset_id,
                               min_dataset_version=min_dataset_version)
        self.dataset: DatasetManifest | None = dm
        entry = dm.splits.get(split) if dm is not None else None
        read = (read_regular_file if self._store is None else
                lambda _path, *a, **kw: self._store.read_small(mname, *a, **kw))
        blob = read(
            None if self._store is not None else self.directory / MANIFEST_NAME,
            MAX_MANIFEST_NBYTES, label=mname, error=ManifestError,
            missing=DatasetNotFoundError if entry is None else MissingShardError,
            missing_message=(
                f"no complete split {split!r} at {str(self.directory)!r} ({MANIFEST_NAME} "
                "missing): write it with ShardWriter / `lightning-sustain encrypt`, or fix the "
                "path (an interrupted write leaves no manifest)"
                if entry is None else
                f"split {split!r} is listed in {DATASET_MANIFEST_NAME} at version "
                f"{entry.version} but its {MANIFEST_NAME} is missing: the split or its manifest "
                "was deleted; restore it"
            ),
        )
        head = parse_manifest_header(blob, mname)
        if head.cipher == CIPHER_NONE and not allow_plaintext:
            raise UnsupportedFormatError(
                "split is stored unencrypted (benchmark baseline format); refusing to load it "
                "as an encrypted dataset",
                shard=mname,
            )
        if head.cipher == CIPHER_AES_256_GCM and data_key is None:
            raise UnsupportedFormatError("split is encrypted but no key was given", shard=mname)
        self._aead = aead if head.cipher == CIPHER_AES_256_GCM else None
        if dataset_id is None:
            if head.cipher != CIPHER_NONE:
                raise ValueError("dataset_id is required for encrypted splits")
            dataset_id = head.dataset_id
        self.manifest: Manifest = decode_manifest(
            blob, self._aead, split=split, dataset_id=dataset_id, shard=mname
        )
        if dm is not None:
            _check_entry(dm, split, self.manifest, mname)
        if expected_version is not None and self.manifest.dataset_version != expected_version:
            raise RollbackError(
                f"split is version {self.manifest.dataset_version}, expected version "
                f"{expected_version} (rolled back or not yet updated)",
                shard=mname,
            )
        if self.manifest.num_samples == 0 or not self.manifest.shards:
            raise EmptyDatasetError(f"split {split!r} holds no samples", shard=mname)
        self._fds: OrderedDict[int, Any] = OrderedDict()
        self._openers: dict[int, FrameOpener] = {}
        self._frames = [s.frames for s in self.manifest.shards]
        self._pool: list[bytearray] = []  # plaintext buffers for reuse (wiped on close)
        self._executor: Any = None  # fetch threads of a URL root (reused across epochs)
        self._executor_pid = -1
        self._fd_lock = threading.Lock()  # fetch threads stat shards too
        self._blocks_of: dict[int, tuple[list[tuple[int, int, int, int, int]], np.ndarray]] = {}
        #: most ciphertext bytes held at once by :meth:`iter_frames` (fetched or in flight)
        self.peak_ciphertext_nbytes = 0
        self._layouts: dict[int, tuple] = {}
        self._views: dict[tuple[int, int], tuple] = {}
        self._names = [
            f"{self._rel}/{s.file}" for s in self.manifest.shards
        ]
        self._first_frame = np.cumsum([0] + [len(f) for f in self._frames])[:-1].tolist()
        self._frame_starts = np.cumsum(
            [0] + [f[2] for s in self.manifest.shards for f in s.frames], dtype=np.int64
        )
        self._frame_index = [
            (si, fi) for si, s in enumerate(self.manifest.shards) for fi in range(len(s.frames))
        ]

    # -- properties --------------------------------------------------------------------

    @property
    def schema(self) -> Schema:
        """The authenticated schema."""
        return self.manifest.schema

    @property
    def num_frames(self) -> int:
        """Total frames in the split."""
        return len(self._frame_index)

    def frame_units(self) -> list[tuple[int, int, int]]:
        """``(shard_index, frame_index, num_samples)`` for every frame, in storage order."""
        return [
            (si, fi, f[2])
            for si, s in enumerate(self.manifest.shards)
            for fi, f in enumerate(s.frames)
        ]

    def shard_name(self, shard_index: int) -> str:
        """Path of a shard relative to the root (used in errors)."""
        return self._names[shard_index]

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __repr__(self) -> str:
        return (
            f"SplitReader(root={str(self.root)!r}, split={self.split!r}, "
            f"version={self.manifest.dataset_version}, samples={self.manifest.num_samples})"
        )

    def __reduce__(self):
        raise TypeError("SplitReader holds a data key and cannot be pickled; reopen it instead")

    # -- file access -------------------------------------------------------------------

    def _remote_object(self, si: int) -> RemoteObject:
        """Stat a shard object and check its header and size (remote roots)."""
        assert self._store is not None
        name = self.shard_name(si)
        try:
            obj = self._store.open_object(name)
        except (FileNotFoundError, IsADirectoryError):
            raise MissingShardError(
                f"shard object listed in the manifest does not exist at "
                f"{self._store.display(name)!r}; restore it", shard=name
            ) from None
        self._check_shard(si, obj.size, lambda: obj.pread(SHARD_HEADER.size, 0))
        return obj

    def _check_shard(self, si: int, size: int, header: Any) -> None:
        info = self.manifest.shards[si]
        name = self.shard_name(si)
        expected = ShardHeader(
            self.manifest.cipher, self.manifest.dataset_id, self.manifest.dataset_version,
            self.split, si, len(info.frames), self.manifest.write_id,
        )
        if size >= SHARD_HEADER.size:
            expected.check(header(), name)
        if size < info.size_bytes:
            first_bad = next(
                (i for i, (off, ln, _) in enumerate(info.frames) if off + ln > size), None
            )
            if size < SHARD_HEADER.size:
                raise TruncatedShardError(
                    f"shard is {size} bytes, shorter than its header; the manifest "
                    f"records {info.size_bytes}: truncated; restore it", shard=name,
                )
            raise TruncatedShardError(
                f"shard is {size} bytes, the manifest records {info.size_bytes}: "
                f"truncated from frame {first_bad} on; restore it", shard=name, frame=first_bad,
            )
        if size > info.size_bytes:
            raise ManifestError(
                f"shard is {size} bytes, the manifest records {info.size_bytes}: "
                "bytes were appended; restore it", shard=name,
            )

    def _fd(self, si: int) -> Any:
        fd = self._fds.get(si)
        if fd is not None:
            self._fds.move_to_end(si)
            return fd
        info = self.manifest.shards[si]
        name = self.shard_name(si)
        if self._store is not None:
            with self._fd_lock:  # fetch threads and the decrypting thread share the map
                fd = self._fds.get(si)
                if fd is None:
                    fd = self._remote_object(si)
                    self._fds[si] = fd
                    self._add_opener(si)
                    while len(self._fds) > _MAX_OPEN_FILES:
                        self._fds.popitem(last=False)
            return fd
        path = self.directory / info.file
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise MissingShardError(
                "shard listed in the manifest does not exist; restore it", shard=name
            ) from None
        except OSError as exc:
            raise ShardHeaderError(f"shard cannot be opened: {exc.strerror}", shard=name) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ShardHeaderError(
                    "shard is not a regular file (a FIFO, device or directory was put in its "
                    "place); restore it",
                    shard=name,
                )
            # the header first: a shard of another position/version/write that merely has
            # another size is a swap or replay, not a truncation
            self._check_shard(si, st.st_size, lambda: os.pread(fd, SHARD_HEADER.size, 0))
        except BaseException:
            os.close(fd)
            raise
        self._fds[si] = fd
        self._add_opener(si)
        while len(self._fds) > _MAX_OPEN_FILES:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _add_opener(self, si: int) -> None:
        if self._aead is not None and si not in self._openers:
            self._openers[si] = FrameOpener(self._aead, frame_aad_base(
                self.manifest.dataset_id, self.manifest.write_id, self.manifest.dataset_version,
                self.split, si,
            ))

    def close(self) -> None:
        """Close shard files, wipe the buffer pool, append the open_split audit record."""
        while self._fds:
            _, fd = self._fds.popitem()
            if isinstance(fd, int):
                os.close(fd)
        self.wipe_pool()
        executor, self._executor = getattr(self, "_executor", None), None
        if executor is not None and getattr(self, "_executor_pid", -1) == os.getpid():
            executor.shutdown(wait=False, cancel_futures=True)
        for buf, _, _ in self._views.values():
            wipe(buf)
        self._views.clear()
        audit, self.audit = self.audit, None
        if audit is not None:
            audit.finish()

    def wipe_pool(self) -> None:
        """Zero every pooled plaintext buffer (they are overwritten on reuse meanwhile)."""
        for buf in self._pool:
            wipe(buf)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: S110 - interpreter shutdown
            pass

    def __enter__(self) -> SplitReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- decryption ----------------------------------------------------------------------

    def read_frame(
        self, shard_index: int, frame_index: int
    ) -> tuple[dict[str, np.ndarray], bytearray]:
        """Authenticate, decrypt and decode one frame.

        The hot path of every epoch: ``pread`` of nonce and ciphertext, the associated data
        packed in place into a per-shard buffer, ``decrypt_into`` a pooled buffer, and
        column views cached per pooled buffer (no per-frame plaintext allocation). A URL
        root fetches exactly this frame with one ranged GET (:meth:`iter_frames` coalesces
        and pipelines the fetches of many frames).

        Returns:
            ``(columns, buffer)``: read-only column views of shape ``(n, *field.shape)`` into
            ``buffer``; copy what you keep and :meth:`release` the buffer afterwards.

        Raises:
            ShardError: Missing, truncated, swapped, stale or modified data.
        """
        offset, length, _ = self._frames[shard_index][frame_index]
        fd = self._fds.get(shard_index)
        if fd is None:
            fd = self._fd(shard_index)
        if type(fd) is int:
            # nonce and ciphertext as two bytes objects: cryptography takes ``bytes`` without
            # a cffi buffer conversion, which costs more than the extra pread (measured)
            nonce = os.pread(fd, NONCE_NBYTES, offset)
            body = os.pread(fd, length - NONCE_NBYTES, offset + NONCE_NBYTES)
        else:  # remote: one ranged GET of this frame, never the whole shard
            blob = fd.pread(length, offset)
            nonce, body = blob[:NONCE_NBYTES], blob[NONCE_NBYTES:]
        return self._open_frame(shard_index, frame_index, nonce, body)

    def _open_frame(
        self, shard_index: int, frame_index: int, nonce: bytes, body: bytes
    ) -> tuple[dict[str, np.ndarray], bytearray]:
        """Authenticate and decode one frame's ciphertext (``nonce``, ``body``)."""
        frames = self._frames[shard_index]
        offset, length, n = frames[frame_index]
        if len(body) != length - NONCE_NBYTES or len(nonce) != NONCE_NBYTES:
            raise TruncatedShardError(
                f"frame ends past the end of the shard ({len(nonce) + len(body)} of {length} "
                "bytes read)",
                shard=self._names[shard_index],
                frame=frame_index,
            )
        size = length - FRAME_OVERHEAD
        pool = self._pool
        buf = pool.pop() if pool and len(pool[-1]) == size else bytearray(size)
        if self._aead is not None:
            try:
                self._openers[shard_index].open_into(
                    nonce, body, frame_index, frame_index == len(frames) - 1, buf
                )
            except InvalidTag:
                wipe(buf)  # decrypt_into may have written unauthenticated plaintext
                self.release(buf)
                if self._store is not None:
                    self._store.forget_cached(self._names[shard_index])
                raise _frame_failed(self._names[shard_index], frame_index) from None
        else:
            buf[:] = memoryview(body)[:size]
        found = _U32.unpack_from(buf, 0)[0]
        if found != n:
            wipe(buf)
            self.release(buf)
            raise SampleDecodeError(
                f"frame holds {found} samples, the manifest records {n}",
                shard=self._names[shard_index],
                frame=frame_index,
            )
        # column views of a pooled buffer are built once per (buffer, sample count) and
        # reused: the buffer is never resized, and callers drop views before release()
        key = (id(buf), n)
        cached = self._views.get(key)
        if cached is None or cached[0] is not buf:
            layout = self._layouts.get(n)
            if layout is None:  # the manifest guarantees the frame size fits n samples
                layout = self._layouts[n] = _layout(self.schema, n)
            if len(self._views) >= 2 * _POOL_SIZE:
                self._views.clear()
            cached = self._views[key] = (
                buf,
                {name: _ndarray(shape, dtype, buf, off) for name, dtype, off, shape in layout[0]},
                layout[1],
            )
        cols = dict(cached[1])
        for name in cached[2]:  # bool fields: a byte other than 0/1 is malformed
            if cols[name].view(np.uint8).max(initial=0) > 1:
                cols.clear()
                wipe(buf)
                self.release(buf)
                raise SampleDecodeError(f"field {name!r} holds a non-boolean byte",
                                        shard=self._names[shard_index], frame=frame_index)
        if self.audit is not None:
            self.audit.frame(self._names[shard_index], n)
        return cols, buf

    def blocks(self, block_nbytes: int) -> tuple[list[tuple[int, int, int, int, int]], np.ndarray]:
        """Group adjacent frames of each shard into read blocks of at most ``block_nbytes``.

        A block never spans two shards and holds at least one frame (a frame larger than
        ``block_nbytes`` is a block of its own); ``block_nbytes <= 0`` makes every frame a
        block. The grouping depends only on the authenticated manifest, so it is the same
        in every process and epoch (stable cache keys, same shuffle on every rank).

        Returns:
            ``(blocks, block_of_frame)``: per block ``(shard, first_frame, stop_frame,
            offset, nbytes)``; per frame of the split (storage order) its block index.
        """
        key = max(0, int(block_nbytes))
        got = self._blocks_of.get(key)
        if got is not None:
            return got
        blocks: list[tuple[int, int, int, int, int]] = []
        of: list[int] = []
        for si, frames in enumerate(self._frames):
            start = 0
            for fi, (off, ln, _) in enumerate(frames):
                if fi > start:
                    b_off = frames[start][0]
                    if off + ln - b_off > key or off != frames[fi - 1][0] + frames[fi - 1][1]:
                        p_off, p_ln, _ = frames[fi - 1]
                        blocks.append((si, start, fi, b_off, p_off + p_ln - b_off))
                        start = fi
                of.append(len(blocks))
            if frames:
                b_off = frames[start][0]
                blocks.append((si, start, len(frames), b_off,
                               frames[-1][0] + frames[-1][1] - b_off))
        got = self._blocks_of[key] = (blocks, np.asarray(of, dtype=np.int64))
        return got

    def iter_frames(
        self,
        units: Sequence[tuple[int, int]],
        *,
        block_nbytes: int = DEFAULT_BLOCK_NBYTES,
        inflight: int = DEFAULT_INFLIGHT,
    ) -> Iterator[tuple[dict[str, np.ndarray], bytearray]]:
        """Yield :meth:`read_frame` of every ``(shard, frame)`` in ``units``, in order.

        On a URL root the frames' read blocks (:meth:`blocks`) are fetched with one ranged
        GET each, up to ``inflight`` blocks ahead of the frame being decrypted, by a pool of
        fetch threads that outlives the epoch (its connections are reused); the shard
        object is stat'ed and its header checked in the fetch thread too, so the next
        shard's first block is on its way while this one is decrypted. Only ciphertext is
        held, at most ``inflight + 1`` blocks (:attr:`peak_ciphertext_nbytes`); every frame
        is authenticated when it is decrypted, so a block fetched after its object was
        replaced fails authentication naming shard and frame. A local root reads frame by
        frame (``pread``). Each yielded buffer goes back with :meth:`release`.
        """
        if self._store is None:
            for si, fi in units:
                yield self.read_frame(si, fi)
            return
        blocks, of = self.blocks(block_nbytes)
        inflight = max(1, int(inflight))
        gids = [int(of[self._first_frame[si] + fi]) for si, fi in units]
        order = list(dict.fromkeys(gids))
        left = Counter(gids)
        _ = self._store.fs  # created once here, not raced by the fetch threads
        if self._executor is None or self._executor_pid != os.getpid():
            # a pool inherited through fork has no threads: each process makes its own
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max(inflight, 4),
                                                thread_name_prefix="lss-fetch")
            self._executor_pid = os.getpid()
        pending: dict[int, Any] = {}
        held: dict[int, bytes] = {}
        nxt = 0

        def fetch(b: int) -> bytes:
            si, _, _, off, nbytes = blocks[b]
            obj = self._fd(si)  # stat, size and header check (once per shard)
            try:
                data = obj.pread(nbytes, off)
            except FileNotFoundError:
                raise MissingShardError(
                    f"shard object listed in the manifest does not exist at "
                    f"{self._store.display(self._names[si])!r}; restore it",
                    shard=self._names[si]) from None
            return data

        def top_up() -> None:
            nonlocal nxt
            while nxt < len(order) and len(pending) + len(held) <= inflight:
                b = order[nxt]
                pending[b] = self._executor.submit(fetch, b)
                nxt += 1
            held_nbytes = sum(blocks[b][4] for b in (*pending, *held))
            self.peak_ciphertext_nbytes = max(self.peak_ciphertext_nbytes, held_nbytes)

        try:
            top_up()
            for (si, fi), b in zip(units, gids, strict=True):
                data = held.get(b)
                if data is None:
                    data = held[b] = pending.pop(b).result()
                _, _, _, b_off, b_len = blocks[b]
                off, length, _ = self._frames[si][fi]
                if len(data) != b_len:
                    raise TruncatedShardError(
                        f"frame ends past the end of the shard ({len(data)} of {b_len} bytes "
                        "of its block read)", shard=self._names[si], frame=fi)
                rel = off - b_off
                nonce = data[rel:rel + NONCE_NBYTES]
                body = data[rel + NONCE_NBYTES:rel + length]
                left[b] -= 1
                if not left[b]:
                    del held[b]
                    top_up()
                yield self._open_frame(si, fi, nonce, body)
        finally:
            for fut in pending.values():
                fut.cancel()
            pending.clear()
            held.clear()

    def release(self, buf: bytearray) -> None:
        """Give a buffer returned by :meth:`read_frame` back for reuse.

        A pooled buffer is overwritten by the next frame decrypted into it and zeroed by
        :meth:`wipe_pool` / :meth:`close` (called at the end of every epoch by the
        DataModule); a buffer that does not fit the pool is zeroed right away. Drop every
        view of the buffer (the column arrays) before releasing it.
        """
        if len(self._pool) < _POOL_SIZE:
            self._pool.append(buf)
        else:
            wipe(buf)

    def read_sample(self, index: int) -> dict[str, Any]:
        """Return sample ``index`` (decrypting only its frame), as numpy arrays/scalars."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        g = int(np.searchsorted(self._frame_starts, index, side="right")) - 1
        si, fi = self._frame_index[g]
        cols, buf = self.read_frame(si, fi)
        row = index - int(self._frame_starts[g])
        out: dict[str, Any] = {}
        for f in self.schema.fields:
            value = np.array(cols[f.name][row])
            out[f.name] = value.item() if f.kind == "scalar" else value
        del cols
        self.release(buf)
        return out


@audited("open")
def open_split(
    root: str | os.PathLike[str],
    split: str,
    key: KeyReference | MasterKey,
    *,
    directory: str | None = None,
    expected_version: int | None = None,
    pin_dataset_id: str | bytes | None = None,
    min_dataset_version: int | None = None,
) -> SplitReader:
    """Open a split of an encrypted dataset for reading.

    Args:
        root: Dataset root.
        split: Split name.
        key: Reference to the master key/password, or a :class:`MasterKey`.
        directory: Split directory relative to ``root`` (default: ``split``).
        expected_version: Refuse other versions of the split.
        pin_dataset_id: Refuse a root that holds another dataset (replaced root).
        min_dataset_version: Refuse a dataset older than this (rolled-back root).

    Every call appends an access-audit record when the reader is closed (keyword
    arguments ``audit_path`` and ``audit_context``, see :mod:`lightning_sustain.data.audit`).
    """
    data_key, dataset_id, _ = resolve_data_key(root, key)
    return SplitReader(
        root, split, data_key, dataset_id, directory=directory, expected_version=expected_version,
        pin_dataset_id=pin_dataset_id, min_dataset_version=min_dataset_version,
    )


@dataclass
class VerifyReport:
    """Result of :func:`verify_dataset`.

    Attributes:
        root: Dataset root.
        key_id: Key id of the master key the keyring is wrapped for.
        splits: Split names checked.
        shards: Shards checked.
        frames: Frames authenticated.
        samples: Samples decoded.
        errors: One line per failure (first bad frame per shard).
        warnings: Unlisted files, leftovers of interrupted writes.
        dataset_id: The dataset id (hex) from the authenticated dataset manifest.
        dataset_version: The dataset version from the authenticated dataset manifest.
    """

    root: str
    key_id: str = ""
    dataset_id: str = ""
    dataset_version: int = 0
    splits: list[str] = field(default_factory=list)
    shards: int = 0
    frames: int = 0
    samples: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    first_error: ShardError | None = None

    @property
    def ok(self) -> bool:
        """Whether every frame authenticated."""
        return not self.errors


@audited("verify")
def verify_dataset(
    root: str | os.PathLike[str],
    key: KeyReference | MasterKey,
    splits: list[str] | None = None,
    *,
    stop_at_first: bool = False,
    pin_dataset_id: str | bytes | None = None,
    min_dataset_version: int | None = None,
    read_block_nbytes: int = DEFAULT_BLOCK_NBYTES,
) -> VerifyReport:
    """Authenticate every frame of every split; report the first bad frame of each shard.

    The splits come from the authenticated dataset manifest (``dataset.lsd``), so a deleted
    split or manifest is an error, not a silent omission; a split directory that it does
    not list is an error too.

    Args:
        root: Dataset root.
        key: Master key reference.
        splits: Splits to check (default: every split the dataset manifest lists).
        stop_at_first: Stop at the first failure.
        pin_dataset_id: Refuse a root holding another dataset.
        min_dataset_version: Refuse a dataset older than this version.
        read_block_nbytes: A URL root is fetched in blocks of adjacent frames of at most
            this many bytes (one ranged GET each, a few ahead; see
            :meth:`SplitReader.iter_frames`).

    Appends one access-audit record (keyword arguments ``audit_path``, ``audit_context``).
    """
    store = as_store(root) if is_remote(root) else None
    root = store if store is not None else Path(root)
    report = VerifyReport(str(root))
    data_key, dataset_id, key_id = resolve_data_key(root, key)
    report.key_id = key_id
    if store is None:
        leftovers = [p.name for p in sorted(root.glob(".*.incomplete-*"))
                     + sorted(root.glob(".*.old-*"))]
    else:
        top = store.listdir("")
        leftovers = [n for n, _ in top if ".incomplete-" in n or ".old-" in n]
    for leftover in leftovers:
        report.warnings.append(f"leftover of an interrupted write: {leftover} (delete it)")

    def fail(exc: ShardError) -> bool:
        report.errors.append(str(exc))
        report.first_error = report.first_error or exc
        return stop_at_first

    try:
        dm = check_dataset(
            load_dataset_manifest(root, data_key.aead(), dataset_id),
            dataset_id=pin_dataset_id, min_dataset_version=min_dataset_version,
        )
    except ShardError as exc:
        fail(exc)
        return report
    report.dataset_id, report.dataset_version = dm.dataset_id.hex(), dm.dataset_version
    if store is None:
        on_disk = sorted(p.parent.name for p in root.glob(f"*/{MANIFEST_NAME}")
                         if not p.parent.name.startswith("."))
    else:
        on_disk = sorted(n for n, t in top if t == "directory" and not n.startswith(".")
                         and store.exists(f"{n}/{MANIFEST_NAME}"))
    for name in on_disk:
        if name not in dm.splits and (splits is None or name in splits):
            exc = RollbackError(
                f"split directory {name!r} has a manifest but {DATASET_MANIFEST_NAME} does not "
                "list it: left by an interrupted write or copied in; re-run its write or "
                "delete it",
                shard=f"{name}/{MANIFEST_NAME}",
            )
            if fail(exc):
                return report
    if splits is None:
        splits = sorted(dm.splits)
        if not splits:
            raise DatasetNotFoundError(f"no split is listed in {DATASET_MANIFEST_NAME} under "
                                       f"{str(root)!r}")
    for split in splits:
        report.splits.append(split)
        try:
            reader = SplitReader(root, split, data_key, dataset_id)
        except ShardError as exc:
            if fail(exc):
                return report
            continue
        with reader:
            listed = {s.file for s in reader.manifest.shards} | {MANIFEST_NAME}
            names = ([p.name for p in sorted(reader.directory.iterdir())] if store is None
                     else [n for n, _ in store.listdir(reader._rel)])
            for name in names:
                if name not in listed:
                    report.warnings.append(f"{split}/{name} is not listed in the manifest")
            for si, info in enumerate(reader.manifest.shards):
                report.shards += 1
                # a URL root: blocks of adjacent frames fetched ahead, one ranged GET each
                frames = reader.iter_frames([(si, fi) for fi in range(len(info.frames))],
                                            block_nbytes=read_block_nbytes)
                try:
                    for cols, buf in frames:
                        report.frames += 1
                        report.samples += len(next(iter(cols.values())))
                        del cols
                        reader.release(buf)
                except ShardError as exc:
                    if fail(exc):
                        return report
                finally:
                    frames.close()
    return report
