"""A learning-rate schedule that moves every iteration, as the paper's recipe does."""
from __future__ import annotations

import math
from typing import Any

import torch

from lavis_ademvl.common.registration import register


def warmup_cosine_lr(progress: float, init_lr: float, min_lr: float, warmup_epochs: float, max_epoch: float) -> float:
    """lr at fractional epoch `progress`: linear warmup from 0, then a half-cycle cosine to min_lr."""
    if progress < warmup_epochs:
        return init_lr * progress / warmup_epochs
    span = max(max_epoch - warmup_epochs, 1e-12)
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress - warmup_epochs, span) / span))


@register("lr_scheduler", "linear_warmup_cosine_iter_lr")
class LinearWarmupCosineIterLRScheduler:
    """Per-iteration warmup + cosine. LAVIS's `linear_warmup_cosine_lr` only decays once per epoch.

    Config (run:): init_lr, min_lr, max_epoch, warmup_epochs (fractional, e.g. 2 or 0.1). The runner passes
    iters_per_epoch, the number of training iterations (not optimizer steps) in one epoch.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_epoch: int,
        init_lr: float,
        min_lr: float = 0.0,
        warmup_epochs: float = 0.0,
        iters_per_epoch: int = 1,
        **kwargs: Any,
    ) -> None:
        if iters_per_epoch <= 0:
            raise ValueError(f"iters_per_epoch={iters_per_epoch} must be positive")
        self.optimizer = optimizer
        self.max_epoch = max_epoch
        self.init_lr = init_lr
        self.min_lr = min_lr
        self.warmup_epochs = float(warmup_epochs)
        self.iters_per_epoch = iters_per_epoch

    def step(self, cur_epoch: int, cur_step: int) -> float:
        progress = cur_epoch + cur_step / self.iters_per_epoch
        lr = warmup_cosine_lr(progress, self.init_lr, self.min_lr, self.warmup_epochs, self.max_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr
