"""Command line tools: ``keygen``, ``encrypt``, ``verify`` and ``rotate-key``.

Run as ``lightning-sustain <command> ...`` or ``python -m lightning_sustain.data <command>``.
Keys are only ever passed by reference (``--key-env NAME``, ``--key-file PATH`` or
``--key-prompt``); no command prints or logs a key.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from pathlib import Path

from lightning_sustain.data.errors import (
    ConcurrentWriteError,
    DatasetNotFoundError,
    EmptyDatasetError,
    KeyFormatError,
    KeyReferenceError,
    SchemaError,
    ShardError,
    WrongKeyError,
)
from lightning_sustain.data.keys import (
    SCRYPT_N,
    KeyProvider,
    KeyReference,
    MasterKey,
    check_scrypt_params,
    generate_key,
    parse_raw_key,
    rotate_key,
    write_key_file,
)
from lightning_sustain.data.reader import verify_dataset
from lightning_sustain.data.writer import write_csv, write_npz

__all__ = ["main"]

from lightning_sustain.data.storage import StorageError  # noqa: E402

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_INTEGRITY = 1
EXIT_USAGE = 2
_USAGE_ERRORS = (
    StorageError,  # unreachable store, missing credentials: not an integrity failure
    ConcurrentWriteError,
    DatasetNotFoundError,
    EmptyDatasetError,
    KeyFormatError,
    KeyReferenceError,
    SchemaError,
    WrongKeyError,
)


class _PromptProvider(KeyProvider):
    """Secret typed at the terminal; kept in this process only."""

    def __init__(self, prompt: str, confirm: bool = False):
        self._prompt = prompt
        self._confirm = confirm
        self._secret: bytes | None = None

    def get_key(self) -> bytes:
        if self._secret is None:
            first = getpass.getpass(self._prompt)
            if self._confirm and getpass.getpass("repeat: ") != first:
                raise ValueError("the two entries differ")
            self._secret = first.encode("utf-8")
        return self._secret

    def __repr__(self) -> str:
        return "_PromptProvider()"

    def __reduce__(self):
        raise TypeError("a typed secret cannot be pickled")


def _add_key_args(p: argparse.ArgumentParser, prefix: str = "", what: str = "master key",
                  required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument(f"--{prefix}key-env", metavar="NAME",
                   help=f"environment variable holding the {what} (hex/base64) or password")
    g.add_argument(f"--{prefix}key-file", metavar="PATH",
                   help=f"file holding the {what} or password")
    g.add_argument(f"--{prefix}key-prompt", action="store_true",
                   help="type the password (or key) at the terminal")


def _key_ref(args: argparse.Namespace, prefix: str = "", confirm: bool = False) -> KeyReference:
    attr = prefix.replace("-", "_")
    if getattr(args, f"{attr}key_prompt"):
        return KeyReference(provider=_PromptProvider(f"{prefix or 'current '}secret: ", confirm))
    return KeyReference(env=getattr(args, f"{attr}key_env"), file=getattr(args, f"{attr}key_file"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-sustain",
        description="Encrypted shard tools (AES-256-GCM frames, envelope keys).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create a random 256-bit master key file (mode 0600)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", metavar="PATH", help="key file to create")
    g.add_argument("--migrate", metavar="PATH",
                   help="rewrite a key file of the old unmarked format in the lskey1 format")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")

    p = sub.add_parser("encrypt", help="encrypt a CSV or .npz file into one split")
    _add_storage_args(p)
    p.add_argument("--input", required=True, metavar="PATH", help=".csv (header row) or .npz")
    p.add_argument("--root", required=True, metavar="DIR", help="dataset root")
    p.add_argument("--split", default="train", help="split name (default: train)")
    p.add_argument("--label", metavar="COLUMN", help="CSV label column (stored as field y)")
    p.add_argument("--dataset-version", type=int, help="version (default: current + 1)")
    p.add_argument("--password", action="store_true",
                   help="new dataset: the secret is a password (scrypt)")
    p.add_argument("--scrypt-n", type=int, default=SCRYPT_N,
                   help="scrypt cost N for --password (power of two in 2**14..2**18, "
                   "default 2**17)")
    p.add_argument("--frame-kib", type=int, default=64, help="plaintext KiB per frame")
    p.add_argument("--shard-mib", type=int, default=64, help="MiB per shard file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--mask", metavar="SPEC",
                   help="masking rules: JSON/YAML file or inline JSON, e.g. "
                   '\'{"patient_id": "pseudonymise", "age": {"op": "generalise", "width": 10}}\'')
    _add_key_args(p)

    p = sub.add_parser("verify", help="authenticate every frame; report the first bad one")
    _add_storage_args(p)
    p.add_argument("--root", required=True, metavar="DIR", help="dataset root")
    p.add_argument("--split", action="append", help="split to check (repeatable; default all)")
    p.add_argument("--dataset-id", metavar="HEX",
                   help="pin: refuse a root that holds another dataset")
    p.add_argument("--min-version", type=int, metavar="N",
                   help="pin: refuse a dataset older than this dataset version")
    _add_audit_args(p)
    _add_key_args(p)

    p = sub.add_parser("rotate-key", help="rewrap the data key for a new master key")
    p.add_argument("--root", required=True, metavar="DIR", help="dataset root")
    p.add_argument("--new-password", action="store_true", help="the new secret is a password")
    _add_storage_args(p)
    _add_audit_args(p)
    _add_key_args(p)
    _add_key_args(p, prefix="new-", what="new master key")

    p = sub.add_parser("audit", help="show or verify the access-audit trail of a dataset")
    asub = p.add_subparsers(dest="audit_command", required=True)
    a = asub.add_parser("show", help="print the audit records")
    a.add_argument("--root", required=True, metavar="DIR", help="dataset root")
    a.add_argument("--audit-path", metavar="PATH", help="audit file (default: in the root)")
    a.add_argument("--last", type=int, metavar="N", help="only the last N records")
    a.add_argument("--json", action="store_true", help="raw JSON lines")
    a = asub.add_parser("verify", help="check the chain and MACs; exit 1 on any break")
    a.add_argument("--root", required=True, metavar="DIR", help="dataset root")
    a.add_argument("--audit-path", metavar="PATH", help="audit file (default: in the root)")
    a.add_argument("--expect-head", metavar="HASH",
                   help="a head hash noted earlier that must still be in the chain")
    _add_key_args(a, required=False)
    return parser


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", metavar="JSON", default=None,
                   help="fsspec options of a URL --root (s3://bucket/prefix), e.g. "
                   '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'; never '
                   "credentials (use AWS_* env vars, ~/.aws or instance metadata)")


def _storage_options(args: argparse.Namespace) -> dict:
    import json

    raw = getattr(args, "storage_options", None)
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except ValueError:
        raise ValueError("--storage-options is not valid JSON") from None
    if not isinstance(opts, dict):
        raise ValueError("--storage-options must be a JSON object")
    return {"storage_options": opts}


def _add_audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audit-path", metavar="PATH",
                   help="access-audit file (default: access-audit.jsonl in the root)")
    p.add_argument("--purpose", help="why the data is decrypted (recorded in the audit)")


def _audit_kwargs(args: argparse.Namespace) -> dict:
    return {"audit_path": args.audit_path, "audit_context": {"purpose": args.purpose}}


def _audit_main(args: argparse.Namespace) -> int:
    from lightning_sustain.data.audit import audit_key, audit_path_for, read_records, verify_audit
    from lightning_sustain.data.keys import load_keyring

    path = audit_path_for(args.root, args.audit_path)
    if not path.exists():
        raise DatasetNotFoundError(f"no access-audit file at {str(path)!r}", shard=str(path))
    if args.audit_command == "show":
        records = read_records(path)
        start = max(0, len(records) - args.last) if args.last else 0
        for lineno, rec in enumerate(records[start:], start=start + 1):
            if args.json or not isinstance(rec, dict):
                print(rec if isinstance(rec, str) else json.dumps(rec, sort_keys=True))
                continue
            print(
                f"{lineno:>6} {rec.get('start', '?')} {rec.get('action', '?'):<10} "
                f"{rec.get('outcome', '?'):<6} splits={','.join(rec.get('splits') or []) or '-'} "
                f"samples={rec.get('samples')} key={rec.get('key_id')} "
                f"user={rec.get('user')}@{rec.get('host')} pid={rec.get('pid')} "
                f"run={rec.get('run_id') or '-'} purpose={rec.get('purpose') or '-'}"
                + ("" if rec.get("mac") else " [unauthenticated]")
            )
        return EXIT_OK
    keys = {}
    if args.key_env or args.key_file or args.key_prompt:
        ring = load_keyring(args.root)
        from lightning_sustain.data.reader import resolve_data_key

        data_key, ds_id, _ = resolve_data_key(args.root, _key_ref(args))
        keys[ring.dataset_id.hex()] = audit_key(data_key, ds_id)
    report = verify_audit(path, keys, expect_head=args.expect_head)
    for e in report.errors:
        print(f"BROKEN: {e}")
    note = "" if keys else " (no key given: chain checked, MACs not checked)"
    print(
        f"{'OK' if report.ok else 'FAILED'}: {report.records} record(s), "
        f"{report.authenticated} authenticated, {len(report.unauthenticated)} without MAC "
        f"(failed key resolution), {len(report.unchecked)} of other datasets; "
        f"head {report.head}{note}"
    )
    return EXIT_OK if report.ok else EXIT_INTEGRITY


def main(argv: list[str] | None = None) -> int:
    """Run one encrypted-shard command.

    Args:
        argv: Arguments after the program name, e.g. ``["verify", "--root", "d"]``.

    Returns:
        0 on success, 1 when data failed verification, 2 on a usage or key error.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return _run(args)
    except _USAGE_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ShardError as exc:  # the data failed an integrity check
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INTEGRITY
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        if args.migrate:
            ref = KeyReference(file=args.migrate)
            key = parse_raw_key(ref.secret(), ref.describe(), legacy=True)
            path = write_key_file(args.migrate, key, overwrite=True)
            print(f"migrated {path} to the lskey1 format (mode 0600), key id "
                  f"{MasterKey(key).key_id}")
            return EXIT_OK
        key = generate_key()
        path = write_key_file(args.out, key, overwrite=args.force)
        print(f"wrote {path} (mode 0600), key id {MasterKey(key).key_id}")
        return EXIT_OK
    if args.command == "encrypt":
        src = Path(args.input)
        if args.password:
            check_scrypt_params(args.scrypt_n, 8, 1)
        kwargs = dict(
            dataset_version=args.dataset_version,
            password=args.password,
            scrypt_n=args.scrypt_n,
            frame_nbytes=args.frame_kib * 1024,
            shard_nbytes=args.shard_mib * 1024 * 1024,
            progress=not args.no_progress,
            masking=args.mask,
            **_storage_options(args),
        )
        key = _key_ref(args, confirm=args.password)
        if src.suffix.lower() == ".npz":
            if args.label:
                raise ValueError("--label applies to CSV input only")
            result = write_npz(args.root, args.split, src, key, **kwargs)
        elif src.suffix.lower() == ".csv":
            result = write_csv(args.root, args.split, src, key, label_column=args.label, **kwargs)
        else:
            raise ValueError(f"--input must be a .csv or .npz file, got {src.name!r}")
        print(
            f"encrypted {result.num_samples} samples into {result.num_shards} shard(s), "
            f"{result.num_frames} frame(s): {result.root}/{result.split} version "
            f"{result.dataset_version}, key id {result.key_id}; dataset {result.dataset_id} "
            f"now at version {result.generation} (pin: --dataset-id {result.dataset_id} "
            f"--min-version {result.generation})"
        )
        return EXIT_OK
    if args.command == "verify":
        report = verify_dataset(args.root, _key_ref(args), args.split,
                                pin_dataset_id=args.dataset_id,
                                min_dataset_version=args.min_version, **_audit_kwargs(args),
                                **_storage_options(args))
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if not report.ok:
            for e in report.errors:
                print(f"FAILED: {e}")
            first = report.first_error
            where = f"{first.shard} frame {first.frame}" if first is not None else "?"
            print(f"verification failed; first bad: {where}")
            return EXIT_INTEGRITY
        print(
            f"OK: {report.frames} frames in {report.shards} shard(s) of split(s) "
            f"{', '.join(report.splits)} authenticated ({report.samples} samples), "
            f"key id {report.key_id}, dataset {report.dataset_id} version "
            f"{report.dataset_version}"
        )
        return EXIT_OK
    if args.command == "rotate-key":
        ring = rotate_key(
            args.root,
            _key_ref(args),
            _key_ref(args, prefix="new-", confirm=args.new_password),
            new_uses_password=args.new_password,
            **_storage_options(args),
            **_audit_kwargs(args),
        )
        print(f"rotated {args.root}: data key now wrapped for key id {ring.key_id}")
        return EXIT_OK
    if args.command == "audit":
        return _audit_main(args)
    raise AssertionError(args.command)  # pragma: no cover
