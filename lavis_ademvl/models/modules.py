"""ADEM-VL's trainable modules beside the frozen towers: the low-rank projections and the vision adapters."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle


class LowRankProjection(nn.Module):
    """W': width -> hidden -> d_llm with SiLU between; xavier weights and zero biases. (Checkpoints written when it
    was an nn.Sequential name fc1/fc2 `0`/`2`: `checkpoint_keys.rename_legacy_keys`.)"""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden_features, out_features)
        for linear in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(features)))


class VisionAdapter(nn.Module):
    """Bottleneck beside a frozen vision tower block's MLP: mlp_out + scale * fc2(dropout(gelu(fc1(x)))), fc2 starting at zero."""

    def __init__(self, width: int, rank: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, rank, bias=False)
        self.fc2 = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.fc2.weight)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, mlp_input: torch.Tensor) -> torch.Tensor:
        return self.scale * self.fc2(self.dropout(F.gelu(self.fc1(mlp_input))))


class VisionAdapters(nn.ModuleList):
    """One VisionAdapter per tower block that runs, reading the input of each block's `adapter_in` submodule (its MLP)
    and adding to the output of `adapter_out` (the MLP, or what follows it before the residual: DINOv2's layer scale)."""

    def __init__(self, width: int, count: int, rank: int, scale: float, dropout: float) -> None:
        super().__init__(VisionAdapter(width, rank, scale, dropout) for _ in range(count))

    def attach(self, blocks: Sequence[nn.Module], adapter_in: str = "mlp", adapter_out: str = "mlp") -> list[RemovableHandle]:
        if len(blocks) != len(self):
            raise ValueError(f"{len(self)} vision adapters for {len(blocks)} vision tower blocks")
        handles = []
        for block, adapter in zip(blocks, self):
            if adapter_in == adapter_out:
                handles.append(getattr(block, adapter_out).register_forward_hook(_adapter_hook(adapter)))
                continue
            # The adapter's input is read when adapter_in runs and consumed when adapter_out, later in the block, does.
            inputs: list[torch.Tensor] = []
            handles.append(getattr(block, adapter_in).register_forward_pre_hook(_input_keeper(inputs)))
            handles.append(getattr(block, adapter_out).register_forward_hook(_adapter_hook(adapter, inputs)))
        return handles


def _input_keeper(inputs: list[torch.Tensor]):
    def hook(module: nn.Module, args: tuple) -> None:
        inputs.append(args[0])

    return hook


def _adapter_hook(adapter: VisionAdapter, inputs: list[torch.Tensor] | None = None):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        adapter_input = inputs.pop() if inputs is not None else args[0]
        return output + adapter(adapter_input).to(output.dtype)

    return hook
