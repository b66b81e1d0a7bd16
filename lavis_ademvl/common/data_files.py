"""Early, clear errors for local dataset files named in a LAVIS dataset config.

LAVIS's builders treat a missing local annotation path as a URL to download (failing with an obscure urllib
error) and only warn about a missing image folder; this check runs before any dataset is built.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lavis.common.utils import get_cache_path


def _is_remote(path: str) -> bool:
    return "://" in path


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def read_utf8(path: str | Path, what: str) -> str:
    """The text of a dataset file; one that is not UTF-8 is a ValueError naming it (`what`: the kind of file)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise not_utf8(path, what) from error


def not_utf8(path: str | Path, what: str) -> ValueError:
    """The error for a file that is not UTF-8, naming it and its first undecodable line (a decoder reading in chunks
    knows only a position within its chunk)."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                around = line[max(error.start - 20, 0) : error.end + 20]
                return ValueError(f"{what} {path} is not UTF-8 text: line {number} holds {around!r} ({error.reason} "
                                  f"at byte {error.start + 1} of the line); save it as UTF-8")
    return ValueError(f"{what} {path} is not UTF-8 text")


def local_annotation_files(datasets_cfg: Any) -> list[tuple[str, str]]:
    """(config key, path) of every local annotation file of the datasets' configs."""
    files = []
    for name, dataset_cfg in datasets_cfg.items():
        for split, info in ((dataset_cfg.get("build_info") or {}).get("annotations") or {}).items():
            for storage in _as_list(info.get("storage")):
                path = storage if os.path.isabs(storage) else get_cache_path(storage)
                if os.path.isfile(path):
                    files.append((f"datasets.{name}.build_info.annotations.{split}", path))
    return files


def unreadable_annotation(datasets_cfg: Any) -> str | None:
    """'<config key>: <file>: <error>' of the first local annotation file that is not UTF-8 JSON, else None (run
    when building failed on JSON: LAVIS's datasets read their files without saying which one failed)."""
    for key, path in local_annotation_files(datasets_cfg):
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return f"{key}: annotation file {path} is not UTF-8 JSON: {error}"
    return None


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
