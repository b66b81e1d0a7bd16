"""The `run:` section of an experiment: the keys runner_ademvl knows, and the type and range of its numbers.

`check_run_config` runs before anything is built (`launch.prepare`) and again in the runner (also when LAVIS's own
train.py starts it), so a wrongly typed or out-of-range value is an error naming the key, not a crash mid-run or a
run that silently trains nothing.
"""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from lavis_ademvl.common.validation import check_known_keys, checked_number

RUNNER = "runner_ademvl"
RUN_KEYS = frozenset(
    {
        # LAVIS 1.0.2 runner and task keys
        "task", "runner", "lr_sched", "init_lr", "min_lr", "warmup_lr", "warmup_steps", "lr_decay_rate",
        "weight_decay", "beta2", "max_epoch", "max_iters", "iters_per_inner_epoch", "batch_size_train",
        "batch_size_eval", "num_workers", "accum_grad_iters", "seed", "output_dir", "amp", "resume_ckpt_path",
        "evaluate", "train_splits", "valid_splits", "test_splits", "train_dataset_ratios", "device", "world_size",
        "dist_url", "distributed", "gpu", "rank", "dist_backend", "log_freq", "use_dist_eval_sampler",
        "max_len", "min_len", "num_beams", "num_ans_candidates", "inference_method", "prompt", "report_metric",
        # runner_ademvl
        "warmup_epochs", "epochs_per_job", "caption_metrics", "caption_gt_files", "caption_pattern", "deterministic",
        "dist_timeout_minutes", "allow_untrained", "distributed_strategy", "fsdp_shard_size", "max_grad_norm",
    }
)
# key: (type, minimum); None: any value of the type.
RUN_NUMBERS: dict[str, tuple[type, float | None]] = {
    "init_lr": (float, 0.0), "min_lr": (float, 0.0), "warmup_lr": (float, None), "warmup_steps": (int, 0),
    "lr_decay_rate": (float, None), "weight_decay": (float, 0.0), "beta2": (float, 0.0),
    "max_epoch": (int, 1), "warmup_epochs": (float, 0.0), "epochs_per_job": (int, 1),
    "batch_size_train": (int, 1), "batch_size_eval": (int, 1), "num_workers": (int, 0), "accum_grad_iters": (int, 1),
    "seed": (int, 0), "log_freq": (int, 1), "max_len": (int, 1), "min_len": (int, 0), "num_beams": (int, 1),
    "num_ans_candidates": (int, 1), "dist_timeout_minutes": (float, 0.1), "fsdp_shard_size": (int, 1),
    "max_grad_norm": (float, None),
    "amp": (bool, None), "evaluate": (bool, None), "allow_untrained": (bool, None), "deterministic": (bool, None),
}
SPLIT_KEYS = ("train_splits", "valid_splits", "test_splits")
# Under torchrun: `ddp`, every rank holds the whole frozen towers; `fsdp`, they are sharded over the ranks (FSDP2).
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp")
# Minutes a rank waits for the others in a collective before the run ends (`run.dist_timeout_minutes`): a hung CPU
# (gloo) rank should not block the others for LAVIS's hour; on GPUs (nccl) LAVIS's 60 stays the default.
DEFAULT_DIST_TIMEOUT_MINUTES = {"gloo": 10.0, "nccl": 60.0}


def check_run_config(run_cfg: Any, known_keys: bool = False) -> None:
    """Every number of `run:` has its type and range, `output_dir` names a folder, every split list is a list of names
    (and, with `known_keys` or for a run of runner_ademvl, every key is one runner_ademvl knows); errors name the key."""
    if known_keys or run_cfg.get("runner") == RUNNER:  # a misspelt key is refused before anything is built
        check_known_keys("run", run_cfg.keys(), RUN_KEYS)
    for key, (kind, minimum) in RUN_NUMBERS.items():
        if run_cfg.get(key) is not None:
            checked_number(f"run.{key}", run_cfg.get(key), kind, minimum)
    max_grad_norm = run_cfg.get("max_grad_norm")
    if max_grad_norm is not None and max_grad_norm <= 0:  # 0 would zero every update
        raise ValueError(f"run.max_grad_norm={max_grad_norm} must be positive (null: no clipping)")
    strategy = run_cfg.get("distributed_strategy")
    if strategy is not None and strategy not in DISTRIBUTED_STRATEGIES:
        raise ValueError(f"run.distributed_strategy={strategy!r}: choose one of {list(DISTRIBUTED_STRATEGIES)}")
    if run_cfg.get("fsdp_shard_size") is not None and strategy != "fsdp":
        raise ValueError(f"run.fsdp_shard_size={run_cfg.get('fsdp_shard_size')} is read only with "
                         "run.distributed_strategy=fsdp")
    if "output_dir" in run_cfg:  # None or "" would crash in the runner, or put the job folders in the working directory
        output_dir = run_cfg.get("output_dir")
        if not isinstance(output_dir, str) or not output_dir.strip():
            raise ValueError(f"run.output_dir={output_dir!r} must name a folder, e.g. output/ademvl/sqa")
    for key in SPLIT_KEYS:
        splits = run_cfg.get(key)
        if splits is not None and (isinstance(splits, str) or not all(isinstance(name, str) for name in splits)):
            raise ValueError(f"run.{key}={splits!r} must be a list of split names, e.g. [val]")


def dist_timeout_minutes(run_cfg: Any, backend: str) -> float:
    """`run.dist_timeout_minutes`, else the backend's default."""
    value = run_cfg.get("dist_timeout_minutes")
    return float(value) if value is not None else DEFAULT_DIST_TIMEOUT_MINUTES[backend]


UNTRAINED = "untrained"


def built_checkpoint(cfg: Any, give: str = "--options model.load_finetuned=true model.finetuned=PATH") -> str:
    """The checkpoint the model of `cfg` (LAVIS's Config) is built with (`model.finetuned`), or UNTRAINED when the
    run allows it (`run.allow_untrained: true`); evaluating (or asking) a model built without either is a ValueError,
    as its scores would be the untrained model's; `give`: how the tool is given a checkpoint."""
    model_cfg, run_cfg = cfg.model_cfg, cfg.run_cfg
    if model_cfg.get("load_finetuned"):
        if OmegaConf.is_missing(model_cfg, "finetuned") or not model_cfg.get("finetuned"):
            raise ValueError("model.load_finetuned is true but model.finetuned names no checkpoint; give "
                             "--options model.finetuned=PATH")
        return str(model_cfg.finetuned)
    if checked_number("run.allow_untrained", run_cfg.get("allow_untrained", False), bool):
        return UNTRAINED
    raise ValueError(f"this run names no checkpoint, so it would score the untrained model: give {give}, or "
                     "--options run.allow_untrained=true to use it untrained")
