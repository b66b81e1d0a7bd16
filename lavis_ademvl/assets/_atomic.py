"""Build an output folder so that it is either absent or complete, never half-written.

Every asset is built in a sibling temporary folder, a JSON marker (`.complete`, holding the build
parameters) is written into it last, and the folder is then renamed onto its final name. A rename within
one file system is atomic, so a folder with a marker is always a finished build, and an interrupted build
leaves only a `.<name>.partial-*` sibling, which a later build removes once its process has gone.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lavis_ademvl.common.job_lock import pid_alive

# How a user without the builders' dependencies (`easy-vqa`, `gguf`) gets them.
# Part of every model asset's build parameters: a folder built under one major version is rebuilt under the other.
TRANSFORMERS_MAJOR = int(importlib.metadata.version("transformers").split(".")[0])
DEMO_EXTRA = 'pip install "lavis-ademvl[demo]" (from a checkout: pip install -e ".[demo]", or make demo)'

MARKER = ".complete"


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    """The parameters a finished build of `out_dir` was made with, or None if it is not a finished build."""
    try:
        return json.loads((Path(out_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_complete(out_dir: Path, params: Mapping[str, Any]) -> bool:
    """True if `out_dir` holds a finished build made with exactly `params`."""
    return read_marker(out_dir) == _normalise(params)


def build_atomically(out_dir: Path, params: Mapping[str, Any], build: Callable[[Path], None]) -> Path:
    """Return `out_dir` at once if it holds a finished build with `params`; else run `build(tmp)` on an
    empty temporary folder and move the result onto `out_dir`.

    A finished build with other parameters is replaced. A non-empty `out_dir` without a marker is not ours
    to delete, so it raises FileExistsError.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    params = _normalise(params)
    if read_marker(out_dir) == params:
        return out_dir
    if out_dir.exists() and read_marker(out_dir) is None and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} exists and is not a finished asset build (no {MARKER} marker); "
            "remove it or choose another output folder"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    # The host and pid in the name let a later build tell an abandoned folder from one still being written.
    tmp = out_dir.parent / f".{out_dir.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, out_dir, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _normalise(params: Mapping[str, Any]) -> dict[str, Any]:
    # A JSON round trip makes tuples lists and keys strings, as they read back from the marker.
    return json.loads(json.dumps(dict(params), sort_keys=True))


def _move_into_place(tmp: Path, out_dir: Path, params: dict[str, Any]) -> None:
    old = None
    if out_dir.exists():
        # An empty folder or an older build with other parameters: set it aside, then swap.
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        # Another process finished the same build first: keep its result.
        if read_marker(out_dir) != params:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_partials(out_dir: Path) -> None:
    """Delete partial builds of `out_dir` left by dead processes on this host (each can be ~0.5 GB)."""
    host = socket.gethostname()
    for path in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        rest = path.name[len(f".{out_dir.name}.partial-") :]
        owner, _, tail = rest.rpartition("-")  # owner = "<host>-<pid>"
        path_host, _, pid = owner.rpartition("-")
        if path_host != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
    for path in out_dir.parent.glob(f".{out_dir.name}.old-*"):
        shutil.rmtree(path, ignore_errors=True)
