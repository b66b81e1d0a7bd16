"""The vision towers ADEM-VL reads: CLIP, SigLIP (SigLIP2's fixed-resolution checkpoints are SigLIP) and DINOv2 (with
or without registers), each through its own Hugging Face class.

One row of `VISION_FAMILIES` says, per family, which class loads it, where its blocks are, where the trainable adapter
beside each block's MLP reads and joins the residual stream, and where its [cls] feature comes from. Everything else is
shared: the features are the input of the last block after the tower's final norm (the last block never runs), split
into one [cls] feature and the patch grid, row-major.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from transformers import (
    AutoConfig,
    CLIPVisionModel,
    Dinov2Model,
    Dinov2WithRegistersModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionModel,
)

# Where a tower's [cls] feature comes from: its class token (position 0), or the pooled output of a tower trained
# without one (SigLIP: its attention-pooling head, the feature SigLIP's contrastive loss was trained on).
CLASS_TOKEN, POOLED_OUTPUT = "class_token", "pooled_output"


@dataclass(frozen=True)
class VisionFamily:
    """How ADEM-VL reads one family of Hugging Face vision towers."""

    model_class: type[PreTrainedModel]
    model_types: tuple[str, ...]  # the tower's config type, and the whole model's whose `vision_config` it loads
    blocks: str  # attribute path of the list of transformer blocks, from the tower's core (`core_of`)
    adapter_in: str  # the block submodule whose input the adapter reads: the MLP's, after its norm
    adapter_out: str  # the submodule whose output the adapter's output joins: the MLP branch's last, before the residual
    class_feature: str  # CLASS_TOKEN or POOLED_OUTPUT
    final_norm: str | None  # the final norm ADEM-VL applies itself, from the core; None: the output is normed already
    other_weights: tuple[str, ...] = ()  # weight-name prefixes a whole-model checkpoint holds beside the tower
    # Whether its forward interpolates position embeddings only when asked (CLIP, SigLIP); DINOv2's always does.
    asks_to_interpolate: bool = True
    # The submodule holding embeddings, blocks and norms in transformers 4.x (CLIP's and SigLIP's `vision_model`);
    # transformers 5's classes hold them themselves.
    wrapper: str | None = None

    def core_of(self, tower: nn.Module) -> nn.Module:
        """The module `blocks` and `final_norm` are paths from: the wrapper where this transformers has one."""
        return getattr(tower, self.wrapper) if self.wrapper and hasattr(tower, self.wrapper) else tower

    def prefix_tokens(self, config: PretrainedConfig) -> int:
        """Tokens before the patches in the blocks' sequence: the class token and DINOv2's register tokens."""
        return int(self.class_feature == CLASS_TOKEN) + getattr(config, "num_register_tokens", 0)


VISION_FAMILIES: dict[str, VisionFamily] = {
    # h += mlp(layer_norm2(h)); the model's last_hidden_state is not normed, post_layernorm is applied here.
    "clip_vision_model": VisionFamily(
        CLIPVisionModel, ("clip_vision_model", "clip"), "encoder.layers", "mlp", "mlp", CLASS_TOKEN, "post_layernorm",
        ("text_model.", "text_projection.", "visual_projection.", "logit_scale"), wrapper="vision_model",
    ),
    # No class token; last_hidden_state comes out of post_layernorm, and the head pools it.
    "siglip_vision_model": VisionFamily(
        SiglipVisionModel, ("siglip_vision_model", "siglip"), "encoder.layers", "mlp", "mlp", POOLED_OUTPUT, None,
        ("text_model.", "logit_scale", "logit_bias"), wrapper="vision_model",
    ),
    # h += layer_scale2(mlp(norm2(h))): the adapter joins after the layer scale, so it enters the residual stream
    # unscaled, as beside CLIP's MLP. Tokens: [cls], registers, patches; last_hidden_state is normed.
    "dinov2": VisionFamily(Dinov2Model, ("dinov2",), "encoder.layer", "mlp", "layer_scale2", CLASS_TOKEN, None,
                           asks_to_interpolate=False),
    "dinov2_with_registers": VisionFamily(
        Dinov2WithRegistersModel, ("dinov2_with_registers",), "encoder.layer", "mlp", "layer_scale2", CLASS_TOKEN, None,
        asks_to_interpolate=False,
    ),
}
DEFAULT_VISION_TYPE = "clip_vision_model"  # of a `vision_config` without `model_type` (the configs written before it)
# SigLIP2's NaFlex checkpoints take patches of variable resolution with a pixel mask, not an image of fixed size.
_REFUSED = {
    "siglip2": "SigLIP2's NaFlex (variable-resolution) towers take patch sequences, not fixed-size images; use a "
               "fixed-resolution SigLIP2 checkpoint (e.g. google/siglip2-so400m-patch14-384, which loads as SigLIP)",
}
_REFUSED["siglip2_vision_model"] = _REFUSED["siglip2"]


def vision_family(model_type: str, source: str) -> VisionFamily:
    """The family loading a config of `model_type`; anything else is a ValueError naming `source` and the types known."""
    for family in VISION_FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for family in VISION_FAMILIES.values() for t in family.model_types)
    reason = _REFUSED.get(model_type, f"supported: {known}")
    raise ValueError(f"{source} is a {model_type!r} model, not a vision tower ADEM-VL reads ({reason})")


def family_of(tower: nn.Module) -> VisionFamily:
    # The tower's own class, also once FSDP has put its subclass in front of it (`FSDPCLIPVisionModel`).
    tower_class = next(cls for cls in type(tower).__mro__ if not issubclass(cls, FSDPModule))
    for family in VISION_FAMILIES.values():
        if tower_class is family.model_class:
            return family
    raise TypeError(f"{tower_class.__name__} is not a vision tower class of {sorted(VISION_FAMILIES)}")


def vision_config(values: dict) -> PretrainedConfig:
    """The configuration of a random tower (`vision_config`): `AutoConfig.for_model(model_type, **rest)`, `model_type`
    one of VISION_FAMILIES (default CLIP's)."""
    values = dict(values)
    model_type = values.pop("model_type", DEFAULT_VISION_TYPE)
    vision_family(model_type, f"model.vision_config (model_type={model_type!r})")
    config = AutoConfig.for_model(model_type, **values)
    return getattr(config, "vision_config", config)


def random_vision_tower(values: dict) -> PreTrainedModel:
    config = vision_config(values)
    return vision_family(config.model_type, "model.vision_config").model_class(config)


def tower_blocks(tower: PreTrainedModel) -> nn.ModuleList:
    family = family_of(tower)
    return family.core_of(tower).get_submodule(family.blocks)


def drop_last_block(tower: PreTrainedModel) -> nn.ModuleList:
    """Remove the tower's last block (its output is never read) and return the blocks that run."""
    family = family_of(tower)
    parent, _, name = family.blocks.rpartition(".")
    blocks = tower_blocks(tower)[:-1]
    setattr(family.core_of(tower).get_submodule(parent), name, blocks)
    return blocks


def adapter_points(tower: PreTrainedModel) -> tuple[str, str]:
    """(the block submodule whose input a vision adapter reads, the one whose output it joins)."""
    family = family_of(tower)
    return family.adapter_in, family.adapter_out


def patch_grid(tower: PreTrainedModel, image_size: int) -> int:
    """The side of the square patch grid of an image of image_size x image_size pixels."""
    return image_size // tower.config.patch_size


def vision_features(tower: PreTrainedModel, image: torch.Tensor, image_size: int) -> torch.Tensor:
    """[B, 1 + N, C]: the [cls] feature, then the N patch features (row-major), read at the input of the tower's last
    block after its final norm. `image_size`: the side the model was built for; images of another size are an error."""
    if tuple(image.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"the images are {tuple(image.shape[-2:])} pixels, but the model reads {image_size}x{image_size} "
                         f"images (model.image_size, else the tower's config; the vis_processor's image_size must match)")
    family = family_of(tower)
    options = {}
    if family.asks_to_interpolate:
        options["interpolate_pos_encoding"] = image_size != tower.config.image_size
    output = tower(pixel_values=image.to(tower.dtype), **options)
    hidden = output.last_hidden_state
    if family.final_norm is not None:
        hidden = family.core_of(tower).get_submodule(family.final_norm)(hidden)
    prefix = family.prefix_tokens(tower.config)
    if family.class_feature == CLASS_TOKEN and prefix == 1:
        return hidden  # already [cls] + patches (CLIP, DINOv2): no copy
    patches = hidden[:, prefix:]
    if family.class_feature == CLASS_TOKEN:
        cls = hidden[:, :1]
    elif output.pooler_output is not None:
        cls = output.pooler_output.unsqueeze(1)
    else:  # a SigLIP tower saved without its head (vision_use_head: false): the patches' mean, as a pooled output
        cls = patches.mean(dim=1, keepdim=True)
    return torch.cat([cls, patches], dim=1)
