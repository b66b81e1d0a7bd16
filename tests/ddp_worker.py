"""Train under torchrun like `python -m lavis_ademvl.train`, then save this rank's trainable weights.

Usage: torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR --cfg-path X.yaml --options ...
"""
import sys

import torch
import torch.distributed as dist

import lavis_ademvl  # noqa: F401
from lavis_ademvl.common.launch import build_runner, finish, parse_args, prepare

out_dir, argv = sys.argv[1], sys.argv[2:]
cfg, task, datasets, model, job_id = prepare(parse_args("DDP test", argv))
build_runner(cfg, task, datasets, model, job_id).train()
torch.save(model.trainable_state_dict(), f"{out_dir}/rank{dist.get_rank()}.pt")
finish()
