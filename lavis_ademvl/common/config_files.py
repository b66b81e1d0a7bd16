"""`includes:` for experiment yamls, so a variant states only what differs from its base config.

A yaml may start with `includes: [base.yaml, ...]` (paths relative to the yaml); the bases are merged in order,
then the yaml itself on top. LAVIS's Config then reads the merged file as usual.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def load_with_includes(path: str | Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path in _seen:
        raise ValueError(f"config includes form a cycle: {' -> '.join(map(str, _seen + (path,)))}")
    config = OmegaConf.load(path)
    includes = config.pop("includes", None) or []
    merged = OmegaConf.create()
    for include in includes:
        merged = OmegaConf.merge(merged, load_with_includes(path.parent / include, _seen + (path,)))
    return OmegaConf.merge(merged, config)


def materialize(path: str | Path) -> str:
    """The path LAVIS should read: `path` itself, or a merged copy when it has includes."""
    if "includes" not in OmegaConf.load(path):
        return str(path)
    merged = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="lavis_ademvl_", delete=False)
    with merged:
        merged.write(OmegaConf.to_yaml(load_with_includes(path)))
    return merged.name
