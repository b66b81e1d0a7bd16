"""What `python -m lavis_ademvl.train` / `.evaluate` share: LAVIS's root scripts, with our plugin imported.

`prepare(experiment, options)` takes plain values (a config path or in-memory config, key=value overrides) and does
what LAVIS's train.py does before running: config, process group, seeds, logger, task, datasets and model.
"""
from __future__ import annotations

import json
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
from lavis_ademvl.common.data_files import check_dataset_files, unreadable_annotation
from lavis_ademvl.common.dist import broadcast_from_main, init_distributed
from lavis_ademvl.common.run_config import built_checkpoint, check_run_config
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


def prepare(experiment: str | Path | DictConfig, options: Sequence[str] = (), evaluating: bool = False) -> Experiment:
    """Config, process group, seeds, logger, task, datasets and model, as LAVIS's train.py does. `evaluating` (or
    `run.evaluate`): the model is evaluated as built, so it must load a checkpoint (`run_config.built_checkpoint`)."""
    cfg = load_experiment(experiment, options)
    if not cfg.config.get("datasets"):
        raise KeyError(f"{cfg.args.cfg_path}: the config has no `datasets` section")
    run_cfg = cfg.run_cfg
    check_run_config(run_cfg)
    run_cfg.evaluate = bool(run_cfg.get("evaluate", False))
    if evaluating or run_cfg.evaluate:
        built_checkpoint(cfg)
    init_distributed(run_cfg)
    set_model_device(cfg.model_cfg, run_cfg.device, run_cfg.gpu)
    set_model_sharding(cfg.model_cfg, run_cfg)
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
    try:
        datasets = task.build_datasets(cfg)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(unreadable_annotation(cfg.datasets_cfg) or f"a dataset file is not UTF-8 JSON: {error}") from error
    model = task.build_model(cfg)
    uneven = model.uneven_scales() if hasattr(model, "uneven_scales") else []
    if uneven and run_cfg.get("deterministic", False) and run_cfg.device == "cuda":
        raise ValueError(f"run.deterministic: true on CUDA, but the pooled token counts {uneven} (model.down_sample_num, "
                         "model.num_visual_input_tokens) do not divide the patch grid: adaptive pooling has no "
                         "deterministic CUDA backward. Choose counts whose side divides the grid's, e.g. 256, 64, 16")
    warn_if_other_task(getattr(model, "checkpoint_task", None), run_cfg.get("task"), cfg.model_cfg.get("finetuned"))
    return Experiment(cfg, task, datasets, model, job_id)


def set_model_device(model_cfg: DictConfig, device: str, gpu: int = 0) -> None:
    """An ADEM-VL model loads its towers straight onto the run's device (this rank's GPU), and its compute dtype
    follows that device: `model.device`, when the config does not set it; a setting of another kind is an error."""
    if model_cfg.get("arch") != "ademvl":
        return
    run_device = f"cuda:{gpu}" if device == "cuda" else device
    chosen = model_cfg.get("device")
    if chosen in (None, "auto"):
        model_cfg.device = run_device
    elif str(chosen).split(":")[0] != device:
        raise ValueError(f"model.device={chosen!r} but run.device is {device!r}: the model would be built for one "
                         f"device and run on the other; leave model.device unset")


def set_model_sharding(model_cfg: DictConfig, run_cfg: DictConfig) -> None:
    """Under torchrun with `run.distributed_strategy: fsdp`, an ADEM-VL model is built sharded (`model.frozen_sharding`,
    `model.fsdp_shard_size`): its LLM is read shard by shard, never whole on one rank. Without a process group there is
    nothing to shard over: the run is one process holding the whole model, as the log says."""
    if model_cfg.get("arch") != "ademvl" or run_cfg.get("distributed_strategy", "ddp") != "fsdp":
        if model_cfg.get("frozen_sharding") is not None:
            raise ValueError(f"model.frozen_sharding={model_cfg.get('frozen_sharding')!r} is set by "
                             "run.distributed_strategy=fsdp; set that instead")
        return
    if not run_cfg.distributed:
        logging.info("run.distributed_strategy=fsdp in one process (no torchrun): the frozen towers stay whole")
        return
    model_cfg.frozen_sharding = "fsdp"
    model_cfg.fsdp_shard_size = run_cfg.get("fsdp_shard_size")


def warn_if_other_task(checkpoint_task: str | None, task: str | None, checkpoint: str | None) -> None:
    """A checkpoint trained for another task may be a deliberate start (fine-tuning on) or a mix-up: said loudly."""
    if checkpoint_task is not None and checkpoint_task != task:
        logging.warning("model.finetuned=%s was trained for task %r, and this run's task is %r",
                        checkpoint, checkpoint_task, task)


def check_job_file(path: Path | None) -> None:
    """--job-file names a file in a folder that exists: found now, not when it is written after the model is built."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"--job-file {path} is a folder; give the file to write the run's job folder into")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--job-file {path}: its folder {path.parent} does not exist")


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()


def lavis_script(
    command: str, doc: str | None, action: Callable[[Any], Any], evaluating: bool = False
) -> Callable[[list[str] | None], int]:
    """The `main` of a LAVIS root script: --cfg-path, --options and --job-file, `prepare`, then `action(runner)`."""
    parser = tool_parser(command, doc)
    parser.add_argument("--job-file", type=Path, help="write the run's job folder into this file once it is created "
                        "(how a parent process, e.g. ablate, knows which job is its run's)")

    @entry_point
    def main(argv: list[str] | None = None) -> None:
        args = parser.parse_args(argv)
        check_job_file(args.job_file)
        runner = prepare(args.cfg_path, args.options, evaluating).build_runner()
        try:
            if args.job_file is not None and get_rank() == 0:
                args.job_file.write_text(str(Path(runner.output_dir).resolve()))
            action(runner)
        finally:  # also when the run fails; LAVIS's own runners hold no lock
            getattr(runner, "release_job_folder", lambda: None)()
        finish()

    return main
