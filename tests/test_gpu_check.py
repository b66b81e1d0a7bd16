"""`make gpu-check` without a GPU: its CPU part passes and it says how many GPU checks it skipped; a failed or timed-out
check fails the run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from cli import REPO

from benchmarks import gpu_check

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this runs the GPU checks (make gpu-check)")


def test_cpu_part_passes_and_counts_the_skipped_gpu_checks(tmp_path):
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path), GPU_CHECK_PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    gpu_checks = sum(check.needs_gpu for check in gpu_check.CHECKS)
    assert gpu_checks >= 10
    assert result.stdout.splitlines()[-1] == f"no GPU: {gpu_checks} checks skipped"
    summary = (tmp_path / "gpu_check_cpu" / "summary.md").read_text()
    for name in ("commands", "cpu-tests", "fusion-speed-tiny"):
        assert f"| {name} | passed |" in summary
    assert summary.count("| skipped | 0.0 | no GPU |") == gpu_checks


def test_a_failed_or_timed_out_check_fails_the_run(tmp_path, monkeypatch, capsys):
    def exits_3(ctx: gpu_check.Context) -> str:
        return ctx.run([sys.executable, "-c", "raise SystemExit(3)"])

    def sleeps(ctx: gpu_check.Context) -> str:
        return ctx.run(["bash", "-c", "sleep 60 & wait"])  # a child of the child is killed as well

    checks = [gpu_check.Check("exits-3", False, 30, exits_3), gpu_check.Check("sleeps", False, 1, sleeps),
              gpu_check.Check("on-gpu", True, 30, exits_3)]
    monkeypatch.setattr(gpu_check, "CHECKS", checks)
    monkeypatch.setenv("GPU_CHECK_OUT", str(tmp_path))
    assert gpu_check.main([]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("exits-3: failed: python -c") and "exited 3" in lines[0]
    assert lines[1].startswith("sleeps: failed: timed out") and lines[2] == "on-gpu: skipped: no GPU"
    assert lines[-1] == "no GPU: 1 checks skipped"
