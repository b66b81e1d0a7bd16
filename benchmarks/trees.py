"""Two source trees measured in one run: each in its own benchmark process, driven one request at a time.

The benchmark code is this checkout's in both processes (copied once, so edits during a run change nothing), the
model code each tree's own: a process's PYTHONPATH puts the copy, then its tree, before the installed package. The
processes never run at once: each waits on its stdin while the other is timed.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def export_revision(rev: str, destination: Path) -> str:
    """The files of commit `rev` of this checkout's repository in `destination` (git archive: no worktree to clean
    up, nothing written into .git); returns the full commit id."""
    commit = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(CHECKOUT), "archive", "--format=tar", commit], capture_output=True,
                             check=True).stdout
    destination.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(destination, filter="data")
    return commit


def copy_driver(destination: Path) -> Path:
    """This checkout's benchmarks package alone in `destination`, to head a process's import path."""
    shutil.copytree(CHECKOUT / "benchmarks", destination / "benchmarks",
                    ignore=shutil.ignore_patterns("results", "__pycache__", "*.sh"))
    return destination


def thread_env(threads: int) -> dict[str, str]:
    """Pins the math libraries' threads before torch starts (the process also calls torch.set_num_threads)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


class WorkerSession:
    """A benchmark process over one tree: `--worker CONFIG` builds and warms up its steps, replies once with its
    record, then times one step per line of stdin, replying with a line of JSON each."""

    def __init__(self, label: str, tree: Path, driver: Path, config: dict, python: str, threads: int, log: Path):
        self.label = label
        self.log = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(driver), str(tree)]), **thread_env(threads)}
        with log.open("w") as stderr:
            # cwd = the driver copy: `python -m` puts the working folder first on the import path.
            self.process = subprocess.Popen(
                [python, "-m", "benchmarks.fusion_speed", "--worker", json.dumps(config)], cwd=driver, env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1)
        self.info: dict = self.reply()["ready"]
        self.keys: list[str] = self.info["keys"]

    def reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            tail = "\n".join(self.log.read_text().splitlines()[-20:])
            raise RuntimeError(f"the benchmark process of {self.label} ended (status {self.process.returncode}):\n{tail}")
        return json.loads(line)

    def time(self, key: str) -> float:
        self.process.stdin.write(key + "\n")
        return self.reply()["seconds"]

    def close(self) -> None:
        """Ends the process (end of its stdin), killing it if it does not end within a minute."""
        try:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
