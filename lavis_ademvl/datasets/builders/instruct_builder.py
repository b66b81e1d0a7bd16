"""Builder `ademvl_instruct`: instruction-following data (all_data.json or LLaVA conversations) from local files."""
from __future__ import annotations

import logging
import os

from lavis_ademvl.common.registration import register
from lavis_ademvl.common.validation import check_choice
from lavis_ademvl.datasets.builders.local_files import LocalFilesBuilder
from lavis_ademvl.datasets.datasets.instruct_datasets import (
    InstructionDataset,
    all_data_conversations,
    llava_conversations,
)

FORMATS = ("all_data", "llava")
DEFAULT_ANNOTATIONS = {"all_data": "all_data.json", "llava": "llava_instruct_150k.json"}


@register("builder", "ademvl_instruct")
class InstructionBuilder(LocalFilesBuilder):
    name = "ademvl_instruct"
    BUILD_INFO_KEYS = frozenset({"format", "data_root", "annotations", "split", "image_dir"})
    train_dataset_cls = InstructionDataset

    def build(self) -> dict[str, InstructionDataset]:
        build_info = self.checked_build_info()
        data_format = build_info.get("format", "all_data")
        check_choice("datasets.ademvl_instruct.build_info.format", data_format, FORMATS)
        root = self.data_root(build_info, f"the folder holding the instruction file ({DEFAULT_ANNOTATIONS[data_format]}) "
                                          "and its images")
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
