"""Checks of configuration values that name the key at fault and what it accepts.

Every component validates its own section with these, so an error reads the same wherever it comes from:
`fusion='late' is not supported; choose one of ['adem', 'prefix', 'none']`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise a ValueError naming the option, the bad value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


def check_known_keys(section: str, keys: Iterable[str], known: Iterable[str]) -> None:
    """Raise a KeyError listing the keys of `section` that are not `known`, and the known ones."""
    known = set(known)
    unknown = sorted(set(keys) - known)
    if unknown:
        raise KeyError(f"unknown {section} config key(s) {unknown}; known keys: {sorted(known)}")


def check_fraction(name: str, value: float) -> None:
    """Raise a ValueError unless 0 <= value < 1."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value} must be in [0, 1)")


def checked_number(name: str, value: Any, kind: type, minimum: float | None = None, maximum: float | None = None) -> Any:
    """`value` as a `kind` (bool, int or float), else a ValueError naming the key: a string, NaN or inf, a fraction
    for an int, or anything but true/false for a bool is refused, and so is a value below `minimum` or above
    `maximum`."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
        kind is int and not float(value).is_integer()
    ):
        raise ValueError(f"{name}={value!r} must be {'an integer' if kind is int else 'a finite number'}")
    value = kind(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} must be at most {maximum}")
    return value
