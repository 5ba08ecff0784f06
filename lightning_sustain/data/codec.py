"""Pickle-free encoding of samples (dicts of numpy arrays, tensors and scalars).

A dataset has one :class:`Schema`: an ordered list of fields, each with a numpy dtype from
a fixed allow-list and a fixed per-sample shape. A *frame* holds ``n`` samples stored
column by column::

    u32 n (little endian) | pad to 8 | column 0: n * field0.nbytes | pad to 8 | column 1 | ...

Decoding only ever calls :func:`numpy.frombuffer` on a buffer whose exact length was
checked first, so a decoder fed untrusted bytes cannot execute code, allocate more than
the buffer it was given, or return a sample of the wrong shape.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_sustain.data.errors import SampleDecodeError, SchemaError

__all__ = ["FieldSpec", "Schema", "decode_frame", "encode_frame", "frame_nbytes", "to_columns"]

ALLOWED_DTYPES: frozenset[str] = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    }
)
KINDS = ("array", "tensor", "scalar")
MAX_FIELDS = 1024
MAX_NDIM = 8
MAX_RECORD_NBYTES = 1 << 31
_ALIGN = 8


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class FieldSpec:
    """One field of a sample.

    Attributes:
        name: Field name (the key in the sample dict).
        dtype: Numpy dtype name from the allow-list, stored little endian.
        shape: Per-sample shape (``()`` for scalars); fixed for every sample.
        kind: What the writer was given: ``"array"`` (numpy), ``"tensor"`` (torch) or
            ``"scalar"`` (Python/numpy scalar). Batches are always tensors.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str = "array"

    @property
    def nbytes(self) -> int:
        """Bytes one sample of this field occupies."""
        return int(math.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def np_dtype(self) -> np.dtype:
        """The little-endian numpy dtype used on disk."""
        return np.dtype(self.dtype).newbyteorder("<")


@dataclass(frozen=True)
class Schema:
    """Ordered fields of every sample of a dataset, plus optional feature names.

    Attributes:
        fields: The fields, in storage order.
        feature_names: Names of the columns of the feature field (for plots/explanations).
    """

    fields: tuple[FieldSpec, ...]
    feature_names: tuple[str, ...] | None = None

    @property
    def names(self) -> list[str]:
        """Field names in storage order."""
        return [f.name for f in self.fields]

    @property
    def record_nbytes(self) -> int:
        """Bytes one sample occupies (without frame padding)."""
        return sum(f.nbytes for f in self.fields)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable description."""
        return {
            "fields": [
                {"name": f.name, "dtype": f.dtype, "shape": list(f.shape), "kind": f.kind}
                for f in self.fields
            ],
            "feature_names": None if self.feature_names is None else list(self.feature_names),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Schema:
        """Validate and build a schema from its JSON description.

        Raises:
            SchemaError: If anything is out of the allowed ranges.
        """
        if not isinstance(obj, dict) or not isinstance(obj.get("fields"), list):
            raise SchemaError("schema must be an object with a 'fields' list")
        raw_fields = obj["fields"]
        if not 0 < len(raw_fields) <= MAX_FIELDS:
            raise SchemaError(f"schema must have 1..{MAX_FIELDS} fields, has {len(raw_fields)}")
        fields = []
        for raw in raw_fields:
            if not isinstance(raw, dict):
                raise SchemaError("schema field must be an object")
            name, dtype, shape, kind = (raw.get(k) for k in ("name", "dtype", "shape", "kind"))
            if not isinstance(name, str) or not 0 < len(name) <= 128:
                raise SchemaError("schema field name must be a string of 1..128 characters")
            if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
                raise SchemaError(f"field {name!r}: dtype {dtype!r} is not allowed")
            if (
                not isinstance(shape, list)
                or len(shape) > MAX_NDIM
                or not all(type(d) is int and 0 <= d < 1 << 31 for d in shape)
            ):
                raise SchemaError(f"field {name!r}: shape must be a list of <= {MAX_NDIM} sizes")
            if not isinstance(kind, str) or kind not in KINDS:
                raise SchemaError(f"field {name!r}: kind {kind!r} is not one of {KINDS}")
            fields.append(FieldSpec(name, dtype, tuple(shape), kind))
        if len({f.name for f in fields}) != len(fields):
            raise SchemaError("schema field names must be unique")
        feature_names = obj.get("feature_names")
        if feature_names is not None:
            if not isinstance(feature_names, list) or len(feature_names) > 1 << 20 or not all(
                isinstance(n, str) for n in feature_names
            ):
                raise SchemaError("schema feature_names must be a list of strings")
            feature_names = tuple(feature_names)
        schema = cls(tuple(fields), feature_names)
        if not 0 < schema.record_nbytes <= MAX_RECORD_NBYTES:
            raise SchemaError(
                f"a sample must occupy 1..{MAX_RECORD_NBYTES} bytes, not {schema.record_nbytes}"
            )
        return schema


def _as_array(name: str, value: Any) -> tuple[np.ndarray, str]:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise SchemaError(f"field {name!r}: bfloat16 tensors are not supported; cast them")
        return value.detach().cpu().numpy(), "tensor"
    if isinstance(value, np.ndarray):
        return value, "array"
    if isinstance(value, (bool, int, float, complex, np.generic)):
        return np.asarray(value), "scalar"
    raise SchemaError(
        f"field {name!r}: {type(value).__name__} cannot be stored; use numpy arrays, "
        "torch tensors or numeric scalars (strings and objects are not supported)"
    )


def infer_schema(sample: Mapping[str, Any], feature_names: Sequence[str] | None = None) -> Schema:
    """Infer the schema from one sample.

    Python ``int``/``float`` scalars are stored as ``int64``/``float64``.

    Raises:
        SchemaError: If the sample is not a non-empty mapping of supported values.
    """
    if not isinstance(sample, Mapping) or not sample:
        raise SchemaError(
            f"a sample must be a non-empty dict of arrays/tensors/scalars, got {type(sample)}"
        )
    fields = []
    for name, value in sample.items():
        if not isinstance(name, str):
            raise SchemaError(f"sample keys must be strings, got {name!r}")
        arr, kind = _as_array(name, value)
        if arr.dtype.name not in ALLOWED_DTYPES:
            raise SchemaError(
                f"field {name!r}: dtype {arr.dtype} is not supported; allowed: "
                f"{sorted(ALLOWED_DTYPES)}"
            )
        if arr.ndim > MAX_NDIM:
            raise SchemaError(f"field {name!r}: at most {MAX_NDIM} dimensions are supported")
        fields.append(FieldSpec(name, arr.dtype.name, tuple(int(d) for d in arr.shape), kind))
    return Schema.from_json(
        {
            "fields": [
                {"name": f.name, "dtype": f.dtype, "shape": list(f.shape), "kind": f.kind}
                for f in fields
            ],
            "feature_names": None if feature_names is None else list(feature_names),
        }
    )


def to_columns(schema: Schema, samples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Stack samples into one contiguous column per field, checking them against the schema.

    Raises:
        SchemaError: If a sample lacks a field, has an extra one, or a value's shape or
            dtype differs from the schema.
    """
    columns = {}
    names = set(schema.names)
    for sample in samples:
        if set(sample) != names:
            raise SchemaError(
                f"sample has fields {sorted(sample)}, the dataset schema has {sorted(names)}"
            )
    for f in schema.fields:
        arrays = []
        for sample in samples:
            arr, _ = _as_array(f.name, sample[f.name])
            if arr.shape != f.shape:
                raise SchemaError(
                    f"field {f.name!r} has shape {arr.shape} in one sample but {f.shape} in "
                    "the first; every sample must have the same shape per field (pad them)"
                )
            if arr.dtype.name != f.dtype and not np.can_cast(arr.dtype, f.dtype, "same_kind"):
                raise SchemaError(
                    f"field {f.name!r} has dtype {arr.dtype} in one sample but {f.dtype} "
                    "in the first"
                )
            arrays.append(arr)
        columns[f.name] = np.ascontiguousarray(np.stack(arrays).astype(f.np_dtype, copy=False))
    return columns


def frame_nbytes(schema: Schema, n: int) -> int:
    """Size in bytes of the plaintext of a frame holding ``n`` samples."""
    total = _aligned(4)
    for f in schema.fields:
        total = _aligned(total + n * f.nbytes)
    return total


def encode_frame(schema: Schema, columns: Mapping[str, np.ndarray], start: int, stop: int) -> bytes:
    """Encode rows ``start:stop`` of ``columns`` as one frame plaintext."""
    n = stop - start
    out = bytearray(frame_nbytes(schema, n))
    struct.pack_into("<I", out, 0, n)
    pos = _aligned(4)
    for f in schema.fields:
        chunk = np.ascontiguousarray(columns[f.name][start:stop], dtype=f.np_dtype)
        raw = chunk.view(np.uint8).reshape(-1)
        out[pos : pos + raw.size] = raw.tobytes()
        pos = _aligned(pos + raw.size)
    return bytes(out)


def decode_frame(
    schema: Schema,
    buf: bytes | bytearray | memoryview,
    expected_n: int | None = None,
    *,
    shard: str | None = None,
    frame: int | None = None,
) -> dict[str, np.ndarray]:
    """Decode a frame plaintext into read-only column views (no copy).

    Args:
        schema: The dataset schema.
        buf: Frame plaintext.
        expected_n: Sample count the manifest records for this frame, if known.
        shard: Shard name for error messages.
        frame: Frame index for error messages.

    Returns:
        One array of shape ``(n, *field.shape)`` per field, viewing ``buf``.

    Raises:
        SampleDecodeError: If the length, count or values do not fit the schema.
    """
    size = len(buf)
    if size < 4:
        raise SampleDecodeError(f"frame plaintext of {size} bytes is too short", shard=shard,
                                frame=frame)
    (n,) = struct.unpack_from("<I", buf, 0)
    if expected_n is not None and n != expected_n:
        raise SampleDecodeError(
            f"frame holds {n} samples, the manifest records {expected_n}", shard=shard, frame=frame
        )
    if n == 0 or n * schema.record_nbytes > size:
        raise SampleDecodeError(
            f"frame claims {n} samples, which do not fit its {size} bytes", shard=shard,
            frame=frame
        )
    if frame_nbytes(schema, n) != size:
        raise SampleDecodeError(
            f"frame of {size} bytes does not match {n} samples of the schema", shard=shard,
            frame=frame
        )
    out = {}
    pos = _aligned(4)
    for f in schema.fields:
        count = n * int(math.prod(f.shape))
        arr = np.frombuffer(buf, dtype=f.np_dtype, count=count, offset=pos).reshape(n, *f.shape)
        if f.dtype == "bool" and count and arr.view(np.uint8).max() > 1:
            raise SampleDecodeError(f"field {f.name!r} holds a non-boolean byte", shard=shard,
                                    frame=frame)
        out[f.name] = arr
        pos = _aligned(pos + n * f.nbytes)
    return out
