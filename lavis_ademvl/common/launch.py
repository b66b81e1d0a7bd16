"""What `python -m lavis_ademvl.train` / `.evaluate` share: LAVIS's root scripts, with our plugin imported."""
from __future__ import annotations

import argparse
import logging
from datetime import datetime
from typing import Any

import torch.backends.cudnn as cudnn
import torch.distributed as dist
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank
from lavis.common.logger import setup_logger
from lavis.common.registry import registry

from lavis_ademvl.common.config_files import drop_null_splits, materialize
from lavis_ademvl.common.data_files import check_dataset_files
from lavis_ademvl.common.dist import broadcast_from_main, init_distributed
from lavis_ademvl.runners.runner_ademvl import seed_everything


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to the configuration yaml")
    parser.add_argument(
        "--options",
        nargs="+",
        help="override settings in the yaml, as key=value pairs, e.g. run.max_epoch=5",
    )
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Config, Any, dict, Any, str]:
    """Config, process group, seeds, logger, task, datasets and model, as LAVIS's train.py does."""
    args.cfg_path = materialize(args.cfg_path)
    cfg = Config(args)
    drop_null_splits(cfg.datasets_cfg)
    run_cfg = cfg.run_cfg
    run_cfg.evaluate = bool(run_cfg.get("evaluate", False))
    init_distributed(run_cfg)
    seed_everything(int(run_cfg.get("seed", 42)) + get_rank())
    cudnn.benchmark = False
    cudnn.deterministic = True
    setup_logger()
    job_id = broadcast_from_main(datetime.now().strftime("%Y%m%d%H%M%S"))
    cfg.pretty_print()

    from lavis import tasks

    task = tasks.setup_task(cfg)
    check_dataset_files(cfg.datasets_cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    return cfg, task, datasets, model, job_id


def build_runner(cfg: Config, task: Any, datasets: dict, model: Any, job_id: str) -> Any:
    name = cfg.run_cfg.get("runner", "runner_base")
    runner_cls = registry.get_runner_class(name)
    if runner_cls is None:
        raise KeyError(f"unknown run.runner {name!r}; registered: {sorted(registry.mapping['runner_name_mapping'])}")
    return runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
