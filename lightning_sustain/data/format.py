"""On-disk layout of encrypted shards: headers, associated data, frames and manifests.

See ``docs/shard-format.md`` for the specification and threat model. In short::

    <root>/keyring.json                 dataset id + data key wrapped by the master key
    <root>/<split>/manifest.lsm         header (plaintext, authenticated) + AES-256-GCM body
    <root>/<split>/shard-00000.lss      112-byte header + frames

    frame on disk = nonce (12) | AES-256-GCM(data key, frame plaintext, AAD) incl. tag (16)
    AAD(frame)    = "lightning-sustain/v1/frame<NUL>" | dataset id | version | shard index
                    | frame index | last-frame flag | split

Everything here is pure byte layout; reading a split lives in
:mod:`lightning_sustain.data.reader`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lightning_sustain.data.codec import Schema, frame_nbytes
from lightning_sustain.data.errors import (
    FrameAuthenticationError,
    ManifestAuthenticationError,
    ManifestError,
    PathTraversalError,
    SchemaError,
    ShardHeaderError,
    ShardSwappedError,
    StaleShardError,
    UnsupportedFormatError,
)
from lightning_sustain.data.masking import validate_record as validate_masking_record

__all__ = [
    "CIPHER_AES_256_GCM",
    "FORMAT_VERSION",
    "Manifest",
    "ShardHeader",
    "ShardInfo",
    "frame_aad",
    "open_frame",
    "seal_frame",
]

FORMAT_VERSION = 1
CIPHER_NONE = 0  # benchmark baseline only: same layout, no encryption; readers refuse it
CIPHER_AES_256_GCM = 1
NONCE_NBYTES = 12
TAG_NBYTES = 16
FRAME_OVERHEAD = NONCE_NBYTES + TAG_NBYTES
MANIFEST_NAME = "manifest.lsm"
SHARD_MAGIC = b"LSSHARD\x00"
MANIFEST_MAGIC = b"LSMANIF\x00"
SPLIT_FIELD = 64
SHARD_HEADER = struct.Struct(f"<8sHBBI16sIII{SPLIT_FIELD}s4x")
MANIFEST_HEADER = struct.Struct(f"<8sHBBI16sI{SPLIT_FIELD}s{NONCE_NBYTES}sQ")
MAX_MANIFEST_NBYTES = 1 << 30
MAX_FRAME_NBYTES = 1 << 31
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_SHARD_FILE_RE = re.compile(r"^shard-[0-9]{5,10}\.lss$")
_FRAME_AAD_PREFIX = b"lightning-sustain/v1/frame\x00"
_MANIFEST_AAD_PREFIX = b"lightning-sustain/v1/manifest\x00"


def check_split_name(split: str) -> bytes:
    """Validate a split name and return its UTF-8 bytes.

    Raises:
        ValueError: If it is not 1..63 characters of ``[A-Za-z0-9_.-]``.
    """
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(
            f"split name {split!r} must be 1..63 characters of letters, digits, '_', '.', '-'"
            " and start with a letter or digit"
        )
    return split.encode("ascii")


def _pack_split(split: str) -> bytes:
    raw = check_split_name(split)
    return bytes([len(raw)]) + raw.ljust(SPLIT_FIELD - 1, b"\x00")


def _unpack_split(field: bytes) -> str | None:
    n = field[0]
    if n == 0 or n >= SPLIT_FIELD or any(field[1 + n :]):
        return None
    try:
        return field[1 : 1 + n].decode("ascii")
    except UnicodeDecodeError:
        return None


def frame_aad(
    dataset_id: bytes, version: int, split: str, shard_index: int, frame_index: int, last: bool
) -> bytes:
    """Associated data binding a frame to its dataset, version, split and position."""
    return (
        _FRAME_AAD_PREFIX
        + dataset_id
        + struct.pack("<IIIB", version, shard_index, frame_index, 1 if last else 0)
        + _pack_split(split)
    )


def seal_frame(aead: AESGCM | None, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt one frame: ``nonce | ciphertext | tag`` (``aead=None``: benchmark baseline)."""
    if aead is None:
        return bytes(NONCE_NBYTES) + plaintext + bytes(TAG_NBYTES)
    nonce = os.urandom(NONCE_NBYTES)
    return nonce + aead.encrypt(nonce, plaintext, aad)


def open_frame(
    aead: AESGCM | None,
    blob: bytes | memoryview,
    aad: bytes,
    *,
    shard: str,
    frame: int,
    out: bytearray | None = None,
) -> bytearray:
    """Authenticate and decrypt one frame into ``out`` or a new ``bytearray``.

    Wipe the returned buffer after use. ``out`` must be exactly the plaintext size.

    Raises:
        FrameAuthenticationError: If authentication fails (``out`` is left zeroed).
    """
    view = memoryview(blob)
    if len(view) < FRAME_OVERHEAD:
        raise FrameAuthenticationError(
            f"frame of {len(view)} bytes is shorter than nonce and tag", shard=shard, frame=frame
        )
    if out is None or len(out) != len(view) - FRAME_OVERHEAD:
        out = bytearray(len(view) - FRAME_OVERHEAD)
    if aead is None:
        out[:] = view[NONCE_NBYTES : len(view) - TAG_NBYTES]
        return out
    try:
        aead.decrypt_into(view[:NONCE_NBYTES], view[NONCE_NBYTES:], aad, out)
    except InvalidTag:
        raise FrameAuthenticationError(
            "frame failed authentication: its bytes were modified, or it was moved from "
            "another position, shard, split, dataset or dataset version; restore the shard "
            "from a trusted copy or re-encrypt the dataset",
            shard=shard,
            frame=frame,
        ) from None
    return out


@dataclass(frozen=True)
class ShardHeader:
    """The plaintext header every shard starts with (checked against the manifest)."""

    cipher: int
    dataset_id: bytes
    dataset_version: int
    split: str
    shard_index: int
    frame_count: int

    def pack(self) -> bytes:
        """Serialise to :data:`SHARD_HEADER.size` bytes."""
        return SHARD_HEADER.pack(
            SHARD_MAGIC,
            FORMAT_VERSION,
            self.cipher,
            0,
            SHARD_HEADER.size,
            self.dataset_id,
            self.dataset_version,
            self.shard_index,
            self.frame_count,
            _pack_split(self.split),
        )

    def check(self, actual: bytes, shard: str) -> None:
        """Compare the bytes found on disk with this (expected) header.

        Raises:
            ShardSwappedError: The header names another dataset, split or shard position.
            StaleShardError: The header names another version of this dataset.
            ShardHeaderError: Anything else differs (modified header, not a shard).
        """
        expected = self.pack()
        if actual == expected:
            return
        if len(actual) < SHARD_HEADER.size:
            raise ShardHeaderError(
                f"header is {len(actual)} bytes, expected {SHARD_HEADER.size}", shard=shard
            )
        magic, fmt, cipher, _, hlen, ds_id, version, index, count, split_raw = SHARD_HEADER.unpack(
            actual[: SHARD_HEADER.size]
        )
        split = _unpack_split(split_raw)
        if magic != SHARD_MAGIC:
            raise ShardHeaderError(
                "file does not start with a lightning_sustain shard header", shard=shard
            )
        if ds_id != self.dataset_id:
            raise ShardSwappedError(
                "shard belongs to another dataset (swapped in from elsewhere, or its header "
                "was modified); restore the original shard",
                shard=shard,
            )
        if split is not None and split != self.split:
            raise ShardSwappedError(
                f"shard belongs to split {split!r}, the manifest expects split {self.split!r} "
                "(shards swapped between splits); restore the original shard",
                shard=shard,
            )
        if version != self.dataset_version:
            raise StaleShardError(
                f"shard belongs to dataset version {version}, the manifest is version "
                f"{self.dataset_version} (an old shard was put back); restore the current shard",
                shard=shard,
            )
        if index != self.shard_index:
            raise ShardSwappedError(
                f"shard is shard #{index} of this split, the manifest expects #{self.shard_index}"
                " at this name (shards renamed or swapped); restore the original names",
                shard=shard,
            )
        raise ShardHeaderError(
            f"header does not match the authenticated manifest (format {fmt}, cipher {cipher}, "
            f"header length {hlen}, {count} frames): it was modified; restore the shard",
            shard=shard,
        )


@dataclass(frozen=True)
class ShardInfo:
    """One shard as recorded in the manifest.

    Attributes:
        file: File name inside the split directory.
        num_samples: Samples in the shard.
        size_bytes: Exact file size.
        frames: ``(offset, length, num_samples)`` per frame.
    """

    file: str
    num_samples: int
    size_bytes: int
    frames: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Manifest:
    """The authenticated description of one split of a dataset.

    Attributes:
        dataset_id: 16-byte dataset id.
        dataset_version: Version of the dataset this split belongs to.
        split: Split name.
        cipher: Cipher id (1 = AES-256-GCM).
        num_samples: Samples in the split.
        schema: Per-sample fields and feature names.
        shards: Shards in order.
        created_utc: ISO timestamp of writing.
    """

    dataset_id: bytes
    dataset_version: int
    split: str
    cipher: int
    num_samples: int
    schema: Schema
    shards: tuple[ShardInfo, ...]
    created_utc: str = ""
    masking: dict[str, Any] | None = None  # masking rules applied at write (data/masking.py)

    def header(self, nonce: bytes, body_nbytes: int) -> bytes:
        """The plaintext manifest header (also its associated data)."""
        return MANIFEST_HEADER.pack(
            MANIFEST_MAGIC,
            FORMAT_VERSION,
            self.cipher,
            0,
            MANIFEST_HEADER.size,
            self.dataset_id,
            self.dataset_version,
            _pack_split(self.split),
            nonce,
            body_nbytes,
        )

    def body(self) -> dict[str, Any]:
        """The JSON body (encrypted on disk)."""
        return {
            "num_samples": self.num_samples,
            "created_utc": self.created_utc,
            "schema": self.schema.to_json(),
            "shards": [
                {
                    "file": s.file,
                    "num_samples": s.num_samples,
                    "size_bytes": s.size_bytes,
                    "frames": [list(f) for f in s.frames],
                }
                for s in self.shards
            ],
            **({"masking": self.masking} if self.masking is not None else {}),
        }

    def encode(self, aead: AESGCM | None) -> bytes:
        """Serialise and encrypt (``aead=None``: benchmark baseline, plaintext body)."""
        body = json.dumps(self.body(), separators=(",", ":")).encode("utf-8")
        nonce = os.urandom(NONCE_NBYTES) if aead is not None else bytes(NONCE_NBYTES)
        header = self.header(nonce, len(body) + TAG_NBYTES)
        if aead is None:
            return header + body + bytes(TAG_NBYTES)
        return header + aead.encrypt(nonce, body, _MANIFEST_AAD_PREFIX + header)


@dataclass(frozen=True)
class ManifestHeader:
    """Plaintext fields of a manifest header."""

    cipher: int
    dataset_id: bytes
    dataset_version: int
    split: str
    nonce: bytes
    body_nbytes: int
    raw: bytes


def parse_manifest_header(blob: bytes, shard: str) -> ManifestHeader:
    """Parse the plaintext manifest header.

    Raises:
        UnsupportedFormatError: Not a manifest, or an unknown version or cipher.
        ManifestAuthenticationError: A field is malformed (the header was modified).
    """
    if len(blob) < MANIFEST_HEADER.size:
        raise UnsupportedFormatError(
            f"manifest is {len(blob)} bytes, shorter than its header", shard=shard
        )
    raw = blob[: MANIFEST_HEADER.size]
    magic, fmt, cipher, reserved, hlen, ds_id, version, split_raw, nonce, body_n = (
        MANIFEST_HEADER.unpack(raw)
    )
    if magic != MANIFEST_MAGIC:
        raise UnsupportedFormatError("not a lightning_sustain manifest", shard=shard)
    if fmt != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"manifest format version {fmt} is not supported (this reader knows "
            f"{FORMAT_VERSION}); upgrade lightning_sustain",
            shard=shard,
        )
    if cipher not in (CIPHER_NONE, CIPHER_AES_256_GCM):
        raise UnsupportedFormatError(f"unknown cipher id {cipher}", shard=shard)
    split = _unpack_split(split_raw)
    if reserved or hlen != MANIFEST_HEADER.size or split is None:
        raise ManifestAuthenticationError("manifest header was modified", shard=shard)
    if body_n != len(blob) - MANIFEST_HEADER.size or not TAG_NBYTES <= body_n:
        raise ManifestAuthenticationError(
            f"manifest records a {body_n}-byte body but {len(blob) - MANIFEST_HEADER.size} "
            "bytes follow its header (truncated or extended)",
            shard=shard,
        )
    return ManifestHeader(cipher, ds_id, version, split, nonce, body_n, raw)


def decode_manifest(
    blob: bytes, aead: AESGCM | None, *, split: str, dataset_id: bytes, shard: str
) -> Manifest:
    """Authenticate, decrypt and validate a manifest file.

    Args:
        blob: Whole manifest file.
        aead: Data-key AEAD (``None`` only for the benchmark baseline).
        split: The split the caller expects (bound by the associated data).
        dataset_id: The dataset id from the keyring.
        shard: Manifest path for error messages.

    Raises:
        ShardSwappedError: The manifest names another split or dataset.
        ManifestAuthenticationError: Authentication failed.
        ManifestError: The decrypted body is inconsistent.
        PathTraversalError: A shard file name escapes the split directory.
    """
    head = parse_manifest_header(blob, shard)
    if head.dataset_id != dataset_id:
        raise ShardSwappedError(
            "manifest belongs to another dataset than the keyring (split directory copied "
            "from another dataset)",
            shard=shard,
        )
    if head.split != split:
        raise ShardSwappedError(
            f"manifest belongs to split {head.split!r}, expected {split!r} (split directories "
            "swapped or renamed)",
            shard=shard,
        )
    body_ct = blob[MANIFEST_HEADER.size :]
    if aead is None:
        body_raw = body_ct[:-TAG_NBYTES]
    else:
        try:
            body_raw = aead.decrypt(head.nonce, body_ct, _MANIFEST_AAD_PREFIX + head.raw)
        except InvalidTag:
            raise ManifestAuthenticationError(
                "manifest failed authentication: it was modified or truncated; restore it from "
                "a trusted copy",
                shard=shard,
            ) from None
    try:
        body = json.loads(body_raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ManifestError("authenticated manifest body is not valid JSON", shard=shard) from None
    return _validate_body(body, head, shard)


def _validate_body(body: Any, head: ManifestHeader, shard: str) -> Manifest:
    def bad(msg: str) -> ManifestError:
        return ManifestError(f"manifest is inconsistent: {msg}", shard=shard)

    if not isinstance(body, dict):
        raise bad("body is not an object")
    try:
        schema = Schema.from_json(body.get("schema"))
    except SchemaError as exc:
        raise bad(str(exc)) from None
    raw_shards = body.get("shards")
    num_samples = body.get("num_samples")
    if not isinstance(raw_shards, list) or type(num_samples) is not int:
        raise bad("shards/num_samples missing")
    shards = []
    seen = set()
    for raw in raw_shards:
        if not isinstance(raw, dict):
            raise bad("shard entry is not an object")
        name = raw.get("file")
        if not isinstance(name, str):
            raise bad("shard file name is not a string")
        if (
            not _SHARD_FILE_RE.match(name)
            or os.path.isabs(name)
            or os.path.basename(name) != name
            or ".." in name
        ):
            raise PathTraversalError(
                f"manifest names shard file {name!r}, which is not a plain shard name inside "
                "the split directory; refusing to open it",
                shard=shard,
            )
        if name in seen:
            raise bad(f"shard file {name!r} listed twice")
        seen.add(name)
        frames_raw = raw.get("frames")
        if not isinstance(frames_raw, list) or not frames_raw:
            raise bad(f"shard {name!r} has no frames")
        frames = []
        pos = SHARD_HEADER.size
        total = 0
        for f in frames_raw:
            if (
                not isinstance(f, list)
                or len(f) != 3
                or not all(type(v) is int for v in f)
            ):
                raise bad(f"shard {name!r}: frame entry malformed")
            offset, length, n = f
            if offset != pos or n <= 0:
                raise bad(f"shard {name!r}: frame offsets are not contiguous")
            if length != frame_nbytes(schema, n) + FRAME_OVERHEAD or length > MAX_FRAME_NBYTES:
                raise bad(f"shard {name!r}: frame length does not match its sample count")
            frames.append((offset, length, n))
            pos += length
            total += n
        if raw.get("size_bytes") != pos or raw.get("num_samples") != total:
            raise bad(f"shard {name!r}: size/sample count do not add up")
        shards.append(ShardInfo(name, total, pos, tuple(frames)))
    if sum(s.num_samples for s in shards) != num_samples:
        raise bad("sample count does not match the shards")
    created = body.get("created_utc", "")
    try:
        masking = validate_masking_record(body.get("masking"))
    except SchemaError as exc:
        raise bad(str(exc)) from None
    return Manifest(
        head.dataset_id,
        head.dataset_version,
        head.split,
        head.cipher,
        num_samples,
        schema,
        tuple(shards),
        created if isinstance(created, str) else "",
        masking,
    )
