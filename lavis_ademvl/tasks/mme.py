"""Task `ademvl_mme`: MME's yes/no questions answered as the authors' eval_mme.py answers them, scored as MME's
official eval_tool/calculation.py scores them.

Answering: "Instruction: {question}\\nResponse:", greedy, at most `run.max_len` (the authors': 10) new tokens, line
breaks removed from the output. Scoring, per subtask: an answer is `yes` / `no` when the lower-cased output is exactly
that word, else when its first four characters contain "yes" (then "no"), else `other` (wrong); acc = right answers /
questions, acc+ = images with both questions right / images, score = 100 x (acc + acc+). Perception = the sum of the 10
perception subtasks' scores, cognition = the sum of the 4 cognition subtasks'; a subtask missing from a partial copy
adds nothing and is listed. Written: result/mme/<subtask>.txt in the eval_tool's format (image, question, ground
truth, answer, tab-separated; an image's two questions on consecutive lines), which calculation.py re-scores with
--results_dir, and evaluate.txt with every subtask's score, acc and acc+, and both totals.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask

from lavis_ademvl.common.registration import register
from lavis_ademvl.common.results import gathered_records, write_evaluation
from lavis_ademvl.datasets.datasets.mme_datasets import COGNITION, PERCEPTION, SUBTASKS

MAX_NEW_TOKENS = 10  # eval_mme.py's max_gen_len
RECORD_KEYS = ("question_id", "subtask", "image_name", "question", "answer")  # kept from each sample
RESULT_FOLDER = "mme"


def instruction_outputs(model: Any, samples: dict, max_new_tokens: int) -> list[str]:
    """The greedy answers to samples whose `text_input` is the whole prompt: MME's answering, and `predict
    --instruction`'s. Line breaks are removed, as the authors remove "\n" (and "\r", which would split a line of the
    eval_tool files that calculation.py reads)."""
    # prompt "{}": the sample's text is the whole prompt, whatever the model's own VQA template.
    outputs = model.predict_answers(samples, inference_method="generate", num_beams=1, max_len=max_new_tokens, prompt="{}")
    return [output.replace("\r", "").replace("\n", "") for output in outputs]


def read_yes_no(output: str) -> str:
    """`yes`, `no` or `other`, as calculation.py reads a prediction."""
    answer = output.lower()
    if answer in ("yes", "no"):
        return answer
    start = answer[:4]
    if "yes" in start:
        return "yes"
    if "no" in start:
        return "no"
    return "other"


def result_line(record: dict) -> str:
    """One line of an eval_tool result file. A tab in the output becomes a space so that the line keeps its four fields
    (which does not change how its first four characters read)."""
    output = record["output"].replace("\t", " ")
    return "\t".join([record["image_name"], record["question"], record["answer"], output]) + "\n"


def subtask_metrics(records: list[dict]) -> dict[str, Any]:
    """acc, acc+ (fractions), score and the counts of one subtask's records."""
    by_image: dict[str, list[bool]] = defaultdict(list)
    others = 0
    for record in records:
        prediction = read_yes_no(record["output"])
        others += prediction == "other"
        by_image[record["image_name"]].append(prediction == record["answer"].lower())
    right = sum(sum(marks) for marks in by_image.values())
    acc = right / len(records)
    acc_plus = sum(all(marks) for marks in by_image.values()) / len(by_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus), "other": others,
            "questions": len(records), "images": len(by_image)}


def mme_metrics(records: list[dict]) -> dict[str, Any]:
    """Every present subtask's score, `perception`, `cognition`, their sum as agg_metrics, each subtask's acc, acc+ and
    counts, and the subtasks not evaluated."""
    by_subtask: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_subtask[record["subtask"]].append(record)
    details = {name: subtask_metrics(by_subtask[name]) for name in SUBTASKS if name in by_subtask}
    perception = sum(details[name]["score"] for name in PERCEPTION if name in details)
    cognition = sum(details[name]["score"] for name in COGNITION if name in details)
    return {
        **{name: metrics["score"] for name, metrics in details.items()},
        "perception": perception,
        "cognition": cognition,
        "agg_metrics": perception + cognition,
        "subtask_metrics": details,
        "missing_subtasks": [name for name in SUBTASKS if name not in details],
    }


def sorted_records(records: list[dict]) -> list[dict]:
    """Subtask, image, then question order: an image's questions adjacent, as calculation.py pairs lines."""
    return sorted(records, key=lambda r: (SUBTASKS.index(r["subtask"]), r["image_name"], r["question_id"]))


def write_result_files(records: list[dict], folder: Path) -> list[Path]:
    """result files in the eval_tool's format, one per subtask present."""
    folder.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = defaultdict(list)
    for record in sorted_records(records):
        lines[record["subtask"]].append(result_line(record))
    paths = []
    for subtask, subtask_lines in lines.items():
        path = folder / f"{subtask}.txt"
        path.write_text("".join(subtask_lines))
        paths.append(path)
    return paths


def format_report(metrics: dict[str, Any]) -> str:
    lines = [f"{name:>22}: {metrics[name]:7.2f}" for name in SUBTASKS if name in metrics]
    lines += [f"{'perception':>22}: {metrics['perception']:7.2f}", f"{'cognition':>22}: {metrics['cognition']:7.2f}"]
    if metrics["missing_subtasks"]:
        lines.append(f"not evaluated (absent): {', '.join(metrics['missing_subtasks'])}")
    return "\n".join(lines)


@register("task", "ademvl_mme")
class MMETask(BaseTask):
    def __init__(self, max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        super().__init__()
        self.max_new_tokens = max_new_tokens

    @classmethod
    def setup_task(cls, cfg: Any, **kwargs: Any) -> MMETask:
        return cls(max_new_tokens=int(cfg.run_cfg.get("max_len", MAX_NEW_TOKENS)))

    def valid_step(self, model: Any, samples: dict) -> list[dict]:
        outputs = instruction_outputs(model, samples, self.max_new_tokens)
        return [
            {key: samples[key][row] for key in RECORD_KEYS} | {"output": output}
            for row, output in enumerate(outputs)
        ]

    def after_evaluation(self, val_result: list[dict], split_name: str, epoch: Any, **kwargs: Any) -> dict | None:
        records = gathered_records(val_result, split_name, epoch)
        if records is None:  # not the main process
            return None
        folder = Path(registry.get_path("result_dir")) / RESULT_FOLDER
        write_result_files(records, folder)
        metrics = mme_metrics(records)
        logging.info("MME %s (%d questions; eval_tool files in %s):\n%s", split_name, len(records), folder,
                     format_report(metrics))
        write_evaluation(split_name, {**metrics, "epoch": epoch})
        return metrics
