"""Image and text processors for ADEM-VL: LAVIS's CLIP image transforms with a choice of normalisation."""
from __future__ import annotations

import re

from lavis.processors.base_processor import BaseProcessor
from lavis.processors.clip_processors import ClipImageEvalProcessor, ClipImageTrainProcessor
from omegaconf import DictConfig, OmegaConf

from lavis_ademvl.common.registration import register
from lavis_ademvl.models.fusion import check_choice

# CLIP's statistics are right for CLIP towers; ImageNet's reproduce the authors' released checkpoints.
NORMALIZATIONS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _read_config(cfg: DictConfig | None, allowed: set[str], processor: str) -> DictConfig:
    cfg = cfg if cfg is not None else OmegaConf.create()
    unknown = sorted(set(cfg.keys()) - allowed - {"name"})
    if unknown:
        raise KeyError(f"unknown {processor} config key(s) {unknown}; known keys: {sorted(allowed)}")
    normalize = cfg.get("normalize", "clip")
    check_choice(f"{processor}.normalize", normalize, tuple(NORMALIZATIONS))
    return cfg


@register("processor", "ademvl_image_train")
class AdemImageTrainProcessor(ClipImageTrainProcessor):
    """Random resized crop (scale min_scale..max_scale), bicubic, RGB, normalised."""

    @classmethod
    def from_config(cls, cfg: DictConfig | None = None) -> "AdemImageTrainProcessor":
        cfg = _read_config(cfg, {"image_size", "min_scale", "max_scale", "normalize"}, "ademvl_image_train")
        mean, std = NORMALIZATIONS[cfg.get("normalize", "clip")]
        return cls(
            image_size=cfg.get("image_size", 224),
            mean=mean,
            std=std,
            min_scale=cfg.get("min_scale", 0.9),
            max_scale=cfg.get("max_scale", 1.0),
        )


@register("processor", "ademvl_image_eval")
class AdemImageEvalProcessor(ClipImageEvalProcessor):
    """Resize the short side, centre crop, RGB, normalised."""

    @classmethod
    def from_config(cls, cfg: DictConfig | None = None) -> "AdemImageEvalProcessor":
        cfg = _read_config(cfg, {"image_size", "normalize"}, "ademvl_image_eval")
        mean, std = NORMALIZATIONS[cfg.get("normalize", "clip")]
        return cls(image_size=cfg.get("image_size", 224), mean=mean, std=std)


@register("processor", "ademvl_text")
class AdemTextProcessor(BaseProcessor):
    """Collapses runs of spaces and tabs and strips; keeps case, punctuation and newlines (prompts use them)."""

    def __call__(self, text: str) -> str:
        return re.sub(r"[ \t]+", " ", text).strip()

    @classmethod
    def from_config(cls, cfg: DictConfig | None = None) -> "AdemTextProcessor":
        cfg = cfg if cfg is not None else OmegaConf.create()
        unknown = sorted(set(cfg.keys()) - {"name"})
        if unknown:
            raise KeyError(f"unknown ademvl_text config key(s) {unknown}; it takes none")
        return cls()
