"""Checks of configuration values that name the key at fault and what it accepts.

Every component validates its own section with these, so an error reads the same wherever it comes from:
`fusion='late' is not supported; choose one of ['adem', 'prefix', 'none']`.
"""
from __future__ import annotations

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
