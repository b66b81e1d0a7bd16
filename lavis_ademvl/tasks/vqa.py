"""Task `ademvl_vqa`: LAVIS's VQA task, able to evaluate a subset of the official questions.

LAVIS 1.0.2's `vqa` task hands the whole official annotation file to `VQA.loadRes`, which asserts a prediction for
every question; here the official annotations and questions are restricted to the answered questions first. Both
files are checked when the datasets are built; a questions file without the header LAVIS copies (`info`, `license`,
...) is scored as open-ended. Accuracy is the official VQAv2 10-answer metric (LAVIS's vqa_tools).
"""
from __future__ import annotations

import json
import logging
from typing import Any

from lavis.common.dist_utils import main_process
from lavis.common.vqa_tools.vqa import VQA
from lavis.common.vqa_tools.vqa_eval import VQAEval
from lavis.tasks.vqa import VQATask

from lavis_ademvl.common.data_files import read_utf8
from lavis_ademvl.common.registration import register
from lavis_ademvl.common.results import save_result, write_evaluation

# The header of an official questions file, which LAVIS's VQA.loadRes copies (a file without one ended with `error:
# info`); only task_type is read, and ademvl_vqa's answers are open-ended.
QUESTIONS_HEADER = {"info": {}, "task_type": "Open-Ended", "data_type": "", "data_subtype": "", "license": {}}


def official_vqa_file(path: str, entries: str) -> dict[str, Any]:
    """An official VQA questions or annotations file: a JSON object with the list `entries`; errors name the file."""
    try:
        data = json.loads(read_utf8(path, "official VQA file"))
    except json.JSONDecodeError as error:
        raise ValueError(f"official VQA file {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get(entries), list):
        raise ValueError(f"official VQA file {path} holds no `{entries}` list; the official layout is "
                         f'{{"{entries}": [...], ...}}')
    return data


def official_vqa_subset(annotation_file: str, question_file: str, question_ids: set[int]) -> VQA:
    """The official VQA helper over only `question_ids`; an id missing from the official files is an error."""
    annotations = official_vqa_file(annotation_file, "annotations")
    questions = {**QUESTIONS_HEADER, **official_vqa_file(question_file, "questions")}
    known = {a["question_id"] for a in annotations["annotations"]}
    unknown = sorted(question_ids - known)
    if unknown:
        raise KeyError(f"{len(unknown)} predicted question ids are not in {annotation_file}, e.g. {unknown[:5]}")
    annotations = dict(annotations, annotations=[a for a in annotations["annotations"] if a["question_id"] in question_ids])
    questions = dict(questions, questions=[q for q in questions["questions"] if q["question_id"] in question_ids])
    vqa = VQA()
    vqa.dataset, vqa.questions = annotations, questions
    vqa.createIndex()
    return vqa


def vqa_accuracy(annotation_file: str, question_file: str, result_file: str) -> dict[str, float]:
    """Official VQAv2 accuracy (percent) of the predictions in result_file, overall and per answer type."""
    with open(result_file) as handle:
        answered = {r["question_id"] for r in json.load(handle)}
    vqa = official_vqa_subset(annotation_file, question_file, answered)
    scorer = VQAEval(vqa, vqa.loadRes(resFile=result_file, quesFile=question_file), n=2)
    scorer.evaluate()
    return {"agg_metrics": scorer.accuracy["overall"], **scorer.accuracy["perAnswerType"]}


@register("task", "ademvl_vqa")
class SubsetVQATask(VQATask):
    save_result = staticmethod(save_result)  # LAVIS's after_evaluation writes its results with it: atomically

    def build_datasets(self, cfg: Any) -> dict:
        datasets = super().build_datasets(cfg)
        for split, question_file in self.ques_files.items():  # read before training, not after it
            official_vqa_file(question_file, "questions")
            official_vqa_file(self.anno_files[split], "annotations")
        return datasets

    @main_process
    def _report_metrics(self, result_file: str, split: str) -> dict[str, Any]:
        if split not in self.ques_files or split not in self.anno_files:
            logging.info("no official annotations for split %s: predictions saved to %s", split, result_file)
            return {}
        metrics = vqa_accuracy(self.anno_files[split], self.ques_files[split], result_file)
        logging.info("VQA %s accuracy: %s", split, metrics)
        write_evaluation(split, metrics)
        return metrics
