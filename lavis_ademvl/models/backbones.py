"""What a checkpoint records of the frozen parts it was trained with, and the check that it loads onto the same ones.

ADEM-VL's trainable weights mean something only on the frozen LLM, vision tower and tokenizer they were trained with,
and shapes do not tell those apart: LLaMA-7B, LLaMA-2-7B and LLaMA-3-8B share every trainable shape, so a checkpoint of
one loaded onto another scores garbage without a word. `backbone_identity` describes each part by the name or folder it
was given (shown in messages only), its model type, and a fingerprint that does not depend on where its files are:

- a tower: a hash of the names and shapes of its frozen tensors, and a sample of their values;
- the tokenizer: a hash of its vocabulary (token -> id).

`check_same_backbones` compares a checkpoint's record (its "backbones" key, written by the runner) with the model's.
Values are compared within a tolerance, not hashed: the same weights read in bfloat16 on a GPU and in float32 on a CPU
differ in their last bits. The weights of Linear layers are left out of the fingerprint, as 8-bit and 4-bit loading
replaces them with packed integers; embeddings, norms and biases stay as they were, and differ between checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Any

import torch
import torch.nn as nn

from lavis_ademvl.models.sharding import sampled_values

PARTS = {"llm": "the LLM", "vision": "the vision tower", "tokenizer": "the tokenizer"}
SAMPLED_TENSORS = 64  # the tensors whose values are sampled, spread over the sorted names (a checkpoint stays small)
VALUES_PER_TENSOR = 4
# Relative tolerance of sampled values: bfloat16 keeps 8 bits of mantissa (0.4%); other weights differ by far more.
VALUE_TOLERANCE = 2e-2
OVERRIDE = "model.allow_backbone_mismatch=true"


def backbone_identity(
    llm: nn.Module, vision_tower: nn.Module | None, tokenizer: Any, sources: dict[str, str | None]
) -> dict[str, dict[str, Any] | None]:
    """{part: its identity} of the LLM, the vision tower (None without one) and the tokenizer (None without one);
    `sources`: each part's name or folder as the config gave it (None: a random tower of `llm_config`/`vision_config`)."""
    return {
        "llm": tower_identity(llm, sources["llm"]),
        "vision": tower_identity(vision_tower, sources["vision"]) if vision_tower is not None else None,
        "tokenizer": tokenizer_identity(tokenizer, sources["tokenizer"]) if tokenizer is not None else None,
    }


def fingerprinted_tensors(tower: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen floating-point tensors of `tower` that every way of loading it keeps: all but Linear weights."""
    linear_weights = {f"{name}.weight" for name, module in tower.named_modules() if isinstance(module, nn.Linear)}
    return {name: tensor for name, tensor in tower.named_parameters()
            if not tensor.requires_grad and tensor.is_floating_point() and name not in linear_weights}


def tower_identity(tower: nn.Module, source: str | None) -> dict[str, Any]:
    tensors = fingerprinted_tensors(tower)
    names = sorted(tensors)
    layout = "\n".join(f"{name} {tuple(tensors[name].shape)}" for name in names)
    sampled = names[:: max(1, math.ceil(len(names) / SAMPLED_TENSORS))]
    return {
        "source": source,
        "model_type": getattr(getattr(tower, "config", None), "model_type", type(tower).__name__),
        "structure": hashlib.sha256(layout.encode()).hexdigest(),
        "sample": [value for name in sampled for value in value_sample(tensors[name])],
    }


def value_sample(tensor: torch.Tensor) -> list[float]:
    """VALUES_PER_TENSOR values spread evenly over the tensor's elements, as float32 on the host (of a tensor sharded
    by FSDP too: then a collective, `sharding.sampled_values`)."""
    numel = tensor.numel()
    count = min(VALUES_PER_TENSOR, numel)
    # integer steps: float32 positions round past the last element of a tensor over 2**24 elements (an embedding)
    positions = torch.arange(count) * (numel - 1) // max(count - 1, 1)
    return sampled_values(tensor, positions).tolist()


def tokenizer_identity(tokenizer: Any, source: str | None) -> dict[str, Any]:
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()))  # ensure_ascii: lone surrogates encode too
    return {"source": source, "vocabulary": hashlib.sha256(vocabulary.encode()).hexdigest()}


def part_difference(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> str | None:
    """How a part of the checkpoint's record differs from the model's (None: the same part)."""
    if saved is None or current is None:
        return None if saved is current else "one side has none"
    if "vocabulary" in saved or "vocabulary" in current:
        return None if saved.get("vocabulary") == current.get("vocabulary") else "another vocabulary"
    if saved.get("model_type") != current.get("model_type"):
        return "another model type"
    if saved.get("structure") != current.get("structure"):
        return "other tensor names or shapes"
    ours, theirs = current.get("sample") or [], saved.get("sample") or []
    if len(ours) != len(theirs) or not torch.allclose(
        torch.tensor(theirs, dtype=torch.float64), torch.tensor(ours, dtype=torch.float64), rtol=VALUE_TOLERANCE, atol=1e-4
    ):
        return "other weights"
    return None


def described(part: str, identity: dict[str, Any] | None) -> str:
    """A part as a message names it: its name or folder (a random tower: its config key) and model type."""
    if identity is None:
        return "none"
    source = repr(identity["source"]) if identity.get("source") else f"a random {part}_config"
    return f"{source} ({identity['model_type']})" if identity.get("model_type") else source


def check_same_backbones(saved: Any, current: dict[str, Any], source: str, allow_mismatch: bool) -> None:
    """A ValueError naming each frozen part the checkpoint was trained on (its record `saved`) that differs from the
    model's (`current`), both sides; with `allow_mismatch`, a warning."""
    if not isinstance(saved, dict) or not all(isinstance(saved.get(part), (dict, type(None))) for part in PARTS):
        raise ValueError(f"checkpoint {source}: its `backbones` record is not a mapping of {sorted(PARTS)}")
    differences = []
    for part, name in PARTS.items():
        if part in saved and (why := part_difference(saved[part], current.get(part))) is not None:
            differences.append(f"{name}: {described(part, saved[part])} there, {described(part, current.get(part))} "
                               f"here ({why})")
    if not differences:
        return
    message = f"checkpoint {source} was trained on other frozen parts: {'; '.join(differences)}"
    if allow_mismatch:
        logging.warning("%s; loaded anyway (%s)", message, OVERRIDE)
        return
    raise ValueError(f"{message}. Load it with the LLM, vision tower and tokenizer it was trained with, or set "
                     f"{OVERRIDE} to load it onto these")
