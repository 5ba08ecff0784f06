"""Master keys, key references, password keys, envelope wrapping and key rotation.

Envelope scheme: every dataset has a random 256-bit *data key* that encrypts its frames
and manifests. The data key is stored only wrapped (AES-256-GCM) under a key-encryption
key derived with HKDF-SHA256 from the *master key*, in ``<root>/keyring.json``. Rotating
the master key rewraps the data key; no shard is re-encrypted.

A master key is either a raw 256-bit key (32 random bytes from a key file or an
environment variable, as raw bytes, hex or base64) or derived from a password with scrypt
and the salt stored in the keyring. The *key id* is the first 8 bytes of an HKDF output of
the master key: it names a key in messages without revealing anything about it.

Key bytes are held only by :class:`MasterKey` and :class:`DataKey` objects, whose reprs
show the key id only and which refuse to be pickled.
"""

from __future__ import annotations

import abc
import base64
import binascii
import json
import logging
import os
import stat
import tempfile
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
    KeyFormatError,
    KeyReferenceError,
    KeyringError,
    WrongKeyError,
)

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
KEYRING_NAME = "keyring.json"
KEYRING_FORMAT = "lightning-sustain-keyring"
KEYRING_VERSION = 1
# scrypt defaults: 2**17 * 128 * 8 bytes = 128 MiB and ~0.3 s per derivation.
SCRYPT_N = 1 << 17
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_MAX_N = 1 << 22
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
        if len(salt) < 16 or n < 2 or n & (n - 1) or n > _SCRYPT_MAX_N or not 0 < r * p <= 64:
            raise KeyFormatError("scrypt salt/parameters out of range (keyring damaged?)")
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


def generate_key() -> bytes:
    """Return 32 random bytes suitable as a raw master key."""
    return os.urandom(KEY_NBYTES)


def write_key_file(path: str | os.PathLike[str], key: bytes, *, overwrite: bool = False) -> Path:
    """Write a raw key as base64 text to ``path`` with mode 0600, atomically.

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
            fh.write(base64.b64encode(key) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def parse_raw_key(material: bytes, source: str) -> bytes:
    """Parse a 256-bit key given as 32 raw bytes, 64 hex characters or base64.

    Raises:
        KeyFormatError: Naming ``source`` and the size seen, never the material.
    """
    if len(material) == KEY_NBYTES:
        return bytes(material)
    text = material.strip()
    if len(text) == 2 * KEY_NBYTES:
        try:
            return binascii.unhexlify(text)
        except (binascii.Error, ValueError):
            pass
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            raw = decode(text + b"=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            continue
        if len(raw) == KEY_NBYTES:
            return raw
    raise KeyFormatError(
        f"{source} does not hold a 256-bit key ({len(material)} bytes seen): expected 32 raw "
        "bytes, 64 hex characters or base64 of 32 bytes; create one with "
        "`lightning-sustain keygen`"
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
        if self.provider is not None and not callable(getattr(self.provider, "get_key", None)):
            raise KeyReferenceError(
                f"key_provider {type(self.provider).__name__} has no get_key() method"
            )

    def describe(self) -> str:
        """Say where the secret comes from (never the secret)."""
        if self.env is not None:
            return f"environment variable {self.env!r}"
        if self.file is not None:
            return f"key file {str(self.file)!r}"
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
                    "(hex or base64) or the password there"
                )
            return value.encode("utf-8")
        if self.file is not None:
            path = Path(self.file).expanduser()
            try:
                mode = path.stat().st_mode
                data = path.read_bytes()
            except FileNotFoundError:
                raise KeyReferenceError(
                    f"key file {str(path)!r} does not exist; create it with "
                    "`lightning-sustain keygen --out PATH` or fix key_file"
                ) from None
            except OSError as exc:
                raise KeyReferenceError(
                    f"key file {str(path)!r} cannot be read: {exc.strerror}"
                ) from None
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                logger.warning("key file %s is accessible by group/others; chmod 600 it", path)
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
        if isinstance(ref_or_secret, KeyReference):
            secret, source = ref_or_secret.secret(), ref_or_secret.describe()
        else:
            secret, source = ref_or_secret, "the given secret"
        if self.uses_password:
            return MasterKey.from_password(
                secret,
                base64.b64decode(self.kdf["salt"]),
                int(self.kdf["n"]),
                int(self.kdf["r"]),
                int(self.kdf["p"]),
            )
        return MasterKey(parse_raw_key(secret, source))

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
        """Write ``<root>/keyring.json`` atomically."""
        return _atomic_write(Path(root) / KEYRING_NAME, json.dumps(self.to_json(), indent=2))


def scrypt_kdf_params(n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> dict[str, Any]:
    """Fresh scrypt parameters with a random 16-byte salt, as stored in the keyring."""
    return {"name": "scrypt", "salt": base64.b64encode(os.urandom(16)).decode(), "n": n, "r": r,
            "p": p}


def load_keyring(root: str | os.PathLike[str]) -> Keyring:
    """Read and validate ``<root>/keyring.json``.

    Raises:
        KeyringError: If it is missing or malformed.
    """
    path = Path(root) / KEYRING_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyringError(
            f"{str(path)!r} does not exist: {str(root)!r} is not an encrypted dataset root "
            "(write one with `lightning-sustain encrypt`)",
            shard=KEYRING_NAME,
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyringError(f"{str(path)!r} cannot be read: {exc}", shard=KEYRING_NAME) from None
    try:
        doc = json.loads(text)
        if doc.get("format") != KEYRING_FORMAT or doc.get("version") != KEYRING_VERSION:
            raise ValueError("unknown format or version")
        kdf = doc["kdf"]
        if not isinstance(kdf, dict) or kdf.get("name") not in ("raw", "scrypt"):
            raise ValueError("unknown kdf")
        if kdf["name"] == "scrypt":
            base64.b64decode(kdf["salt"], validate=True)
            for k in ("n", "r", "p"):
                if type(kdf[k]) is not int:
                    raise ValueError(f"scrypt {k} must be an integer")
        key_id = doc["key_id"]
        if not isinstance(key_id, str) or len(key_id) != 16:
            raise ValueError("bad key id")
        dataset_id = bytes.fromhex(doc["dataset_id"])
        if len(dataset_id) != 16:
            raise ValueError("bad dataset id")
        nonce = base64.b64decode(doc["wrap"]["nonce"], validate=True)
        wrapped = base64.b64decode(doc["wrap"]["ciphertext"], validate=True)
        if len(nonce) != 12 or len(wrapped) != KEY_NBYTES + 16:
            raise ValueError("bad wrap")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise KeyringError(
            f"{str(path)!r} is malformed ({exc}); restore it from backup", shard=KEYRING_NAME
        ) from None
    return Keyring(dataset_id, key_id, kdf, nonce, wrapped)


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
    ring = load_keyring(root)
    data_key = ring.unwrap(ring.master_key(old), str(root))
    if new_uses_password:
        kdf = scrypt_kdf_params()
        template = Keyring(ring.dataset_id, "0" * 16, kdf, b"", b"")
    else:
        kdf = {"name": "raw"}
        template = Keyring(ring.dataset_id, "0" * 16, kdf, b"", b"")
    new_master = template.master_key(new)
    new_ring = Keyring.wrap(data_key, new_master, ring.dataset_id, kdf)
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
