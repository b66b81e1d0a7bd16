"""`includes:` for experiment yamls, so a variant states only what differs from its base config.

A yaml may start with `includes: [base.yaml, ...]` (paths relative to the yaml); the bases are merged in order,
then the yaml itself on top. An annotation split set to null (`datasets.X.build_info.annotations.train: null`)
is left out, e.g. so an evaluation config does not need the training files. LAVIS's Config then reads the merged
file as usual.
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


def drop_null_splits(datasets_cfg: DictConfig) -> None:
    """Remove annotation splits set to null (after LAVIS merged its dataset defaults, which list every split)."""
    for dataset in datasets_cfg.values():
        annotations = (dataset.get("build_info") or {}).get("annotations")
        if annotations is not None:
            for split in [s for s, value in annotations.items() if value is None]:
                del annotations[split]


def materialize(path: str | Path) -> str:
    """The path LAVIS should read: `path` itself, or a merged copy when it has includes."""
    if "includes" not in OmegaConf.load(path):
        return str(path)
    merged = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="lavis_ademvl_", delete=False)
    with merged:
        merged.write(OmegaConf.to_yaml(load_with_includes(path)))
    return merged.name
