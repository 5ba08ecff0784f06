"""Master keys, key references, password keys, envelope wrapping and key rotation.

Envelope scheme: every dataset has a random 256-bit *data key* that encrypts its frames
and manifests. The data key is stored only wrapped (AES-256-GCM) under a key-encryption
key derived with HKDF-SHA256 from the *master key*, in ``<root>/keyring.json``. Rotating
the master key rewraps the data key; no shard is re-encrypted.

A master key is either a raw 256-bit key in the documented key format
(``lskey1:`` followed by 64 hex digits or the 44-character base64 of exactly 32 bytes, as
``lightning-sustain keygen`` writes it) or derived from a password with scrypt and the
salt stored in the keyring. A password is never taken as a raw key: secret material that
is not in the key format is refused where a raw key is expected. The *key id* is the
first 8 bytes of an HKDF output of the master key: it names a key in messages without
revealing anything about it.

Key bytes are held only by :class:`MasterKey` and :class:`DataKey` objects, whose reprs
show the key id only and which refuse to be pickled.
"""

from __future__ import annotations

import abc
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from lightning_sustain.data.audit import audited
from lightning_sustain.data.errors import (
    ConcurrentWriteError,
    KeyFormatError,
    KeyReferenceError,
    KeyringError,
    WrongKeyError,
)
from lightning_sustain.data.format import parse_json, read_regular_file

__all__ = [
    "DataKey",
    "KeyProvider",
    "KeyReference",
    "Keyring",
    "MasterKey",
    "generate_key",
    "load_keyring",
    "rotate_key",
    "write_key_file",
]

logger = logging.getLogger(__name__)

KEY_NBYTES = 32
KEY_PREFIX = "lskey1:"
KEYRING_NAME = "keyring.json"
LOCK_NAME = ".keyring.lock"
KEYRING_FORMAT = "lightning-sustain-keyring"
KEYRING_VERSION = 1
MAX_KEYRING_NBYTES = 64 * 1024
MAX_SECRET_NBYTES = 4096
# scrypt defaults: 2**17 * 128 * 8 bytes = 128 MiB and ~0.3 s per derivation.
SCRYPT_N = 1 << 17
SCRYPT_R = 8
SCRYPT_P = 1
# The fixed window accepted on writing and reading (keyring.json is not authenticated
# before the key is derived, so its parameters must not be able to force a huge
# derivation): at most 4x the default work and 256 MiB, at least 1/8 of the default.
SCRYPT_N_RANGE = (1 << 14, 1 << 18)
SCRYPT_R_RANGE = (8, 8)
SCRYPT_P_RANGE = (1, 2)
SCRYPT_MAX_WORK = 4 * SCRYPT_N * SCRYPT_R * SCRYPT_P
LOCK_TIMEOUT_S = 120.0
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_B64_RE = re.compile(r"^[A-Za-z0-9+/]{43}=$")
_KEYLIKE_RE = re.compile(r"^[A-Za-z0-9+/_=-]{32,}$")
_ID_INFO = b"lightning-sustain/v1/key-id"
_WRAP_INFO = b"lightning-sustain/v1/wrap"


def _hkdf(key: bytes, info: bytes, salt: bytes | None = None, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


class _SecretHolder:
    """Holds key bytes; never pickled, never shown."""

    __slots__ = ("_key", "key_id")

    def __init__(self, key: bytes, key_id: str):
        self._key = bytes(key)
        self.key_id = key_id

    def __reduce__(self):
        raise TypeError(
            f"{type(self).__name__} (key id {self.key_id}) holds key material and cannot be "
            "pickled; pass a key reference (key_env / key_file / key_provider) instead"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_id={self.key_id!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.key_id == self.key_id  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.key_id))


class MasterKey(_SecretHolder):
    """A 256-bit master key (key-encryption key material).

    Build one with :meth:`from_bytes`, :meth:`from_password` or a :class:`KeyReference`.
    ``repr`` shows the key id only; pickling raises ``TypeError``.
    """

    __slots__ = ()

    def __init__(self, key: bytes):
        if len(key) != KEY_NBYTES:
            raise KeyFormatError(f"a master key must be {KEY_NBYTES} bytes, got {len(key)}")
        super().__init__(key, _hkdf(bytes(key), _ID_INFO, length=8).hex())

    @classmethod
    def from_bytes(cls, key: bytes) -> MasterKey:
        """Wrap 32 raw key bytes."""
        return cls(key)

    @classmethod
    def from_password(
        cls,
        password: bytes | str,
        salt: bytes,
        n: int = SCRYPT_N,
        r: int = SCRYPT_R,
        p: int = SCRYPT_P,
    ) -> MasterKey:
        """Derive a master key from a password with scrypt.

        Raises:
            KeyFormatError: If the password is empty or the parameters are out of range.
        """
        if isinstance(password, str):
            password = password.encode("utf-8")
        password = password.rstrip(b"\r\n")
        if not password:
            raise KeyFormatError("the password is empty")
        if not isinstance(salt, bytes) or not 16 <= len(salt) <= 64:
            raise KeyFormatError("scrypt salt must be 16..64 bytes", shard=KEYRING_NAME)
        check_scrypt_params(n, r, p)
        kdf = Scrypt(salt=salt, length=KEY_NBYTES, n=n, r=r, p=p)
        try:
            return cls(kdf.derive(password))
        except (ValueError, MemoryError) as exc:
            raise KeyFormatError(f"scrypt failed with n={n}, r={r}, p={p}: {exc}") from None

    def _kek(self, dataset_id: bytes) -> AESGCM:
        return AESGCM(_hkdf(self._key, _WRAP_INFO, salt=dataset_id))


class DataKey(_SecretHolder):
    """A dataset's data key. ``repr`` shows its dataset-local id only; not picklable."""

    __slots__ = ()

    def __init__(self, key: bytes):
        if len(key) != KEY_NBYTES:
            raise KeyFormatError(f"a data key must be {KEY_NBYTES} bytes, got {len(key)}")
        super().__init__(key, _hkdf(bytes(key), _ID_INFO, length=8).hex())

    @classmethod
    def generate(cls) -> DataKey:
        """Draw a fresh random data key."""
        return cls(os.urandom(KEY_NBYTES))

    def aead(self) -> AESGCM:
        """Return an AES-256-GCM instance keyed with this data key."""
        return AESGCM(self._key)


def check_scrypt_params(n: Any, r: Any, p: Any) -> None:
    """Refuse scrypt parameters outside the fixed window around the defaults.

    Raises:
        KeyFormatError: Naming the parameters and the window.
    """
    ok = (
        all(type(v) is int for v in (n, r, p))
        and SCRYPT_N_RANGE[0] <= n <= SCRYPT_N_RANGE[1]
        and n & (n - 1) == 0
        and SCRYPT_R_RANGE[0] <= r <= SCRYPT_R_RANGE[1]
        and SCRYPT_P_RANGE[0] <= p <= SCRYPT_P_RANGE[1]
        and n * r * p <= SCRYPT_MAX_WORK
    )
    if not ok:
        raise KeyFormatError(
            f"scrypt parameters n={n!r}, r={r!r}, p={p!r} are outside the accepted window (n a "
            f"power of two in {SCRYPT_N_RANGE[0]}..{SCRYPT_N_RANGE[1]}, r = {SCRYPT_R}, p in "
            f"{SCRYPT_P_RANGE[0]}..{SCRYPT_P_RANGE[1]}); if {KEYRING_NAME} says so it was "
            "modified: restore it",
            shard=KEYRING_NAME,
        )


def format_key(key: bytes) -> str:
    """The documented text form of a raw key: ``lskey1:`` + base64 of the 32 bytes."""
    if len(key) != KEY_NBYTES:
        raise KeyFormatError(f"a key must be {KEY_NBYTES} bytes, got {len(key)}")
    return KEY_PREFIX + base64.b64encode(bytes(key)).decode("ascii")


def looks_like_key(value: str) -> bool:
    """Whether a value given as a *reference* (env var name, path) looks like key material."""
    v = value.strip()
    if v.startswith(KEY_PREFIX) or _HEX_RE.match(v) or _B64_RE.match(v):
        return True
    if not _KEYLIKE_RE.match(v):
        return False
    # long, one token, mixed case and digits, or base64 punctuation: not a name people type
    mixed = any(c.islower() for c in v) and any(c.isupper() for c in v) and any(
        c.isdigit() for c in v)
    return mixed or any(c in "+=" for c in v)


def generate_key() -> bytes:
    """Return 32 random bytes suitable as a raw master key."""
    return os.urandom(KEY_NBYTES)


def write_key_file(path: str | os.PathLike[str], key: bytes, *, overwrite: bool = False) -> Path:
    """Write a raw key in the key format (``lskey1:<base64>``) to ``path``, mode 0600, atomically.

    Raises:
        FileExistsError: If ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if len(key) != KEY_NBYTES:
        raise KeyFormatError(f"a key must be {KEY_NBYTES} bytes, got {len(key)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite a key file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(format_key(key).encode("ascii") + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename/replace inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_raw_key(material: bytes, source: str, *, legacy: bool = False) -> bytes:
    """Parse a 256-bit key in the documented key format.

    The format is ``lskey1:`` followed by 64 hex digits or the 44-character base64 (with
    padding) of exactly 32 bytes; surrounding whitespace is ignored. With ``legacy`` (key
    files only) the bare base64 line written by ``keygen`` before format ``lskey1`` is
    accepted too, with a warning to migrate (``lightning-sustain keygen --migrate``).

    Raises:
        KeyFormatError: Naming ``source`` and the size seen, never the material.
    """
    text = bytes(material).strip()
    body = None
    if text.startswith(KEY_PREFIX.encode()):
        body = text[len(KEY_PREFIX):]
    elif legacy and _B64_RE.match(text.decode("latin-1")):
        body = text
        logger.warning(
            "%s holds a key in the old unmarked format; migrate it with `lightning-sustain "
            "keygen --migrate PATH` (adds the %r marker)", source, KEY_PREFIX,
        )
    if body is not None:
        decoded = body.decode("latin-1")
        try:
            if _HEX_RE.match(decoded):
                return binascii.unhexlify(body)
            if _B64_RE.match(decoded):
                raw = base64.b64decode(body, validate=True)
                if len(raw) == KEY_NBYTES:
                    return raw
        except (binascii.Error, ValueError):
            pass
    raise KeyFormatError(
        f"{source} does not hold a key in the key format ({len(material)} bytes seen): a raw "
        f"key is {KEY_PREFIX!r} followed by 64 hex digits or the base64 of 32 bytes (create "
        "one with `lightning-sustain keygen`); a password is only accepted for a dataset "
        "created with password=True / --password, and then goes through scrypt"
    )


class KeyProvider(abc.ABC):
    """Supplies secret material on demand (e.g. from a KMS or a secrets manager).

    Subclasses implement :meth:`get_key`, which returns either 32 raw key bytes (or their
    hex/base64 form) or, for password-based datasets, the password. The provider is sent
    to DataLoader workers, so it must hold a *reference* to the secret, not the secret,
    and its ``repr`` must not reveal it.
    """

    @abc.abstractmethod
    def get_key(self) -> bytes:
        """Return the secret material."""


@dataclass(frozen=True)
class KeyReference:
    """Where a secret lives: an environment variable, a file, or a provider object.

    Exactly one of the three must be set. Resolving happens in the process that needs
    the key (each DataLoader worker), never earlier.

    Attributes:
        env: Name of an environment variable holding the secret.
        file: Path of a file holding the secret.
        provider: Object with a ``get_key() -> bytes`` method.
    """

    env: str | None = None
    file: str | None = None
    provider: Any = None

    def __post_init__(self) -> None:
        given = [n for n, v in (("key_env", self.env), ("key_file", self.file),
                                ("key_provider", self.provider)) if v is not None]
        if len(given) != 1:
            raise KeyReferenceError(
                "exactly one of key_env, key_file, key_provider must be given, got "
                + (", ".join(given) if given else "none")
            )
        for name, value in (("key_env", self.env), ("key_file", self.file)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise KeyReferenceError(f"{name} must be a string, got {type(value).__name__}")
        if self.env is not None and (looks_like_key(self.env) or not _ENV_NAME_RE.match(
                self.env)):
            if looks_like_key(self.env):
                raise KeyReferenceError(
                    "key_env: value looks like a key, not a reference; pass the *name* of an "
                    "environment variable that holds the key"
                )
            raise KeyReferenceError(
                "key_env must be an environment variable name (letters, digits, '_'), got a "
                f"value of {len(self.env)} characters that is not one"
            )
        if self.file is not None:
            text = os.fspath(self.file)
            if looks_like_key(text) and not os.path.lexists(text):
                raise KeyReferenceError(
                    "key_file: value looks like a key, not a reference; pass the path of a "
                    "file that holds the key"
                )
        if self.provider is not None and not callable(getattr(self.provider, "get_key", None)):
            raise KeyReferenceError(
                f"key_provider {type(self.provider).__name__} has no get_key() method"
            )

    def describe(self) -> str:
        """Say where the secret comes from (never the secret)."""
        if self.env is not None:
            return f"environment variable {self.env!r}"
        if self.file is not None:
            return f"key file {os.fspath(self.file)!r}"
        return f"key provider {type(self.provider).__name__}"

    def secret(self) -> bytes:
        """Read the secret material.

        Raises:
            KeyReferenceError: If the variable is unset/empty, the file is missing or
                unreadable, or the provider fails or returns no bytes.
        """
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise KeyReferenceError(
                    f"environment variable {self.env!r} is not set or empty; export the key "
                    f"({KEY_PREFIX}...) or the password there"
                )
            if len(value) > MAX_SECRET_NBYTES:
                raise KeyReferenceError(
                    f"environment variable {self.env!r} holds {len(value)} characters, more "
                    f"than a key or password can have ({MAX_SECRET_NBYTES})"
                )
            return value.encode("utf-8")
        if self.file is not None:
            path = Path(os.fspath(self.file)).expanduser()
            data = read_regular_file(
                path, MAX_SECRET_NBYTES, label=f"key file {str(path)!r}",
                error=KeyReferenceError, label_in_text=True,
                missing_message="does not exist; create it with `lightning-sustain keygen "
                "--out PATH` or fix key_file",
            )
            with contextlib.suppress(OSError):
                if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                    logger.warning("key file %s is accessible by group/others; chmod 600 it",
                                   path)
            if not data.strip():
                raise KeyReferenceError(f"key file {str(path)!r} is empty")
            return data
        try:
            value = self.provider.get_key()
        except Exception as exc:
            raise KeyReferenceError(
                f"key provider {type(self.provider).__name__} failed: {type(exc).__name__}"
            ) from None
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray, memoryview)) or not len(value):
            raise KeyReferenceError(
                f"key provider {type(self.provider).__name__}.get_key() must return "
                "non-empty bytes"
            )
        if len(value) > MAX_SECRET_NBYTES:
            raise KeyReferenceError(
                f"key provider {type(self.provider).__name__}.get_key() returned "
                f"{len(value)} bytes, more than a key or password can have"
            )
        return bytes(value)

    def __repr__(self) -> str:
        return f"KeyReference({self.describe()})"


@dataclass(frozen=True)
class Keyring:
    """The parsed ``keyring.json`` of a dataset: its id and the wrapped data key.

    Attributes:
        dataset_id: 16 random bytes naming the dataset (bound into every frame).
        key_id: Id of the master key the data key is wrapped for.
        kdf: ``{"name": "raw"}`` or ``{"name": "scrypt", "salt": b64, "n", "r", "p"}``.
        nonce: Nonce of the wrap.
        wrapped: The wrapped data key (ciphertext and tag).
    """

    dataset_id: bytes
    key_id: str
    kdf: dict[str, Any]
    nonce: bytes
    wrapped: bytes

    @property
    def uses_password(self) -> bool:
        """Whether the master key is derived from a password."""
        return self.kdf.get("name") == "scrypt"

    def _aad(self) -> bytes:
        body = {"dataset_id": self.dataset_id.hex(), "key_id": self.key_id, "kdf": self.kdf}
        return b"lightning-sustain/v1/keyring\x00" + json.dumps(body, sort_keys=True).encode()

    def master_key(self, ref_or_secret: KeyReference | MasterKey | bytes) -> MasterKey:
        """Turn secret material into the master key this keyring expects (raw or scrypt).

        Raises:
            KeyFormatError: A :class:`MasterKey` given for a password-based keyring.
        """
        if isinstance(ref_or_secret, MasterKey):
            if self.uses_password:
                raise KeyFormatError("this dataset uses a password; pass a reference to it")
            return ref_or_secret
        legacy = False
        if isinstance(ref_or_secret, KeyReference):
            secret, source = ref_or_secret.secret(), ref_or_secret.describe()
            legacy = ref_or_secret.file is not None
        elif isinstance(ref_or_secret, (bytes, bytearray)):
            secret, source = bytes(ref_or_secret), "the given secret"
        else:
            raise KeyReferenceError(
                f"expected a KeyReference, MasterKey or bytes, got {type(ref_or_secret).__name__}"
            )
        if self.uses_password:
            return MasterKey.from_password(
                secret,
                base64.b64decode(self.kdf["salt"]),
                self.kdf["n"],
                self.kdf["r"],
                self.kdf["p"],
            )
        return MasterKey(parse_raw_key(secret, source, legacy=legacy))

    def unwrap(self, master: MasterKey, root: str = "") -> DataKey:
        """Unwrap the data key.

        Raises:
            WrongKeyError: If ``master`` has another key id (names both ids).
            KeyringError: If the ids match but the wrap fails authentication.
        """
        if master.key_id != self.key_id:
            kind = "password" if self.uses_password else "master key"
            raise WrongKeyError(
                f"wrong {kind} for dataset {root!r}: got key id {master.key_id}, the data key "
                f"is wrapped for key id {self.key_id}; use the key it was encrypted or last "
                "rotated with",
                shard=KEYRING_NAME,
            )
        try:
            raw = master._kek(self.dataset_id).decrypt(self.nonce, self.wrapped, self._aad())
        except InvalidTag:
            raise KeyringError(
                f"the wrapped data key of dataset {root!r} failed authentication although the "
                f"key id {self.key_id} matches: {KEYRING_NAME} was modified; restore it",
                shard=KEYRING_NAME,
            ) from None
        return DataKey(raw)

    @classmethod
    def wrap(
        cls, data_key: DataKey, master: MasterKey, dataset_id: bytes, kdf: dict[str, Any]
    ) -> Keyring:
        """Wrap ``data_key`` for ``master``."""
        ring = cls(dataset_id, master.key_id, dict(kdf), os.urandom(12), b"")
        wrapped = master._kek(dataset_id).encrypt(ring.nonce, data_key._key, ring._aad())
        return cls(dataset_id, master.key_id, dict(kdf), ring.nonce, wrapped)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON document stored in ``keyring.json``."""
        return {
            "format": KEYRING_FORMAT,
            "version": KEYRING_VERSION,
            "dataset_id": self.dataset_id.hex(),
            "key_id": self.key_id,
            "kdf": self.kdf,
            "wrap": {
                "alg": "AES-256-GCM/HKDF-SHA256",
                "nonce": base64.b64encode(self.nonce).decode(),
                "ciphertext": base64.b64encode(self.wrapped).decode(),
            },
        }

    def save(self, root: str | os.PathLike[str]) -> Path:
        """Write ``<root>/keyring.json`` atomically (and fsync the directory)."""
        return _atomic_write(Path(root) / KEYRING_NAME, json.dumps(self.to_json(), indent=2))


def scrypt_kdf_params(n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> dict[str, Any]:
    """Fresh scrypt parameters with a random 16-byte salt, as stored in the keyring.

    Raises:
        KeyFormatError: Parameters outside the accepted window.
    """
    check_scrypt_params(n, r, p)
    return {"name": "scrypt", "salt": base64.b64encode(os.urandom(16)).decode(), "n": n, "r": r,
            "p": p}


@contextlib.contextmanager
def keyring_lock(root: str | os.PathLike[str], timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the dataset root's writer lock (``<root>/.keyring.lock``, ``flock``).

    Creating the keyring, committing a split and rotating the key happen under it, so
    concurrent writers (processes or threads) serialise instead of losing each other's
    keyring or dataset-manifest update.

    Raises:
        ConcurrentWriteError: The lock was not obtained within ``timeout_s``.
    """
    import fcntl

    path = Path(root) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConcurrentWriteError(
                        f"another writer has held the lock of {str(root)!r} for more than "
                        f"{timeout_s:.0f} s; retry when it has finished",
                        shard=LOCK_NAME,
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def load_keyring(root: str | os.PathLike[str]) -> Keyring:
    """Read and validate ``<root>/keyring.json`` (bounded: regular file, size, depth, types).

    Raises:
        KeyringError: If it is missing, not a regular file, too large or malformed.
        KeyFormatError: If its scrypt parameters are outside the accepted window.
    """
    from lightning_sustain.data.storage import as_store, is_remote

    if is_remote(root):
        blob = _remote_keyring_blob(as_store(root))
    else:
        path = Path(root) / KEYRING_NAME
        blob = read_regular_file(
            path, MAX_KEYRING_NBYTES, label=KEYRING_NAME, error=KeyringError,
            missing_message=f"{str(path)!r} does not exist: {str(root)!r} is not an encrypted "
            "dataset root (write one with `lightning-sustain encrypt`)",
        )
    return parse_keyring(blob)


def parse_keyring(blob: bytes) -> Keyring:
    """Validate the bytes of a ``keyring.json`` (see :func:`load_keyring`)."""
    doc = parse_json(blob, label=KEYRING_NAME, error=KeyringError, what=KEYRING_NAME)

    def bad(msg: str) -> KeyringError:
        return KeyringError(f"{KEYRING_NAME} is malformed ({msg}); restore it from backup",
                            shard=KEYRING_NAME)

    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    if doc.get("format") != KEYRING_FORMAT or doc.get("version") != KEYRING_VERSION:
        raise bad("unknown format or version")
    kdf, key_id, ds_hex, wrap = (doc.get(k) for k in ("kdf", "key_id", "dataset_id", "wrap"))
    if not isinstance(kdf, dict) or kdf.get("name") not in ("raw", "scrypt"):
        raise bad("unknown kdf")
    if kdf["name"] == "raw":
        if set(kdf) != {"name"}:
            raise bad("unexpected kdf fields")
    else:
        if set(kdf) != {"name", "salt", "n", "r", "p"} or not isinstance(kdf["salt"], str):
            raise bad("scrypt fields")
        try:
            salt = base64.b64decode(kdf["salt"], validate=True)
        except (binascii.Error, ValueError):
            raise bad("scrypt salt is not base64") from None
        if not 16 <= len(salt) <= 64:
            raise bad("scrypt salt size")
        check_scrypt_params(kdf["n"], kdf["r"], kdf["p"])
    if not isinstance(key_id, str) or not re.fullmatch(r"[0-9a-f]{16}", key_id):
        raise bad("key id")
    if not isinstance(ds_hex, str) or not re.fullmatch(r"[0-9a-f]{32}", ds_hex):
        raise bad("dataset id")
    if not isinstance(wrap, dict) or not all(
        isinstance(wrap.get(k), str) for k in ("nonce", "ciphertext")
    ):
        raise bad("wrap")
    try:
        nonce = base64.b64decode(wrap["nonce"], validate=True)
        wrapped = base64.b64decode(wrap["ciphertext"], validate=True)
    except (binascii.Error, ValueError):
        raise bad("wrap is not base64") from None
    if len(nonce) != 12 or len(wrapped) != KEY_NBYTES + 16:
        raise bad("wrap sizes")
    ring = Keyring(bytes.fromhex(ds_hex), key_id, kdf, nonce, wrapped)
    # the exact bytes this library writes: an edit that keeps the JSON meaningful
    # (whitespace, the informational "alg", an extra field) is refused, not ignored
    if json.dumps(ring.to_json(), indent=2).encode() != bytes(blob).rstrip(b"\n"):
        raise bad("it differs from the form this library writes: edited")
    return ring


@audited("rotate-key", key_arg="old")
def rotate_key(
    root: str | os.PathLike[str],
    old: KeyReference | MasterKey | bytes,
    new: KeyReference | MasterKey | bytes,
    *,
    new_uses_password: bool = False,
) -> Keyring:
    """Rewrap a dataset's data key for a new master key; no shard is re-encrypted.

    Args:
        root: Dataset root.
        old: Current secret (key or password, as the keyring expects) or its reference.
        new: New secret or its reference.
        new_uses_password: Treat ``new`` as a password (scrypt with a fresh salt).

    Returns:
        The new keyring (already written atomically).

    Appends one access-audit record (keyword arguments ``audit_path``, ``audit_context``).
    """
    from lightning_sustain.data.storage import as_store, is_remote

    if is_remote(root):
        return _rotate_remote(as_store(root), old, new, new_uses_password)
    with keyring_lock(root):
        return _rotate_locked(root, old, new, new_uses_password)


def _rotate_remote(store: Any, old: Any, new: Any, new_uses_password: bool) -> Keyring:
    """Rotate on object storage: one PUT of ``keyring.json``, checked before and after.

    Object storage has no lock: the keyring is re-read just before the PUT (another
    rotation since ours began is refused) and read back after it (a rotation that raced
    between the check and the PUT is reported, naming the key id that is now current).
    Shards and manifests are untouched (the data key does not change).
    """
    blob = _remote_keyring_blob(store)
    ring = parse_keyring(blob)
    new_ring = _rewrap(ring, old, new, new_uses_password, str(store))
    if _remote_keyring_blob(store) != blob:
        raise ConcurrentWriteError(
            f"{KEYRING_NAME} at {store.url!r} was changed by another rotation while this one "
            "ran; nothing was written: re-run rotate-key with the key now in use",
            shard=KEYRING_NAME,
        )
    data = json.dumps(new_ring.to_json(), indent=2).encode()
    store.put(KEYRING_NAME, data)  # one PUT: the object is replaced whole or not at all
    now = _remote_keyring_blob(store)
    if now != data:
        current = parse_keyring(now).key_id
        raise ConcurrentWriteError(
            f"{KEYRING_NAME} at {store.url!r} was overwritten by a concurrent rotation: the "
            f"data key is now wrapped for key id {current}, not {new_ring.key_id}; run one "
            "rotation at a time",
            shard=KEYRING_NAME,
        )
    logger.info("rotated dataset %s from key id %s to key id %s", store.url, ring.key_id,
                new_ring.key_id)
    return new_ring


def _remote_keyring_blob(store: Any) -> bytes:
    return store.read_small(
        KEYRING_NAME, MAX_KEYRING_NBYTES, label=KEYRING_NAME, error=KeyringError,
        missing_message=f"{KEYRING_NAME} does not exist: {store.url!r} is not an encrypted "
        "dataset root (write one with `lightning-sustain encrypt`)",
    )


def _rewrap(ring: Keyring, old: Any, new: Any, new_uses_password: bool, where: str) -> Keyring:
    """The data key of ``ring`` (opened with ``old``) wrapped for ``new``."""
    data_key = ring.unwrap(ring.master_key(old), where)
    kdf = scrypt_kdf_params() if new_uses_password else {"name": "raw"}
    template = Keyring(ring.dataset_id, "0" * 16, kdf, b"", b"")
    return Keyring.wrap(data_key, template.master_key(new), ring.dataset_id, kdf)


def _rotate_locked(root: Any, old: Any, new: Any, new_uses_password: bool) -> Keyring:
    ring = load_keyring(root)
    new_ring = _rewrap(ring, old, new, new_uses_password, str(root))
    new_ring.save(root)
    logger.info("rotated dataset %s from key id %s to key id %s", root, ring.key_id,
                new_ring.key_id)
    return new_ring


def _atomic_write(path: Path, text: str | bytes) -> Path:
    data = text.encode("utf-8") if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
