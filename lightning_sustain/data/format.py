"""On-disk layout of encrypted shards: headers, associated data, frames and manifests.

See ``docs/shard-format.md`` for the specification and threat model. In short::

    <root>/keyring.json                 dataset id + data key wrapped by the master key
    <root>/dataset.lsd                  authenticated list of splits (version, write id)
    <root>/<split>/manifest.lsm         header (plaintext, authenticated) + AES-256-GCM body
    <root>/<split>/shard-00000.lss      128-byte header + frames

    frame on disk = nonce (12) | AES-256-GCM(data key, frame plaintext, AAD) incl. tag (16)
    AAD(frame)    = "lightning-sustain/v2/frame<NUL>" | dataset id | write id | version
                    | shard index | split | frame index | last-frame flag

Every write of a split draws a random 16-byte *write id* that is bound into every frame,
shard header and manifest of that write, so no frame of an earlier write can ever
authenticate in a later one, whatever version numbers a rollback or crash produced.

Everything here is pure byte layout; reading a split lives in
:mod:`lightning_sustain.data.reader`.
"""

from __future__ import annotations

import json
import os
import re
import stat
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
    ShardError,
    ShardHeaderError,
    ShardSwappedError,
    StaleShardError,
    UnsupportedFormatError,
)
from lightning_sustain.data.masking import validate_record as validate_masking_record

__all__ = [
    "CIPHER_AES_256_GCM",
    "FORMAT_VERSION",
    "DatasetManifest",
    "Manifest",
    "ShardHeader",
    "ShardInfo",
    "frame_aad",
    "open_frame",
    "parse_json",
    "read_regular_file",
    "seal_frame",
]

FORMAT_VERSION = 2
CIPHER_NONE = 0  # benchmark baseline only: same layout, no encryption; readers refuse it
CIPHER_AES_256_GCM = 1
NONCE_NBYTES = 12
TAG_NBYTES = 16
FRAME_OVERHEAD = NONCE_NBYTES + TAG_NBYTES
MANIFEST_NAME = "manifest.lsm"
DATASET_MANIFEST_NAME = "dataset.lsd"
SHARD_MAGIC = b"LSSHARD\x00"
MANIFEST_MAGIC = b"LSMANIF\x00"
DATASET_MAGIC = b"LSDSET\x00\x00"
SPLIT_FIELD = 64
WRITE_ID_NBYTES = 16
SHARD_HEADER = struct.Struct(f"<8sHBBI16sIII{SPLIT_FIELD}s{WRITE_ID_NBYTES}s4x")
MANIFEST_HEADER = struct.Struct(
    f"<8sHBBI16sI{SPLIT_FIELD}s{WRITE_ID_NBYTES}s{NONCE_NBYTES}sQ"
)
DATASET_HEADER = struct.Struct(f"<8sHBBI16sQ{NONCE_NBYTES}sQ")
MAX_MANIFEST_NBYTES = 256 << 20
MAX_DATASET_MANIFEST_NBYTES = 1 << 20
MAX_FRAME_NBYTES = 1 << 31
MAX_JSON_DEPTH = 16
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_SHARD_FILE_RE = re.compile(r"^shard-[0-9]{5,10}\.lss$")
_FRAME_AAD_PREFIX = b"lightning-sustain/v2/frame\x00"
_MANIFEST_AAD_PREFIX = b"lightning-sustain/v2/manifest\x00"
_DATASET_AAD_PREFIX = b"lightning-sustain/v2/dataset\x00"
_JSON_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"')


# -- bounded reading of untrusted files ---------------------------------------------------


def read_regular_file(
    path: str | os.PathLike[str],
    max_nbytes: int,
    *,
    label: str,
    error: type[ShardError],
    missing: type[ShardError] | None = None,
    missing_message: str = "does not exist",
    label_in_text: bool = False,
) -> bytes:
    """Read a whole file that must be a regular file of at most ``max_nbytes`` bytes.

    The file is opened non-blocking (a FIFO in its place cannot hang us), checked with
    ``fstat`` (FIFOs, devices, sockets and directories are refused) and its size is
    checked before a single byte is read.

    Args:
        path: File to read.
        max_nbytes: Size cap.
        label: Name of the file in messages (``shard`` attribute of the error).
        error: Exception class raised for every problem.
        missing: Exception class raised when the file does not exist (default ``error``).
        missing_message: Message for a missing file.
        label_in_text: Start the message with ``label`` instead of setting ``shard`` (for
            files outside the dataset, e.g. key files).

    Raises:
        ShardError: ``error`` (or ``missing``) naming ``label`` and the problem.
    """
    if label_in_text:
        error = _prefixed(error, label)
        missing = _prefixed(missing, label) if missing is not None else None
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise (missing or error)(missing_message, shard=label) from None
    except OSError as exc:
        raise error(f"cannot be opened: {exc.strerror}", shard=label) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(
                f"is not a regular file ({_file_kind(st.st_mode)}); refusing to read it",
                shard=label,
            )
        if st.st_size > max_nbytes:
            raise error(
                f"is {st.st_size} bytes, more than the {max_nbytes} bytes such a file can "
                "have; refusing to read it",
                shard=label,
            )
        chunks = []
        left = st.st_size + 1  # one more byte: notice a file that grew meanwhile
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_nbytes:
            raise error(f"grew past {max_nbytes} bytes while being read", shard=label)
        return data
    except OSError as exc:
        raise error(f"cannot be read: {exc.strerror}", shard=label) from None
    finally:
        os.close(fd)


def _prefixed(cls: type[ShardError], label: str) -> Any:
    def make(message: str, shard: str | None = None) -> ShardError:
        return cls(f"{label} {message}")

    return make


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def json_depth(raw: bytes) -> int:
    """Maximum nesting depth of ``[``/``{`` in a JSON text (strings ignored), in linear time."""
    import numpy as np

    stripped = _JSON_STRING_RE.sub(b'""', raw)
    arr = np.frombuffer(stripped, dtype=np.uint8)
    step = (np.isin(arr, (0x5B, 0x7B)).astype(np.int32)
            - np.isin(arr, (0x5D, 0x7D)).astype(np.int32))
    return int(np.cumsum(step).max(initial=0))


def parse_json(raw: bytes, *, label: str, error: type[ShardError], what: str) -> Any:
    """Parse untrusted JSON with a depth limit; only ``error`` escapes.

    Raises:
        ShardError: ``error`` naming ``label``: not UTF-8, not JSON, or nested too deeply.
    """
    try:
        if json_depth(raw) > MAX_JSON_DEPTH:
            raise error(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep", shard=label)
        return json.loads(raw.decode("utf-8"))
    except ShardError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError):
        raise error(f"{what} is not valid JSON", shard=label) from None


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


def frame_aad_base(
    dataset_id: bytes, write_id: bytes, version: int, split: str, shard_index: int
) -> bytes:
    """The part of a frame's associated data shared by every frame of one shard."""
    return (
        _FRAME_AAD_PREFIX
        + dataset_id
        + write_id
        + struct.pack("<II", version, shard_index)
        + _pack_split(split)
    )


_FRAME_POS = struct.Struct("<IB")


def frame_aad(
    dataset_id: bytes,
    version: int,
    split: str,
    shard_index: int,
    frame_index: int,
    last: bool,
    write_id: bytes = bytes(WRITE_ID_NBYTES),
) -> bytes:
    """Associated data binding a frame to its dataset, write, version, split and position."""
    return frame_aad_base(dataset_id, write_id, version, split, shard_index) + _FRAME_POS.pack(
        frame_index, 1 if last else 0
    )


class FrameOpener:
    """Decrypts the frames of one shard with no per-frame allocation.

    Holds the shard's associated data in a ``bytearray`` whose last 5 bytes (frame index
    and last-frame flag) are rewritten in place per frame; the caller passes the nonce and
    ciphertext as buffers (e.g. cached ``memoryview`` slices of a reused read buffer) and
    the output buffer. This is the whole per-frame cost on top of ``decrypt_into``. Pass
    ``bytes`` for nonce and ciphertext where possible: cryptography converts any other
    buffer type through cffi, which costs more per frame than copying 64 KiB.
    """

    __slots__ = ("_aad", "_aead", "_tail")

    def __init__(self, aead: AESGCM, aad_base: bytes):
        self._aead = aead
        self._aad = bytearray(aad_base) + bytearray(_FRAME_POS.size)
        self._tail = len(aad_base)

    def open_into(
        self, nonce: Any, body: Any, frame_index: int, last: bool, out: bytearray
    ) -> None:
        """Authenticate and decrypt into ``out``; raises ``InvalidTag`` (``out`` then dirty)."""
        _FRAME_POS.pack_into(self._aad, self._tail, frame_index, last)
        self._aead.decrypt_into(nonce, body, self._aad, out)


def seal_frame(aead: AESGCM | None, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt one frame: ``nonce | ciphertext | tag`` (``aead=None``: benchmark baseline)."""
    if aead is None:
        return bytes(NONCE_NBYTES) + plaintext + bytes(TAG_NBYTES)
    nonce = os.urandom(NONCE_NBYTES)
    return nonce + aead.encrypt(nonce, plaintext, aad)


def _frame_failed(shard: str, frame: int) -> FrameAuthenticationError:
    return FrameAuthenticationError(
        "frame failed authentication: its bytes were modified, or it was moved from "
        "another position, shard, split, dataset or write of this split; restore the shard "
        "from a trusted copy or re-encrypt the dataset",
        shard=shard,
        frame=frame,
    )


def open_frame(
    aead: AESGCM | None,
    blob: bytes | bytearray | memoryview,
    aad: bytes,
    *,
    shard: str,
    frame: int,
    out: bytearray | None = None,
) -> bytearray:
    """Authenticate and decrypt one frame into ``out`` or a new ``bytearray``.

    Wipe the returned buffer after use. ``out`` must be exactly the plaintext size.

    Raises:
        FrameAuthenticationError: If authentication fails. ``out`` is zeroed then:
            ``decrypt_into`` may have written unauthenticated plaintext into it.
    """
    size = len(blob) - FRAME_OVERHEAD
    if size < 0:
        raise FrameAuthenticationError(
            f"frame of {len(blob)} bytes is shorter than nonce and tag", shard=shard, frame=frame
        )
    if out is None or len(out) != size:
        out = bytearray(size)
    if isinstance(blob, bytes):
        # bytes slices (one copy) beat memoryviews: cryptography converts any non-bytes
        # buffer through cffi, which costs more than the copy (measured in bench_shards.py)
        nonce, body = blob[:NONCE_NBYTES], blob[NONCE_NBYTES:]
    else:
        view = memoryview(blob)
        nonce, body = view[:NONCE_NBYTES], view[NONCE_NBYTES:]
    if aead is None:
        out[:] = memoryview(body)[:size]
        return out
    try:
        aead.decrypt_into(nonce, body, aad, out)
    except InvalidTag:
        out[:] = bytes(size) if size < 4096 else b"\x00" * size
        raise _frame_failed(shard, frame) from None
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
    write_id: bytes = bytes(WRITE_ID_NBYTES)

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
            self.write_id,
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
        magic, fmt, cipher, _, hlen, ds_id, version, index, count, split_raw, write_id = (
            SHARD_HEADER.unpack(actual[: SHARD_HEADER.size])
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
        if fmt != FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"shard has format version {fmt}, this reader knows {FORMAT_VERSION}; "
                "re-encrypt the dataset with this version of lightning_sustain",
                shard=shard,
            )
        if version < self.dataset_version:
            raise StaleShardError(
                f"shard belongs to version {version} of this split, the manifest is version "
                f"{self.dataset_version}: an old shard was put back; restore the current shard",
                shard=shard,
            )
        if version > self.dataset_version:
            raise StaleShardError(
                f"shard belongs to version {version} of this split but the manifest is the "
                f"older version {self.dataset_version}: an old manifest was put back; restore "
                "the current manifest",
                shard=shard,
            )
        if write_id != self.write_id:
            raise StaleShardError(
                f"shard was written by another write of this split (write id "
                f"{write_id.hex()[:12]}, the manifest's is {self.write_id.hex()[:12]}), e.g. "
                "an earlier or interrupted write; restore the current shard",
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
        write_id: Random id of the write that produced this split (bound into every frame).
    """

    dataset_id: bytes
    dataset_version: int
    split: str
    cipher: int
    num_samples: int
    schema: Schema
    shards: tuple[ShardInfo, ...]
    created_utc: str = ""
    write_id: bytes = bytes(WRITE_ID_NBYTES)
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
            self.write_id,
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
    write_id: bytes = bytes(WRITE_ID_NBYTES)


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
    magic, fmt, cipher, reserved, hlen, ds_id, version, split_raw, write_id, nonce, body_n = (
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
    return ManifestHeader(cipher, ds_id, version, split, nonce, body_n, raw, write_id)


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
    body = parse_json(
        body_raw, label=shard, error=ManifestError, what="authenticated manifest body"
    )
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
    if not isinstance(raw_shards, list) or type(num_samples) is not int or num_samples < 0:
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
        if (
            type(raw.get("size_bytes")) is not int
            or type(raw.get("num_samples")) is not int
            or raw["size_bytes"] != pos
            or raw["num_samples"] != total
        ):
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
        head.write_id,
        masking,
    )


# -- the dataset manifest -------------------------------------------------------------------


@dataclass(frozen=True)
class SplitEntry:
    """One split as the dataset manifest records it.

    Attributes:
        version: The split's version (bound into its frames).
        write_id: Random id of the write that produced it (bound into its frames).
        num_samples: Samples in the split.
    """

    version: int
    write_id: bytes
    num_samples: int


@dataclass(frozen=True)
class DatasetManifest:
    """The authenticated list of a dataset's splits (``<root>/dataset.lsd``).

    ``dataset_version`` increases by at least one with every committed write of any split
    and never goes back: a user who pins a minimum version (and the dataset id) detects a
    rolled-back or replaced root; a split directory that does not match its entry here is
    detected as rolled back, deleted or left by an interrupted write.

    Attributes:
        dataset_id: 16-byte dataset id.
        dataset_version: Monotonic version of the whole dataset.
        cipher: Cipher id.
        splits: Split name -> entry.
        updated_utc: ISO timestamp of the last commit.
        reserved_version: Highest split version handed out to a writer so far (also to
            writers that crashed or failed): the next writer gets a higher one, so no
            version is ever bound into the frames of two writes.
    """

    dataset_id: bytes
    dataset_version: int
    cipher: int
    splits: dict[str, SplitEntry]
    updated_utc: str = ""
    reserved_version: int = 0

    def encode(self, aead: AESGCM | None) -> bytes:
        """Serialise and encrypt (``aead=None``: benchmark baseline, plaintext body)."""
        body = json.dumps(
            {
                "dataset_version": self.dataset_version,
                "reserved_version": self.reserved_version,
                "updated_utc": self.updated_utc,
                "splits": {
                    name: {"version": e.version, "write_id": e.write_id.hex(),
                           "num_samples": e.num_samples}
                    for name, e in sorted(self.splits.items())
                },
            },
            separators=(",", ":"),
        ).encode("utf-8")
        nonce = os.urandom(NONCE_NBYTES) if aead is not None else bytes(NONCE_NBYTES)
        header = DATASET_HEADER.pack(
            DATASET_MAGIC, FORMAT_VERSION, self.cipher, 0, DATASET_HEADER.size, self.dataset_id,
            self.dataset_version, nonce, len(body) + TAG_NBYTES,
        )
        if aead is None:
            return header + body + bytes(TAG_NBYTES)
        return header + aead.encrypt(nonce, body, _DATASET_AAD_PREFIX + header)


def decode_dataset_manifest(
    blob: bytes,
    aead: AESGCM | None,
    *,
    dataset_id: bytes | None,
    shard: str = DATASET_MANIFEST_NAME,
) -> DatasetManifest:
    """Authenticate, decrypt and validate ``dataset.lsd``.

    Args:
        blob: Whole file.
        aead: Data-key AEAD (``None`` only for the benchmark baseline).
        dataset_id: The keyring's dataset id (``None``: baseline, take the file's).
        shard: Name for messages.

    Raises:
        UnsupportedFormatError: Not a dataset manifest or another format version.
        ShardSwappedError: It belongs to another dataset.
        ManifestAuthenticationError: It was modified.
        ManifestError: The authenticated body is malformed.
    """
    if len(blob) < DATASET_HEADER.size:
        raise UnsupportedFormatError(
            f"dataset manifest is {len(blob)} bytes, shorter than its header", shard=shard
        )
    raw = blob[: DATASET_HEADER.size]
    magic, fmt, cipher, reserved, hlen, ds_id, version, nonce, body_n = DATASET_HEADER.unpack(raw)
    if magic != DATASET_MAGIC:
        raise UnsupportedFormatError("not a lightning_sustain dataset manifest", shard=shard)
    if fmt != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"dataset manifest format version {fmt} is not supported (this reader knows "
            f"{FORMAT_VERSION})",
            shard=shard,
        )
    if cipher not in (CIPHER_NONE, CIPHER_AES_256_GCM) or (cipher == CIPHER_NONE) != (aead is None):
        raise UnsupportedFormatError(f"unexpected cipher id {cipher}", shard=shard)
    if reserved or hlen != DATASET_HEADER.size or body_n != len(blob) - DATASET_HEADER.size \
            or body_n < TAG_NBYTES:
        raise ManifestAuthenticationError(
            "dataset manifest header was modified, or the file was truncated or extended",
            shard=shard,
        )
    if dataset_id is not None and ds_id != dataset_id:
        raise ShardSwappedError(
            "dataset manifest belongs to another dataset than the keyring (copied from "
            "elsewhere); restore this dataset's own dataset.lsd",
            shard=shard,
        )
    body_ct = blob[DATASET_HEADER.size :]
    if aead is None:
        body_raw = body_ct[:-TAG_NBYTES]
    else:
        try:
            body_raw = aead.decrypt(nonce, body_ct, _DATASET_AAD_PREFIX + raw)
        except InvalidTag:
            raise ManifestAuthenticationError(
                "dataset manifest failed authentication: it was modified; restore it from a "
                "trusted copy",
                shard=shard,
            ) from None
    body = parse_json(body_raw, label=shard, error=ManifestError, what="dataset manifest body")

    def bad(msg: str) -> ManifestError:
        return ManifestError(f"dataset manifest is inconsistent: {msg}", shard=shard)

    if not isinstance(body, dict) or body.get("dataset_version") != version:
        raise bad("version missing or different from the header")
    raw_splits = body.get("splits")
    if not isinstance(raw_splits, dict) or len(raw_splits) > 4096:
        raise bad("splits missing")
    splits = {}
    for name, e in raw_splits.items():
        if not isinstance(name, str) or not _SPLIT_RE.match(name) or not isinstance(e, dict):
            raise bad("split entry malformed")
        v, w, n = e.get("version"), e.get("write_id"), e.get("num_samples")
        if (type(v) is not int or not 0 < v <= version or type(n) is not int or n < 0
                or not isinstance(w, str) or not re.fullmatch(r"[0-9a-f]{32}", w)):
            raise bad(f"entry of split {name!r} malformed")
        splits[name] = SplitEntry(v, bytes.fromhex(w), n)
    reserved = body.get("reserved_version", 0)
    if type(reserved) is not int or not 0 <= reserved < 1 << 32:
        raise bad("reserved version malformed")
    updated = body.get("updated_utc", "")
    return DatasetManifest(ds_id, version, cipher, splits,
                           updated if isinstance(updated, str) else "", reserved)



def load_dataset_manifest(
    root: str | os.PathLike[str], aead: AESGCM | None, dataset_id: bytes | None
) -> DatasetManifest | None:
    """Read ``<root>/dataset.lsd`` bounded and authenticated; ``None`` if it does not exist.

    ``root`` is a local path or a :class:`~lightning_sustain.data.storage.RemoteStore`.

    Raises:
        ShardError: It is not a regular file, too large, modified or malformed.
    """
    from lightning_sustain.data.storage import as_store, is_remote

    try:
        if is_remote(root):
            blob = as_store(root).read_small(DATASET_MANIFEST_NAME, MAX_DATASET_MANIFEST_NBYTES,
                                   label=DATASET_MANIFEST_NAME, error=ManifestError,
                                   missing=_Missing)
        else:
            blob = read_regular_file(
                os.path.join(os.fspath(root), DATASET_MANIFEST_NAME),
                MAX_DATASET_MANIFEST_NBYTES, label=DATASET_MANIFEST_NAME, error=ManifestError,
                missing=_Missing,
            )
    except _Missing:
        return None
    return decode_dataset_manifest(blob, aead, dataset_id=dataset_id)


class _Missing(ShardError):
    pass
