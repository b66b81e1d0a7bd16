"""The GPU memory one rank of an ADEM-VL training run needs, under DDP and under FSDP on N GPUs, from shapes alone.

`predict_training_memory(model, batch, length, gpus)` takes a model built on the meta device (`AdemVL.on_meta_device`)
and returns, per strategy, what each rank holds (bytes):
- `frozen`: the frozen LLM and vision tower in `llm_dtype`; under FSDP its shard only, each tensor's rows split as
  torch.chunk splits them (`sharding.shard_rows`);
- `gathered`: under FSDP, the units gathered at a time: the largest, twice (the one running and the one prefetched);
- `trainable`: the trainable weights in float32 with their gradients and AdamW's two moments (16 bytes each);
- `activations`: what autograd saves for backward in one step of `batch` sequences of `length` tokens with images,
  measured by running the model's forward on the meta device (`common.saved_tensors`); with gradient checkpointing,
  plus one decoder layer's share, recomputed in backward. The meta device runs attention by the math kernel, which
  keeps each layer's attention weights (batch x heads x length^2); the flash and memory-efficient kernels a GPU runs
  keep a row statistic instead, so the figure is an upper bound by that much.
Not counted: the CUDA context and the allocator's cache (1-2 GB), temporaries inside one operation, the DDP gradient
buckets (4 bytes per trainable weight).
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lavis_ademvl.common.saved_tensors import saved_tensor_bytes
from lavis_ademvl.models.processing import EncodedBatch
from lavis_ademvl.models.sharding import llm_units
from lavis_ademvl.models.towers import DTYPES
from lavis_ademvl.models.vision_towers import tower_blocks

TRAINABLE_BYTES = 16  # float32 weight, gradient, AdamW's exp_avg and exp_avg_sq
ANSWER_TOKENS = 8  # the label columns whose logits a training step computes


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds during a training step."""

    frozen: int
    gathered: int
    trainable: int
    activations: int

    @property
    def total(self) -> int:
        return self.frozen + self.gathered + self.trainable + self.activations


def tensor_bytes(tensors: list[torch.Tensor], element_size: int, shards: int = 1) -> int:
    """Bytes of `tensors` in elements of `element_size`, or of one rank's shard of each when split over `shards`."""
    return sum(math.ceil(t.shape[0] / shards) * math.prod(t.shape[1:]) * element_size if t.dim() else element_size
               for t in tensors)


def frozen_units(model: nn.Module) -> list[list[torch.Tensor]]:
    """The frozen weights of each FSDP unit (`sharding.shard_frozen_towers`' split), the roots' leftovers last."""
    units = []
    for unit in llm_units(model.llm):
        modules = unit if isinstance(unit, list) else [unit]
        units.append(list({id(p): p for module in modules for p in module.parameters()}.values()))
    if model.vision_tower is not None:
        units += [list(block.parameters()) for block in tower_blocks(model.vision_tower)]
    held = {id(p) for unit in units for p in unit}
    towers = [model.llm, *([model.vision_tower] if model.vision_tower is not None else [])]
    units.append([p for tower in towers for p in tower.parameters() if id(p) not in held])
    return units


class RotaryOnHost(nn.Module):
    """A rotary position embedding run on the host for a meta-device forward: transformers 4.x opens an autocast
    guard on its input's device inside it, which the meta device has not. The cos and sin it returns need no gradient
    (nothing saved for backward), so only their shapes matter: computed from host copies, handed back on meta."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = copy.deepcopy(rotary).to_empty(device="cpu")

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        host = self.rotary(torch.zeros(x.shape, dtype=x.dtype, device="cpu"),
                           torch.zeros(position_ids.shape, dtype=torch.long, device="cpu"), *args, **kwargs)
        return tuple(torch.empty_like(tensor, device="meta") for tensor in host)


@contextlib.contextmanager
def rotaries_on_host(llm: nn.Module) -> Iterator[None]:
    """Every rotary embedding of `llm` (a module named rotary_emb*, without weights) replaced by `RotaryOnHost`."""
    replaced = [(name, module) for name, module in llm.named_modules()
                if name.rpartition(".")[2].startswith("rotary_emb") and not list(module.parameters())]
    for name, module in replaced:
        llm.set_submodule(name, RotaryOnHost(module))
    try:
        yield
    finally:
        for name, module in replaced:
            llm.set_submodule(name, module)


def measured_activations(model: nn.Module, batch: int, length: int, dtype: torch.dtype,
                         device: str | torch.device = "meta") -> int:
    """Bytes autograd saves in one training step of `batch` sequences of `length` tokens with an image each, on the
    model's device (the meta device: shapes only); the model is cast to `dtype` (as autocast computes it) for it."""
    model = model.to(dtype).train()

    def step() -> None:
        with torch.device(device):
            image = torch.empty(batch, 3, model.image_size, model.image_size, dtype=dtype) \
                if model.vision_tower is not None else None
            visual = model.visual_inputs(image, torch.ones(batch))
            ids = torch.zeros(batch, length, dtype=torch.long)
            slots = torch.zeros(batch, length, dtype=torch.bool)
            encoded = EncodedBatch(ids, torch.ones_like(ids), slots, ids, ANSWER_TOKENS, padded=False)
            # A 4-D mask: Hugging Face's mask builder reads a 2-D one's values, which meta tensors have not.
            mask = torch.ones(batch, 1, length, length, dtype=torch.bool)
            on_host = rotaries_on_host(model.llm) if torch.device(device).type == "meta" else contextlib.nullcontext()
            with model.llm_inputs(encoded, visual) as embeds, on_host:
                logits = model.llm(inputs_embeds=embeds, attention_mask=mask,
                                   use_cache=False, **model.logits_to_keep(embeds, ANSWER_TOKENS + 1)).logits
            F.cross_entropy(logits.float().flatten(0, 1), torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long))

    saved = saved_tensor_bytes(step, model.parameters())
    if model.config.llm_gradient_checkpointing:  # backward recomputes one layer at a time, on top of what is kept
        model.llm.gradient_checkpointing_disable()
        saved += saved_tensor_bytes(step, model.parameters()) // len(model.decoder_layers())
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return saved


def predict_training_memory(model: nn.Module, batch: int, length: int, gpus: int) -> dict[str, RankMemory]:
    """{"ddp": ..., "fsdp": ...}: what one rank holds in a training step, the frozen towers sharded over `gpus` ranks
    under FSDP."""
    dtype = DTYPES[model.config.llm_dtype]
    element_size = torch.empty(0, dtype=dtype).element_size()
    units = frozen_units(model)
    frozen = [p for unit in units for p in unit]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * TRAINABLE_BYTES
    activations = measured_activations(model, batch, length, dtype)
    largest = max(tensor_bytes(unit, element_size) for unit in units)
    return {
        "ddp": RankMemory(tensor_bytes(frozen, element_size), 0, trainable, activations),
        "fsdp": RankMemory(tensor_bytes(frozen, element_size, gpus), 2 * largest if gpus > 1 else 0, trainable,
                           activations),
    }
