"""Task `ademvl_mmbench`: MMBench multiple choice with circular evaluation, accuracy overall, per category and per
l2-category (percent), scored as VLMEvalKit's `mcq_circular_eval` and `report_acc` score the official TSV.

Every row (prompt) is answered by the `scienceqa_mc` answering path (`answer_questions`: one greedy token read as its
first capital letter, or `rank`). Rows belong to the question `index % 1,000,000`; a question is right only when all
its rows are. `vanilla` is the accuracy over the main rows (index < 1,000,000) alone, for comparison with
single-pass numbers. docs/mmbench.md has the details.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from lavis.tasks.base_task import BaseTask

from lavis_ademvl.common.registration import register
from lavis_ademvl.common.results import gathered_records, write_evaluation
from lavis_ademvl.common.validation import check_choice
from lavis_ademvl.datasets.datasets.mmbench_datasets import CIRCULAR_OFFSET
from lavis_ademvl.tasks.scienceqa import INFERENCE_METHODS, answer_questions

RECORD_KEYS = ("question_id", "index", "answer", "category", "l2_category", "rotations")


def _percent(right: int, total: int) -> float:
    return 100.0 * right / total


def circular_metrics(records: list[dict]) -> dict[str, Any]:
    """From one record per prompt (`index`: its TSV row's): agg_metrics = circular accuracy over questions;
    `vanilla`: main rows only; `category` and `l2_category`: circular accuracy per value, one count per question (its
    main row's value); `questions`, `prompts` (rows asked) and `rotations` (where the rows came from)."""
    rows: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        rows[int(record["index"]) % CIRCULAR_OFFSET].append(record)
    mains = {}
    for question, group in rows.items():
        main = [record for record in group if int(record["index"]) == question]
        if not main:  # the dataset always asks the main row, so a question without it lost records on the way
            raise ValueError(f"MMBench records: question {question} has rows {sorted(r['index'] for r in group)} but "
                             f"no record of its main row (index {question})")
        mains[question] = main[0]
    rotations = sorted({record["rotations"] for record in records})
    if len(rotations) != 1:
        raise ValueError(f"MMBench records come from different rotation sources {rotations}; score one run at a time")
    right = {question: all(r["prediction"] == r["answer"] for r in group) for question, group in rows.items()}
    metrics: dict[str, Any] = {
        "agg_metrics": _percent(sum(right.values()), len(right)),
        "vanilla": _percent(sum(main["prediction"] == main["answer"] for main in mains.values()), len(mains)),
        "questions": len(right),
        "prompts": len(records),
        "rotations": rotations[0],
    }
    for key in ("category", "l2_category"):
        groups: dict[str, list[bool]] = defaultdict(list)
        for question, main in mains.items():
            groups[main[key]].append(right[question])
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
            {key: samples[key][row] for key in RECORD_KEYS}
            | {"output": output, "prediction": predictions[row]}
            for row, output in enumerate(outputs)
        ]

    def after_evaluation(self, val_result: list[dict], split_name: str, epoch: Any, **kwargs: Any) -> dict | None:
        records = gathered_records(val_result, split_name, epoch)
        if records is None:  # not the main process
            return None
        metrics = circular_metrics(records)
        logging.info("MMBench %s: circular accuracy %.2f over %d questions, %d prompts (rotations: %s); vanilla %.2f; "
                     "per category %s", split_name, metrics["agg_metrics"], metrics["questions"], metrics["prompts"],
                     metrics["rotations"], metrics["vanilla"], metrics["category"])
        write_evaluation(split_name, {**metrics, "epoch": epoch})
        return metrics
