"""Exceptions raised by the encrypted shard format, its keys, writer and DataModule.

One class per failure class. Every exception that concerns a file carries ``shard`` (the
path of the shard or manifest relative to the dataset root) and ``frame`` (the frame
index, or ``None`` when the failure is in a header, manifest or keyring), and its message
names both and says what to do. No message ever contains key material.
"""

from __future__ import annotations

import ast
import re

__all__ = [
    "ConcurrentWriteError",
    "DatasetNotFoundError",
    "EmptyDatasetError",
    "FrameAuthenticationError",
    "KeyFormatError",
    "KeyReferenceError",
    "KeyringError",
    "ManifestAuthenticationError",
    "ManifestError",
    "MissingShardError",
    "PathTraversalError",
    "RollbackError",
    "SampleDecodeError",
    "SchemaError",
    "ShardError",
    "ShardHeaderError",
    "ShardSwappedError",
    "StaleShardError",
    "TruncatedShardError",
    "UnsupportedFormatError",
    "WrongKeyError",
]


class ShardError(Exception):
    """Base class of every error of the encrypted shard package.

    Attributes:
        shard: Path of the affected file relative to the dataset root, or ``None``.
        frame: Index of the affected frame, or ``None`` for headers, manifests and keys.
    """

    def __init__(self, message: str, *, shard: str | None = None, frame: int | None = None):
        if shard is None and frame is None and isinstance(message, str):
            # torch re-raises a DataLoader worker's exception as ``type(exc)(text)``: recover
            # the location from the original message quoted in that text.
            shard, frame = _location_from_text(message)
            if shard is not None:
                self.shard, self.frame = shard, frame
                super().__init__(message)
                return
        self.shard = shard
        self.frame = frame
        where = []
        if shard is not None:
            where.append(f"shard {shard!r}")
        if frame is not None:
            where.append(f"frame {frame}")
        elif shard is not None and shard.endswith(".lss"):
            where.append("header")
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(prefix + message)

    def __reduce__(self):  # keep shard/frame across process boundaries (DataLoader workers)
        return (_rebuild_error, (type(self), self.args[0], self.shard, self.frame))


_LOCATION_RE = re.compile(
    r"\[shard ('(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\")(?:, frame (\d+)|, header)?\] "
)


def _location_from_text(text: str) -> tuple[str | None, int | None]:
    if "DataLoader worker" not in text:
        return None, None
    found = list(_LOCATION_RE.finditer(text))
    if not found:
        return None, None
    last = found[-1]
    try:
        shard = ast.literal_eval(last.group(1))
    except (ValueError, SyntaxError):
        return None, None
    return (shard if isinstance(shard, str) else None,
            int(last.group(2)) if last.group(2) is not None else None)


def _rebuild_error(cls: type, text: str, shard: str | None, frame: int | None) -> ShardError:
    err = cls.__new__(cls)
    Exception.__init__(err, text)
    err.shard = shard
    err.frame = frame
    return err


# --- keys -------------------------------------------------------------------------------


class KeyReferenceError(ShardError, LookupError):
    """A key reference cannot be resolved: variable unset, file missing, none or several given."""


class KeyFormatError(ShardError, ValueError):
    """Key material has the wrong size or encoding (the message never contains the material)."""


class WrongKeyError(ShardError):
    """The master key is not the one the dataset's data key is wrapped for (names both key ids)."""


class KeyringError(ShardError):
    """The dataset's keyring is missing, malformed, or failed authentication."""


# --- dataset / manifest -----------------------------------------------------------------


class DatasetNotFoundError(ShardError, FileNotFoundError):
    """No complete dataset split (a directory with a manifest) exists at the given path."""


class EmptyDatasetError(ShardError, ValueError):
    """A dataset or split holds no samples (refused when writing and when loading)."""


class UnsupportedFormatError(ShardError):
    """A file is not a lightning_sustain shard/manifest, or has an unknown format version."""


class ManifestError(ShardError):
    """The authenticated manifest is malformed or inconsistent with the files on disk."""


class ManifestAuthenticationError(ManifestError):
    """The manifest failed authentication: modified, or bound to another dataset/split."""


class PathTraversalError(ManifestError):
    """The manifest names a shard file outside the split directory."""


# --- shards -----------------------------------------------------------------------------


class MissingShardError(ShardError, FileNotFoundError):
    """A shard listed in the manifest does not exist."""


class TruncatedShardError(ShardError):
    """A shard file is shorter than the manifest records (names the first incomplete frame)."""


class ShardHeaderError(ShardError):
    """A shard header does not match the header the manifest authenticates."""


class ShardSwappedError(ShardHeaderError):
    """A shard belongs to another dataset, split or shard position (swapped files)."""


class StaleShardError(ShardHeaderError):
    """A shard belongs to an older (or other) version of this dataset (replayed file)."""


class RollbackError(StaleShardError):
    """A split or the whole dataset is older than the dataset manifest or the user's pin."""


class ConcurrentWriteError(ShardError):
    """Another writer committed the same split first (or holds the root lock too long)."""


class FrameAuthenticationError(ShardError):
    """A frame failed AEAD authentication: modified, reordered, truncated or replayed bytes."""


class SampleDecodeError(ShardError, ValueError):
    """Authenticated frame plaintext does not decode under the manifest's schema."""


# --- writer input -----------------------------------------------------------------------


class SchemaError(ShardError, ValueError):
    """Samples given to the writer cannot be stored (unsupported type, inconsistent shapes)."""
