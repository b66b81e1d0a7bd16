"""Early, clear errors for local dataset files named in a LAVIS dataset config.

LAVIS's builders treat a missing local annotation path as a URL to download (failing with an obscure urllib
error) and only warn about a missing image folder; this check runs before any dataset is built.
"""
from __future__ import annotations

import os
from typing import Any

from lavis.common.utils import get_cache_path


def _is_remote(path: str) -> bool:
    return "://" in path


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def check_dataset_files(datasets_cfg: Any) -> None:
    """Raise FileNotFoundError naming the config key of the first local file or folder that does not exist."""
    for name, dataset_cfg in datasets_cfg.items():
        build_info = dataset_cfg.get("build_info") or {}
        for split, info in (build_info.get("annotations") or {}).items():
            urls, storages = _as_list(info.get("url")), _as_list(info.get("storage"))
            for index, storage in enumerate(storages):
                url = urls[index] if index < len(urls) else None
                storage_path = storage if os.path.isabs(storage) else get_cache_path(storage)
                if os.path.isfile(storage_path) or (url is not None and _is_remote(url)):
                    continue
                if url is not None and os.path.isfile(url):
                    continue
                key = f"datasets.{name}.build_info.annotations.{split}"
                raise FileNotFoundError(f"{key}: annotation file not found: {url or storage_path}")
        images = (build_info.get(dataset_cfg.get("data_type", "images")) or {}) if "annotations" in build_info else {}
        storage = images.get("storage") if hasattr(images, "get") else None
        if storage and not _is_remote(str(storage)):
            path = storage if os.path.isabs(storage) else get_cache_path(storage)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"datasets.{name}.build_info.images.storage: image folder not found: {path}")
