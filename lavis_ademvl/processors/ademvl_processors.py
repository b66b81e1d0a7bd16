"""Image and text processors for ADEM-VL: CLIP-style transforms, or the authors' own, with a choice of normalisation.

`resize: squash` is the authors' `Resize((224, 224), bicubic)` (ScienceQA, instruction data, COCO evaluation), which
changes the aspect ratio instead of cropping; `augment: randaugment` is their (and BLIP's) COCO training recipe.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
from lavis.processors.base_processor import BaseProcessor
from lavis.processors.blip_processors import BlipImageBaseProcessor
from lavis.processors.clip_processors import _convert_to_rgb
from lavis.processors.randaugment import RandomAugment, arg_dict, func_dict
from omegaconf import DictConfig, OmegaConf
from torchvision import transforms
from torchvision.transforms.functional import InterpolationMode

from lavis_ademvl.common.registration import register
from lavis_ademvl.common.validation import check_choice, check_known_keys

# CLIP's statistics are right for CLIP towers; the authors' ScienceQA and instruction checkpoints saw ImageNet's.
NORMALIZATIONS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # DINOv2's
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
TRAIN_RESIZES = ("random_crop", "squash")  # random resized crop (CLIP/BLIP) | the authors' fixed (size, size) resize
EVAL_RESIZES = ("center_crop", "squash")  # short side to size + centre crop (CLIP) | (size, size) resize
AUGMENTS = ("none", "randaugment")
# The operations of the authors' (and BLIP's) COCO caption RandomAugment(2, 5, ...).
RANDAUGMENT_OPS = ["Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY",
                   "TranslateX", "TranslateY", "Rotate"]


def _read_config(cfg: DictConfig | None, choices: dict[str, tuple[str, ...]], other: set[str], processor: str) -> DictConfig:
    """The processor's config, every key known and every choice (first value: the default) allowed."""
    cfg = cfg if cfg is not None else OmegaConf.create()
    check_known_keys(processor, set(cfg.keys()) - {"name"}, set(choices) | other)
    for key, values in choices.items():
        check_choice(f"{processor}.{key}", cfg.get(key, values[0]), values)
    return cfg


def autocontrast(image: np.ndarray) -> np.ndarray:
    """Stretch each channel of an HxWx3 uint8 image to 0..255 (PIL.ImageOps.autocontrast without cutoff).

    LAVIS 1.0.2's version negates the channel minimum as a uint8, which wraps around (-20 becomes 236) and whitens
    every channel whose minimum is above 0; the authors' copy computes it in floating point, as here.
    """
    out = np.empty_like(image)
    for channel in range(image.shape[2]):
        values = image[..., channel]
        low, high = float(values.min()), float(values.max())
        if high <= low:
            out[..., channel] = values
            continue
        scale = 255.0 / (high - low)
        table = (np.arange(256) * scale - low * scale).clip(0, 255).astype(np.uint8)
        out[..., channel] = table[values]
    return out


class CaptionRandomAugment(RandomAugment):
    """LAVIS's RandomAugment (two random operations of RANDAUGMENT_OPS at magnitude 5, each applied with
    probability 0.5, on a PIL image, returning an array) with `autocontrast` in place of LAVIS's AutoContrast."""

    def __init__(self) -> None:
        super().__init__(2, 5, isPIL=True, augs=RANDAUGMENT_OPS)

    def __call__(self, image: Any) -> np.ndarray:
        image = np.array(image)
        for name, probability, level in self.get_random_ops():
            if np.random.random() > probability:
                continue
            image = autocontrast(image) if name == "AutoContrast" else func_dict[name](image, *arg_dict[name](level))
        return image


@register("processor", "ademvl_image_train")
class AdemImageTrainProcessor(BlipImageBaseProcessor):
    """`resize: random_crop` (random resized crop, scale min_scale..max_scale) or `squash` ((size, size), no crop);
    bicubic; `augment: randaugment` adds a horizontal flip and CaptionRandomAugment; RGB, tensor, normalised."""

    def __init__(
        self,
        image_size: int = 224,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        min_scale: float = 0.9,
        max_scale: float = 1.0,
        resize: str = "random_crop",
        augment: str = "none",
    ) -> None:
        super().__init__(mean=mean, std=std)
        check_choice("ademvl_image_train.resize", resize, TRAIN_RESIZES)
        check_choice("ademvl_image_train.augment", augment, AUGMENTS)
        if resize == "random_crop":
            scale = (min_scale, max_scale)
            steps = [transforms.RandomResizedCrop(image_size, scale=scale, interpolation=InterpolationMode.BICUBIC)]
        else:
            steps = [transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)]
        steps.append(_convert_to_rgb)
        if augment == "randaugment":
            steps += [transforms.RandomHorizontalFlip(), CaptionRandomAugment()]
        self.transform = transforms.Compose(steps + [transforms.ToTensor(), self.normalize])

    def __call__(self, item: Any) -> Any:
        return self.transform(item)

    @classmethod
    def from_config(cls, cfg: DictConfig | None = None) -> AdemImageTrainProcessor:
        choices = {"normalize": tuple(NORMALIZATIONS), "resize": TRAIN_RESIZES, "augment": AUGMENTS}
        cfg = _read_config(cfg, choices, {"image_size", "min_scale", "max_scale"}, "ademvl_image_train")
        mean, std = NORMALIZATIONS[cfg.get("normalize", "clip")]
        return cls(
            image_size=cfg.get("image_size", 224),
            mean=mean,
            std=std,
            min_scale=cfg.get("min_scale", 0.9),
            max_scale=cfg.get("max_scale", 1.0),
            resize=cfg.get("resize", "random_crop"),
            augment=cfg.get("augment", "none"),
        )


@register("processor", "ademvl_image_eval")
class AdemImageEvalProcessor(BlipImageBaseProcessor):
    """`resize: center_crop` (short side to image_size, centre crop) or `squash` ((size, size), no crop); bicubic;
    RGB, tensor, normalised."""

    def __init__(
        self,
        image_size: int = 224,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        resize: str = "center_crop",
    ) -> None:
        super().__init__(mean=mean, std=std)
        check_choice("ademvl_image_eval.resize", resize, EVAL_RESIZES)
        if resize == "center_crop":
            steps = [transforms.Resize(image_size, interpolation=InterpolationMode.BICUBIC), transforms.CenterCrop(image_size)]
        else:
            steps = [transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)]
        self.transform = transforms.Compose(steps + [_convert_to_rgb, transforms.ToTensor(), self.normalize])

    def __call__(self, item: Any) -> Any:
        return self.transform(item)

    @classmethod
    def from_config(cls, cfg: DictConfig | None = None) -> AdemImageEvalProcessor:
        cfg = _read_config(cfg, {"normalize": tuple(NORMALIZATIONS), "resize": EVAL_RESIZES}, {"image_size"}, "ademvl_image_eval")
        mean, std = NORMALIZATIONS[cfg.get("normalize", "clip")]
        return cls(image_size=cfg.get("image_size", 224), mean=mean, std=std, resize=cfg.get("resize", "center_crop"))


@register("processor", "ademvl_text")
class AdemTextProcessor(BaseProcessor):
    """Collapses runs of spaces and tabs and strips; keeps case, punctuation and newlines (prompts use them)."""

    def __call__(self, text: str) -> str:
        return re.sub(r"[ \t]+", " ", text).strip()

    @classmethod
    def from_config(cls, cfg: DictConfig | None = None) -> AdemTextProcessor:
        cfg = cfg if cfg is not None else OmegaConf.create()
        unknown = sorted(set(cfg.keys()) - {"name"})
        if unknown:
            raise KeyError(f"unknown ademvl_text config key(s) {unknown}; it takes none")
        return cls()
