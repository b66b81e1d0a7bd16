"""One run at a time in a job folder: two resumes of the same checkpoint (or a resume of a run still training) would
otherwise interleave their logs and overwrite each other's checkpoint_latest.pth.

The main process holds `job.lock` in its job folder for the whole run: JSON naming the holder (host, pid, start time),
created with O_CREAT|O_EXCL so that of two runs only one creates it, and removed when the run ends (also when it fails;
at the latest when the process exits). A lock left by a process of this host that is no longer alive (killed, out of
memory) is stale and taken over with a warning; a live holder, or one on another host (whose processes cannot be seen
from here), is refused by name.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
from datetime import datetime
from pathlib import Path

from lavis_ademvl.common.cli import RunFailed

LOCK_FILE = "job.lock"


class JobLock:
    """The held lock of a job folder; `release` removes it (if it is still this run's) and may be called again."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text = path, text

    def release(self) -> None:
        with contextlib.suppress(OSError):  # already gone (the folder removed): nothing to release
            if self.path.read_text() == self.text:
                self.path.unlink()


def lock_job_folder(job_dir: Path) -> JobLock:
    """Hold `job_dir` for this process, or RunFailed naming the run that holds it."""
    path = job_dir / LOCK_FILE
    text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "started": datetime.now().isoformat(timespec="seconds")})
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            remove_stale_lock(path)  # returns only when the lock is gone: then try again
        except OSError as error:
            raise RunFailed(f"cannot create the job folder's lock {path}: {error.strerror or error}") from error
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    lock = JobLock(path, text)
    atexit.register(lock.release)  # a run that ends without reaching its own release (LAVIS's train.py, an exception)
    return lock


def remove_stale_lock(path: Path) -> None:
    """Remove `path` if its holder is a dead process of this host; RunFailed if it is (or may be) alive."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return  # released meanwhile
    holder = lock_holder(text)
    if holder is None:
        raise RunFailed(f"the job folder {path.parent} is locked by {path}, which names no holder ({text[:200]!r}): a run "
                        f"is taking it now, or one died while taking it; remove {path} if no run uses the folder")
    host, pid, started = holder
    if host != socket.gethostname() or pid_alive(pid):
        raise RunFailed(f"another run holds the job folder {path.parent}: pid {pid} on {host}, started {started} "
                        f"({path}); two runs in one folder would overwrite each other's checkpoints. Wait for it to end, "
                        f"or remove {path} if that process is not this run's")
    # Moved aside under this process's own name first: of two runs taking over the same stale lock, the second would
    # otherwise remove the lock the first has just created.
    aside = path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if aside.read_text() != text:  # another run took it over first: its lock goes back, and it holds the folder
        os.rename(aside, path)
        raise RunFailed(f"another run has just taken over the job folder {path.parent} ({path})")
    aside.unlink()
    logging.warning("taking over the job folder %s: its lock %s was left by pid %d on %s (started %s), which is no "
                    "longer running", path.parent, path, pid, host, started)


def lock_holder(text: str) -> tuple[str, int, str] | None:
    """(host, pid, start time) of a lock file's text; None if it names no holder (empty, being written, not ours)."""
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("host"), str):
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    return holder["host"], pid, str(holder.get("started"))


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (another user's counts: signalling it is refused, not failed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
