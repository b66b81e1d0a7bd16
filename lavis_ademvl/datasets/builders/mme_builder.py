"""Builder `ademvl_mme`: the MME benchmark from a local copy of its release."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_ademvl.common.registration import register
from lavis_ademvl.common.validation import check_choice, check_known_keys
from lavis_ademvl.datasets.datasets.mme_datasets import SUBTASKS, MMEDataset, read_subtask

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "datasets" / "ademvl_mme"
DATASET_KEYS = {"data_type", "build_info", "vis_processor", "text_processor", "type"}
BUILD_INFO_KEYS = {"data_root", "subtasks"}


@register("builder", "ademvl_mme")
class MMEBuilder(BaseDatasetBuilder):
    eval_dataset_cls = MMEDataset
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "defaults.yaml")}

    @classmethod
    def default_config_path(cls, type: str = "default") -> str:
        check_choice("ademvl_mme type", type, tuple(cls.DATASET_CONFIG_DICT))
        return cls.DATASET_CONFIG_DICT[type]

    def build_datasets(self) -> dict[str, MMEDataset]:
        return self.build()

    def build(self) -> dict[str, MMEDataset]:
        check_known_keys("datasets.ademvl_mme", set(self.config.keys()), DATASET_KEYS)
        build_info = self.config.get("build_info") or {}
        check_known_keys("datasets.ademvl_mme.build_info", set(build_info.keys()), BUILD_INFO_KEYS)
        if not build_info.get("data_root"):
            raise ValueError("datasets.ademvl_mme.build_info.data_root is not set; point it at MME_Benchmark_release_version/")
        root = Path(os.path.expanduser(str(build_info.data_root)))
        if not root.is_dir():
            raise FileNotFoundError(f"datasets.ademvl_mme.build_info.data_root is not a folder: {root}")
        subtasks = build_info.get("subtasks")
        if subtasks is None:
            subtasks = [name for name in SUBTASKS if (root / name).is_dir()]
            if not subtasks:
                raise FileNotFoundError(f"MME: none of the subtask folders {list(SUBTASKS)} is in {root}")
        for name in subtasks:
            check_choice("datasets.ademvl_mme.build_info.subtasks", name, SUBTASKS)
            if not (root / name).is_dir():
                raise FileNotFoundError(f"MME subtask folder not found: {root / name}")
        questions = [question for name in subtasks for question in read_subtask(root, name)]
        self.build_processors()
        missing = sorted(set(SUBTASKS) - set(subtasks))
        logging.info("MME %s: %d questions in %d subtasks%s", root, len(questions), len(subtasks),
                     f" (not evaluated: {missing})" if missing else "")
        return {"test": MMEDataset(questions, self.vis_processors["eval"])}
