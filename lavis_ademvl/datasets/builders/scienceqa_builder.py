"""Builder `scienceqa_mc`: ScienceQA from a local copy of the official release (nothing is downloaded)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lavis_ademvl.common.registration import register
from lavis_ademvl.datasets.builders.local_files import LocalFilesBuilder
from lavis_ademvl.datasets.datasets.scienceqa_datasets import (
    QuestionFormat,
    ScienceQADataset,
    ScienceQASampleMaker,
    check_problem,
)

IMAGE_FOLDERS = ("train", "val", "test")
DEFAULT_SPLITS = {"train": "train", "val": "val", "test": "test"}
# Keys that may differ between the training split and the evaluation splits ({train: .., eval: ..}).
SPLIT_ROLES = ("train", "eval")


def _read_json(path: Path, what: str) -> dict:
    """A JSON object file; missing, undecodable, invalid or not an object: an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"ScienceQA {what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except UnicodeDecodeError as error:
        raise ValueError(f"ScienceQA {what} {path} is not UTF-8 text: {error}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"ScienceQA {what} {path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"ScienceQA {what} {path} holds a JSON {type(content).__name__}, not an object keyed by pid")
    return content


def _shown(value: Any) -> str:
    """A JSON value by its type and start, for an error message."""
    text = json.dumps(value)
    return f"a {type(value).__name__} ({text[:60]}{'...' if len(text) > 60 else ''})"


def for_split(value: Any, key: str, training: bool) -> Any:
    """A setting given once (`CQM-A`) or per role (`{train: CQM-A, eval: QCM-A}`; eval = every other split)."""
    if not isinstance(value, (dict, DictConfig)):
        return value
    if set(value.keys()) != set(SPLIT_ROLES):
        hint = ""
        if len(value) == 1 and next(iter(value.values())) is None:  # `answer_cue=Answer:` is YAML's {Answer: null}
            word = next(iter(value))
            hint = (f"; YAML reads an unquoted '{word}:' as a mapping: for the text, quote it, e.g. "
                    f"datasets.scienceqa_mc.{key}='\"{word}:\"'")
        raise KeyError(f"datasets.scienceqa_mc.{key} per split needs exactly the keys {list(SPLIT_ROLES)}, got "
                       f"{sorted(value.keys())}{hint}")
    return value["train" if training else "eval"]


@register("builder", "scienceqa_mc")
class ScienceQAMCBuilder(LocalFilesBuilder):
    name = "scienceqa_mc"
    DATASET_KEYS = LocalFilesBuilder.DATASET_KEYS | {"prompt_style", "prompt_format", "answer_format", "answer_cue"}
    BUILD_INFO_KEYS = frozenset({"data_root", "splits", "use_caption"})
    train_dataset_cls = ScienceQADataset
    eval_dataset_cls = ScienceQADataset

    def question_format(self, training: bool) -> QuestionFormat:
        """The training split's or the evaluation splits' question format, from the config (errors name the key)."""
        values = {
            key: for_split(self.config.get(key, default), key, training)
            for key, default in (("prompt_style", "ours"), ("prompt_format", "QCM-A"), ("answer_format", "letter"),
                                 ("answer_cue", None))
        }
        try:
            return QuestionFormat(**values, training=training)
        except ValueError as error:
            raise ValueError(f"datasets.scienceqa_mc.{error}") from error

    def uses_captions(self, training: bool) -> bool:
        value = for_split((self.config.get("build_info") or {}).get("use_caption", False), "build_info.use_caption", training)
        if not isinstance(value, bool):
            raise ValueError(f"datasets.scienceqa_mc.build_info.use_caption={value!r} must be true or false (or per split)")
        return value

    def sample_maker(self, training: bool) -> ScienceQASampleMaker:
        """What turns a problem (and image, caption) into a sample of the training or the evaluation splits; call
        build_processors() first."""
        role = "train" if training else "eval"
        return ScienceQASampleMaker(self.question_format(training), self.vis_processors[role], self.text_processors[role])

    def build(self) -> dict[str, ScienceQADataset]:
        build_info = self.checked_build_info()
        for training in (True, False):
            self.question_format(training)  # every setting is checked before any file is read
            self.uses_captions(training)
        root = self.data_root(build_info, "the folder holding problems.json, pid_splits.json and images/")
        problems = _read_json(root / "problems.json", "problems file")
        pid_splits = _read_json(root / "pid_splits.json", "split file")
        splits = build_info.get("splits") or DEFAULT_SPLITS
        captions = None
        if any(self.uses_captions(split == "train") for split in splits):
            captions = _read_json(root / "captions.json", "captions file").get("captions", {})

        self.build_processors()
        datasets = {}
        for split, source_split in splits.items():
            if source_split not in pid_splits:
                raise KeyError(f"split {source_split!r} (for {split}) is not in {root / 'pid_splits.json'}: {sorted(pid_splits)}")
            listed = pid_splits[source_split]
            # A dict or a string would be iterated as its keys or characters, each taken as a pid.
            if not isinstance(listed, list) or not all(isinstance(pid, (str, int)) for pid in listed):
                raise ValueError(f"split {source_split!r} (for {split}) in {root / 'pid_splits.json'} holds "
                                 f"{_shown(listed)}; a split is a list of pids, e.g. [\"1\", \"4\"]")
            pids = [str(pid) for pid in listed]
            if not pids:
                raise ValueError(f"split {source_split!r} (for {split}) in {root / 'pid_splits.json'} is empty")
            missing = [pid for pid in pids if pid not in problems]
            if missing:
                raise KeyError(f"{len(missing)} pids of split {source_split!r} are not in problems.json, e.g. {missing[:5]}")
            for pid in pids:
                check_problem(problems[pid], pid, root / "problems.json")
            training = split == "train"
            datasets[split] = ScienceQADataset(
                problems=problems,
                pids=pids,
                image_paths=self._image_paths(root, problems, pids),
                make_sample=self.sample_maker(training),
                captions=captions if self.uses_captions(training) else None,
            )
            logging.info("ScienceQA %s (%s): %d questions, %s", split, source_split, len(pids), self.question_format(training))
        return datasets

    @staticmethod
    def _image_paths(root: Path, problems: dict, pids: list[str]) -> dict[str, str]:
        """Locate images/<train|val|test>/<pid>/<file> for every question that has one; all must exist."""
        paths, missing = {}, []
        for pid in pids:
            name = problems[pid].get("image")
            if not name:
                continue
            candidates = (root / "images" / folder / pid / name for folder in IMAGE_FOLDERS)
            found = next((path for path in candidates if path.is_file()), None)
            if found is None:
                missing.append(str(root / "images" / "<split>" / pid / name))
            else:
                paths[pid] = str(found)
        if missing:
            raise FileNotFoundError(f"{len(missing)} ScienceQA images are missing, e.g. {missing[:3]}")
        return paths
