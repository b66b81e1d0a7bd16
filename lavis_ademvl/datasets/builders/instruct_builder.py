"""Builder `ademvl_instruct`: instruction-following data (all_data.json or LLaVA conversations) from local files."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_ademvl.common.registration import register
from lavis_ademvl.common.validation import check_choice, check_known_keys
from lavis_ademvl.datasets.datasets.instruct_datasets import (
    InstructionDataset,
    all_data_conversations,
    llava_conversations,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "datasets" / "ademvl_instruct"
DATASET_KEYS = {"data_type", "build_info", "vis_processor", "text_processor", "type"}
BUILD_INFO_KEYS = {"format", "data_root", "annotations", "split", "image_dir"}
FORMATS = ("all_data", "llava")
DEFAULT_ANNOTATIONS = {"all_data": "all_data.json", "llava": "llava_instruct_150k.json"}


@register("builder", "ademvl_instruct")
class InstructionBuilder(BaseDatasetBuilder):
    train_dataset_cls = InstructionDataset
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "defaults.yaml")}

    @classmethod
    def default_config_path(cls, type: str = "default") -> str:
        check_choice("ademvl_instruct type", type, tuple(cls.DATASET_CONFIG_DICT))
        return cls.DATASET_CONFIG_DICT[type]

    def build_datasets(self) -> dict[str, InstructionDataset]:
        # Local files only: every rank reads them, nothing to download or wait for.
        return self.build()

    def build(self) -> dict[str, InstructionDataset]:
        check_known_keys("datasets.ademvl_instruct", set(self.config.keys()), DATASET_KEYS)
        build_info = self.config.get("build_info") or {}
        check_known_keys("datasets.ademvl_instruct.build_info", set(build_info.keys()), BUILD_INFO_KEYS)
        data_format = build_info.get("format", "all_data")
        check_choice("datasets.ademvl_instruct.build_info.format", data_format, FORMATS)
        if not build_info.get("data_root"):
            raise ValueError(
                "datasets.ademvl_instruct.build_info.data_root is not set; point it at the folder holding the "
                f"instruction file ({DEFAULT_ANNOTATIONS[data_format]}) and its images"
            )
        root = Path(os.path.expanduser(str(build_info.data_root)))
        if not root.is_dir():
            raise FileNotFoundError(f"datasets.ademvl_instruct.build_info.data_root is not a folder: {root}")
        annotations = root / os.path.expanduser(str(build_info.get("annotations") or DEFAULT_ANNOTATIONS[data_format]))
        if data_format == "all_data":
            conversations = all_data_conversations(annotations, str(build_info.get("split") or "all"), root)
        else:
            image_dir = root / os.path.expanduser(str(build_info.get("image_dir") or "."))
            conversations = llava_conversations(annotations, image_dir)
        if not conversations:
            raise ValueError(f"{annotations} holds no instruction entries")
        self.build_processors()
        logging.info("instruction data %s (%s): %d conversations, %d with an image", annotations, data_format,
                     len(conversations), sum(c.image is not None for c in conversations))
        return {"train": InstructionDataset(conversations, self.vis_processors["train"])}
