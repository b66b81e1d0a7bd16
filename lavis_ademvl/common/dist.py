"""Process-group setup for CPU (gloo) and GPU (nccl) runs, single-process or under torchrun."""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from lavis.common.dist_utils import setup_for_distributed

from lavis_ademvl.common.run_config import dist_timeout_minutes

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, key: str = "run.device") -> str:
    """`auto` picks CUDA when present; asking for CUDA without a GPU is an error naming `key`, not a silent CPU run."""
    if name not in DEVICES:
        raise ValueError(f"{key}={name!r} is not supported; choose one of {list(DEVICES)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}=cuda but no CUDA device is visible; use {key}=cpu or auto")
    return name


def init_distributed(run_cfg: Any) -> None:
    """Fill run_cfg.device/distributed/gpu; join the process group when launched by torchrun (RANK is set)."""
    run_cfg.device = resolve_device(run_cfg.get("device", "auto"))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        run_cfg.distributed = False
        run_cfg.gpu = 0
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if run_cfg.device == "cuda" else "gloo"
    if run_cfg.device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend,
        init_method=run_cfg.get("dist_url", "env://"),
        world_size=world_size,
        rank=rank,
        timeout=datetime.timedelta(minutes=dist_timeout_minutes(run_cfg, backend)),
    )
    run_cfg.distributed = True
    run_cfg.gpu = local_rank
    run_cfg.world_size = world_size
    dist.barrier()
    setup_for_distributed(rank == 0)


def broadcast_from_main(value: Any) -> Any:
    """rank 0's value on every rank (e.g. the job id, so all ranks write to one folder)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
