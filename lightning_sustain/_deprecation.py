"""Renamed arguments: the old name keeps working for a while, with a DeprecationWarning."""

from __future__ import annotations

import warnings
from typing import TypeVar

T = TypeVar("T")


def renamed_argument(owner: str, old: str, old_value: T | None, new: str, new_value: T) -> T:
    """The value to use for an argument renamed from ``old`` to ``new``.

    ``old_value`` (when given, i.e. not ``None``) wins and warns; otherwise ``new_value``.

    Args:
        owner: the class whose argument was renamed, for the message.
        old: the deprecated name.
        old_value: what the caller passed under the old name, ``None`` when not passed.
        new: the current name.
        new_value: what the caller passed (or the default) under the new name.
    """
    if old_value is None:
        return new_value
    warnings.warn(
        f"{owner}({old}=...) is deprecated: use {new}=... instead (the old name will be "
        "removed in a future release).",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value
