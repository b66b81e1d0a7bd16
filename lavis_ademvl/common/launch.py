"""What `python -m lavis_ademvl.train` / `.evaluate` share: LAVIS's root scripts, with our plugin imported.

`prepare(experiment, options)` takes plain values (a config path or in-memory config, key=value overrides) and does
what LAVIS's train.py does before running: config, process group, seeds, logger, task, datasets and model.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.backends.cudnn as cudnn
import torch.distributed as dist
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank
from lavis.common.logger import setup_logger
from lavis.common.registry import registry
from omegaconf import DictConfig

from lavis_ademvl.common.cli import entry_point, tool_parser
from lavis_ademvl.common.config_files import load_experiment
from lavis_ademvl.common.data_files import check_dataset_files
from lavis_ademvl.common.dist import broadcast_from_main, init_distributed
from lavis_ademvl.common.seeding import seed_everything


@dataclass
class Experiment:
    """Everything a LAVIS runner is built from."""

    cfg: Config
    task: Any
    datasets: dict
    model: Any
    job_id: str

    def build_runner(self) -> Any:
        """The runner named by `run.runner` (LAVIS's own train.py does the same; its evaluate.py does not)."""
        name = self.cfg.run_cfg.get("runner", "runner_base")
        runner_cls = registry.get_runner_class(name)
        if runner_cls is None:
            raise KeyError(f"unknown run.runner {name!r}; registered: {sorted(registry.mapping['runner_name_mapping'])}")
        return runner_cls(cfg=self.cfg, job_id=self.job_id, task=self.task, model=self.model, datasets=self.datasets)


def prepare(experiment: str | Path | DictConfig, options: Sequence[str] = ()) -> Experiment:
    """Config, process group, seeds, logger, task, datasets and model, as LAVIS's train.py does."""
    cfg = load_experiment(experiment, options)
    if not cfg.config.get("datasets"):
        raise KeyError(f"{cfg.args.cfg_path}: the config has no `datasets` section")
    run_cfg = cfg.run_cfg
    run_cfg.evaluate = bool(run_cfg.get("evaluate", False))
    init_distributed(run_cfg)
    seed_everything(int(run_cfg.get("seed", 42)) + get_rank())
    cudnn.benchmark = False
    cudnn.deterministic = True
    if run_cfg.get("deterministic", False):
        # cuBLAS needs a fixed workspace for deterministic matmuls; it must be set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    setup_logger()
    job_id = broadcast_from_main(datetime.now().strftime("%Y%m%d%H%M%S"))
    cfg.pretty_print()

    from lavis import tasks

    task = tasks.setup_task(cfg)
    check_dataset_files(cfg.datasets_cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    return Experiment(cfg, task, datasets, model, job_id)


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()


def lavis_script(module: str, doc: str | None, action: Callable[[Any], Any]) -> Callable[[list[str] | None], int]:
    """The `main` of a LAVIS root script: --cfg-path and --options, `prepare`, then `action(runner)`."""
    parser = tool_parser(module, doc)

    @entry_point
    def main(argv: list[str] | None = None) -> None:
        args = parser.parse_args(argv)
        action(prepare(args.cfg_path, args.options).build_runner())
        finish()

    return main
