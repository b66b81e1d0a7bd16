"""Task `ademvl_mmbench`: MMBench multiple choice with circular evaluation, accuracy overall, per category and per
l2-category (percent).

Every rotation of a question's options is answered by the `scienceqa_mc` answering path (`answer_questions`: one
greedy token read as its first capital letter, or `rank`); a question is right only when all its rotations are.
`vanilla` is the accuracy over the unrotated questions alone, for comparison with single-pass numbers.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from lavis.tasks.base_task import BaseTask

from lavis_ademvl.common.registration import register
from lavis_ademvl.common.results import gathered_records, write_evaluation
from lavis_ademvl.common.validation import check_choice
from lavis_ademvl.tasks.scienceqa import INFERENCE_METHODS, answer_questions


def _percent(right: int, total: int) -> float:
    return 100.0 * right / total


def circular_metrics(records: list[dict]) -> dict[str, Any]:
    """agg_metrics = overall circular accuracy; `category` and `l2_category`: accuracy per value; `vanilla`: rotation 0
    only; counts of questions."""
    rotations: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        rotations[record["index"]].append(record)
    right = {index: all(r["prediction"] == r["answer"] for r in rows) for index, rows in rotations.items()}
    metrics: dict[str, Any] = {
        "agg_metrics": _percent(sum(right.values()), len(right)),
        "questions": len(right),
    }
    originals = [r for r in records if int(r["rotation"]) == 0]
    metrics["vanilla"] = _percent(sum(r["prediction"] == r["answer"] for r in originals), len(originals)) if originals else None
    for key in ("category", "l2_category"):
        groups: dict[str, list[bool]] = defaultdict(list)
        for index, rows in rotations.items():
            groups[rows[0][key]].append(right[index])
        metrics[key] = {name: _percent(sum(marks), len(marks)) for name, marks in sorted(groups.items())}
    return metrics


@register("task", "ademvl_mmbench")
class MMBenchTask(BaseTask):
    def __init__(self, inference_method: str = "generate") -> None:
        super().__init__()
        check_choice("run.inference_method", inference_method, INFERENCE_METHODS)
        self.inference_method = inference_method

    @classmethod
    def setup_task(cls, cfg: Any, **kwargs: Any) -> MMBenchTask:
        return cls(inference_method=cfg.run_cfg.get("inference_method", "generate"))

    def valid_step(self, model: Any, samples: dict) -> list[dict]:
        outputs, predictions = answer_questions(model, samples, self.inference_method)
        return [
            {key: samples[key][row] for key in ("question_id", "index", "rotation", "answer", "category", "l2_category")}
            | {"output": output, "prediction": predictions[row]}
            for row, output in enumerate(outputs)
        ]

    def after_evaluation(self, val_result: list[dict], split_name: str, epoch: Any, **kwargs: Any) -> dict | None:
        records = gathered_records(self, val_result, split_name, epoch)
        if records is None:  # not the main process
            return None
        metrics = circular_metrics(records)
        logging.info("MMBench %s: circular accuracy %.2f over %d questions (vanilla %s); per category %s", split_name,
                     metrics["agg_metrics"], metrics["questions"], metrics["vanilla"], metrics["category"])
        write_evaluation(split_name, {**metrics, "epoch": epoch})
        return metrics
