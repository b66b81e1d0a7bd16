"""`cpu_dtype: auto`: the arithmetic of the frozen towers on CPU (float32, or bfloat16 under autocast), chosen by
measurement rather than assumed from the CPU's flags.

bfloat16 pays only on a CPU that computes it natively (its flags list AVX512-BF16 or AMX-BF16; elsewhere it is
emulated, several times slower), and not even on every such CPU: on an Intel Xeon with AVX512-BF16 the demo trained
1.5x slower in bfloat16 than in float32 (issue #37). So `auto` is bfloat16 only where the CPU lists those flags and a
step shaped like the demo's training step (a frozen linear layer's forward and backward, 576 -> 1536 features over 96
tokens: SmolLM2-135M's MLP, two demo questions) runs at least BF16_MIN_SPEEDUP times faster under bfloat16 autocast
than in float32; else float32. The measurement (a second or so) is made once per CPU model, thread count and torch
version and kept in the asset cache (`cpu_dtype.json` in `$LAVIS_ADEMVL_CACHE`, default `~/.cache/lavis_ademvl`), so
every later run on the machine makes the same choice; delete the file to measure again.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lavis_ademvl.common.atomic_files import write_atomically

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# bfloat16 must be clearly faster: it rounds every product to 8 significant bits, and a tie is not worth that.
BF16_MIN_SPEEDUP = 1.2
MEASURE_SHAPE = {"tokens": 96, "in_features": 576, "out_features": 1536}  # SmolLM2-135M's MLP, 2 demo questions
MEASURE_REPEATS = 5
CACHE_FILE = "cpu_dtype.json"


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo); empty when they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else the machine type (`platform.machine()`)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return os.uname().machine


def cpu_has_native_bfloat16(cpuinfo: Path = CPUINFO) -> bool:
    """True when the CPU flags list AVX512-BF16 or AMX-BF16 (Linux); False when they cannot be read."""
    return any(flag in cpu_flags(cpuinfo) for flag in NATIVE_BF16_FLAGS)


def measure_step_seconds(repeats: int = MEASURE_REPEATS) -> dict[str, float]:
    """Median seconds of one frozen linear layer's forward and backward (to its input, as the frozen towers pass
    gradients to the trainable modules) in float32 and under bfloat16 autocast, the two timed in turn."""
    generator = torch.Generator().manual_seed(0)
    shape = MEASURE_SHAPE
    inputs = torch.randn(shape["tokens"], shape["in_features"], generator=generator)
    weight32 = torch.randn(shape["out_features"], shape["in_features"], generator=generator) * 0.02
    weights = {"float32": weight32, "bfloat16": weight32.to(torch.bfloat16)}  # the towers are loaded in their dtype

    def step(dtype: str) -> float:
        x = inputs.clone().requires_grad_()
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = F.silu(F.linear(x, weights[dtype]))
        out.float().square().mean().backward()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {dtype: [] for dtype in weights}
    for index in range(repeats + 1):
        for dtype in weights:
            seconds = step(dtype)
            if index:  # the first of each is warm-up (allocations, kernel selection)
                times[dtype].append(seconds)
    return {dtype: statistics.median(values) for dtype, values in times.items()}


def choose_cpu_dtype(native_bf16: bool, seconds: dict[str, float] | None) -> tuple[torch.dtype, str]:
    """The decision of `auto` and why, from the CPU's native bfloat16 support and the measured step `seconds`
    (float32 and bfloat16; None where not measured, as on a CPU without native bfloat16)."""
    if not native_bf16:
        return torch.float32, "the CPU lists neither AVX512-BF16 nor AMX-BF16, so bfloat16 would be emulated"
    if seconds is None:
        raise ValueError("a CPU with native bfloat16 needs the measured step seconds to choose")
    speedup = seconds["float32"] / seconds["bfloat16"]
    measured = (f"a frozen linear step measured {seconds['bfloat16'] * 1e3:.1f} ms in bfloat16 against "
                f"{seconds['float32'] * 1e3:.1f} ms in float32 ({speedup:.2f}x)")
    if speedup >= BF16_MIN_SPEEDUP:
        return torch.bfloat16, f"the CPU has native bfloat16 and {measured}"
    return torch.float32, f"the CPU has native bfloat16, but {measured}, under the {BF16_MIN_SPEEDUP}x it takes"


def measured_seconds(cache_file: Path, cpuinfo: Path = CPUINFO) -> dict[str, float]:
    """`measure_step_seconds` for this CPU model, thread count and torch version: read from `cache_file` when it
    holds them, else measured now and added to it (a file that cannot be written only costs a new measurement)."""
    key = f"{cpu_model(cpuinfo)} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = measure_step_seconds()
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(cache_file, (json.dumps(cached, indent=1, sort_keys=True) + "\n").encode(), "the cpu_dtype cache")
        except OSError as error:
            logging.warning("cpu_dtype auto: %s", error)
    return cached[key]


def auto_cpu_dtype(cpuinfo: Path = CPUINFO, cache_file: Path | None = None) -> tuple[torch.dtype, str]:
    """`cpu_dtype: auto` resolved on this CPU, with the reason (module docstring); `cache_file` defaults to
    CACHE_FILE in the asset cache."""
    native = cpu_has_native_bfloat16(cpuinfo)
    if not native:
        return choose_cpu_dtype(False, None)
    if cache_file is None:
        from lavis_ademvl.assets import default_cache_dir

        cache_file = default_cache_dir() / CACHE_FILE
    return choose_cpu_dtype(True, measured_seconds(cache_file, cpuinfo))


def describe_cpu_dtype(
    cpu_dtype: str, cpuinfo: Path = CPUINFO, cache_file: Path | None = None
) -> tuple[torch.dtype, str]:
    """The dtype a `model.cpu_dtype` setting computes in on this CPU, and a line saying why, naming the CPU."""
    cpu = cpu_model(cpuinfo)
    if cpu_dtype == "auto":
        dtype, reason = auto_cpu_dtype(cpuinfo, cache_file)
        return dtype, f"{str(dtype).removeprefix('torch.')}, chosen by model.cpu_dtype=auto on this CPU ({cpu}): {reason}"
    native = "has" if cpu_has_native_bfloat16(cpuinfo) else "lacks"
    return getattr(torch, cpu_dtype), f"{cpu_dtype}, set by model.cpu_dtype (this CPU, {cpu}, {native} native bfloat16)"
