r"""Tamper-evident access audit: one hash-chained, MACed JSONL record per decryption.

Every decryption of a dataset appends one record to an append-only JSONL file (default
``<root>/access-audit.jsonl``, or a path the user chooses): the DataModule's ``setup``,
each pass of a DataLoader worker (or of the main process) over a split, ``verify``,
``rotate-key`` and a reader opened with :func:`~lightning_sustain.data.reader.open_split`
(written when it is closed). A record holds the dataset id and versions, the splits and
shards opened, the key id (never key material), the purpose, the run (Trainer
``log_dir``), a config hash, host, user, pid, rank, worker, start and end time, samples
decrypted, and the outcome.

Chain: ``hash_i = SHA-256(hash_{i-1} || "\n" || canonical JSON of record i without
hash/mac)`` (``hash_{-1}`` = 64 zeros), ``seq_i = i``, and
``mac_i = HMAC-SHA256(K_a, hash_i)`` with ``K_a = HKDF-SHA256(DK, salt=dataset_id,
info="lightning-sustain/v1/audit")``. Editing, deleting or reordering any record breaks
the chain at that point; recomputing the hashes after an edit needs ``K_a`` for every
later MAC. An attempt that fails before the data key is unwrapped (wrong or missing key)
is recorded with ``mac: null``: it is chained but not authenticated.

Concurrency: an append takes an exclusive ``flock`` on the file, reads the last record,
writes one line with one ``write`` on an ``O_APPEND`` descriptor, fsyncs and unlocks, so
DataLoader workers, DDP ranks and separate jobs never interleave or fork the chain. The
record of a pass over a split made in the training process itself (``read`` with
``num_workers=0``, once per epoch) is appended, the same way, by the process's audit
writer thread, so the training loop does not wait for lock, write and disk; the next
audited operation of the process (the next pass, ``setup``, ``verify``, the DataModule's
``teardown``) first waits for it and raises its error if it failed (fail closed one pass
late), and the interpreter joins the writer before the process exits. Every other
record (DataLoader workers' passes included) is appended and fsynced before the call
returns.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import hashlib
import hmac
import inspect
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lightning_sustain.data.errors import ShardError

__all__ = [
    "AUDIT_FILE_NAME",
    "AuditChainError",
    "AuditError",
    "AuditReport",
    "AuditSession",
    "append_record",
    "audit_key",
    "audit_path_for",
    "audited",
    "config_hash",
    "read_records",
    "verify_audit",
]

logger = logging.getLogger(__name__)

AUDIT_FILE_NAME = "access-audit.jsonl"
AUDIT_INFO = b"lightning-sustain/v1/audit"
GENESIS = "0" * 64
#: the process's audit writer (pid, executor) and the records it has not appended yet
_writer: tuple[int, Any] | None = None
_pending: list[Any] = []
_MAX_LINE = 1 << 20

F = TypeVar("F", bound=Callable[..., Any])


class AuditError(ShardError):
    """The audit record could not be written (no decryption proceeds without one)."""


class AuditChainError(ShardError):
    """The audit file's chain is broken: a record was edited, deleted, reordered or forged."""


def audit_key(data_key: Any, dataset_id: bytes) -> bytes:
    """Derive the audit MAC key of a dataset from its data key (never stored)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=dataset_id,
                info=AUDIT_INFO).derive(data_key._key)


def audit_path_for(root: str | os.PathLike[str], audit_path: str | None = None) -> Path:
    """Where records of ``root`` go: ``audit_path`` if given, else next to the dataset.

    For a root in object storage the default is a local file (an append-only, locked
    file needs a local disk): see :func:`~lightning_sustain.data.storage.default_remote_audit_path`.
    """
    if audit_path:
        return Path(audit_path)
    from lightning_sustain.data.storage import as_store, default_remote_audit_path, is_remote

    if is_remote(root):
        return default_remote_audit_path(as_store(root))
    return Path(as_store(root)) / AUDIT_FILE_NAME


def config_hash(*configs: Mapping[str, Any] | None) -> str | None:
    """SHA-256 of the canonical JSON of configuration mappings (e.g. hparams)."""
    parts = [dict(c) for c in configs if c]
    if not parts:
        return None
    blob = json.dumps(parts, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _chain_hash(prev: str, body: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev.encode("ascii") + b"\n" + _canonical(body)).hexdigest()


def _mac(key: bytes, digest_hex: str) -> str:
    return hmac.new(key, bytes.fromhex(digest_hex), hashlib.sha256).hexdigest()


def _last_line(fd: int, size: int) -> tuple[bytes | None, int]:
    """Return the last complete line and the offset where a torn tail starts (or ``size``)."""
    if size == 0:
        return None, 0
    chunk = 4096
    while True:
        start = max(0, size - chunk)
        data = os.pread(fd, size - start, start)
        end = data.rfind(b"\n")
        if end < 0:
            if start == 0:
                return None, 0  # one torn line, nothing complete
            chunk *= 4
            continue
        body_end = start + end  # offset of the last newline
        prev_nl = data.rfind(b"\n", 0, end)
        if prev_nl < 0 and start > 0 and chunk < _MAX_LINE * 4:
            chunk *= 4
            continue
        line = data[prev_nl + 1: end]
        return line, body_end + 1


def append_later(path: str | os.PathLike[str], record: Mapping[str, Any],
                 key: bytes | None) -> None:
    """Append ``record`` from this process's audit writer thread (in submission order)."""
    global _writer
    if _writer is None or _writer[0] != os.getpid():
        from concurrent.futures import ThreadPoolExecutor

        # one thread: records of this process keep their order; joined at interpreter exit
        _writer = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="lss-audit"))
        _pending.clear()  # a fork's copy: the parent's writer appends those
    _pending.append(_writer[1].submit(append_record, path, record, key))


def wait_pending_records() -> None:
    """Wait for this process's background audit appends; raise the first failure.

    Raises:
        AuditError: A record could not be appended (nothing more may be decrypted).
    """
    if _writer is None or _writer[0] != os.getpid():
        return
    while _pending:
        fut = _pending.pop(0)
        exc = fut.exception()
        if exc is not None:
            _pending.clear()
            raise exc


def append_record(path: str | os.PathLike[str], record: Mapping[str, Any],
                  key: bytes | None, *, fsync: bool = True) -> dict[str, Any]:
    """Append one record to the chain in ``path`` under an exclusive file lock.

    Args:
        path: Audit file (created with mode 0600).
        record: Record fields (JSON-serialisable; no ``seq``/``prev``/``hash``/``mac``).
        key: Audit MAC key, or ``None`` when the data key could not be unwrapped.
        fsync: Flush the record to stable storage before unlocking.

    Returns:
        The record as written.

    Raises:
        AuditError: The file cannot be opened, locked, read or written.
    """
    import fcntl

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0),
                     0o600)
    except OSError as exc:
        raise AuditError(
            f"cannot open the access audit file {str(path)!r} ({exc.strerror}); make it "
            "writable or choose another audit_path / --audit-path",
            shard=str(path),
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        line, good_end = _last_line(fd, size)
        if good_end < size:  # a writer died mid-write (we hold the lock): drop the torn tail
            logger.warning("audit file %s: dropping a torn last line (%d bytes)", path,
                           size - good_end)
            os.ftruncate(fd, good_end)
        prev, seq = GENESIS, 0
        if line is not None:
            try:
                last = json.loads(line)
                prev, seq = str(last["hash"]), int(last["seq"]) + 1
            except (ValueError, KeyError, TypeError):
                raise AuditChainError(
                    f"the last record of {str(path)!r} is unreadable; run `lightning-sustain "
                    "audit verify` and restore the file before decrypting",
                    shard=str(path),
                ) from None
        body = {k: v for k, v in record.items() if k not in ("seq", "prev", "hash", "mac")}
        body["seq"], body["prev"] = seq, prev
        digest = _chain_hash(prev, body)
        out = dict(body, hash=digest, mac=None if key is None else _mac(key, digest))
        data = json.dumps(out, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        written = os.write(fd, data)
        if written != len(data):
            os.ftruncate(fd, size if good_end >= size else good_end)
            raise OSError(28, "short write")
        if fsync:
            os.fsync(fd)
        return out
    except OSError as exc:
        raise AuditError(
            f"cannot append to the access audit file {str(path)!r} ({exc.strerror or exc}); "
            "no data is decrypted without an audit record",
            shard=str(path),
        ) from None
    finally:
        os.close(fd)  # releases the lock


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any] | str]:
    """Parse the audit file; an unparsable line is returned as its raw text."""
    out: list[dict[str, Any] | str] = []
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                obj = json.loads(raw)
                out.append(obj if isinstance(obj, dict) else raw.decode("utf-8", "replace"))
            except ValueError:
                out.append(raw.decode("utf-8", "replace"))
    return out


@dataclass
class AuditReport:
    """Result of :func:`verify_audit`.

    Attributes:
        path: Audit file.
        records: Records read.
        authenticated: Records whose MAC was checked and is valid.
        unauthenticated: Line numbers of records without a MAC (failed key resolution).
        unchecked: Line numbers of records of other datasets (no key given for them).
        errors: One line per break in the chain, with its line number.
        head: Hash of the last record (keep it elsewhere to detect a cut-off tail).
    """

    path: str
    records: int = 0
    authenticated: int = 0
    unauthenticated: list[int] = field(default_factory=list)
    unchecked: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    head: str = GENESIS

    @property
    def ok(self) -> bool:
        """Whether the chain is intact and every checkable MAC is valid."""
        return not self.errors


def verify_audit(
    path: str | os.PathLike[str],
    keys: Mapping[str, bytes] | None = None,
    *,
    expect_head: str | None = None,
) -> AuditReport:
    """Check the chain and MACs of an audit file.

    Args:
        path: Audit file.
        keys: Audit MAC key per dataset id (hex), from :func:`audit_key`.
        expect_head: A head hash recorded earlier: it must still be in the chain (detects
            records cut off the end after that point was noted).

    Returns:
        The report; ``report.ok`` is false on any edit, deletion, reordering or forgery.
    """
    keys = dict(keys or {})
    rep = AuditReport(str(path))
    prev = GENESIS
    seen_head = expect_head is None
    for lineno, rec in enumerate(read_records(path), start=1):
        rep.records += 1
        if not isinstance(rec, dict):
            rep.errors.append(f"line {lineno}: not a JSON record (edited or corrupted)")
            prev = "?"
            continue
        body = {k: v for k, v in rec.items() if k not in ("hash", "mac")}
        if rec.get("seq") != lineno - 1:
            rep.errors.append(
                f"line {lineno}: sequence number {rec.get('seq')!r}, expected {lineno - 1} "
                "(a record was deleted, inserted or reordered)")
        if rec.get("prev") != prev:
            rep.errors.append(
                f"line {lineno}: does not link to the record before it (a record was "
                "deleted, inserted, reordered or edited)")
        digest = _chain_hash(str(rec.get("prev")), body)
        if rec.get("hash") != digest:
            rep.errors.append(f"line {lineno}: hash does not match its content (record edited)")
        mac = rec.get("mac")
        key = keys.get(str(rec.get("dataset_id")))
        if mac is None:
            rep.unauthenticated.append(lineno)
        elif key is None:
            rep.unchecked.append(lineno)
        elif not isinstance(mac, str) or not hmac.compare_digest(
                mac, _mac(key, str(rec.get("hash")) if _is_hex64(rec.get("hash")) else GENESIS)):
            rep.errors.append(f"line {lineno}: MAC invalid (record forged or edited)")
        else:
            rep.authenticated += 1
        prev = str(rec.get("hash"))
        if prev == expect_head:
            seen_head = True
    rep.head = prev
    if not seen_head:
        rep.errors.append(
            f"the expected head {expect_head} is not in the chain (records were cut off the "
            "end or the file was replaced)")
    return rep


def _is_hex64(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


# -- sessions --------------------------------------------------------------------------------


class AuditSession:
    """Collects what one decryption touched and appends its record when finished.

    Args:
        root: Dataset root (for the default file and the record).
        action: ``setup``, ``read``, ``verify``, ``rotate-key`` or ``open``.
        audit_path: Audit file (default ``<root>/access-audit.jsonl``).
        context: Purpose/run fields: ``purpose``, ``run_id``, ``log_dir``, ``config_hash``.
    """

    def __init__(self, root: str | os.PathLike[str], action: str, *,
                 audit_path: str | None = None, context: Mapping[str, Any] | None = None):
        self.path = audit_path_for(root, audit_path)
        self.root = str(root)
        self._root_ref = root  # a RemoteStore keeps its storage options for identify()
        self.action = action
        self.context = {k: v for k, v in (context or {}).items() if v is not None}
        self.start = _now()
        self.dataset_id: str | None = None
        self.key_id: str | None = None
        self.versions: dict[str, int] = {}
        self.shards: dict[str, int] = {}
        self.samples_decrypted = 0
        self.samples: int | None = None  # rows handed to the caller, where it counts them
        self.extra: dict[str, Any] = {}
        self.spent_s = 0.0
        self._key: bytes | None = None
        self._done = False
        #: append the record from the process's audit writer thread (see module doc)
        self.background = False
        wait_pending_records()  # fail closed: an earlier pass's record must be in the chain

    def __repr__(self) -> str:
        return f"AuditSession({self.action!r}, path={str(self.path)!r})"

    def __reduce__(self):
        raise TypeError("AuditSession holds the audit key and cannot be pickled")

    def bind(self, data_key: Any, dataset_id: bytes, key_id: str) -> None:
        """Attach the dataset (its data key gives the MAC key; the key itself is not kept)."""
        self.dataset_id, self.key_id = dataset_id.hex(), key_id
        self._key = audit_key(data_key, dataset_id)

    def identify(self, root: str | os.PathLike[str]) -> None:
        """Fill dataset id and key id from the keyring alone (when the key failed)."""
        if self.dataset_id is not None:
            return
        try:
            from lightning_sustain.data.keys import load_keyring

            ring = load_keyring(root)
            self.dataset_id, self.key_id = ring.dataset_id.hex(), ring.key_id
        except Exception:  # noqa: BLE001 - the record still says what failed
            pass

    def split(self, name: str, version: int) -> None:
        """Record that a split's manifest was opened."""
        self.versions[name] = int(version)

    def frame(self, shard: str, num_samples: int) -> None:
        """Record one decrypted frame (called by the reader)."""
        self.shards[shard] = self.shards.get(shard, 0) + 1
        self.samples_decrypted += num_samples

    def rows(self, num_samples: int) -> None:
        """Record samples handed to the caller (less than decrypted at frame boundaries)."""
        self.samples = (self.samples or 0) + num_samples

    def finish(self, exc: BaseException | None = None, outcome: str | None = None) -> None:
        """Append the record (once)."""
        if self._done:
            return
        self._done = True
        t0 = time.perf_counter()
        if exc is not None and self.dataset_id is None:
            self.identify(self._root_ref)
        if outcome is None:
            if exc is None or isinstance(exc, GeneratorExit):
                outcome = "ok"
            else:
                outcome = "error"
        record: dict[str, Any] = {
            "action": self.action,
            "root": self.root,
            "dataset_id": self.dataset_id,
            "dataset_version": self.versions,
            "splits": sorted(self.versions),
            "shards": sorted(self.shards),
            "frames": sum(self.shards.values()),
            "samples": self.samples if self.samples is not None else self.samples_decrypted,
            "samples_decrypted": self.samples_decrypted,
            "key_id": self.key_id,
            "purpose": self.context.get("purpose"),
            "run_id": self.context.get("run_id"),
            "log_dir": self.context.get("log_dir"),
            "config_hash": self.context.get("config_hash"),
            "host": socket.gethostname(),
            "user": _user(),
            "pid": os.getpid(),
            "rank": self.context.get("rank", _int_env("RANK")),
            "worker": self.context.get("worker"),
            "start": self.start,
            "end": _now(),
            "outcome": outcome,
        }
        if exc is not None and not isinstance(exc, GeneratorExit):
            # our errors never carry key material (project rule); keep the message short
            record["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        record.update(self.extra)
        try:
            if self.background:  # a pass in the training process: off its thread
                append_later(self.path, record, self._key)
            else:
                append_record(self.path, record, self._key)
        finally:
            self._key = None
            self.spent_s += time.perf_counter() - t0


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else None


def _int_env(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


@contextlib.contextmanager
def audit_session(root: str | os.PathLike[str], action: str, *, audit_path: str | None = None,
                  context: Mapping[str, Any] | None = None) -> Iterator[AuditSession]:
    """Context manager: the record is appended on exit, with the outcome of the block."""
    session = AuditSession(root, action, audit_path=audit_path, context=context)
    try:
        yield session
    except BaseException as exc:
        try:
            session.finish(exc)
        except AuditError as audit_exc:
            logger.error("%s", audit_exc)
        raise
    session.finish()


def _resolve(root: Any, key: Any, session: AuditSession) -> Any:
    """Key reference -> MasterKey once (no second scrypt), data key bound to the session."""
    from lightning_sustain.data.keys import MasterKey, load_keyring

    ring = load_keyring(root)
    session.dataset_id, session.key_id = ring.dataset_id.hex(), ring.key_id
    master = key if isinstance(key, MasterKey) else ring.master_key(key)
    data_key = ring.unwrap(master, str(root))
    session.bind(data_key, ring.dataset_id, ring.key_id)
    # a password keyring refuses a ready MasterKey: pass the reference on (derived again)
    return key if ring.uses_password else master


def audited(action: str, key_arg: str = "key") -> Callable[[F], F]:
    """Decorate ``fn(root, ..., key, ...)`` so that each call appends an audit record.

    The wrapped function gains keyword arguments ``audit_path``, ``audit_context`` and
    ``storage_options`` (fsspec options of a URL root, never credentials).
    The key (parameter ``key_arg``) is resolved once here and passed on as a
    :class:`MasterKey`. For ``open``, the record is written when the reader is closed.
    """

    def deco(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, audit_path: str | None = None,
                    audit_context: Mapping[str, Any] | None = None,
                    storage_options: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
            from lightning_sustain.data.storage import as_store, is_remote

            bound = sig.bind(*args, **kwargs)
            root = bound.arguments["root"]
            if is_remote(root):  # a URL: one store (fsspec options, no secrets) for the call
                root = bound.arguments["root"] = as_store(root, storage_options)
            session = AuditSession(root, action, audit_path=audit_path, context=audit_context)
            try:
                bound.arguments[key_arg] = _resolve(root, bound.arguments[key_arg], session)
                result = fn(*bound.args, **bound.kwargs)
            except BaseException as exc:
                session.finish(exc)
                raise
            if action == "open":
                session.split(result.split, result.manifest.dataset_version)
                result.audit = session
                return result
            if action == "verify":
                session.samples = result.samples
                session.extra = {"splits": list(result.splits), "frames": result.frames,
                                 "shards_checked": result.shards}
                session.finish(outcome="ok" if result.ok else "failed verification")
            elif action == "rotate-key":
                session.extra = {"new_key_id": result.key_id}
                session.finish()
            else:
                session.finish()
            return result

        return wrapper  # type: ignore[return-value]

    return deco
