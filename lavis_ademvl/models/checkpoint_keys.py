"""The key layouts of the checkpoints ADEM-VL reads, mapped to its parameter names (`checkpoint_state`):

- ours (`lavis_ademvl.train`'s checkpoints: {"model": trainable weights, "optimizer", "epoch", ...});
- ours before the projections had named sub-layers: `visual_proj.0.*`/`.2.*` (an nn.Sequential) for `.fc1.*`/`.fc2.*`;
- the ADEM-VL authors' released checkpoints (`checkpoint_7B_{sqa,caption,instruction}.pth`).

Their `util/misc.py` `save_model` writes {"model", "optimizer", "epoch", "scaler", "args" (an argparse.Namespace of
their train.py arguments)}; `common.checkpoints.load_checkpoint_file` reads it with weights_only=True. "model" holds
every parameter whose name contains "adapter", behind the DDP `module.` prefix when trained on several GPUs:
  adapter_emb1, adapter_emb2                        [1, Nv, d]       -> visual_key_offset, visual_value_offset
  adapter_proj.fc1.{weight,bias}, .fc2.*            W'               -> visual_proj.fc1.*, visual_proj.fc2.*
  adapter_proj_cls.fc1.*, .fc2.*                    [cls] projection -> cls_proj.fc1.*, cls_proj.fc2.*
  backbone.visual.transformer.resblocks.{i}.adapter_mlp.fc{1,2}.weight (OpenAI-CLIP block i = Hugging Face layer i)
                                                                     -> vision_adapters.{i}.fc{1,2}.weight
Their last CLIP block's adapter was saved but never used (its output is not read): it is skipped, and said so.
Their ScienceQA and instruction images were normalised with ImageNet statistics, their COCO ones with CLIP's:
projects/ademvl/authors/ holds the evaluation configs that feed each checkpoint what it was trained on.
"""
from __future__ import annotations

import argparse
import logging
import re
from typing import Any

import torch

_PROJECTIONS = {"adapter_proj": "visual_proj", "adapter_proj_cls": "cls_proj"}
_LEGACY_PROJECTION = re.compile(r"^(visual_proj|cls_proj)\.([02])\.(weight|bias)$")
_LEGACY_LINEARS = {"0": "fc1", "2": "fc2"}
_VISION_ADAPTER = re.compile(r"^backbone\.visual\.transformer\.resblocks\.(\d+)\.adapter_mlp\.(fc[12])\.weight$")
_PROJECTION = re.compile(r"^(adapter_proj|adapter_proj_cls)\.(fc[12])\.(weight|bias)$")
# The train.py arguments that decide what text and sequences the checkpoint saw.
_TRAINING_ARGS = ("dataset", "prompt_format", "use_caption", "max_seq_len", "adapter_dim", "down_sample_num",
                  "alpha", "beta", "drop_ratio", "no_cls")


def checkpoint_state(checkpoint: dict[str, Any], num_used_vision_layers: int, source: str) -> dict[str, torch.Tensor]:
    """The trainable weights of a loaded checkpoint file (an authors' one mapped to our names); `rename_legacy_keys`
    is applied on loading (`AdemVL.load_trainable_state`, which a resumed run calls too)."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {source} holds no weights (a dict of tensors, under 'model')")
    if is_authors_checkpoint(state):
        state = convert_authors_state_dict(state, num_used_vision_layers)
        describe_authors_run(checkpoint, source)
    return state


def rename_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`visual_proj.0.weight` -> `visual_proj.fc1.weight` (and `.2.` -> `.fc2.`, likewise `cls_proj`); other keys
    stay as they are."""
    renamed = {}
    for key, value in state.items():
        match = _LEGACY_PROJECTION.match(key)
        if match:
            module, position, kind = match.groups()
            key = f"{module}.{_LEGACY_LINEARS[position]}.{kind}"
        renamed[key] = value
    return renamed


def is_authors_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    return any(key.removeprefix("module.") in ("adapter_emb1", "adapter_emb2") for key in state)


def convert_authors_state_dict(state: dict[str, torch.Tensor], num_used_vision_layers: int) -> dict[str, torch.Tensor]:
    """Their keys -> ours. A key that maps to nothing is an error (unless it is the unused last-block adapter)."""
    converted, unmapped, skipped = {}, [], []
    for key, value in state.items():
        name = key.removeprefix("module.")
        if name == "adapter_emb1":
            converted["visual_key_offset"] = value
        elif name == "adapter_emb2":
            converted["visual_value_offset"] = value
        elif match := _PROJECTION.match(name):
            module, linear, kind = match.groups()
            converted[f"{_PROJECTIONS[module]}.{linear}.{kind}"] = value
        elif match := _VISION_ADAPTER.match(name):
            block, linear = int(match.group(1)), match.group(2)
            if block < num_used_vision_layers:
                converted[f"vision_adapters.{block}.{linear}.weight"] = value
            elif block == num_used_vision_layers:
                skipped.append(key)
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    if unmapped:
        raise KeyError(f"{len(unmapped)} keys of the authors' checkpoint map to nothing in this model: {unmapped[:8]}")
    if skipped:
        logging.info("skipped the authors' adapter of the last CLIP block, which their model never used: %s", skipped)
    return converted


def describe_authors_run(checkpoint: dict[str, Any], source: str) -> None:
    """Log the epoch and the training arguments an authors' checkpoint was saved with, when it holds them."""
    args = checkpoint.get("args")
    settings = {}
    if isinstance(args, argparse.Namespace):
        settings = {name: getattr(args, name) for name in _TRAINING_ARGS if hasattr(args, name)}
    logging.info(
        "authors' checkpoint %s, epoch %s, trained with %s", source, checkpoint.get("epoch", "?"), settings or "unknown arguments"
    )
