"""Run the project's command-line entry points in a subprocess, as a user would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_SQA = REPO / "projects" / "ademvl" / "debug" / "sqa_tiny.yaml"


def run_module(module: str, cfg: Path, options: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", module, "--cfg-path", str(cfg), "--options", *options]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def job_dirs(output_dir: Path) -> list[Path]:
    return sorted(path for path in output_dir.iterdir() if path.is_dir())


def read_jsonl(path: Path) -> list[dict]:
    """One-line JSON records (log.txt also holds the run's indented config, which is skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{") and line.endswith("}")]
