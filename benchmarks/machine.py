"""What a benchmark figure was measured on: the CPU kind and its bfloat16 support, threads, versions, git revision.

Timings from an AVX2 CPU (bfloat16 converted in software) and from one with AVX512-BF16 or AMX (bfloat16 in
hardware) are not comparable, so every result records which it came from and the arithmetic path each figure took.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch
import transformers

# The CPU flags that decide how fast float32 and bfloat16 matmuls run.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Environment that sets or binds the math libraries' threads; recorded as found.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_PROC_BIND", "KMP_AFFINITY",
              "GOMP_CPU_AFFINITY")


def cpu_kind(cpuinfo: str | None = None) -> dict:
    """The CPU model and which of RELEVANT_FLAGS it has, from /proc/cpuinfo (or the text given); elsewhere the
    platform's processor name and no flags."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name") or platform.processor() or platform.machine(),
            "flags": [flag for flag in RELEVANT_FLAGS if flag in flags], "logical_cpus": os.cpu_count(),
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def arithmetic_path(dtype: str, device: torch.device, cpu: dict) -> str:
    """How a dtype's matmuls run here: float32 as is; bfloat16 autocast in hardware or converted in software."""
    if device.type == "cuda":
        return f"{dtype} on {torch.cuda.get_device_name(device)}"
    if dtype == "float32":
        return "float32"
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in cpu["flags"]]
    support = f"native ({', '.join(native)})" if native else "emulated (no avx512_bf16 or amx_bf16)"
    return f"{dtype} autocast, {support}" if dtype == "bfloat16" else f"{dtype} autocast"


def git_revision(root: Path) -> dict:
    """The commit checked out at `root` and whether tracked files differ from it; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"rev": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"rev": None, "dirty": None}


def machine() -> dict:
    """This process's machine and software, for a result's record."""
    record = {"cpu": cpu_kind(), "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
              "thread_env": {name: os.environ.get(name) for name in THREAD_ENV}, "python": platform.python_version(),
              "torch": torch.__version__, "transformers": transformers.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name()
    return record


def describe(record: dict) -> str:
    """One line naming the CPU kind, for a table's heading."""
    cpu = record["cpu"]
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in cpu["flags"]]
    kind = ", ".join(native) if native else "no native bfloat16"
    return (f"{cpu['model']} ({' '.join(cpu['flags']) or 'no flags read'}; {kind}), {record['threads']} threads, "
            f"torch {record['torch']}, transformers {record['transformers']}" + (f", {record['gpu']}" if "gpu" in record else ""))
