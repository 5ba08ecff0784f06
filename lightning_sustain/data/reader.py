"""Random-access reading and verification of one split of an encrypted dataset.

A :class:`SplitReader` decrypts one frame at a time with ``os.pread``: memory use is a few
frames whatever the shard size, and plaintext exists only in buffers the caller wipes.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sustain.data.audit import AuditSession, audited
from lightning_sustain.data.codec import Schema, decode_frame
from lightning_sustain.data.errors import (
    DatasetNotFoundError,
    EmptyDatasetError,
    ManifestError,
    MissingShardError,
    PathTraversalError,
    ShardError,
    StaleShardError,
    TruncatedShardError,
    UnsupportedFormatError,
)
from lightning_sustain.data.format import (
    CIPHER_AES_256_GCM,
    CIPHER_NONE,
    FRAME_OVERHEAD,
    MANIFEST_NAME,
    MAX_MANIFEST_NBYTES,
    SHARD_HEADER,
    Manifest,
    ShardHeader,
    check_split_name,
    decode_manifest,
    frame_aad,
    open_frame,
    parse_manifest_header,
)
from lightning_sustain.data.keys import DataKey, KeyReference, MasterKey, load_keyring

__all__ = ["SplitReader", "VerifyReport", "open_split", "verify_dataset"]

logger = logging.getLogger(__name__)

_MAX_OPEN_FILES = 16
_POOL_SIZE = 16


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
        expected_version: Refuse a manifest of another dataset version (rollback guard).
        allow_plaintext: Accept the unencrypted benchmark baseline format.

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
    ):
        check_split_name(split)
        self.root = Path(root)
        self.split = split
        self.directory = self.root / (directory or split)
        rel = os.path.relpath(self.directory, self.root)
        if rel.startswith("..") or os.path.isabs(rel):
            raise PathTraversalError(f"split directory {directory!r} is outside root {root!s}")
        self._rel = rel
        manifest_path = self.directory / MANIFEST_NAME
        mname = f"{rel}/{MANIFEST_NAME}"
        try:
            st = manifest_path.stat()
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_NBYTES:
                raise ManifestError("manifest is not a regular file of sane size", shard=mname)
            blob = manifest_path.read_bytes()
        except FileNotFoundError:
            raise DatasetNotFoundError(
                f"no complete split {split!r} at {str(self.directory)!r} ({MANIFEST_NAME} "
                "missing): write it with ShardWriter / `lightning-sustain encrypt`, or fix the "
                "path (an interrupted write leaves no manifest)",
                shard=mname,
            ) from None
        head = parse_manifest_header(blob, mname)
        if head.cipher == CIPHER_NONE and not allow_plaintext:
            raise UnsupportedFormatError(
                "split is stored unencrypted (benchmark baseline format); refusing to load it "
                "as an encrypted dataset",
                shard=mname,
            )
        if head.cipher == CIPHER_AES_256_GCM and data_key is None:
            raise UnsupportedFormatError("split is encrypted but no key was given", shard=mname)
        self._aead = data_key.aead() if head.cipher == CIPHER_AES_256_GCM else None
        if dataset_id is None:
            if head.cipher != CIPHER_NONE:
                raise ValueError("dataset_id is required for encrypted splits")
            dataset_id = head.dataset_id
        self.manifest: Manifest = decode_manifest(
            blob, self._aead, split=split, dataset_id=dataset_id, shard=mname
        )
        if expected_version is not None and self.manifest.dataset_version != expected_version:
            raise StaleShardError(
                f"split is dataset version {self.manifest.dataset_version}, expected version "
                f"{expected_version} (rolled back or not yet updated)",
                shard=mname,
            )
        if self.manifest.num_samples == 0 or not self.manifest.shards:
            raise EmptyDatasetError(f"split {split!r} holds no samples", shard=mname)
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pool: list[bytearray] = []  # zeroed plaintext buffers for reuse
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
        return f"{self._rel}/{self.manifest.shards[shard_index].file}"

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

    def _fd(self, si: int) -> int:
        fd = self._fds.get(si)
        if fd is not None:
            self._fds.move_to_end(si)
            return fd
        info = self.manifest.shards[si]
        name = self.shard_name(si)
        path = self.directory / info.file
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise MissingShardError(
                "shard listed in the manifest does not exist; restore it", shard=name
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ManifestError("shard is not a regular file", shard=name)
            if st.st_size < info.size_bytes:
                first_bad = next(
                    (i for i, (off, ln, _) in enumerate(info.frames) if off + ln > st.st_size),
                    None,
                )
                raise TruncatedShardError(
                    f"shard is {st.st_size} bytes, the manifest records {info.size_bytes}: "
                    f"truncated from frame {first_bad} on; restore it",
                    shard=name,
                    frame=first_bad,
                )
            if st.st_size > info.size_bytes:
                raise ManifestError(
                    f"shard is {st.st_size} bytes, the manifest records {info.size_bytes}: "
                    "bytes were appended; restore it",
                    shard=name,
                )
            header = os.pread(fd, SHARD_HEADER.size, 0)
            expected = ShardHeader(
                self.manifest.cipher,
                self.manifest.dataset_id,
                self.manifest.dataset_version,
                self.split,
                si,
                len(info.frames),
            )
            expected.check(header, name)
        except BaseException:
            os.close(fd)
            raise
        self._fds[si] = fd
        while len(self._fds) > _MAX_OPEN_FILES:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def close(self) -> None:
        """Close open shard files (and append the audit record of :func:`open_split`)."""
        while self._fds:
            _, fd = self._fds.popitem()
            os.close(fd)
        audit, self.audit = self.audit, None
        if audit is not None:
            audit.finish()

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

        Returns:
            ``(columns, buffer)``: read-only column views of shape ``(n, *field.shape)`` into
            ``buffer``; copy what you keep and :func:`wipe` the buffer afterwards.

        Raises:
            ShardError: Missing, truncated, swapped, stale or modified data.
        """
        info = self.manifest.shards[shard_index]
        offset, length, n = info.frames[frame_index]
        name = self.shard_name(shard_index)
        fd = self._fd(shard_index)
        blob = os.pread(fd, length, offset)
        if len(blob) != length:
            raise TruncatedShardError(
                f"frame ends past the end of the shard ({len(blob)} of {length} bytes read)",
                shard=name,
                frame=frame_index,
            )
        aad = frame_aad(
            self.manifest.dataset_id,
            self.manifest.dataset_version,
            self.split,
            shard_index,
            frame_index,
            frame_index == len(info.frames) - 1,
        )
        size = length - FRAME_OVERHEAD
        spare = self._pool.pop() if self._pool and len(self._pool[-1]) == size else None
        try:
            buf = open_frame(self._aead, blob, aad, shard=name, frame=frame_index, out=spare)
        except BaseException:
            if spare is not None:
                self.release(spare)
            raise
        try:
            cols = decode_frame(self.schema, buf, n, shard=name, frame=frame_index)
        except BaseException:
            self.release(buf)
            raise
        if self.audit is not None:
            self.audit.frame(name, n)
        return cols, buf

    def release(self, buf: bytearray) -> None:
        """Zero a buffer returned by :meth:`read_frame` and keep it for reuse.

        Drop every view of the buffer (the column arrays) before releasing it.
        """
        wipe(buf)
        if len(self._pool) < _POOL_SIZE:
            self._pool.append(buf)

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
) -> SplitReader:
    """Open a split of an encrypted dataset for reading.

    Args:
        root: Dataset root.
        split: Split name.
        key: Reference to the master key/password, or a :class:`MasterKey`.
        directory: Split directory relative to ``root`` (default: ``split``).
        expected_version: Refuse other dataset versions.

    Every call appends an access-audit record when the reader is closed (keyword
    arguments ``audit_path`` and ``audit_context``, see :mod:`lightning_sustain.data.audit`).
    """
    data_key, dataset_id, _ = resolve_data_key(root, key)
    return SplitReader(
        root, split, data_key, dataset_id, directory=directory, expected_version=expected_version
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
    """

    root: str
    key_id: str = ""
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
) -> VerifyReport:
    """Authenticate every frame of every split; report the first bad frame of each shard.

    Args:
        root: Dataset root.
        key: Master key reference.
        splits: Splits to check (default: every directory with a manifest).
        stop_at_first: Stop at the first failure.

    Appends one access-audit record (keyword arguments ``audit_path``, ``audit_context``).
    """
    root = Path(root)
    report = VerifyReport(str(root))
    data_key, dataset_id, key_id = resolve_data_key(root, key)
    report.key_id = key_id
    for leftover in sorted(root.glob(".*.incomplete-*")) + sorted(root.glob(".*.old-*")):
        report.warnings.append(f"leftover of an interrupted write: {leftover.name} (delete it)")
    if splits is None:
        splits = sorted(p.parent.name for p in root.glob(f"*/{MANIFEST_NAME}"))
        if not splits:
            raise DatasetNotFoundError(f"no split with a {MANIFEST_NAME} under {str(root)!r}")
    for split in splits:
        report.splits.append(split)
        try:
            reader = SplitReader(root, split, data_key, dataset_id)
        except ShardError as exc:
            report.errors.append(str(exc))
            report.first_error = report.first_error or exc
            if stop_at_first:
                return report
            continue
        with reader:
            listed = {s.file for s in reader.manifest.shards} | {MANIFEST_NAME}
            for p in sorted(reader.directory.iterdir()):
                if p.name not in listed:
                    report.warnings.append(f"{split}/{p.name} is not listed in the manifest")
            for si, info in enumerate(reader.manifest.shards):
                report.shards += 1
                for fi in range(len(info.frames)):
                    try:
                        cols, buf = reader.read_frame(si, fi)
                    except ShardError as exc:
                        report.errors.append(str(exc))
                        report.first_error = report.first_error or exc
                        if stop_at_first:
                            return report
                        break
                    report.frames += 1
                    report.samples += len(next(iter(cols.values())))
                    del cols
                    reader.release(buf)
    return report
