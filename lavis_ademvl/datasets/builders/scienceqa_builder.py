"""Builder `scienceqa_mc`: ScienceQA from a local copy of the official release (nothing is downloaded)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_ademvl.common.registration import register
from lavis_ademvl.datasets.datasets.scienceqa_datasets import ANSWER_FORMATS, PROMPT_FORMATS, ScienceQADataset
from lavis_ademvl.models.fusion import check_choice

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "datasets" / "scienceqa_mc"
DATASET_KEYS = {"data_type", "build_info", "vis_processor", "text_processor", "prompt_format", "answer_format", "type"}
BUILD_INFO_KEYS = {"data_root", "splits", "use_caption"}
IMAGE_FOLDERS = ("train", "val", "test")
DEFAULT_SPLITS = {"train": "train", "val": "val", "test": "test"}


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"ScienceQA {what} not found: {path}")
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"ScienceQA {what} {path} is not valid JSON: {error}") from error


@register("builder", "scienceqa_mc")
class ScienceQAMCBuilder(BaseDatasetBuilder):
    train_dataset_cls = ScienceQADataset
    eval_dataset_cls = ScienceQADataset
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "defaults.yaml")}

    @classmethod
    def default_config_path(cls, type: str = "default") -> str:
        if type not in cls.DATASET_CONFIG_DICT:
            raise KeyError(f"unknown scienceqa_mc type {type!r}; choose one of {sorted(cls.DATASET_CONFIG_DICT)}")
        return cls.DATASET_CONFIG_DICT[type]

    def build_datasets(self) -> dict[str, ScienceQADataset]:
        # Local files only: every rank reads them, nothing to download or wait for.
        return self.build()

    def build(self) -> dict[str, ScienceQADataset]:
        unknown = sorted(set(self.config.keys()) - DATASET_KEYS)
        build_info = self.config.build_info
        unknown += sorted(f"build_info.{key}" for key in set(build_info.keys()) - BUILD_INFO_KEYS)
        if unknown:
            raise KeyError(f"unknown scienceqa_mc config key(s) {unknown}")
        prompt_format = self.config.get("prompt_format", "QCM-A")
        check_choice("datasets.scienceqa_mc.prompt_format", prompt_format, PROMPT_FORMATS)
        answer_format = self.config.get("answer_format", "letter")
        check_choice("datasets.scienceqa_mc.answer_format", answer_format, ANSWER_FORMATS)
        if not build_info.get("data_root"):
            raise ValueError(
                "datasets.scienceqa_mc.build_info.data_root is not set; point it at the folder holding "
                "problems.json, pid_splits.json and images/"
            )
        root = Path(os.path.expanduser(str(build_info.data_root)))
        if not root.is_dir():
            raise FileNotFoundError(f"ScienceQA data_root is not a folder: {root}")
        problems = _read_json(root / "problems.json", "problems file")
        pid_splits = _read_json(root / "pid_splits.json", "split file")
        captions = None
        if build_info.get("use_caption", False):
            captions = _read_json(root / "captions.json", "captions file").get("captions", {})

        self.build_processors()
        datasets = {}
        splits = build_info.get("splits") or DEFAULT_SPLITS
        for split, source_split in splits.items():
            if source_split not in pid_splits:
                raise KeyError(f"split {source_split!r} (for {split}) is not in {root / 'pid_splits.json'}: {sorted(pid_splits)}")
            pids = [str(pid) for pid in pid_splits[source_split]]
            if not pids:
                raise ValueError(f"split {source_split!r} (for {split}) in {root / 'pid_splits.json'} is empty")
            missing = [pid for pid in pids if pid not in problems]
            if missing:
                raise KeyError(f"{len(missing)} pids of split {source_split!r} are not in problems.json, e.g. {missing[:5]}")
            is_train = split == "train"
            datasets[split] = ScienceQADataset(
                problems=problems,
                pids=pids,
                image_paths=self._image_paths(root, problems, pids),
                vis_processor=self.vis_processors["train" if is_train else "eval"],
                text_processor=self.text_processors["train" if is_train else "eval"],
                prompt_format=prompt_format,
                captions=captions,
                answer_format=answer_format,
            )
            logging.info("ScienceQA %s (%s): %d questions", split, source_split, len(pids))
        return datasets

    @staticmethod
    def _image_paths(root: Path, problems: dict, pids: list[str]) -> dict[str, str]:
        """Locate images/<train|val|test>/<pid>/<file> for every question that has one; all must exist."""
        paths, missing = {}, []
        for pid in pids:
            name = problems[pid].get("image")
            if not name:
                continue
            found = next(
                (root / "images" / folder / pid / name for folder in IMAGE_FOLDERS if (root / "images" / folder / pid / name).is_file()),
                None,
            )
            if found is None:
                missing.append(str(root / "images" / "<split>" / pid / name))
            else:
                paths[pid] = str(found)
        if missing:
            raise FileNotFoundError(f"{len(missing)} ScienceQA images are missing, e.g. {missing[:3]}")
        return paths
