"""Masking and pseudonymisation of fields while shards are written.

A *masking spec* maps a field name (a top-level field of the samples, or a named column
of the feature field, e.g. a CSV column) to one rule:

* ``drop``: the field (or feature column) is not stored at all.
* ``pseudonymise``: each value is replaced by a 63-bit token
  ``int64(HMAC-SHA256(K_p, canonical(value))[:8]) & (2**63 - 1)`` with
  ``K_p = HKDF-SHA256(DK, salt=dataset_id, info="lightning-sustain/v1/pseudonymise")``,
  where ``DK`` is the dataset's data key (unwrapped with the master key). The same
  identifier gives the same token in every split and version of one dataset (also after
  a master-key rotation, which keeps ``DK``); different datasets give unlinkable tokens;
  without ``DK`` a token cannot be reversed or recomputed. ``canonical`` is the decimal
  text of an integer (so ``123``, ``123.0`` and ``"123"`` agree), the stripped text of a
  string, ``repr`` of a non-integral float, UTF-8 encoded. A pseudonymised feature column
  leaves the feature matrix and becomes its own ``int64`` field of that name (a token is
  an identifier for joins and grouping, not a numeric feature).
* ``generalise``: numeric bucketing (``width`` and optional ``origin``: the value becomes
  the lower edge ``origin + floor((v - origin) / width) * width``; or ``edges``: the value
  becomes the largest edge ``<= v``, values below the first edge become the first edge),
  or date truncation (``date``: ``year``, ``month``, ``day`` or ``hour``; input in
  seconds since the epoch, or ISO-8601 text in CSV input; output seconds since the epoch
  of the start of the period, UTC).
* ``noise``: additive noise, ``distribution`` ``laplace`` (density
  ``exp(-|x|/scale) / (2 scale)``) or ``gaussian`` (standard deviation ``scale``), drawn
  from ``numpy.random.default_rng([seed, crc32(field name)])`` in sample order. The seed
  is *not* stored (whoever can decrypt must not be able to subtract the noise); give it
  for reproducible output, otherwise a random one is drawn.

The applied rules (never the seed, never key material) are recorded in the authenticated
manifest under ``masking`` and exposed as ``EncryptedShardDataModule.masking``.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lightning_sustain.data.errors import SchemaError

__all__ = [
    "MaskingError",
    "MaskingRule",
    "MaskingSpec",
    "Masker",
    "PSEUDONYM_INFO",
    "load_masking_spec",
    "masked_feature_labels",
    "pseudonym_key",
    "pseudonymise_values",
]

PSEUDONYM_INFO = b"lightning-sustain/v1/pseudonymise"
OPS = ("drop", "pseudonymise", "generalise", "noise")
DATE_UNITS = {"year": "Y", "month": "M", "day": "D", "hour": "h"}
DISTRIBUTIONS = ("laplace", "gaussian")
_TOKEN_MASK = (1 << 63) - 1
_ALIASES = {"pseudonymize": "pseudonymise", "generalize": "generalise", "mask": "drop"}


class MaskingError(SchemaError):
    """A masking spec is malformed or does not fit the data."""


@dataclass(frozen=True)
class MaskingRule:
    """One masking rule for one field.

    Attributes:
        name: Field name or feature-column name.
        op: ``drop``, ``pseudonymise``, ``generalise`` or ``noise``.
        params: Rule parameters (``width``/``origin``, ``edges``, ``date``,
            ``distribution``/``scale``/``seed``).
    """

    name: str
    op: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """What goes into the manifest (the noise seed is left out)."""
        out: dict[str, Any] = {"name": self.name, "op": self.op}
        out.update({k: v for k, v in self.params.items() if k != "seed"})
        if self.op == "pseudonymise":
            out["token"] = "int64 = HMAC-SHA256(HKDF(DK, dataset_id, pseudonymise), value)[:8]"
        return out


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MaskingError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _parse_rule(name: Any, raw: Any) -> MaskingRule:
    if not isinstance(name, str) or not name:
        raise MaskingError(f"masking spec: field name must be a non-empty string, got {name!r}")
    if isinstance(raw, str):
        raw = {"op": raw}
    if not isinstance(raw, Mapping):
        raise MaskingError(
            f"masking rule for {name!r} must be an op name or an object with 'op', got {raw!r}"
        )
    params = dict(raw)
    op = params.pop("op", None)
    op = _ALIASES.get(op, op)
    if op not in OPS:
        raise MaskingError(f"masking rule for {name!r}: op must be one of {OPS}, got {op!r}")
    allowed: dict[str, set[str]] = {
        "drop": set(),
        "pseudonymise": set(),
        "generalise": {"width", "origin", "edges", "date"},
        "noise": {"distribution", "scale", "seed"},
    }
    extra = set(params) - allowed[op]
    if extra:
        raise MaskingError(
            f"masking rule for {name!r} ({op}): unknown parameter(s) {sorted(extra)}; "
            f"allowed: {sorted(allowed[op])}"
        )
    if op == "generalise":
        kinds = [k for k in ("width", "edges", "date") if k in params]
        if len(kinds) != 1:
            raise MaskingError(
                f"masking rule for {name!r} (generalise) needs exactly one of 'width', "
                f"'edges' or 'date', got {kinds or 'none'}"
            )
        if "width" in params:
            if _number(params["width"], f"{name}: width") <= 0:
                raise MaskingError(f"masking rule for {name!r}: width must be > 0")
            params["width"] = float(params["width"])
            params["origin"] = _number(params.get("origin", 0.0), f"{name}: origin")
        elif "origin" in params:
            raise MaskingError(f"masking rule for {name!r}: 'origin' needs 'width'")
        if "edges" in params:
            edges = params["edges"]
            if not isinstance(edges, Sequence) or isinstance(edges, str) or not edges:
                raise MaskingError(f"masking rule for {name!r}: edges must be a non-empty list")
            edges = [_number(e, f"{name}: edge") for e in edges]
            if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
                raise MaskingError(f"masking rule for {name!r}: edges must increase strictly")
            params["edges"] = edges
        if "date" in params and params["date"] not in DATE_UNITS:
            raise MaskingError(
                f"masking rule for {name!r}: date must be one of {sorted(DATE_UNITS)}, got "
                f"{params['date']!r}"
            )
    if op == "noise":
        dist = params.get("distribution", "laplace")
        if dist not in DISTRIBUTIONS:
            raise MaskingError(
                f"masking rule for {name!r}: distribution must be one of {DISTRIBUTIONS}, got "
                f"{dist!r}"
            )
        params["distribution"] = dist
        if "scale" not in params or _number(params["scale"], f"{name}: scale") <= 0:
            raise MaskingError(f"masking rule for {name!r} (noise) needs a scale > 0")
        params["scale"] = float(params["scale"])
        seed = params.get("seed")
        if seed is not None and (type(seed) is not int or seed < 0):
            raise MaskingError(f"masking rule for {name!r}: seed must be an integer >= 0")
    return MaskingRule(name, op, params)


@dataclass(frozen=True)
class MaskingSpec:
    """An ordered set of masking rules, at most one per field.

    Build with :meth:`parse` from ``{"name": "drop", "age": {"op": "generalise",
    "width": 10}}`` or a list of ``{"name": ..., "op": ...}`` objects; a field named
    twice raises :class:`MaskingError`.
    """

    rules: tuple[MaskingRule, ...]

    @classmethod
    def parse(cls, raw: Any) -> MaskingSpec:
        """Validate and build a spec (see the module docstring for the rules).

        Raises:
            MaskingError: Malformed spec, unknown op or parameter, a field masked twice.
        """
        if isinstance(raw, MaskingSpec):
            return raw
        items: list[tuple[Any, Any]]
        if isinstance(raw, Mapping):
            items = list(raw.items())
        elif isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)):
            items = []
            for entry in raw:
                if not isinstance(entry, Mapping) or "name" not in entry:
                    raise MaskingError(
                        f"masking spec list entries must be objects with 'name' and 'op', got "
                        f"{entry!r}"
                    )
                rest = {k: v for k, v in entry.items() if k != "name"}
                items.append((entry["name"], rest))
        else:
            raise MaskingError(
                f"masking spec must be a mapping or a list of rules, got {type(raw).__name__}"
            )
        rules, seen = [], set()
        for name, rule in items:
            if name in seen:
                raise MaskingError(
                    f"field {name!r} is masked twice; give one rule per field"
                )
            seen.add(name)
            rules.append(_parse_rule(name, rule))
        return cls(tuple(rules))

    def rule(self, name: str) -> MaskingRule | None:
        """The rule for ``name``, if any."""
        return next((r for r in self.rules if r.name == name), None)

    def record(self) -> dict[str, Any]:
        """The manifest record of this spec."""
        return {"version": 1, "fields": [r.record() for r in self.rules]}

    def __bool__(self) -> bool:
        return bool(self.rules)


def load_masking_spec(source: str | os.PathLike[str] | Mapping[str, Any] | MaskingSpec) -> (
        MaskingSpec):
    """Read a spec from a JSON or YAML file, a JSON string, or a mapping.

    Raises:
        MaskingError: Unreadable or malformed spec.
    """
    if isinstance(source, (MaskingSpec, Mapping)):
        return MaskingSpec.parse(source)
    text = str(source)
    if text.lstrip().startswith(("{", "[")):
        try:
            return MaskingSpec.parse(json.loads(text))
        except ValueError as exc:
            raise MaskingError(f"masking spec is not valid JSON: {exc}") from None
    path = Path(text)
    try:
        content = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MaskingError(f"cannot read masking spec {text!r}: {exc.strerror}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(content)
        else:
            data = json.loads(content)
    except ValueError as exc:
        raise MaskingError(f"masking spec {text!r} is not valid: {exc}") from None
    return MaskingSpec.parse(data)


# -- operations ------------------------------------------------------------------------------


def pseudonym_key(data_key: Any, dataset_id: bytes) -> bytes:
    """Derive the pseudonymisation key of a dataset from its data key (never stored)."""
    raw = data_key._key  # the DataKey's bytes; the derived key stays in this process
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=dataset_id,
                info=PSEUDONYM_INFO).derive(raw)


def _canonical(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value.strip()
    if isinstance(value, str):
        return value.strip().encode("utf-8")
    if isinstance(value, (bool, np.bool_)):
        return b"1" if value else b"0"
    if isinstance(value, (int, np.integer)):
        return str(int(value)).encode()
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if not math.isfinite(f):
            raise MaskingError(f"cannot pseudonymise the non-finite value {f}")
        return str(int(f)).encode() if f.is_integer() else repr(f).encode()
    raise MaskingError(f"cannot pseudonymise a value of type {type(value).__name__}")


def pseudonymise_values(key: bytes, values: np.ndarray) -> np.ndarray:
    """Return the ``int64`` token of every element of ``values`` (same shape)."""
    flat = np.asarray(values).reshape(-1)
    digest = hmac.digest
    if flat.dtype.kind in "iu":
        msgs: Any = np.char.encode(flat.astype(str), "ascii").tolist()
    elif flat.dtype.kind == "U":
        msgs = np.char.encode(np.char.strip(flat), "utf-8").tolist()
    else:
        msgs = [_canonical(v) for v in flat.tolist()]
    packed = b"".join([digest(key, m, "sha256")[:8] for m in msgs])
    out = np.frombuffer(packed, dtype=">i8").astype(np.int64) & _TOKEN_MASK
    return out.reshape(np.shape(values))


def _to_float(values: np.ndarray, name: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise MaskingError(
            f"field {name!r} holds non-numeric values; only 'pseudonymise', 'drop' or "
            "generalise with 'date' accept text"
        ) from None


def _truncate_date(values: np.ndarray, unit: str, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.dtype.kind in "USO":
        try:
            t = np.asarray(a, dtype="datetime64[s]")
        except (TypeError, ValueError):
            raise MaskingError(
                f"field {name!r}: cannot parse dates (use ISO 8601, e.g. 2024-05-17 or "
                "2024-05-17T13:45:00)"
            ) from None
    else:
        f = _to_float(a, name)
        if not np.isfinite(f).all():
            raise MaskingError(f"field {name!r}: a timestamp is not finite")
        t = f.astype(np.int64).astype("datetime64[s]")
    return t.astype(f"datetime64[{DATE_UNITS[unit]}]").astype("datetime64[s]").astype(
        np.float64)


def _cast_back(result: np.ndarray, like: np.ndarray) -> np.ndarray:
    if like.dtype.kind in "iu":
        return np.rint(result).astype(like.dtype)
    if like.dtype.kind == "f":
        return result.astype(like.dtype)
    return result


class Masker:
    """Applies a :class:`MaskingSpec` to the columns a writer is given.

    Args:
        spec: The rules.
        pseudonym_key: Key for ``pseudonymise`` (from :func:`pseudonym_key`).
    """

    def __init__(self, spec: MaskingSpec, pseudonym_key: bytes | None):
        self.spec = spec
        self._key = pseudonym_key
        self._rngs: dict[str, np.random.Generator] = {}
        self._checked = False
        for r in spec.rules:
            if r.op == "noise":
                seed = r.params.get("seed")
                if seed is None:
                    seed = int.from_bytes(os.urandom(8), "little")
                self._rngs[r.name] = np.random.default_rng(
                    [seed, zlib.crc32(r.name.encode("utf-8"))])

    def __repr__(self) -> str:
        return f"Masker({[(r.name, r.op) for r in self.spec.rules]})"

    def __reduce__(self):
        raise TypeError("Masker holds the pseudonymisation key and cannot be pickled")

    def _check(self, fields: Sequence[str], features: Sequence[str] | None) -> None:
        if self._checked:
            return
        known = set(fields) | set(features or ())
        unknown = [r.name for r in self.spec.rules if r.name not in known]
        if unknown:
            raise MaskingError(
                f"masking spec names unknown field(s) {unknown}; fields are {list(fields)}"
                + (f", feature columns are {list(features)}" if features else "")
            )
        clash = [r.name for r in self.spec.rules if r.name in fields and r.name in (
            features or ())]
        if clash:
            raise MaskingError(f"{clash} name both a field and a feature column; rename one")
        self._checked = True

    def _op(self, rule: MaskingRule, values: np.ndarray) -> np.ndarray:
        p = rule.params
        if rule.op == "pseudonymise":
            if self._key is None:
                raise MaskingError("pseudonymise needs the dataset's data key")
            return pseudonymise_values(self._key, values)
        if rule.op == "generalise":
            if "date" in p:
                return _truncate_date(values, p["date"], rule.name)
            f = _to_float(values, rule.name)
            if "width" in p:
                out = p["origin"] + np.floor((f - p["origin"]) / p["width"]) * p["width"]
            else:
                edges = np.asarray(p["edges"])
                idx = np.clip(np.searchsorted(edges, f, side="right") - 1, 0, len(edges) - 1)
                out = edges[idx]
            return _cast_back(out, np.asarray(values))
        if rule.op == "noise":
            f = _to_float(values, rule.name)
            rng = self._rngs[rule.name]
            if p["distribution"] == "laplace":
                draw = rng.laplace(0.0, p["scale"], size=f.shape)
            else:
                draw = rng.normal(0.0, p["scale"], size=f.shape)
            return _cast_back(f + draw, np.asarray(values))
        raise AssertionError(rule.op)  # pragma: no cover

    def apply(
        self,
        columns: Mapping[str, np.ndarray],
        feature_names: Sequence[str] | None,
        feature_field: str | None = None,
    ) -> tuple[dict[str, np.ndarray], list[str] | None]:
        """Mask one batch of columns (leading axis = sample).

        Args:
            columns: One array per field.
            feature_names: Names of the last axis of ``feature_field``'s samples.
            feature_field: Field whose columns ``feature_names`` name (default: the one
                2-D field whose width equals ``len(feature_names)``).

        Returns:
            ``(masked columns, feature names after masking)``.

        Raises:
            MaskingError: Unknown names, or values a rule cannot handle.
        """
        cols = {k: np.asarray(v) for k, v in columns.items()}
        names = list(feature_names) if feature_names is not None else None
        if names is not None and feature_field is None:
            cand = [k for k, a in cols.items() if a.ndim == 2 and a.shape[1] == len(names)]
            feature_field = cand[0] if len(cand) == 1 else None
        self._check(list(cols), names if feature_field is not None else None)
        keep_feature: list[int] | None = None
        for rule in self.spec.rules:
            if rule.name in cols:
                if rule.op == "drop":
                    del cols[rule.name]
                else:
                    cols[rule.name] = self._op(rule, cols[rule.name])
                continue
            assert names is not None and feature_field is not None
            j = names.index(rule.name)
            if keep_feature is None:
                keep_feature = list(range(len(names)))
            if rule.op in ("drop", "pseudonymise"):
                keep_feature.remove(j)
                if rule.op == "pseudonymise":
                    cols[rule.name] = self._op(rule, cols[feature_field][:, j])
                continue
            x = cols[feature_field]
            if not x.flags.writeable or x is columns.get(feature_field):
                x = x.copy()
            x[:, j] = self._op(rule, x[:, j])
            cols[feature_field] = x
        if keep_feature is not None and names is not None and feature_field is not None:
            if len(keep_feature) != len(names):
                if not keep_feature:
                    raise MaskingError(
                        f"masking removes every column of field {feature_field!r}; drop the "
                        "field instead"
                    )
                cols[feature_field] = np.ascontiguousarray(cols[feature_field][:, keep_feature])
                names = [names[i] for i in keep_feature]
        if not cols:
            raise MaskingError("masking drops every field; nothing would be stored")
        return cols, names


def masked_feature_labels(
    feature_names: Sequence[str], masking: Mapping[str, Any] | None
) -> list[str]:
    """Feature names with masked ones marked, e.g. ``age [generalised]``.

    For SHAP plots and reports: a feature whose values were generalised or noised at
    encryption time is named as such so its attributions are not read as raw-data effects.
    """
    ops = {r["name"]: r["op"] for r in (masking or {}).get("fields", [])}
    tag = {"generalise": "generalised", "noise": "noised", "pseudonymise": "pseudonymised"}
    return [f"{n} [{tag[ops[n]]}]" if ops.get(n) in tag else n for n in feature_names]


def validate_record(obj: Any) -> dict[str, Any] | None:
    """Check the shape of a manifest masking record (already authenticated)."""
    if obj is None:
        return None
    if (
        not isinstance(obj, dict)
        or obj.get("version") != 1
        or not isinstance(obj.get("fields"), list)
        or not all(isinstance(f, dict) and isinstance(f.get("name"), str)
                   and f.get("op") in OPS for f in obj["fields"])
    ):
        raise MaskingError("manifest masking record is malformed")
    return obj
