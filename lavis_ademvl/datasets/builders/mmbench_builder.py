"""Builder `ademvl_mmbench`: MMBench's official TSV, every row of every question (circular evaluation: the file's
circular copies, or, in a file without any, the options rotated here)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from lavis_ademvl.common.registration import register
from lavis_ademvl.datasets.builders.local_files import LocalFilesBuilder
from lavis_ademvl.datasets.datasets.mmbench_datasets import ROTATION_SOURCES, ROTATIONS_OURS, MMBenchDataset, read_tsv
from lavis_ademvl.datasets.datasets.scienceqa_datasets import QuestionFormat, ScienceQASampleMaker


@register("builder", "ademvl_mmbench")
class MMBenchBuilder(LocalFilesBuilder):
    name = "ademvl_mmbench"
    DATASET_KEYS = LocalFilesBuilder.DATASET_KEYS | {"prompt_style", "prompt_format", "answer_format", "answer_cue"}
    BUILD_INFO_KEYS = frozenset({"tsv", "circular"})
    eval_dataset_cls = MMBenchDataset

    def question_format(self) -> QuestionFormat:
        values = {key: self.config.get(key, default) for key, default in
                  (("prompt_style", "authors"), ("prompt_format", "QCM-A"), ("answer_format", "letter"),
                   ("answer_cue", None))}
        try:
            return QuestionFormat(**values, training=False)
        except ValueError as error:
            raise ValueError(f"datasets.ademvl_mmbench.{error}") from error

    def build(self) -> dict[str, MMBenchDataset]:
        build_info = self.checked_build_info()
        question_format = self.question_format()
        circular = build_info.get("circular", True)
        if not isinstance(circular, bool):
            raise ValueError(f"datasets.ademvl_mmbench.build_info.circular={circular!r} must be true or false")
        if not build_info.get("tsv"):
            raise ValueError("datasets.ademvl_mmbench.build_info.tsv is not set; point it at MMBench's dev TSV")
        tsv = read_tsv(Path(os.path.expanduser(str(build_info.tsv))))
        self.build_processors()
        make_sample = ScienceQASampleMaker(question_format, self.vis_processors["eval"], self.text_processors["eval"])
        dataset = MMBenchDataset(tsv, make_sample, circular)
        # A file without copies is not the official file: its figure rests on our rotations, hence a warning.
        log = logging.warning if dataset.rotations == ROTATIONS_OURS else logging.info
        log("MMBench %s: %d questions, %d prompts; rotations: %s (%s)", tsv.path, len(tsv.questions), len(dataset),
            dataset.rotations, ROTATION_SOURCES[dataset.rotations])
        return {"test": dataset}
