"""Atomic writer of encrypted shards from numpy arrays, a torch Dataset, CSV or ``.npz``.

A split is written into a hidden staging directory next to its final place and moved
there with ``rename`` only after every shard and the manifest are on disk and fsynced;
the dataset manifest (``dataset.lsd``) is then updated to list the split's new version
and write id. An interrupted write leaves at most hidden ``.<split>.incomplete-*`` /
``.<split>.old-*`` directories that no reader opens and that the next write removes, or a
split that the dataset manifest does not list (detected by every reader). Creating the
keyring and committing run under the root's writer lock. Only ciphertext is written.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import logging
import os
import shutil
import struct
import sys
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sustain.data.codec import Schema, encode_frame, infer_schema, to_columns
from lightning_sustain.data.errors import (
    ConcurrentWriteError,
    EmptyDatasetError,
    ManifestError,
    SchemaError,
)
from lightning_sustain.data.format import (
    CIPHER_AES_256_GCM,
    CIPHER_NONE,
    DATASET_MANIFEST_NAME,
    FRAME_OVERHEAD,
    MANIFEST_NAME,
    SHARD_HEADER,
    WRITE_ID_NBYTES,
    DatasetManifest,
    Manifest,
    ShardHeader,
    ShardInfo,
    SplitEntry,
    check_split_name,
    frame_aad_base,
    load_dataset_manifest,
    seal_frame,
)
from lightning_sustain.data.keys import (
    KEYRING_NAME,
    DataKey,
    KeyReference,
    Keyring,
    MasterKey,
    fsync_dir,
    keyring_lock,
    load_keyring,
    scrypt_kdf_params,
)
from lightning_sustain.data.masking import Masker, MaskingSpec, load_masking_spec, pseudonym_key
from lightning_sustain.data.storage import RemoteStore, as_store, is_remote

__all__ = [
    "ShardWriter",
    "WriteResult",
    "write_arrays",
    "write_csv",
    "write_npz",
    "write_torch_dataset",
]

logger = logging.getLogger(__name__)

DEFAULT_FRAME_NBYTES = 64 * 1024
DEFAULT_SHARD_NBYTES = 64 * 1024 * 1024


@dataclass
class WriteResult:
    """What :class:`ShardWriter` wrote.

    Attributes:
        root: Dataset root.
        split: Split name.
        dataset_id: Dataset id (hex).
        dataset_version: Version written.
        key_id: Id of the master key the data key is wrapped for.
        num_samples: Samples written.
        num_shards: Shard files written.
        num_frames: Frames written.
        bytes_written: Bytes of shards and manifest.
        generation: Version of the whole dataset after this commit (pin it as
            ``min_dataset_version`` together with ``dataset_id``).
        write_id: Random id of this write (hex), bound into every frame.
    """

    root: str
    split: str
    dataset_id: str
    dataset_version: int
    key_id: str
    num_samples: int
    num_shards: int
    num_frames: int
    bytes_written: int
    generation: int = 0
    write_id: str = ""


def _progress(total: int | None, enabled: bool, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with lightning
        return None
    return tqdm(total=total, disable=not enabled, desc=desc, unit="samples", file=sys.stderr,
                dynamic_ncols=True)


_fsync_dir = fsync_dir


def _remove_leftovers(root: Path, split: str) -> None:
    """Delete staging/old directories of ``split`` left by crashed writers (lock held).

    A staging directory still flocked by a live writer is kept.
    """
    for stale in sorted(root.glob(f".{split}.incomplete-*")) + sorted(root.glob(f".{split}.old-*")):
        try:
            fd = os.open(stale, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer is still filling it
            shutil.rmtree(stale, ignore_errors=True)
            logger.info("removed %s left by an interrupted write", stale.name)
        finally:
            os.close(fd)


class ShardWriter:
    """Write one split of an encrypted dataset.

    Use as a context manager: leaving the block normally commits the split atomically,
    leaving it with an exception discards everything written::

        with ShardWriter("data/", "train", KeyReference(file="master.key")) as w:
            w.write_columns({"x": x, "y": y})

    Args:
        root: Dataset root. Created if needed. If it already holds a keyring, the key must
            unwrap it and the split joins that dataset (same dataset id and data key).
        split: Split name (``train``, ``val``, ...), also its directory name.
        key: Master key reference (or :class:`MasterKey`). For a new dataset with
            ``password=True`` the referenced secret is a password (scrypt, salt stored).
        dataset_version: Version of the split to write; default: the dataset's version
            (``dataset.lsd``) + 1. Must exceed the split's recorded version. Versions
            come from the authenticated dataset manifest, so deleting or corrupting a split
            cannot reset them; a random write id is bound into every frame besides.
        feature_names: Names of the feature columns, stored in the authenticated schema.
        frame_nbytes: Target plaintext bytes per frame (tens of KiB: random-access unit).
        shard_nbytes: Target bytes per shard file.
        password: Derive the master key from a password (new datasets only).
        scrypt_n: scrypt cost for new password datasets (power of two).
        progress: Show a progress bar on stderr.
        total: Expected samples, for the progress bar.
        masking: Masking rules applied before encryption (:mod:`lightning_sustain.data.masking`;
            a :class:`MaskingSpec`, a mapping, or a JSON/YAML file path); recorded in the
            authenticated manifest.
        storage_options: fsspec options of a URL ``root`` (endpoint, region, timeouts);
            credentials come from the provider chain only (secret-like keys are refused).

    A URL ``root`` (``s3://bucket/prefix``, ``memory://...``) is written through a local
    staging directory holding ciphertext only (under ``TMPDIR``), then uploaded: shards,
    the split manifest, and the dataset manifest last (the commit point). A dataset
    manifest changed by another writer since this one started is refused
    (:class:`ConcurrentWriteError`); see docs/shard-format.md, "Object storage".

    Raises:
        ValueError: Bad split name or sizes.
        ShardError: The key does not open an existing dataset, or the version is not newer.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        key: KeyReference | MasterKey,
        *,
        dataset_version: int | None = None,
        feature_names: Sequence[str] | None = None,
        frame_nbytes: int = DEFAULT_FRAME_NBYTES,
        shard_nbytes: int = DEFAULT_SHARD_NBYTES,
        password: bool = False,
        scrypt_n: int = 1 << 17,
        progress: bool = True,
        total: int | None = None,
        masking: MaskingSpec | Mapping[str, Any] | str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        _unencrypted_baseline: bool = False,
    ):
        check_split_name(split)
        if split in (KEYRING_NAME,) or split.startswith("."):
            raise ValueError(f"split name {split!r} is reserved")
        if not 256 <= frame_nbytes <= 1 << 30:
            raise ValueError(f"frame_nbytes must be in 256..2**30, got {frame_nbytes}")
        if shard_nbytes < frame_nbytes:
            raise ValueError("shard_nbytes must be at least frame_nbytes")
        self._remote: RemoteStore | None = None
        self._remote_dm: bytes | None = None
        self._created_keyring = False
        if is_remote(root):
            self._remote = as_store(root, storage_options)
            root = self._stage_remote(self._remote)
        elif storage_options:
            raise ValueError("storage_options are for URL roots only (s3://, memory://, ...)")
        self.root = Path(root)
        self.split = split
        self.frame_nbytes = int(frame_nbytes)
        self.shard_nbytes = int(shard_nbytes)
        self.feature_names = None if feature_names is None else [str(n) for n in feature_names]
        self.root.mkdir(parents=True, exist_ok=True)
        self._cipher = CIPHER_NONE if _unencrypted_baseline else CIPHER_AES_256_GCM
        self._new_keyring: Keyring | None = None
        self.write_id = os.urandom(WRITE_ID_NBYTES)
        with keyring_lock(self.root):
            self._setup_keys(key, password, scrypt_n, _unencrypted_baseline)
            self.dataset_version = self._pick_version(dataset_version)
            _remove_leftovers(self.root, split)
            self._staging = self.root / f".{split}.incomplete-{uuid.uuid4().hex[:12]}"
            self._staging.mkdir()
            self._staging_fd = os.open(self._staging, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            fcntl.flock(self._staging_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.generation = 0
        self._masker = self._make_masker(masking)
        self._schema: Schema | None = None
        self._pending: list[Mapping[str, Any]] = []
        self._shards: list[ShardInfo] = []
        self._fh: Any = None
        self._held: bytes | None = None
        self._frames: list[tuple[int, int, int]] = []
        self._shard_samples = 0
        self._pos = 0
        self._num_samples = 0
        self._bytes = 0
        self._closed = False
        self._bar = _progress(total, progress, f"encrypt {split}")

    # -- setup ----------------------------------------------------------------------------

    def _stage_remote(self, store: RemoteStore) -> Path:
        """Local staging root (ciphertext only) seeded with the remote keyring/manifest."""
        from lightning_sustain.data.format import MAX_DATASET_MANIFEST_NBYTES
        from lightning_sustain.data.keys import MAX_KEYRING_NBYTES

        stage = Path(tempfile.mkdtemp(prefix="lightning-sustain-upload-"))
        try:
            self._remote_dm = self._remote_blob(DATASET_MANIFEST_NAME,
                                                MAX_DATASET_MANIFEST_NBYTES)
            if self._remote_dm is not None:
                (stage / DATASET_MANIFEST_NAME).write_bytes(self._remote_dm)
            ring = self._remote_blob(KEYRING_NAME, MAX_KEYRING_NBYTES)
            if ring is not None:
                (stage / KEYRING_NAME).write_bytes(ring)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return stage

    def _remote_blob(self, name: str, max_nbytes: int) -> bytes | None:
        assert self._remote is not None
        try:
            return self._remote.read_small(name, max_nbytes, label=name, error=ManifestError,
                                           missing=_RemoteMissing)
        except _RemoteMissing:
            return None

    def _check_remote_unchanged(self) -> None:
        assert self._remote is not None
        from lightning_sustain.data.format import MAX_DATASET_MANIFEST_NBYTES

        now = self._remote_blob(DATASET_MANIFEST_NAME, MAX_DATASET_MANIFEST_NBYTES)
        if now != self._remote_dm:
            raise ConcurrentWriteError(
                f"{DATASET_MANIFEST_NAME} at {self._remote.url!r} was changed by another writer "
                f"while this one wrote split {self.split!r}; this write was not committed (its "
                "uploaded objects may have replaced the split's objects: readers detect that "
                "by authentication); re-run the write. Object storage has no lock: run one "
                "writer per dataset at a time",
                shard=DATASET_MANIFEST_NAME,
            )

    def _publish(self) -> None:
        """Upload the committed staging split; the dataset manifest goes last (commit point)."""
        store = self._remote
        assert store is not None
        split_dir = self.root / self.split
        self._check_remote_unchanged()
        names = sorted(p.name for p in split_dir.iterdir() if p.name != MANIFEST_NAME)
        for name in names:
            store.upload(split_dir / name, f"{self.split}/{name}")
        store.upload(split_dir / MANIFEST_NAME, f"{self.split}/{MANIFEST_NAME}")
        self._check_remote_unchanged()
        if getattr(self, "_update_dataset", True):
            store.upload(self.root / DATASET_MANIFEST_NAME, DATASET_MANIFEST_NAME)
        if self._created_keyring:
            store.upload(self.root / KEYRING_NAME, KEYRING_NAME)
        listed = {*names, MANIFEST_NAME}
        for name, _ in store.listdir(self.split):
            if name not in listed:
                store.remove(f"{self.split}/{name}")

    def _setup_keys(self, key: Any, password: bool, scrypt_n: int, plain: bool) -> None:
        if plain:
            self._data_key, self._aead = None, None
            self.dataset_id, self.key_id = os.urandom(16), "none"
            if (self.root / KEYRING_NAME).exists():
                self.dataset_id = load_keyring(self.root).dataset_id
            else:
                found = load_dataset_manifest(self.root, None, None)
                if found is not None:
                    self.dataset_id = found.dataset_id
            return
        if not isinstance(key, (KeyReference, MasterKey)):
            raise TypeError(
                f"key must be a KeyReference or MasterKey, got {type(key).__name__}"
            )
        if (self.root / KEYRING_NAME).exists():
            ring = load_keyring(self.root)
            master = key if isinstance(key, MasterKey) else ring.master_key(key)
            data_key = ring.unwrap(master, str(self.root))
            self.dataset_id, self.key_id = ring.dataset_id, ring.key_id
        else:
            if password and isinstance(key, MasterKey):
                raise ValueError("password=True needs a KeyReference to the password")
            kdf = scrypt_kdf_params(n=scrypt_n) if password else {"name": "raw"}
            self.dataset_id = os.urandom(16)
            template = Keyring(self.dataset_id, "0" * 16, kdf, b"", b"")
            master = key if isinstance(key, MasterKey) else template.master_key(key)
            data_key = DataKey.generate()
            self._new_keyring = Keyring.wrap(data_key, master, self.dataset_id, kdf)
            self.key_id = master.key_id
        self._data_key = data_key
        self._aead = data_key.aead()
        if self._new_keyring is not None:
            # A new dataset: the (empty) dataset manifest first, then the keyring, both under
            # the root lock, so a concurrent writer joins this dataset instead of making its
            # own, and a keyring never exists without its dataset manifest.
            empty = DatasetManifest(self.dataset_id, 0, self._cipher, {}, _now())
            _write_file(self.root / DATASET_MANIFEST_NAME, empty.encode(self._aead))
            self._new_keyring.save(self.root)
            self._new_keyring = None
            self._created_keyring = True

    def _dataset_manifest(self) -> DatasetManifest:
        if self._aead is None and (self.root / KEYRING_NAME).exists():
            # baseline (benchmarks, downgrade tests) inside an encrypted root: it cannot and
            # does not touch the encrypted dataset manifest
            self._update_dataset = False
            return DatasetManifest(self.dataset_id, 0, self._cipher, {}, _now())
        found = load_dataset_manifest(self.root, self._aead, self.dataset_id)
        if found is None and self._aead is None:
            return DatasetManifest(self.dataset_id, 0, self._cipher, {}, _now())
        if found is None:
            raise ManifestError(
                f"{DATASET_MANIFEST_NAME} is missing although {KEYRING_NAME} exists: it was "
                "deleted (or the dataset was written by format 1). Restore it from a trusted "
                "copy, or re-encrypt into a new root; refusing to write so that versions "
                "cannot start again",
                shard=DATASET_MANIFEST_NAME,
            )
        return found

    def _make_masker(self, masking: Any) -> Masker | None:
        spec = None if masking is None else load_masking_spec(masking)
        if not spec:
            return None
        key = None if self._data_key is None else pseudonym_key(self._data_key, self.dataset_id)
        return Masker(spec, key)

    def _mask(self, cols: dict[str, Any]) -> dict[str, Any]:
        """Apply the masking rules to a batch of columns (call site of data/masking.py)."""
        if self._masker is None:
            return cols
        masked, names = self._masker.apply(cols, self.feature_names)
        self.feature_names = names
        return masked

    def _pick_version(self, requested: int | None) -> int:
        """Hand out a version no other write of this dataset ever had (root lock held)."""
        dm = self._dataset_manifest()
        entry = dm.splits.get(self.split)
        current = entry.version if entry is not None else 0
        floor = max(dm.reserved_version, dm.dataset_version)
        if requested is None:
            version = floor + 1
        elif type(requested) is not int or not 1 <= requested < 1 << 32:
            raise ValueError(f"dataset_version must be an integer in 1..2**32-1, got {requested}")
        elif requested <= current:
            raise ValueError(
                f"split {self.split!r} already exists at version {current}; write version "
                f"{current + 1} or higher (or omit dataset_version) so that shards of the old "
                "version cannot be replayed into the new one"
            )
        elif requested <= floor:
            raise ValueError(
                f"version {requested} was already handed out to a write of this dataset (the "
                f"highest so far is {floor}); write version {floor + 1} or higher, or omit "
                "dataset_version"
            )
        else:
            version = requested
        if version >= 1 << 32:
            raise ValueError("the dataset has used up its 2**32 versions; re-encrypt it")
        if getattr(self, "_update_dataset", True):
            reserved = dataclasses.replace(dm, reserved_version=version)
            _write_file(self.root / DATASET_MANIFEST_NAME, reserved.encode(self._aead))
        return version

    # -- writing --------------------------------------------------------------------------

    def write(self, sample: Mapping[str, Any]) -> None:
        """Append one sample (dict of numpy arrays / tensors / numeric scalars)."""
        if self._masker is not None and not getattr(self, "_premasked", False):
            touched = {r.name for r in self._masker.spec.rules}
            if touched - set(sample):
                touched |= {k for k, v in sample.items() if np.ndim(v) == 1}
            masked = self._mask({k: np.asarray(v)[None] for k, v in sample.items()})
            sample = {
                k: (sample[k] if k in sample and k not in touched else v[0])
                for k, v in masked.items()
            }
        if self._schema is None:
            self._schema = infer_schema(sample, self.feature_names)
        self._pending.append(sample)
        if len(self._pending) >= self._per_frame():
            cols = to_columns(self._schema, self._pending)
            self._pending = []
            self._emit(cols, 0, len(next(iter(cols.values()))))

    def write_columns(self, columns: Mapping[str, Any]) -> None:
        """Append many samples given as one array per field (leading axis = sample)."""
        cols = {}
        for name, value in columns.items():
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            cols[name] = np.asarray(value)
        if not cols:
            raise SchemaError("write_columns needs at least one column")
        if not getattr(self, "_premasked", False):
            cols = self._mask(cols)
        lengths = {name: (a.shape[0] if a.ndim else -1) for name, a in cols.items()}
        if len(set(lengths.values())) != 1 or -1 in lengths.values():
            raise SchemaError(f"columns must share their first (sample) axis, got {lengths}")
        n = next(iter(lengths.values()))
        if n == 0:
            return
        if self._schema is None:
            # a 1-D column holds one scalar per sample
            self._schema = infer_schema({k: a[0] for k, a in cols.items()}, self.feature_names)
        if set(cols) != set(self._schema.names):
            raise SchemaError(
                f"columns {sorted(cols)} differ from the dataset schema {self._schema.names}"
            )
        for f in self._schema.fields:
            a = cols[f.name]
            if a.shape[1:] != f.shape:
                raise SchemaError(
                    f"column {f.name!r} has per-sample shape {a.shape[1:]}, schema has {f.shape}"
                )
            if a.dtype.name != f.dtype:
                if not np.can_cast(a.dtype, f.dtype, "same_kind"):
                    raise SchemaError(f"column {f.name!r} has dtype {a.dtype}, schema {f.dtype}")
            cols[f.name] = np.ascontiguousarray(a, dtype=f.np_dtype)
        if self._pending:
            self._premasked = True
            try:
                for i in range(n):
                    self.write({k: v[i] for k, v in cols.items()})
            finally:
                self._premasked = False
            return
        k = self._per_frame()
        for start in range(0, n - n % k, k):
            self._emit(cols, start, start + k)
        rest = n % k
        if rest:
            self._pending.extend(
                {name: cols[name][i] for name in cols} for i in range(n - rest, n)
            )

    def _per_frame(self) -> int:
        assert self._schema is not None
        return max(1, self.frame_nbytes // max(1, self._schema.record_nbytes))

    def _emit(self, cols: Mapping[str, np.ndarray], start: int, stop: int) -> None:
        assert self._schema is not None
        plaintext = encode_frame(self._schema, cols, start, stop)
        if self._fh is None:
            self._open_shard()
        # The last-frame flag is known only when the shard closes, so one frame is held
        # back: sealing the previous frame now (it is not the last one).
        if self._held is not None:
            self._write_sealed(self._held, len(self._frames) - 1, last=False)
        self._held = plaintext
        length = len(plaintext) + FRAME_OVERHEAD
        self._frames.append((self._pos, length, stop - start))
        self._pos += length
        self._shard_samples += stop - start
        self._num_samples += stop - start
        if self._bar is not None:
            self._bar.update(stop - start)
        if self._pos + length > self.shard_nbytes:
            self._close_shard()

    def _open_shard(self) -> None:
        index = len(self._shards)
        self._fh = open(self._staging / f"shard-{index:05d}.lss", "wb")  # noqa: SIM115
        self._fh.write(bytes(SHARD_HEADER.size))  # the real header is written at close
        self._frames = []
        self._pos = SHARD_HEADER.size
        self._shard_samples = 0
        self._held = None
        self._aad_base = frame_aad_base(
            self.dataset_id, self.write_id, self.dataset_version, self.split, index
        )

    def _write_sealed(self, plaintext: bytes, frame_index: int, *, last: bool) -> None:
        aad = self._aad_base + struct.pack("<IB", frame_index, 1 if last else 0)
        self._fh.write(seal_frame(self._aead, plaintext, aad))

    def _close_shard(self) -> None:
        if self._fh is None:
            return
        if self._held is not None:
            self._write_sealed(self._held, len(self._frames) - 1, last=True)
            self._held = None
        index = len(self._shards)
        header = ShardHeader(
            self._cipher, self.dataset_id, self.dataset_version, self.split, index,
            len(self._frames), self.write_id,
        ).pack()
        self._fh.seek(0)
        self._fh.write(header)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        self._bytes += self._pos
        self._shards.append(
            ShardInfo(f"shard-{index:05d}.lss", self._shard_samples, self._pos, tuple(self._frames))
        )

    # -- commit / abort ---------------------------------------------------------------------

    def commit(self) -> WriteResult:
        """Finish the split and move it into place atomically.

        Raises:
            EmptyDatasetError: If no sample was written (nothing is committed).
        """
        if self._closed:
            raise RuntimeError("writer already closed")
        try:
            if self._pending:
                assert self._schema is not None
                cols = to_columns(self._schema, self._pending)
                self._pending = []
                self._emit(cols, 0, len(next(iter(cols.values()))))
            self._close_shard()
            if self._num_samples == 0 or self._schema is None:
                raise EmptyDatasetError(
                    f"no samples were written to split {self.split!r}; nothing committed"
                )
            manifest = Manifest(
                self.dataset_id,
                self.dataset_version,
                self.split,
                self._cipher,
                self._num_samples,
                self._schema,
                tuple(self._shards),
                _now(),
                self.write_id,
                self._masker.spec.record() if self._masker is not None else None,
            )
            blob = manifest.encode(self._aead)
            with open(self._staging / MANIFEST_NAME, "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            self._bytes += len(blob)
            _fsync_dir(self._staging)
            with keyring_lock(self.root):
                self._commit_locked()
            if self._remote is not None:
                self._publish()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._unlock_staging()
        if self._bar is not None:
            self._bar.close()
        if self._remote is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        result = WriteResult(
            str(self._remote or self.root), self.split, self.dataset_id.hex(),
            self.dataset_version, self.key_id,
            self._num_samples, len(self._shards), sum(len(s.frames) for s in self._shards),
            self._bytes, self.generation, self.write_id.hex(),
        )
        logger.info(
            "wrote split %s of %s: %d samples, %d shards, version %d, key id %s",
            self.split, self.root, result.num_samples, result.num_shards,
            result.dataset_version, result.key_id,
        )
        return result

    def _commit_locked(self) -> None:
        """Move the staged split into place and record it in the dataset manifest."""
        dm = self._dataset_manifest()
        entry = dm.splits.get(self.split)
        if entry is not None and entry.version >= self.dataset_version:
            raise ConcurrentWriteError(
                f"split {self.split!r} was committed at version {entry.version} by another "
                f"writer while this one wrote version {self.dataset_version}; nothing was "
                "committed by this writer: re-run it",
                shard=DATASET_MANIFEST_NAME,
            )
        self.generation = max(dm.dataset_version + 1, self.dataset_version)
        splits = dict(dm.splits)
        splits[self.split] = SplitEntry(self.dataset_version, self.write_id, self._num_samples)
        new_dm = DatasetManifest(
            self.dataset_id, self.generation, self._cipher, splits, _now(),
            max(dm.reserved_version, self.dataset_version),
        )
        target = self.root / self.split
        old = None
        if os.path.lexists(target):
            old = self.root / f".{self.split}.old-{uuid.uuid4().hex[:12]}"
            os.rename(target, old)
        os.rename(self._staging, target)
        _fsync_dir(self.root)
        # commit point: from here on readers accept the new split and nothing else
        if getattr(self, "_update_dataset", True):
            _write_file(self.root / DATASET_MANIFEST_NAME, new_dm.encode(self._aead))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _unlock_staging(self) -> None:
        fd = getattr(self, "_staging_fd", None)
        if fd is not None:
            self._staging_fd = None
            os.close(fd)

    def abort(self) -> None:
        """Discard everything written by this writer."""
        if self._closed:
            return
        self._closed = True
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        shutil.rmtree(self._staging, ignore_errors=True)
        self._unlock_staging()
        if self._remote is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.result = self.commit()
        else:
            self.abort()

    def __repr__(self) -> str:
        return (f"ShardWriter(root={str(self._remote or self.root)!r}, split={self.split!r}, "
                f"key_id={self.key_id!r})")

    def __reduce__(self):
        raise TypeError("ShardWriter holds a data key and cannot be pickled")


class _RemoteMissing(ManifestError):
    pass


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_file(path: Path, data: bytes) -> None:
    """Write ``path`` atomically and durably (temp file, fsync, replace, fsync dir)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# -- convenience front ends ------------------------------------------------------------------


def write_arrays(
    root: str | os.PathLike[str],
    split: str,
    arrays: Mapping[str, Any],
    key: KeyReference | MasterKey,
    **kwargs: Any,
) -> WriteResult:
    """Write a split from one array per field (leading axis = sample).

    Example: ``write_arrays(root, "train", {"x": X, "y": y}, key, feature_names=names)``.
    Keyword arguments go to :class:`ShardWriter`.
    """
    first = next(iter(arrays.values()), None)
    kwargs.setdefault("total", None if first is None else len(first))
    with ShardWriter(root, split, key, **kwargs) as w:
        w.write_columns(arrays)
    return w.result


def write_torch_dataset(
    root: str | os.PathLike[str],
    split: str,
    dataset: Any,
    key: KeyReference | MasterKey,
    *,
    field_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> WriteResult:
    """Write a split from a map-style or iterable torch ``Dataset``.

    Samples may be dicts, or tuples/lists that ``field_names`` name (default ``x``, ``y``,
    then ``f2``, ...).
    """
    total = len(dataset) if hasattr(dataset, "__len__") else None
    kwargs.setdefault("total", total)
    iterable: Iterable[Any] = (
        (dataset[i] for i in range(total)) if total is not None and hasattr(
            dataset, "__getitem__") else dataset
    )
    with ShardWriter(root, split, key, **kwargs) as w:
        for item in iterable:
            if isinstance(item, Mapping):
                w.write(item)
            elif isinstance(item, (tuple, list)):
                names = list(field_names or ["x", "y"])
                names += [f"f{i}" for i in range(len(names), len(item))]
                if len(item) > len(names):
                    raise SchemaError("more tuple elements than field_names")
                w.write(dict(zip(names[: len(item)], item, strict=True)))
            else:
                raise SchemaError(
                    f"dataset item of type {type(item).__name__} is neither a dict nor a tuple"
                )
    return w.result


def write_npz(
    root: str | os.PathLike[str],
    split: str,
    path: str | os.PathLike[str],
    key: KeyReference | MasterKey,
    **kwargs: Any,
) -> WriteResult:
    """Write a split from a ``.npz`` file (one array per field; object arrays refused)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    return write_arrays(root, split, arrays, key, **kwargs)


def write_csv(
    root: str | os.PathLike[str],
    split: str,
    path: str | os.PathLike[str],
    key: KeyReference | MasterKey,
    *,
    label_column: str | None = None,
    feature_dtype: str = "float32",
    label_dtype: str = "int64",
    **kwargs: Any,
) -> WriteResult:
    """Write a split from a numeric CSV file with a header row.

    Every column except ``label_column`` becomes one feature of field ``x`` (shape
    ``(n_features,)``, names stored as ``feature_names``); the label becomes field ``y``.

    With ``masking``, the rules name CSV columns; text cells are allowed in columns that
    are pseudonymised, dropped or date-generalised. A pseudonymised column becomes its own
    ``int64`` field named after the column (not a feature of ``x``).

    Raises:
        SchemaError: Missing label column, non-numeric cells or ragged rows.
    """
    if kwargs.get("masking") is not None:
        return _write_csv_masked(root, split, path, key, label_column, feature_dtype,
                                 label_dtype, **kwargs)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise EmptyDatasetError(f"CSV file {str(path)!r} is empty") from None
        if label_column is not None and label_column not in header:
            raise SchemaError(
                f"label column {label_column!r} not in CSV header {header}; pass --label with "
                "one of those names"
            )
        li = header.index(label_column) if label_column is not None else None
        feats = [h for i, h in enumerate(header) if i != li]
        xs, ys = [], []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise SchemaError(f"{path}:{lineno}: {len(row)} cells, header has {len(header)}")
            try:
                xs.append([float(c) for i, c in enumerate(row) if i != li])
                if li is not None:
                    ys.append(float(row[li]))
            except ValueError:
                raise SchemaError(f"{path}:{lineno}: a cell is not a number") from None
    if not xs:
        raise EmptyDatasetError(f"CSV file {str(path)!r} has no data rows")
    arrays: dict[str, Any] = {"x": np.asarray(xs, dtype=feature_dtype)}
    if li is not None:
        arrays["y"] = np.asarray(ys).astype(label_dtype)
    kwargs.setdefault("feature_names", feats)
    return write_arrays(root, split, arrays, key, **kwargs)


def _read_csv_text(path: str | os.PathLike[str]) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise EmptyDatasetError(f"CSV file {str(path)!r} is empty") from None
        rows = []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise SchemaError(f"{path}:{lineno}: {len(row)} cells, header has {len(header)}")
            rows.append(row)
    if not rows:
        raise EmptyDatasetError(f"CSV file {str(path)!r} has no data rows")
    if len(set(header)) != len(header):
        raise SchemaError(f"CSV header of {str(path)!r} repeats a column name: {header}")
    return header, rows


def _write_csv_masked(
    root: str | os.PathLike[str],
    split: str,
    path: str | os.PathLike[str],
    key: KeyReference | MasterKey,
    label_column: str | None,
    feature_dtype: str,
    label_dtype: str,
    **kwargs: Any,
) -> WriteResult:
    """``write_csv`` with masking rules that name CSV columns (text cells allowed)."""
    header, rows = _read_csv_text(path)
    if label_column is not None and label_column not in header:
        raise SchemaError(
            f"label column {label_column!r} not in CSV header {header}; pass --label with "
            "one of those names"
        )
    table = {h: np.array([r[i] for r in rows]) for i, h in enumerate(header)}
    kwargs.setdefault("total", len(rows))
    kwargs.pop("feature_names", None)
    with ShardWriter(root, split, key, **kwargs) as w:
        assert w._masker is not None
        masked, _ = w._masker.apply(table, None)
        pseudo = {r.name for r in w._masker.spec.rules if r.op == "pseudonymise"}
        arrays: dict[str, Any] = {}
        feats = [h for h in header if h in masked and h != label_column and h not in pseudo]
        for h in (*feats, *([label_column] if label_column in masked else [])):
            try:
                masked[h] = np.asarray(masked[h], dtype=np.float64)
            except ValueError:
                raise SchemaError(
                    f"{path}: column {h!r} has non-numeric cells; pseudonymise, drop or "
                    "date-generalise it in the masking spec"
                ) from None
        if feats:
            arrays["x"] = np.stack([masked[h] for h in feats], axis=1).astype(feature_dtype)
        if label_column is not None and label_column in masked:
            arrays["y"] = masked[label_column].astype(label_dtype)
        for h in header:
            if h in pseudo:
                if h in arrays:
                    raise SchemaError(f"pseudonymised column {h!r} clashes with field {h!r}")
                arrays[h] = masked[h]
        w.feature_names = feats
        w._premasked = True
        w.write_columns(arrays)
    return w.result
