"""Runner `runner_ademvl`: LAVIS's epoch runner, made to work on CPU, one GPU or many, and to resume exactly.

Differences from LAVIS 1.0.2's `runner_base` (each fixes a problem of that release):
- the model is moved and wrapped once (the base `model` property returns None when it is already on the device);
- `run.device: auto` means CUDA when available, also when LAVIS's own train.py starts the run;
- no CUDA streams, `.cuda()` calls or barriers unless CUDA / a process group is in use;
- gradient accumulation divides the loss and skips DDP's all-reduce between optimizer steps;
- `run.max_grad_norm` clips the gradients of the trainable parameters (after unscaling), which LAVIS's runner cannot;
- the lr scheduler learns the number of iterations per epoch (for per-iteration schedules);
- the data order and random state depend only on (seed, rank, epoch), and every epoch writes
  `checkpoint_latest.pth`, so a resumed run continues exactly where the interrupted one stopped;
- checkpoints hold the trainable weights only and load with `weights_only=True` (`common.checkpoints`); a missing
  trainable key is an error; what a model can resume from is the model's to say (its `check_resumable`);
- `output_dir` is relative to the working directory, and a resumed run keeps writing to its checkpoint's folder,
  which it holds alone (`common.job_lock`);
- the epoch loop is the runner's own (`train_epoch`): it calls the task's `train_step` per batch; a task that
  overrides LAVIS's `train_epoch` is refused rather than silently bypassed.

Each override below says in one line which of these it is for; the rest of RunnerBase is used as LAVIS wrote it.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, get_world_size, is_main_process, main_process
from lavis.common.logger import MetricLogger, SmoothedValue
from lavis.common.registry import registry
from lavis.runners.runner_base import RunnerBase
from lavis.tasks.base_task import BaseTask
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lavis_ademvl.common.atomic_files import write_atomically
from lavis_ademvl.common.checkpoints import load_checkpoint_file, non_finite_keys
from lavis_ademvl.common.cli import RunFailed
from lavis_ademvl.common.dist import broadcast_from_main, resolve_device
from lavis_ademvl.common.job_lock import lock_job_folder
from lavis_ademvl.common.registration import register
from lavis_ademvl.common.results import EVALUATED_CHECKPOINT
from lavis_ademvl.common.run_config import built_checkpoint, check_run_config
from lavis_ademvl.common.seeding import seed_everything
from lavis_ademvl.common.validation import checked_number
from lavis_ademvl.models.sharding import frozen_mesh

LATEST_CHECKPOINT = "checkpoint_latest.pth"


@register("runner", "runner_ademvl")
class RunnerAdemVL(RunnerBase):
    def __init__(self, cfg: Any, task: Any, model: torch.nn.Module, datasets: dict, job_id: str) -> None:
        check_run_config(cfg.run_cfg, known_keys=True)
        if type(task).train_epoch is not BaseTask.train_epoch or type(task)._train_inner_loop is not BaseTask._train_inner_loop:
            raise TypeError(f"task {type(task).__name__} has its own train_epoch, which runner_ademvl's epoch loop would "
                            "skip (it calls the task's train_step per batch); use LAVIS's runner_base for this task")
        super().__init__(cfg=cfg, task=task, model=model, datasets=datasets, job_id=job_id)
        self.best_agg_metric = -math.inf
        self.best_epoch = -1
        self.trained_here = False  # whether this process trained or resumed the weights it evaluates

    # ------------------------------------------------------------------ setup

    def setup_output_dir(self) -> None:
        # Relative to the working directory (not LAVIS's library root), a new folder per run, held while it runs.
        resume = self.config.run_cfg.get("resume_ckpt_path")
        if resume and not self.evaluate_only:
            output_dir = Path(resume).resolve().parent
        else:
            root = Path(self.config.run_cfg.get("output_dir", "output"))
            # One new folder per run, made by the main process: two runs started in the same second never share one.
            output_dir = broadcast_from_main(new_job_dir(root, self.job_id) if is_main_process() else None)
        result_dir = output_dir / "result"
        try:
            result_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunFailed(f"cannot create the run folder {result_dir}: {error.strerror or error}") from error
        # The main process holds the folder for the run: a second resume of the same checkpoint is refused.
        self.job_lock = lock_job_folder(output_dir) if is_main_process() else None
        # LAVIS registers paths once per process; a second runner in the same process replaces them.
        registry.mapping["paths"]["output_dir"] = str(output_dir)
        registry.mapping["paths"]["result_dir"] = str(result_dir)
        self.output_dir, self.result_dir = output_dir, result_dir

    def release_job_folder(self) -> None:
        """Let another run use the job folder (at the end of the run, also a failed one)."""
        if self.job_lock is not None:
            self.job_lock.release()

    @property
    def seed(self) -> int:
        return int(self.config.run_cfg.get("seed", 42))

    @property
    def device(self) -> torch.device:  # `auto` resolved, also when LAVIS's own train.py starts the run
        # LAVIS's own train.py leaves `run.device: auto` as it is (our launcher resolves it); resolve it here too.
        if self._device is None:
            self._device = torch.device(resolve_device(self.config.run_cfg.get("device", "auto")))
        return self._device

    @property
    def model(self) -> torch.nn.Module:  # moved and wrapped once (the base returns None once it is on the device)
        if self._wrapped_model is None:
            if getattr(self._model, "llm_spans_devices", False) and self.use_distributed:
                raise ValueError("model.llm_device_map spreads one model over several GPUs in one process; run it "
                                 "without torchrun (a quantized LLM, on each rank's own GPU, trains under torchrun)")
            self._model = self._model.to(self.device)  # a dispatched LLM stays where it was placed (AdemVL.to)
            if self.use_distributed and self.config.run_cfg.get("distributed_strategy", "ddp") == "fsdp":
                self.shard_frozen_towers()
            if self.use_distributed:
                # DDP owns the trainable parameters only: the frozen towers come from the same files (or the same
                # seed) on every rank, and broadcasting them at wrap time (13.5 GB at 7B) and their buffers at every
                # forward would only cost time.
                DDP._set_params_and_buffers_to_ignore_for_model(self._model, frozen_state_names(self._model))
                device_ids = [self.config.run_cfg.gpu] if self.cuda_enabled else None
                self._wrapped_model = DDP(self._model, device_ids=device_ids)
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    def shard_frozen_towers(self) -> None:
        """`run.distributed_strategy: fsdp`: the model's frozen towers sharded over the ranks (FSDP2), unless it was
        built so (`lavis.train` builds it sharded); its trainable weights stay whole, under the DDP wrap."""
        shard = getattr(self._model, "shard_frozen", None)
        if shard is None:
            raise ValueError(f"run.distributed_strategy=fsdp shards the frozen towers of an ademvl model; "
                             f"{type(self._model).__name__} has none")
        if not self._model.llm_sharded:
            shard(frozen_mesh(self.device.type, self.config.run_cfg.get("fsdp_shard_size")))

    @property
    def scaler(self) -> torch.amp.GradScaler | None:  # decided by device and dtype (float16 on CUDA), not run.amp alone
        if self._scaler is None:
            dtype = getattr(self._model, "compute_dtype", torch.float32)
            if needs_loss_scaling(self.device, dtype, bool(self.config.run_cfg.get("amp", False))):
                self._scaler = torch.amp.GradScaler("cuda")
        return self._scaler

    @property
    def lr_scheduler(self) -> Any:  # told the iterations per epoch, for per-iteration schedules
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

    def create_loaders(  # a sampler whose order depends only on (seed, epoch), in one process too; no CUDA prefetch
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

    def train(self) -> None:  # a resume point every epoch, best-metric state that resumes, run.epochs_per_job
        start_time = time.time()
        self.log_config()
        self.check_splits()
        self.check_image_sizes()
        if not self.evaluate_only:  # decided before training: a contradicting run.amp ends the run here
            logging.info("loss scaling: %s", "on (float16 on CUDA)" if self.scaler else "off")
        if not self.evaluate_only and self.resume_ckpt_path is not None:
            self._load_checkpoint(self.resume_ckpt_path)
            self.trained_here = True
        epochs_per_job = self.config.run_cfg.get("epochs_per_job")
        end_epoch = self.max_epoch if epochs_per_job is None else min(self.max_epoch, self.start_epoch + int(epochs_per_job))

        cur_epoch = self.start_epoch - 1
        for cur_epoch in range(self.start_epoch, end_epoch):
            if not self.evaluate_only:
                logging.info("Start training epoch %d", cur_epoch)
                self.log_stats(split_name="train", stats=self.train_epoch(cur_epoch))
                self.trained_here = True
                # Saved before validation, so that a failure there loses no training.
                if not self.valid_splits:
                    self.save_checkpoint(cur_epoch, name=str(cur_epoch))
                self.save_checkpoint(cur_epoch, name="latest")
            for split_name in self.valid_splits:
                logging.info("Evaluating on %s.", split_name)
                val_log = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch)
                if val_log is not None and is_main_process():
                    if val_log["agg_metrics"] > self.best_agg_metric and split_name == "val":
                        self.best_epoch, self.best_agg_metric = cur_epoch, val_log["agg_metrics"]
                        self.save_checkpoint(cur_epoch, name="best")
                    self.log_stats({**val_log, "best_epoch": self.best_epoch}, split_name)
            if self.evaluate_only:
                break
            if self.valid_splits:
                self.save_checkpoint(cur_epoch, name="latest")  # again, with the best epoch so far
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

    def check_splits(self) -> None:
        """Every split the run evaluates was built (checked before training, not after the first epoch)."""
        built = sorted(self.dataloaders)
        for key in ("valid_splits", "test_splits"):
            unknown = [split for split in self.config.run_cfg.get(key) or [] if split not in built]
            if unknown:
                raise KeyError(f"run.{key} names {unknown}, which the datasets do not build; built splits: {built}")

    def check_image_sizes(self) -> None:
        """The image processors make images of the size the model reads (else it fails at the first evaluation)."""
        model = self.unwrap_dist_model(self.model)
        if getattr(model, "vision_tower", None) is None:
            return
        expected = model.image_size
        for name, dataset_cfg in self.config.datasets_cfg.items():
            for role, processor_cfg in (dataset_cfg.get("vis_processor") or {}).items():
                size = (processor_cfg or {}).get("image_size")
                if size is not None and size != expected:
                    raise ValueError(f"datasets.{name}.vis_processor.{role}.image_size={size}, but the vision tower "
                                     f"reads {expected}x{expected} images (model.image_size, else the tower's config)")

    def train_epoch(self, epoch: int) -> dict[str, str]:  # exact resume, accumulation without all-reduce, one host read
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
        optimizer.zero_grad(set_to_none=True)
        header = f"Train: data epoch: [{epoch}]"
        host_inputs = getattr(self.unwrap_dist_model(model), "host_inputs", frozenset())
        pending: list[torch.Tensor] = []  # the losses of this update's micro-steps, on the device
        for step, samples in enumerate(metric_logger.log_every(loader, self.log_freq, header)):
            samples = upload(samples, self.device, host_inputs)
            lr = self.lr_scheduler.step(cur_epoch=epoch, cur_step=step)
            update = (step + 1) % accum == 0 or step + 1 == iters
            # Between optimizer steps, gradients accumulate locally; DDP all-reduces only on the update step.
            sync_context = model.no_sync() if self.use_distributed and not update else contextlib.nullcontext()
            with sync_context:
                loss = self.task.train_step(model=model, samples=samples)
                scaled = loss / accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            pending.append(loss.detach())
            if update:
                # The host reads the losses once per update, after its backward passes are queued, and before the
                # weights take them.
                losses = torch.stack(pending).float().tolist()
                check_finite_losses(losses, epoch, step + 1 - len(losses), iters)
                optimizer_update(optimizer, scaler, self.config.run_cfg.get("max_grad_norm"))
                if "loss" not in metric_logger.meters:  # added at the first update: an empty meter cannot print
                    metric_logger.add_meter("loss", SmoothedValue(window_size=1, fmt="{value:.4f}"))
                for value in losses:
                    metric_logger.update(loss=value)
                pending = []
            metric_logger.update(lr=optimizer.param_groups[0]["lr"] if lr is None else lr)
        self._synchronize_meters(metric_logger)
        logging.info("Averaged stats: %s", metric_logger.global_avg())
        return {name: f"{meter.global_avg:.6f}" for name, meter in metric_logger.meters.items()}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def eval_epoch(self, split_name: str, cur_epoch: Any, skip_reload: bool = False) -> dict | None:  # names the weights
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
        # The task's write_evaluation names the checkpoint; the label is this evaluation's only.
        registry.register(EVALUATED_CHECKPOINT, self.evaluated_checkpoint(cur_epoch, skip_reload))
        try:
            return self.task.after_evaluation(val_result=results, split_name=split_name, epoch=cur_epoch)
        finally:
            registry.mapping["state"].pop(EVALUATED_CHECKPOINT, None)

    def evaluated_checkpoint(self, cur_epoch: Any, skip_reload: bool) -> str:
        """The checkpoint whose weights an evaluation scores, as evaluate.txt names it."""
        if cur_epoch == "best" and not skip_reload:
            return str(self.output_dir / "checkpoint_best.pth")
        if self.trained_here:  # the weights of the epoch just trained, saved as checkpoint_latest.pth
            return str(self.output_dir / LATEST_CHECKPOINT)
        return built_checkpoint(self.config)

    # ------------------------------------------------------------------ checkpoints

    @main_process
    def save_checkpoint(self, cur_epoch: int, name: str = "latest") -> None:
        """checkpoint_<name>.pth: the trainable weights and the state a resume needs, written whole or not at all
        (LAVIS's `_save_checkpoint` writes every buffer, in place; this runner never calls it)."""
        model = self.unwrap_dist_model(self.model)
        checkpoint = {
            "model": {k: v.cpu() for k, v in model.trainable_state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
            # The frozen parts the weights were trained on (a model without the notion records none).
            "backbones": getattr(model, "backbone_identity", lambda: None)(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": cur_epoch,
            "best_agg_metric": self.best_agg_metric,
            "best_epoch": self.best_epoch,
        }
        path = self.output_dir / f"checkpoint_{name}.pth"
        non_finite = non_finite_keys(checkpoint["model"])
        if non_finite:  # never replace a good resume point with broken weights
            raise RunFailed(f"epoch {cur_epoch}: not saving {path}: the weights {non_finite[:8]} hold NaN or inf")
        # Serialized in memory and written by Python: torch's own file writer reports a full disk or a missing folder
        # as a RuntimeError without the OS's reason ("unexpected pos 704 vs 598"); Python's writes raise the OSError.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            write_atomically(path, buffer.getbuffer(), "checkpoint")  # never a truncated checkpoint
        except OSError as error:  # the run cannot go on without its resume point
            raise RunFailed(str(error)) from error
        logging.info("Saved epoch %d checkpoint to %s", cur_epoch, path)

    def _reload_best_model(self, model: torch.nn.Module) -> torch.nn.Module:  # safe load, every trainable key
        model.load_checkpoint(str(self.output_dir / "checkpoint_best.pth"))
        return model

    def _load_checkpoint(self, url_or_filename: str) -> None:  # validated, exact resume (random state, best epoch)
        checkpoint = load_checkpoint_file(url_or_filename, what="run.resume_ckpt_path: checkpoint")
        model = self.unwrap_dist_model(self.model)
        check_resumable = getattr(model, "check_resumable", None)  # the model's own rule (ADEM-VL: its options match)
        if check_resumable is not None:
            check_resumable(checkpoint, url_or_filename)
        missing = [key for key in ("model", "optimizer", "epoch") if key not in checkpoint]
        if missing:
            raise ValueError(f"run.resume_ckpt_path={url_or_filename} lacks {missing}: resume from a "
                             f"{LATEST_CHECKPOINT} written by lavis_ademvl.train")
        where = f"run.resume_ckpt_path={url_or_filename}"
        epoch = checked_number(f"{where}: epoch", checkpoint["epoch"], int, 0)
        best_epoch = checked_number(f"{where}: best_epoch", checkpoint.get("best_epoch", -1), int, -1)
        best_agg_metric = checkpoint.get("best_agg_metric", -math.inf)  # -inf until a validation: not checked_number's
        if not isinstance(best_agg_metric, (int, float)) or isinstance(best_agg_metric, bool):
            raise ValueError(f"{where}: best_agg_metric={best_agg_metric!r} must be a number")
        check_same_task(checkpoint.get("config"), self.config.to_dict(), url_or_filename)
        changed = changed_settings(checkpoint.get("config"), self.config.to_dict())
        if changed:  # a moved data folder may be meant; another prompt style rarely is: said, not refused
            logging.warning("run.resume_ckpt_path=%s was trained with other settings: %s; the resumed run trains and "
                            "evaluates with this run's, and its job folder's log and evaluate.txt hold both",
                            url_or_filename, "; ".join(changed))
        model.load_trainable_state(checkpoint["model"], source=url_or_filename)
        check_optimizer_state(checkpoint["optimizer"], self.optimizer, dict(model.named_parameters()), url_or_filename)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.start_epoch = epoch + 1
        self.best_agg_metric = float(best_agg_metric)
        self.best_epoch = best_epoch
        best = self.output_dir / "checkpoint_best.pth"
        if self.valid_splits and self.best_epoch >= 0 and not best.is_file():
            raise FileNotFoundError(
                f"run.resume_ckpt_path={url_or_filename}: its run's best epoch ({self.best_epoch}) was saved as {best}, "
                f"which is missing; a resumed run ends by testing that checkpoint, so copy it beside the resumed one"
            )
        logging.info("Resumed from %s at epoch %d", url_or_filename, self.start_epoch)

    def _synchronize_meters(self, metric_logger: MetricLogger) -> None:  # new: LAVIS's always allocates on CUDA
        """Average meters over ranks on the run's device (LAVIS's version always allocates on CUDA)."""
        if not self.use_distributed:
            return
        for meter in metric_logger.meters.values():
            totals = torch.tensor([meter.count, meter.total], dtype=torch.float64, device=self.device)
            dist.all_reduce(totals)
            meter.count, meter.total = int(totals[0].item()), totals[1].item()

    def _barrier(self) -> None:  # new: no barrier without a process group
        if self.use_distributed and dist.is_initialized():
            dist.barrier()



def check_same_task(saved: dict | None, current: dict, source: str) -> None:
    """A resumed run continues the run its checkpoint came from: the same task (the model checks its own options)."""
    if not saved:
        return
    saved_task, task = (saved.get("run") or {}).get("task"), (current.get("run") or {}).get("task")
    if saved_task != task:
        raise ValueError(f"run.resume_ckpt_path={source} comes from a run of task {saved_task!r}, not {task!r}")


# Run keys a resume may change without changing what is trained and scored: how long, where and on what it runs.
RESUME_MAY_CHANGE = frozenset({"resume_ckpt_path", "max_epoch", "epochs_per_job", "output_dir", "device", "world_size",
                               "rank", "gpu", "distributed", "dist_url", "dist_backend", "num_workers", "log_freq",
                               "dist_timeout_minutes"})


def changed_settings(saved: dict | None, current: dict) -> list[str]:
    """`key=<value> there, <value> here` for each `datasets` key, and `run` key but RESUME_MAY_CHANGE, that differs
    between a checkpoint's saved config and this run's (the model's options are the model's to check)."""
    if not saved:
        return []

    def settings(config: dict) -> dict[str, Any]:
        run = {key: value for key, value in (config.get("run") or {}).items() if key not in RESUME_MAY_CHANGE}
        return flattened({"datasets": config.get("datasets") or {}, "run": run})

    before, after = settings(saved), settings(current)
    return [f"{key}={before.get(key)!r} there, {after.get(key)!r} here"
            for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]


def flattened(config: dict, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested config dict (lists are values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flattened(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_optimizer_state(
    saved: Any, optimizer: torch.optim.Optimizer, parameters: dict[str, torch.nn.Parameter], source: str
) -> None:
    """A saved optimizer state fits `optimizer`: its groups hold as many parameters, and every per-parameter tensor
    (Adam's moments) has its parameter's shape. torch checks only the counts, with a message naming neither file nor
    group, and a moment of another shape fails only at the first step, mid-epoch."""
    where = f"run.resume_ckpt_path={source}: its optimizer state"
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    state = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not isinstance(state, dict) or not all(
        isinstance(group, dict) and isinstance(group.get("params"), list) for group in groups
    ):
        raise ValueError(f"{where} is not a torch optimizer's state_dict (`state`, and `param_groups` with `params`)")
    names = {id(parameter): name for name, parameter in parameters.items()}
    counts = [len(group["params"]) for group in groups]
    expected = [len(group["params"]) for group in optimizer.param_groups]
    if counts != expected:
        raise ValueError(f"{where} holds parameter groups of {counts} parameters, this run's optimizer {expected}: it "
                         "was saved for other trainable parameters")
    for saved_group, group in zip(groups, optimizer.param_groups):
        for key, parameter in zip(saved_group["params"], group["params"]):
            for field, value in (state.get(key) or {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameter.shape:
                    raise ValueError(
                        f"{where}: `{field}` of {names.get(id(parameter), f'parameter {key}')} has shape "
                        f"{tuple(value.shape)}, the parameter {tuple(parameter.shape)}"
                    )


def new_job_dir(root: Path, job_id: str) -> Path:
    """A folder root/<job_id> that did not exist before (root/<job_id>_1, _2, ... if it did), created now."""
    path, attempt = root / job_id, 0
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)  # atomic: of two runs, only one creates a given folder
            return path
        except FileExistsError:
            attempt += 1
            path = root / f"{job_id}_{attempt}"
        except OSError as error:
            raise RunFailed(f"cannot create the run folder {path}: {error.strerror or error}") from error


def check_finite_losses(losses: list[float], epoch: int, first_step: int, iters: int) -> None:
    """Stop the run at a NaN or infinite loss (its weights would follow), naming the iteration; `losses` are those of
    iterations first_step, first_step + 1, ..."""
    for step, value in enumerate(losses, start=first_step):
        if not math.isfinite(value):
            raise RunFailed(
                f"the training loss is {value} at epoch {epoch}, iteration {step} of {iters}; the run stops before the "
                f"weights take it (the checkpoints written so far are kept). Lower run.init_lr, or check the data."
            )


def optimizer_update(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, max_grad_norm: float | None
) -> None:
    """One optimizer step on the accumulated gradients, which are then cleared. With `max_grad_norm` (run key), the
    gradients of the trainable (optimized) parameters are first scaled down to that total 2-norm when above it,
    after unscaling when a loss scaler is used, so the limit holds for the true gradients."""
    if max_grad_norm is not None:
        if scaler:
            scaler.unscale_(optimizer)  # scaler.step then steps without unscaling again (or skips on inf/NaN)
        params = [param for group in optimizer.param_groups for param in group["params"] if param.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def needs_loss_scaling(device: torch.device, dtype: torch.dtype, amp: bool) -> bool:
    """Whether training scales its loss: float16 on CUDA does (its small gradients underflow); bfloat16 (float32's
    exponent range) and float32 do not. `run.amp: true` asks for mixed precision, which a model computing in float32
    contradicts: an error rather than a run that silently trains in full precision."""
    if amp and dtype == torch.float32:
        raise ValueError(f"run.amp is true, but the model computes in float32 on {device.type} (model.llm_dtype on "
                         "CUDA, model.cpu_dtype on CPU): choose bfloat16 or float16 there, or set run.amp=false")
    return device.type == "cuda" and dtype == torch.float16


def frozen_state_names(model: torch.nn.Module) -> list[str]:
    """The parameters that do not train, and the buffers of submodules without a trainable parameter: what DDP
    leaves alone."""
    names = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    for module_name, module in model.named_modules():
        if not any(parameter.requires_grad for parameter in module.parameters()):
            prefix = f"{module_name}." if module_name else ""
            names += [prefix + name for name, _ in module.named_buffers(recurse=False)]
    return names


def upload(samples: dict, device: torch.device, host_inputs: frozenset[str] = frozenset()) -> dict:
    """The batch's tensors (also inside lists and dicts) on `device`, copied without blocking the host (the loader
    pins them on CUDA), except the fields the model reads on the host (`host_inputs`): uploading those would read them
    back every step."""

    def moved(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, dict):
            return {key: moved(item) for key, item in value.items()}
        if isinstance(value, list):
            return [moved(item) for item in value]
        return value

    return {key: value if key in host_inputs else moved(value) for key, value in samples.items()}
