"""Task `scienceqa_mc`: multiple-choice evaluation with ScienceQA's Table I breakdown."""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from lavis.tasks.base_task import BaseTask

from lavis_ademvl.common.registration import register
from lavis_ademvl.common.results import gathered_records, write_evaluation
from lavis_ademvl.common.validation import check_choice
from lavis_ademvl.models.config import FUSION_NAMES

INFERENCE_METHODS = ("generate", "rank")
TABLE_COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
MAX_TEXT_ANSWER_TOKENS = 16
SUBJECT_COLUMNS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def first_capital_letter(text: str) -> str:
    """The prediction read from generated text: its first capital letter, or "" (counted wrong)."""
    match = re.search(r"[A-Z]", text)
    return match.group(0) if match else ""


def matching_option(text: str, letters: list[str], options: list[str]) -> str:
    """The letter of the option a generated text answer names: an exact match, else the longest option the text
    starts with; "" (counted wrong) when it names none."""
    answer = text.strip().rstrip(".").strip().lower()
    exact = [letter for letter, option in zip(letters, options) if option.lower() == answer]
    if exact:
        return exact[0]
    named = [(len(option), letter) for letter, option in zip(letters, options) if option and answer.startswith(option.lower())]
    prefixes = sorted(named)
    return prefixes[-1][1] if prefixes else ""


def answer_questions(model: Any, samples: dict, inference_method: str) -> tuple[list[str], list[str]]:
    """(model outputs, predicted letters) for a batch made by the dataset's ScienceQASampleMaker: the one answering
    path of evaluation, `predict` and `visualize`.

    rank: the most likely candidate (never fails). generate, letter answers: one greedy token, its first capital
    letter ("" = wrong, like the authors' "FAILED"); text answers: up to MAX_TEXT_ANSWER_TOKENS greedy tokens, matched
    to an option's text.
    """
    check_choice("run.inference_method", inference_method, INFERENCE_METHODS)
    if inference_method == "rank":
        outputs = model.predict_answers(samples, inference_method="rank", answer_list=samples["candidates"])
        predictions = [letters[candidates.index(output)] for letters, candidates, output
                       in zip(samples["choices"], samples["candidates"], outputs)]
    elif samples["answer_format"][0] == "letter":
        outputs = model.predict_answers(samples, inference_method="generate", num_beams=1, max_len=1)
        predictions = [first_capital_letter(output) for output in outputs]
    else:
        outputs = model.predict_answers(samples, inference_method="generate", num_beams=1, max_len=MAX_TEXT_ANSWER_TOKENS)
        predictions = [matching_option(output, letters, options) for output, letters, options
                       in zip(outputs, samples["choices"], samples["options"])]
    return outputs, predictions


def _grade_number(grade: str) -> int | None:
    match = re.search(r"\d+", str(grade))
    return int(match.group(0)) if match else None


def _columns(record: dict) -> Iterable[str]:
    """The Table I columns a question counts towards (besides Avg)."""
    if record["subject"] in SUBJECT_COLUMNS:
        yield SUBJECT_COLUMNS[record["subject"]]
    if record["has_context"]:
        yield "TXT"
    if record["has_image"]:
        yield "IMG"
    if not record["has_context"] and not record["has_image"]:
        yield "NO"
    grade = _grade_number(record["grade"])
    if grade is not None:
        yield "G1-6" if grade <= 6 else "G7-12"
    yield "Avg"


def scienceqa_metrics(records: list[dict]) -> dict[str, Any]:
    """Accuracy (percent) per Table I column, question counts per column, and agg_metrics = Avg.

    A column without questions reports None.
    """
    totals = {column: 0 for column in TABLE_COLUMNS}
    correct = {column: 0 for column in TABLE_COLUMNS}
    for record in records:
        for column in _columns(record):
            totals[column] += 1
            correct[column] += int(record["prediction"] == record["answer"])
    metrics: dict[str, Any] = {
        column: (100.0 * correct[column] / totals[column] if totals[column] else None) for column in TABLE_COLUMNS
    }
    metrics["counts"] = totals
    metrics["agg_metrics"] = metrics["Avg"] if metrics["Avg"] is not None else 0.0
    return metrics


def method_name(model_cfg: Any) -> str:
    """The Table I row label of a run's model: ADEM-VL or the baseline its `fusion` names; another model's arch."""
    arch = model_cfg.get("arch", "ademvl")
    if arch != "ademvl":
        return str(arch)
    fusion = model_cfg.get("fusion", "adem")
    return FUSION_NAMES.get(fusion, fusion)  # an unknown fusion is the model config's error to name


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table, one row per named result, Table I's columns."""
    lines = ["| Method | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name, metrics in rows.items():
        cells = ["-" if metrics.get(c) is None else f"{metrics[c]:.2f}" for c in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@register("task", "scienceqa_mc")
class ScienceQAMCTask(BaseTask):
    def __init__(self, inference_method: str = "generate", method: str = "ADEM-VL") -> None:
        super().__init__()
        check_choice("run.inference_method", inference_method, INFERENCE_METHODS)
        self.inference_method = inference_method
        self.method = method  # the row label of the logged table

    @classmethod
    def setup_task(cls, cfg: Any, **kwargs: Any) -> ScienceQAMCTask:
        return cls(inference_method=cfg.run_cfg.get("inference_method", "generate"), method=method_name(cfg.model_cfg))

    def valid_step(self, model: Any, samples: dict) -> list[dict]:
        outputs, predictions = answer_questions(model, samples, self.inference_method)
        return [
            {
                "question_id": samples["question_id"][row],
                "output": output,
                "prediction": predictions[row],
                "answer": samples["answer"][row],
                "subject": samples["subject"][row],
                "grade": samples["grade"][row],
                "has_context": int(samples["has_context"][row]),
                "has_image": int(samples["has_image"][row]),
            }
            for row, output in enumerate(outputs)
        ]

    def after_evaluation(self, val_result: list[dict], split_name: str, epoch: Any, **kwargs: Any) -> dict | None:
        records = gathered_records(val_result, split_name, epoch)
        if records is None:  # not the main process
            return None
        metrics = scienceqa_metrics(records)
        logging.info("ScienceQA %s (%d questions):\n%s", split_name, len(records), format_table({self.method: metrics}))
        write_evaluation(split_name, {**metrics, "epoch": epoch})
        return metrics
