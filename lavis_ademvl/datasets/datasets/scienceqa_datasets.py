"""ScienceQA multiple-choice questions read from the official release layout.

data_root/problems.json     pid -> {question, choices, answer, hint, image (file name or null), subject, grade, ...}
data_root/pid_splits.json   split name -> [pid, ...]
data_root/captions.json     optional: {"captions": {pid: caption}}
data_root/images/<split>/<pid>/<image>
"""
from __future__ import annotations

import string
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from lavis_ademvl.common.images import load_image
from lavis_ademvl.models.fusion import check_choice

PROMPT_FORMATS = ("QCM-A", "CQM-A")
# What follows ANSWER_CUE: the option letter (the paper's protocol) or the option's text.
ANSWER_FORMATS = ("letter", "text")
ANSWER_CUE = "Answer: The answer is"
OPTION_LETTERS = string.ascii_uppercase


def option_letters(num_choices: int) -> list[str]:
    return list(OPTION_LETTERS[:num_choices])


def answer_text(answer: str) -> str:
    """The training target after ANSWER_CUE (a letter or an option's text); rank inference scores these strings."""
    return f" {answer}."


def build_prompt(problem: dict, prompt_format: str, caption: str = "", clean: Callable[[str], str] = str.strip) -> str:
    """The question/context/options block that precedes ANSWER_CUE (the authors' QCM / CQM inputs)."""
    check_choice("prompt_format", prompt_format, PROMPT_FORMATS)
    question = clean(problem["question"])
    context = " ".join(part for part in (clean(problem.get("hint") or ""), clean(caption)) if part) or "N/A"
    options = " ".join(f"({letter}) {clean(str(choice))}" for letter, choice in zip(OPTION_LETTERS, problem["choices"]))
    if prompt_format == "QCM-A":
        return f"Question: {question}\nContext: {context}\nOptions: {options}\n"
    return f"Context: {context}\nQuestion: {question}\nOptions: {options}\n"


class ScienceQADataset(Dataset):
    """One multiple-choice question per item; text-only questions get a blank image and has_image = 0."""

    def __init__(
        self,
        problems: dict[str, dict],
        pids: list[str],
        image_paths: dict[str, str],
        vis_processor: Callable[[Image.Image], torch.Tensor],
        text_processor: Callable[[str], str],
        prompt_format: str = "QCM-A",
        captions: dict[str, str] | None = None,
        placeholder_size: int = 224,
        answer_format: str = "letter",
    ) -> None:
        check_choice("prompt_format", prompt_format, PROMPT_FORMATS)
        check_choice("answer_format", answer_format, ANSWER_FORMATS)
        self.answer_format = answer_format
        self.problems = problems
        self.pids = pids
        self.image_paths = image_paths
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.prompt_format = prompt_format
        self.captions = captions or {}
        self.placeholder = Image.new("RGB", (placeholder_size, placeholder_size))

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pid = self.pids[index]
        problem = self.problems[pid]
        has_image = pid in self.image_paths
        image = load_image(self.image_paths[pid], f"of ScienceQA question {pid}") if has_image else self.placeholder
        letters = option_letters(len(problem["choices"]))
        answer = letters[int(problem["answer"])]
        options = [self.text_processor(str(choice)) for choice in problem["choices"]]
        candidates = [answer_text(c) for c in (letters if self.answer_format == "letter" else options)]
        return {
            "image": self.vis_processor(image),
            "has_image": int(has_image),
            "text_input": build_prompt(problem, self.prompt_format, self.captions.get(pid, ""), self.text_processor),
            "answer_cue": ANSWER_CUE,
            "text_output": candidates[int(problem["answer"])],
            "choices": letters,
            "options": options,
            "candidates": candidates,
            "answer_format": self.answer_format,
            "answer": answer,
            "question_id": pid,
            "subject": problem.get("subject", ""),
            "grade": problem.get("grade", ""),
            "has_context": int(bool((problem.get("hint") or "").strip())),
        }

    def collater(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {key: [item[key] for item in items] for key in items[0]}
        batch["image"] = torch.stack(batch["image"])
        batch["has_image"] = torch.tensor(batch["has_image"], dtype=torch.long)
        return batch
