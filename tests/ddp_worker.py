"""Train under torchrun like `python -m lavis_ademvl.train`, then save this rank's trainable weights.

Usage: torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR --cfg-path X.yaml --options ...
"""
import sys

import torch
import torch.distributed as dist

import lavis_ademvl  # noqa: F401
from lavis_ademvl.common.cli import tool_parser
from lavis_ademvl.common.launch import finish, prepare

out_dir, args = sys.argv[1], tool_parser("ddp_worker", __doc__).parse_args(sys.argv[2:])
experiment = prepare(args.cfg_path, args.options)
runner = experiment.build_runner()
runner.train()
torch.save(experiment.model.trainable_state_dict(), f"{out_dir}/rank{dist.get_rank()}.pt")
# What DDP owned, and this rank's frozen weights (DDP no longer broadcasts them: they must be equal by construction).
ddp = runner.model
torch.save(
    {
        "owned": sorted(name for name, _ in ddp.module.named_parameters() if name not in ddp.parameters_to_ignore),
        "frozen": {name: p.detach() for name, p in ddp.module.named_parameters() if not p.requires_grad},
    },
    f"{out_dir}/rank{dist.get_rank()}_ddp.pt",
)
finish()
