"""Files written whole or not at all: checkpoints (runner_ademvl) and evaluation results (`results.save_result`).

`write_atomically` writes to `<file>.partial` and renames it over the file: a rename within one file system is atomic,
so a process killed mid-write never leaves a truncated file, and a failed write (a full disk, a file-size limit, the
folder gone) leaves the previous file as it was and no `.partial` behind.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomically(path: Path, data: bytes | memoryview, what: str) -> None:
    """`data` as the file `path`; a failed write is an OSError `cannot write <what> <path>: <the OS's reason>` (the
    OS's own message names no file: `[Errno 28] No space left on device`)."""
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
        os.replace(partial, path)
    except OSError as error:
        with contextlib.suppress(OSError):  # nothing to remove where the folder itself is gone
            partial.unlink()
        raise OSError(f"cannot write {what} {path}: {error.strerror or error}") from error
