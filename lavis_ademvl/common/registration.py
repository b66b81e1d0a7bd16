"""Registration into LAVIS's process-wide registry that tolerates re-importing our own modules."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from lavis.common.registry import registry

T = TypeVar("T")

KINDS = ("model", "processor", "task", "builder", "runner", "lr_scheduler")


def _qualified_name(obj: object) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def register(kind: str, name: str) -> Callable[[T], T]:
    """Like `registry.register_<kind>(name)`, but re-registering the same class (a module reload) is allowed.

    A different class under a taken name still raises LAVIS's KeyError, so clashes are never hidden.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; choose one of {list(KINDS)}")
    mapping = registry.mapping[f"{kind}_name_mapping"]

    def wrap(obj: T) -> T:
        existing = mapping.get(name)
        if existing is not None and _qualified_name(existing) == _qualified_name(obj):
            mapping[name] = obj
            return obj
        return getattr(registry, f"register_{kind}")(name)(obj)

    return wrap
