"""Dataset roots in object storage (``s3://``, ``gs://``, ``memory://``, ... via fsspec).

A plain local path (or a ``file://`` URL) keeps the hardened local code path of
:mod:`lightning_sustain.data.format` (regular files only, ``O_NONBLOCK``, ``fstat``, size
caps, directory fsync, ``flock``). Any other URL becomes a :class:`RemoteStore`:

- size caps are applied from the object's size (``fs.info``) before a byte is read;
- frames are fetched with range reads (``fs.cat_file(path, start, end)``) of one frame or
  one read block of adjacent frames (:meth:`SplitReader.iter_frames`, 4 MiB by default),
  never a whole shard larger than that; an optional local cache holds fetched
  *ciphertext* ranges only;
- the filesystem object is created lazily in the process that uses it (DataLoader
  workers each open their own: s3fs/aiohttp are not fork-safe);
- credentials come only from the provider chain (env vars, ``~/.aws``, instance
  metadata): ``storage_options`` holding a secret-like key is refused;
- transient failures (timeouts, connection errors, 5xx) are retried ``retries`` times with
  backoff; every failure is raised as :class:`StorageError` naming the URL, never a
  credential.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from lightning_sustain.data.errors import ShardError

__all__ = [
    "RemoteStore",
    "StorageCredentialsError",
    "StorageError",
    "StorageUnavailableError",
    "as_store",
    "check_storage_options",
    "is_remote",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: storage_options keys refused because they would put a secret into a config
_SECRET_KEY_RE = re.compile(
    r"(secret|password|passwd|token|credential|(^|_)key$|^key|private|session)", re.IGNORECASE
)
#: keys that look secret-like but hold no secret
_ALLOWED_KEYS = {"client_kwargs", "config_kwargs", "s3_additional_kwargs", "endpoint_url",
                 "anon", "use_ssl", "requester_pays", "version_aware", "default_block_size",
                 "region_name", "profile", "project", "cache_regions"}
#: the package providing each common fsspec protocol (named in the error when missing)
_FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                    "abfs": "adlfs", "abfss": "adlfs", "hf": "huggingface_hub"}
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
               "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY")


class StorageError(ShardError):
    """The object store failed (permanent error, or retries exhausted)."""


class StorageUnavailableError(StorageError):
    """The object store cannot be reached (connection refused, DNS, timeouts)."""


class StorageCredentialsError(StorageError, PermissionError):
    """No credentials were found, or they were refused by the store."""


def is_remote(root: Any) -> bool:
    """Whether ``root`` is a :class:`RemoteStore` or a non-``file://`` URL."""
    if isinstance(root, RemoteStore):
        return True
    if isinstance(root, str) and "://" in root:
        return not root.startswith("file://")
    return False


def check_storage_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Refuse secrets in ``storage_options`` (nested dicts included); return a copy.

    Raises:
        ValueError: A key such as ``secret``, ``key``, ``token`` or ``password`` is present.
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"storage_options must be a mapping, got {type(options).__name__}")

    def walk(obj: Mapping[str, Any], where: str) -> None:
        for k, v in obj.items():
            name = str(k)
            if name not in _ALLOWED_KEYS and _SECRET_KEY_RE.search(name):
                raise ValueError(
                    f"storage_options{where}[{name!r}] looks like a credential; credentials "
                    "are never taken from configs: use the provider chain instead (env vars "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials or a "
                    "profile, instance metadata / workload identity)"
                )
            if isinstance(v, Mapping):
                walk(v, f"{where}[{name!r}]")

    walk(options, "")
    return dict(options)


def _scrub(text: str) -> str:
    """Remove credential values known to this process from an error text."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(?i)(signature|credential|x-amz-security-token)=[^&\s'\"]+", r"\1=***",
                  text)[:300]


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError, ValueError, TypeError, ShardError)):
        return False
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.EINVAL, errno.EPERM, errno.EACCES,
                                                   errno.ENOENT):
        return False
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "ClientError"):
        text = str(exc)
        return bool(re.search(r"\b5\d\d\b|InternalError|ServiceUnavailable|SlowDown", text))
    return True  # timeouts, connection errors, 5xx mapped to OSError(EIO)


def _classify(exc: BaseException, url: str, what: str) -> ShardError:
    name = type(exc).__name__
    text = _scrub(str(exc))
    if name in ("NoCredentialsError", "PartialCredentialsError") or \
            "Unable to locate credentials" in text:
        return StorageCredentialsError(
            f"no usable credentials for {url!r} ({what}): set them through the provider chain "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY env vars, ~/.aws/credentials, "
            "AWS_PROFILE, instance metadata); never in a config"
        )
    if isinstance(exc, PermissionError) or re.search(
            r"AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|Forbidden|\b403\b", text):
        return StorageCredentialsError(
            f"access to {url!r} was refused ({what}: {name}): check the credentials the "
            "provider chain yields and the bucket policy"
        )
    if _is_transient(exc):
        return StorageUnavailableError(
            f"object store at {url!r} failed ({what}: {name}: {text}); it is unreachable, "
            "too slow or failing: check the endpoint and network, or raise "
            "storage_timeout_s / storage_retries"
        )
    return StorageError(f"object store at {url!r} refused {what} ({name}: {text})")


class RemoteObject:
    """A shard object opened for range reads (size checked once at open)."""

    def __init__(self, store: RemoteStore, rel: str, size: int, etag: str | None):
        self.store, self.rel, self.size, self.etag = store, rel, size, etag

    def pread(self, nbytes: int, offset: int) -> bytes:
        """Read ``nbytes`` at ``offset`` (one ranged GET; cached ciphertext if enabled)."""
        return self.store.read_range(self.rel, offset, nbytes)


class RemoteStore:
    """A dataset root in object storage, addressed by URL.

    Args:
        url: Root URL (``s3://bucket/prefix``, ``memory://x``, anything fsspec knows).
        storage_options: Extra fsspec arguments (endpoint, region, ``config_kwargs``);
            never credentials (refused, see :func:`check_storage_options`).
        cache_dir: Local directory caching fetched ciphertext ranges (never plaintext).
        timeout_s: Connect/read timeout of one request (applied to s3fs through
            ``config_kwargs`` unless given there).
        retries: Extra attempts after a transient failure.
        retry_backoff_s: First backoff; doubles each attempt.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 cache_dir: str | os.PathLike[str] | None = None, timeout_s: float = 30.0,
                 retries: int = 3, retry_backoff_s: float = 0.2):
        if not isinstance(url, str) or "://" not in url:
            raise ValueError(f"not a URL: {url!r}")
        self.url = url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0]
        self.storage_options = check_storage_options(storage_options)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if not 0 <= int(retries) <= 20:
            raise ValueError(f"retries must be in 0..20, got {retries}")
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.retry_backoff_s = float(retry_backoff_s)
        self._fs: Any = None
        self._pid = -1
        self._base: str | None = None

    # -- identity / pickling --------------------------------------------------------------

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs"], state["_pid"] = None, -1  # each process opens its own filesystem
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- filesystem ---------------------------------------------------------------------

    @property
    def fs(self) -> Any:
        """The fsspec filesystem of this process (created on first use after a fork)."""
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            opts = dict(self.storage_options)
            if self.protocol in ("s3", "s3a"):
                cfg = dict(opts.get("config_kwargs") or {})
                cfg.setdefault("connect_timeout", self.timeout_s)
                cfg.setdefault("read_timeout", self.timeout_s)
                cfg.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
                opts["config_kwargs"] = cfg
            try:
                cls = fsspec.get_filesystem_class(self.protocol)
            except (ImportError, ValueError) as exc:
                package = _FSSPEC_PACKAGES.get(self.protocol)
                hint = (f"install {package} (pip install {package}) to use "
                        f"{self.protocol}:// roots" if package else
                        "install the fsspec implementation of this protocol")
                raise StorageError(
                    f"cannot open {self.url!r}: no fsspec implementation for "
                    f"{self.protocol}:// is installed ({_scrub(str(exc))}); {hint}"
                ) from None
            self._fs = cls(skip_instance_cache=True, **opts)
            if hasattr(self._fs, "retries"):
                self._fs.retries = 1  # s3fs's own retry loop: ours owns retrying
            self._base = cls._strip_protocol(self.url).rstrip("/")
            self._pid = os.getpid()
        return self._fs

    def path(self, rel: str) -> str:
        """Backend path of ``rel`` under the root."""
        _ = self.fs
        return f"{self._base}/{rel}" if rel else str(self._base)

    def display(self, rel: str) -> str:
        """URL of ``rel`` (for messages)."""
        return f"{self.url}/{rel}"

    def _call(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries on transient errors; map failures to our errors."""
        delay = self.retry_backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except ShardError:
                raise
            except Exception as exc:  # noqa: BLE001 - backends raise anything
                if attempt < self.retries and _is_transient(exc):
                    logger.warning("%s of %s failed (%s), retry %d/%d", what,
                                   self.display(rel), type(exc).__name__, attempt + 1,
                                   self.retries)
                    time.sleep(delay)
                    delay *= 2
                    if self._fs is not None and hasattr(self._fs, "invalidate_cache"):
                        self._fs.invalidate_cache()
                    continue
                raise _classify(exc, self.display(rel), what) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def info(self, rel: str) -> dict[str, Any]:
        """Object metadata (``size``, ``type``); ``FileNotFoundError`` if missing."""
        fs = self.fs
        path = self.path(rel)
        return self._call("stat", rel, lambda: fs.info(path))

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` exists."""
        try:
            self.info(rel)
            return True
        except FileNotFoundError:
            return False

    def read_small(self, rel: str, max_nbytes: int, *, label: str, error: type[ShardError],
                   missing: type[ShardError] | None = None,
                   missing_message: str = "does not exist") -> bytes:
        """Read a whole small object (manifest, keyring) with its size checked first."""
        try:
            info = self.info(rel)
        except FileNotFoundError:
            raise (missing or error)(f"{missing_message} ({self.display(rel)})",
                                     shard=label) from None
        if info.get("type", "file") != "file":
            raise error(f"is a {info.get('type')}, not an object; refusing to read it",
                        shard=label)
        size = int(info.get("size") or 0)
        if size > max_nbytes:
            raise error(f"is {size} bytes, more than the {max_nbytes} bytes such a file can "
                        "have; refusing to read it", shard=label)
        fs, path = self.fs, self.path(rel)
        try:
            # an object is immutable: its size from ``info`` bounds the read (one ranged GET)
            data = (self._call("read", rel, lambda: fs.cat_file(path, start=0, end=size))
                    if size else b"")
        except FileNotFoundError:
            raise (missing or error)(f"{missing_message} ({self.display(rel)})",
                                     shard=label) from None
        if len(data) > max_nbytes:
            raise error(f"grew past {max_nbytes} bytes while being read", shard=label)
        return bytes(data)

    def open_object(self, rel: str) -> RemoteObject:
        """Stat a shard object for range reads (``FileNotFoundError`` if missing)."""
        info = self.info(rel)
        if info.get("type", "file") != "file":
            raise IsADirectoryError(rel)
        etag = info.get("ETag") or info.get("etag")
        return RemoteObject(self, rel, int(info.get("size") or 0), etag)

    def read_range(self, rel: str, offset: int, nbytes: int) -> bytes:
        """Ranged read of ``nbytes`` at ``offset`` (through the ciphertext cache)."""
        cached = self._cache_file(rel, offset, nbytes)
        if cached is not None:
            try:
                with open(cached, "rb") as fh:
                    data = fh.read(nbytes + 1)
                if len(data) == nbytes:
                    return data
            except OSError:
                pass
        fs, path = self.fs, self.path(rel)
        data = self._call("range read", rel,
                          lambda: fs.cat_file(path, start=offset, end=offset + nbytes))
        if cached is not None and len(data) == nbytes:
            self._cache_put(cached, data)
        return bytes(data)

    def _cache_file(self, rel: str, offset: int, nbytes: int) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(f"{self.url}\x00{rel}".encode()).hexdigest()[:32]
        return Path(self.cache_dir) / digest / f"{offset}-{nbytes}.ct"

    @staticmethod
    def _cache_put(path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:  # a failing cache never fails training
            logger.warning("ciphertext cache write failed: %s", exc)

    def forget_cached(self, rel: str) -> None:
        """Drop cached ranges of ``rel`` (after an authentication failure)."""
        if self.cache_dir is None:
            return
        import shutil

        digest = hashlib.sha256(f"{self.url}\x00{rel}".encode()).hexdigest()[:32]
        shutil.rmtree(Path(self.cache_dir) / digest, ignore_errors=True)

    def put(self, rel: str, data: bytes) -> None:
        """Write a whole object (one PUT: all or nothing on S3-compatible stores)."""
        fs, path = self.fs, self.path(rel)
        self._call("write", rel, lambda: fs.pipe_file(path, data))

    def upload(self, local: str | os.PathLike[str], rel: str) -> None:
        """Upload a local (ciphertext) file."""
        fs, path = self.fs, self.path(rel)
        self._call("upload", rel, lambda: fs.put_file(os.fspath(local), path))

    def remove(self, rel: str) -> None:
        """Delete an object (missing is fine)."""
        fs, path = self.fs, self.path(rel)
        try:
            self._call("delete", rel, lambda: fs.rm_file(path))
        except FileNotFoundError:
            pass

    def listdir(self, rel: str = "") -> list[tuple[str, str]]:
        """``(name, type)`` of the entries directly under ``rel`` (empty if none)."""
        fs, path = self.fs, self.path(rel)
        try:
            entries = self._call("list", rel, lambda: fs.ls(path, detail=True, refresh=True))
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            out.append((name, e.get("type", "file")))
        return sorted(out)


def as_store(root: Any, storage_options: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
    """``root`` as a :class:`RemoteStore` (URLs) or a local :class:`~pathlib.Path`.

    ``file://`` URLs become local paths (the hardened local code path).
    """
    if isinstance(root, RemoteStore):
        return root
    if isinstance(root, str) and root.startswith("file://"):
        return Path(root[len("file://"):])
    if is_remote(root):
        return RemoteStore(root, storage_options, **kwargs)
    if storage_options:
        check_storage_options(storage_options)
    return Path(root)


def default_remote_audit_path(store: RemoteStore) -> Path:
    """Local audit file for a remote root (an append-only, locked file needs a local disk)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", store.url)[:120]
    digest = hashlib.sha256(store.url.encode()).hexdigest()[:12]
    return Path(base) / "lightning_sustain" / "audit" / f"{name}-{digest}.jsonl"
