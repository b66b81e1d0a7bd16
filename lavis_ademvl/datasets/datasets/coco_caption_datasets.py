"""COCO caption evaluation images with their id read from the file name whatever its format (`.jpg`, `.png`, ...).

LAVIS 1.0.2's COCOCapEvalDataset reads the id with `name.strip(".jpg").split("_")[-1]`: `strip` removes characters,
not the suffix, so `COCO_val2014_000000000300.png` gave '000000000300.pn' and the evaluation stopped after training.
This dataset takes the digits after the last `_` of the name without its suffix, checks every annotation's name when
it is built, and opens images with `common.images.load_image` (errors name the file; 16-bit PNGs are not clipped).
"""
from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import Any

from lavis.datasets.datasets.coco_caption_datasets import COCOCapEvalDataset

from lavis_ademvl.common.images import load_image


def caption_image_id(image_path: str) -> int:
    """The COCO image id in an image's file name: the digits after its last `_` (`val2014/COCO_val2014_000000000300.png`
    -> 300), or the whole name when it has no `_` (`300.jpg`); anything else is a ValueError."""
    digits = PurePosixPath(image_path).stem.split("_")[-1]
    if not digits.isdigit():
        raise ValueError(f"image {image_path!r}: no image id in its file name; COCO caption evaluation reads it from "
                         "the digits after the name's last '_' (COCO_val2014_000000000300.jpg -> 300)")
    return int(digits)


class CaptionImagesEvalDataset(COCOCapEvalDataset):
    def __init__(self, vis_processor: Any, text_processor: Any, vis_root: str, ann_paths: list[str]) -> None:
        super().__init__(vis_processor, text_processor, vis_root, ann_paths)
        for number, annotation in enumerate(self.annotation):
            try:
                caption_image_id(annotation["image"])
            except ValueError as error:
                raise ValueError(f"{', '.join(ann_paths)}, entry {number}: {error}") from error

    def __getitem__(self, index: int) -> dict[str, Any]:
        annotation = self.annotation[index]
        image = load_image(os.path.join(self.vis_root, annotation["image"]))
        return {
            "image": self.vis_processor(image),
            "image_id": str(caption_image_id(annotation["image"])),  # a str, as LAVIS's dataset gives it
            "instance_id": annotation["instance_id"],
        }
