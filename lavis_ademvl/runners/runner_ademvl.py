"""Runner `runner_ademvl`: LAVIS's epoch runner, made to work on CPU, one GPU or many, and to resume exactly.

Differences from LAVIS 1.0.2's `runner_base` (each fixes a problem of that release):
- the model is moved and wrapped once (the base `model` property returns None when it is already on the device);
- `run.device: auto` means CUDA when available, also when LAVIS's own train.py starts the run;
- no CUDA streams, `.cuda()` calls or barriers unless CUDA / a process group is in use;
- gradient accumulation divides the loss and skips DDP's all-reduce between optimizer steps;
- the lr scheduler learns the number of iterations per epoch (for per-iteration schedules);
- the data order and random state depend only on (seed, rank, epoch), and every epoch writes
  `checkpoint_latest.pth`, so a resumed run continues exactly where the interrupted one stopped;
- checkpoints hold the trainable weights only and load with `weights_only=True` (`common.checkpoints`); a missing
  trainable key is an error;
- `output_dir` is relative to the working directory, and a resumed run keeps writing to its checkpoint's folder.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, get_world_size, is_main_process, main_process
from lavis.common.logger import MetricLogger, SmoothedValue
from lavis.common.registry import registry
from lavis.datasets.data_utils import prepare_sample
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lavis_ademvl.common.checkpoints import load_checkpoint_file
from lavis_ademvl.common.dist import resolve_device
from lavis_ademvl.common.registration import register
from lavis_ademvl.common.seeding import seed_everything
from lavis_ademvl.common.validation import check_known_keys

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
        "warmup_epochs", "epochs_per_job", "caption_metrics", "caption_gt_files", "caption_pattern",
        "deterministic",
    }
)
LATEST_CHECKPOINT = "checkpoint_latest.pth"


@register("runner", "runner_ademvl")
class RunnerAdemVL(RunnerBase):
    def __init__(self, cfg: Any, task: Any, model: torch.nn.Module, datasets: dict, job_id: str) -> None:
        check_known_keys("run", cfg.run_cfg.keys(), RUN_KEYS)
        super().__init__(cfg=cfg, task=task, model=model, datasets=datasets, job_id=job_id)
        self.best_agg_metric = -math.inf
        self.best_epoch = -1

    # ------------------------------------------------------------------ setup

    def setup_output_dir(self) -> None:
        resume = self.config.run_cfg.get("resume_ckpt_path")
        if resume and not self.evaluate_only:
            output_dir = Path(resume).resolve().parent
        else:
            output_dir = Path(self.config.run_cfg.get("output_dir", "output")) / self.job_id
        result_dir = output_dir / "result"
        result_dir.mkdir(parents=True, exist_ok=True)
        # LAVIS registers paths once per process; a second runner in the same process replaces them.
        registry.mapping["paths"]["output_dir"] = str(output_dir)
        registry.mapping["paths"]["result_dir"] = str(result_dir)
        self.output_dir, self.result_dir = output_dir, result_dir

    @property
    def seed(self) -> int:
        return int(self.config.run_cfg.get("seed", 42))

    @property
    def device(self) -> torch.device:
        # LAVIS's own train.py leaves `run.device: auto` as it is (our launcher resolves it); resolve it here too.
        if self._device is None:
            self._device = torch.device(resolve_device(self.config.run_cfg.get("device", "auto")))
        return self._device

    @property
    def model(self) -> torch.nn.Module:
        if self._wrapped_model is None:
            placed = getattr(self._model, "llm_dispatched", False)
            if placed and self.use_distributed:
                raise ValueError("model.llm_device_map spreads one model over several GPUs in one process; "
                                 "run it without torchrun")
            self._model = self._model.place(self.device) if hasattr(self._model, "place") else self._model.to(self.device)
            if self.use_distributed:
                device_ids = [self.config.run_cfg.gpu] if self.cuda_enabled else None
                self._wrapped_model = DDP(self._model, device_ids=device_ids)
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        # A loss scaler only matters for float16 autocast on CUDA.
        if self._scaler is None and self.config.run_cfg.get("amp", False) and self.cuda_enabled:
            self._scaler = torch.amp.GradScaler("cuda")
        return self._scaler

    @property
    def lr_scheduler(self) -> Any:
        if self._lr_sched is None:
            run_cfg = self.config.run_cfg
            scheduler_cls = registry.get_lr_scheduler_class(run_cfg.lr_sched)
            if scheduler_cls is None:
                known = sorted(registry.mapping["lr_scheduler_name_mapping"])
                raise KeyError(f"unknown run.lr_sched {run_cfg.lr_sched!r}; registered: {known}")
            self._lr_sched = scheduler_cls(
                optimizer=self.optimizer,
                max_epoch=self.max_epoch,
                min_lr=self.min_lr,
                init_lr=self.init_lr,
                decay_rate=run_cfg.get("lr_decay_rate", None),
                warmup_start_lr=run_cfg.get("warmup_lr", -1),
                warmup_steps=run_cfg.get("warmup_steps", 0),
                warmup_epochs=run_cfg.get("warmup_epochs", 0),
                iters_per_epoch=len(self.train_loader),
            )
        return self._lr_sched

    def create_loaders(
        self,
        datasets: list,
        num_workers: int,
        batch_sizes: list[int],
        is_trains: list[bool],
        collate_fns: list,
        dataset_ratios: Any = None,
    ) -> list[DataLoader]:
        loaders = []
        for dataset, batch_size, is_train, collate_fn in zip(datasets, batch_sizes, is_trains, collate_fns):
            if isinstance(dataset, (list, tuple)) or not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
                raise TypeError(f"runner_ademvl takes map-style datasets only, got {type(dataset).__name__}")
            use_sampler = is_train or self.use_dist_eval_sampler
            # A DistributedSampler even in one process: its order depends only on (seed, epoch).
            sampler = (
                DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=is_train, seed=self.seed)
                if use_sampler
                else None
            )
            loader = DataLoader(
                dataset,
                batch_size=batch_size,
                num_workers=num_workers,
                pin_memory=self.cuda_enabled,
                sampler=sampler,
                collate_fn=collate_fn,
                drop_last=is_train,
            )
            if is_train and len(loader) == 0:
                raise ValueError(
                    f"the training split has {len(dataset)} samples, fewer than batch_size_train={batch_size} "
                    f"x {get_world_size()} process(es)"
                )
            loaders.append(loader)
        return loaders

    # ------------------------------------------------------------------ training

    def train(self) -> None:
        start_time = time.time()
        self.log_config()
        if not self.evaluate_only and self.resume_ckpt_path is not None:
            self._load_checkpoint(self.resume_ckpt_path)
        epochs_per_job = self.config.run_cfg.get("epochs_per_job")
        end_epoch = self.max_epoch if epochs_per_job is None else min(self.max_epoch, self.start_epoch + int(epochs_per_job))

        cur_epoch = self.start_epoch - 1
        for cur_epoch in range(self.start_epoch, end_epoch):
            if not self.evaluate_only:
                logging.info("Start training epoch %d", cur_epoch)
                self.log_stats(split_name="train", stats=self.train_epoch(cur_epoch))
            for split_name in self.valid_splits:
                logging.info("Evaluating on %s.", split_name)
                val_log = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch)
                if val_log is not None and is_main_process():
                    if val_log["agg_metrics"] > self.best_agg_metric and split_name == "val":
                        self.best_epoch, self.best_agg_metric = cur_epoch, val_log["agg_metrics"]
                        self._save_checkpoint(cur_epoch, name="best")
                    self.log_stats({**val_log, "best_epoch": self.best_epoch}, split_name)
            if self.evaluate_only:
                break
            if not self.valid_splits:
                self._save_checkpoint(cur_epoch, name=str(cur_epoch))
            self._save_checkpoint(cur_epoch, name="latest")
            self._barrier()

        if not self.evaluate_only and end_epoch < self.max_epoch:
            logging.info(
                "Stopped after epoch %d of %d (run.epochs_per_job); continue with "
                "--options run.resume_ckpt_path=%s", end_epoch - 1, self.max_epoch, self.output_dir / LATEST_CHECKPOINT,
            )
            return
        test_epoch = "best" if self.valid_splits and not self.evaluate_only else cur_epoch
        self.evaluate(cur_epoch=test_epoch, skip_reload=self.evaluate_only)
        logging.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))

    def train_epoch(self, epoch: int) -> dict[str, str]:
        model = self.model
        model.train()
        loader = self.train_loader
        loader.sampler.set_epoch(epoch)
        seed_everything(self.seed + get_rank() + 100_003 * epoch)
        accum = self.accum_grad_iters
        iters = len(loader)
        optimizer, scaler = self.optimizer, self.scaler

        metric_logger = MetricLogger(delimiter="  ")
        metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
        metric_logger.add_meter("loss", SmoothedValue(window_size=1, fmt="{value:.4f}"))
        optimizer.zero_grad(set_to_none=True)
        header = f"Train: data epoch: [{epoch}]"
        for step, samples in enumerate(metric_logger.log_every(loader, self.log_freq, header)):
            samples = prepare_sample(samples, cuda_enabled=self.cuda_enabled)
            lr = self.lr_scheduler.step(cur_epoch=epoch, cur_step=step)
            update = (step + 1) % accum == 0 or step + 1 == iters
            # Between optimizer steps, gradients accumulate locally; DDP all-reduces only on the update step.
            sync_context = model.no_sync() if self.use_distributed and not update else contextlib.nullcontext()
            with sync_context:
                loss = self.task.train_step(model=model, samples=samples)
                scaled = loss / accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            if update:
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            metric_logger.update(loss=loss.item())
            metric_logger.update(lr=optimizer.param_groups[0]["lr"] if lr is None else lr)
        self._synchronize_meters(metric_logger)
        logging.info("Averaged stats: %s", metric_logger.global_avg())
        return {name: f"{meter.global_avg:.6f}" for name, meter in metric_logger.meters.items()}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def eval_epoch(self, split_name: str, cur_epoch: Any, skip_reload: bool = False) -> dict | None:
        data_loader = self.dataloaders.get(split_name)
        if data_loader is None:
            raise KeyError(f"no dataset split {split_name!r} was built; built splits: {sorted(self.dataloaders)}")
        model = self.unwrap_dist_model(self.model)
        if not skip_reload and cur_epoch == "best":
            model = self._reload_best_model(model)
        model.eval()
        self.task.before_evaluation(model=model, dataset=self.datasets[split_name])
        results = self.task.evaluation(model, data_loader, cuda_enabled=self.cuda_enabled)
        if results is None:
            return None
        return self.task.after_evaluation(val_result=results, split_name=split_name, epoch=cur_epoch)

    # ------------------------------------------------------------------ checkpoints

    @main_process
    def _save_checkpoint(self, cur_epoch: int, name: str = "latest") -> None:
        model = self.unwrap_dist_model(self.model)
        checkpoint = {
            "model": {k: v.cpu() for k, v in model.trainable_state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": cur_epoch,
            "best_agg_metric": self.best_agg_metric,
            "best_epoch": self.best_epoch,
        }
        path = self.output_dir / f"checkpoint_{name}.pth"
        partial = path.with_suffix(".pth.partial")
        torch.save(checkpoint, partial)
        os.replace(partial, path)  # an interrupted save never leaves a truncated checkpoint behind
        logging.info("Saved epoch %d checkpoint to %s", cur_epoch, path)

    def _reload_best_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model.load_checkpoint(str(self.output_dir / "checkpoint_best.pth"))
        return model

    def _load_checkpoint(self, url_or_filename: str) -> None:
        checkpoint = load_checkpoint_file(url_or_filename, what="run.resume_ckpt_path: checkpoint")
        self.unwrap_dist_model(self.model).load_trainable_state(checkpoint["model"], source=url_or_filename)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.start_epoch = int(checkpoint["epoch"]) + 1
        self.best_agg_metric = float(checkpoint.get("best_agg_metric", -math.inf))
        self.best_epoch = int(checkpoint.get("best_epoch", -1))
        logging.info("Resumed from %s at epoch %d", url_or_filename, self.start_epoch)

    def _synchronize_meters(self, metric_logger: MetricLogger) -> None:
        """Average meters over ranks on the run's device (LAVIS's version always allocates on CUDA)."""
        if not self.use_distributed:
            return
        for meter in metric_logger.meters.values():
            totals = torch.tensor([meter.count, meter.total], dtype=torch.float64, device=self.device)
            dist.all_reduce(totals)
            meter.count, meter.total = int(totals[0].item()), totals[1].item()

    def _barrier(self) -> None:
        if self.use_distributed and dist.is_initialized():
            dist.barrier()

    @main_process
    def log_stats(self, stats: dict, split_name: str) -> None:
        with open(self.output_dir / "log.txt", "a") as handle:
            handle.write(json.dumps({f"{split_name}_{k}": v for k, v in stats.items()}) + "\n")
