"""Builder `ademvl_mme`: the MME benchmark from a local copy of its release."""
from __future__ import annotations

import logging

from lavis_ademvl.common.registration import register
from lavis_ademvl.common.validation import check_choice
from lavis_ademvl.datasets.builders.local_files import LocalFilesBuilder
from lavis_ademvl.datasets.datasets.mme_datasets import SUBTASKS, MMEDataset, read_subtask


@register("builder", "ademvl_mme")
class MMEBuilder(LocalFilesBuilder):
    name = "ademvl_mme"
    BUILD_INFO_KEYS = frozenset({"data_root", "subtasks"})
    eval_dataset_cls = MMEDataset

    def build(self) -> dict[str, MMEDataset]:
        build_info = self.checked_build_info()
        root = self.data_root(build_info, "MME_Benchmark_release_version/")
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
