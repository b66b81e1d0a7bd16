"""ScienceQA multiple-choice questions read from the official release layout.

data_root/problems.json     pid -> {question, choices, answer, hint, image (file name or null), subject, grade, ...}
data_root/pid_splits.json   split name -> [pid, ...]
data_root/captions.json     optional: {"captions": {pid: caption}}
data_root/images/<split>/<pid>/<image>

Two ways to write a question (`prompt_style`), each in the QCM (question, context, options) or CQM order:
- `authors`: the ADEM-VL authors' text, character for character. Training: "Question: ...\\nContext: ...\\nOptions: (A) ..
  (B) ..\\nResponse:" followed, with no space, by "The answer is B." (the loss covers that answer and the end of
  sequence). Evaluation: the same prompt and the cue "The answer is", then " B." (one greedy token, or each option
  scored). No text clean-up besides theirs (one pass of "  " -> " ", then a strip); the text processor is not used.
- `ours`: the question block cleaned by the dataset's text processor, the cue "Answer: The answer is" (the dataset key
  `answer_cue` sets another, e.g. the demo's shorter "Answer:"), then " B.".
`answer_format: text` puts the option's text where the letter goes ("The answer is teal.").
"""
from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from lavis_ademvl.common.images import load_image
from lavis_ademvl.common.validation import check_choice

PROMPT_STYLES = ("authors", "ours")
PROMPT_FORMATS = ("QCM-A", "CQM-A")
# What follows the answer cue: the option letter (the paper's protocol) or the option's text.
ANSWER_FORMATS = ("letter", "text")
ANSWER_CUE = "Answer: The answer is"  # ours, unless the dataset's `answer_cue` says otherwise
AUTHORS_RESPONSE = "Response:"  # ends the authors' prompt
AUTHORS_ANSWER_LEAD = "The answer is"  # starts the authors' answer: learned in training, the cue at evaluation
OPTION_LETTERS = string.ascii_uppercase


def option_letters(num_choices: int) -> list[str]:
    return list(OPTION_LETTERS[:num_choices])


def check_problem(problem: Any, pid: str, source: Path | str, labelled: bool = True) -> None:
    """A ScienceQA problem is well formed, else a ValueError naming `source` and the pid: a non-empty question, a
    non-empty list of at most 26 choices (one letter each; strings or finite numbers), a string or null hint, and (when
    `labelled`) an integer answer indexing them."""
    where = f"{source}: problem {pid}"
    if not isinstance(problem, dict):
        raise ValueError(f"{where} is a {type(problem).__name__}, not an object")
    question = problem.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: `question` must be a non-empty string, got {question!r}")
    choices = problem.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"{where}: `choices` must be a non-empty list of options, got {choices!r}")
    if len(choices) > len(OPTION_LETTERS):
        raise ValueError(f"{where} has {len(choices)} choices; options are lettered A-Z, so at most {len(OPTION_LETTERS)}")
    if not all(isinstance(choice, (str, int, float)) and not isinstance(choice, bool) for choice in choices):
        raise ValueError(f"{where}: every choice must be a string (or number), got {choices!r}")
    if any(isinstance(choice, float) and not math.isfinite(choice) for choice in choices):  # JSON's NaN trained as "nan"
        raise ValueError(f"{where}: every choice must be a string (or finite number), got {choices!r}")
    hint = problem.get("hint")
    if hint is not None and not isinstance(hint, str):
        raise ValueError(f"{where}: `hint` must be a string (or null), got {hint!r}")
    answer = problem.get("answer")
    if answer is None and not labelled:
        return
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: `answer` must be an integer index into its {len(choices)} choices "
                         f"(0-{len(choices) - 1}), got {answer!r}")


def answer_text(answer: str) -> str:
    """What follows the answer cue (a letter or an option's text); rank inference scores these strings."""
    return f" {answer}."


def _layout(prompt_format: str, question: str, context: str, options: str) -> str:
    if prompt_format == "QCM-A":
        return f"Question: {question}\nContext: {context}\nOptions: {options}\n"
    return f"Context: {context}\nQuestion: {question}\nOptions: {options}\n"


def _options(choices: list[Any], clean: Callable[[str], str]) -> str:
    return " ".join(f"({letter}) {clean(str(choice))}" for letter, choice in zip(OPTION_LETTERS, choices))


def build_prompt(problem: dict, prompt_format: str, caption: str = "", clean: Callable[[str], str] = str.strip) -> str:
    """Our question/context/options block (each part cleaned by `clean`), which precedes the answer cue."""
    check_choice("prompt_format", prompt_format, PROMPT_FORMATS)
    context = " ".join(part for part in (clean(problem.get("hint") or ""), clean(caption)) if part) or "N/A"
    return _layout(prompt_format, clean(problem["question"]), context, _options(problem["choices"], clean))


def _authors_cleanup(text: str) -> str:
    """The only clean-up the authors apply: one (non-repeated) pass of "  " -> " ", then strip."""
    return text.replace("  ", " ").strip()


def authors_prompt(problem: dict, prompt_format: str, caption: str = "") -> str:
    """The authors' prompt: context = hint and caption joined by a space and stripped (or "N/A"), the block in
    `prompt_format` order, "Response:" after it, then their clean-up over the whole (which also drops the line break
    they put in front)."""
    check_choice("prompt_format", prompt_format, PROMPT_FORMATS)
    context = " ".join([problem.get("hint") or "", caption]).strip() or "N/A"
    block = _layout(prompt_format, problem["question"], context, _options(problem["choices"], str))
    return _authors_cleanup("\n" + block + AUTHORS_RESPONSE)


@dataclass(frozen=True)
class QuestionFormat:
    """How the questions of one split are written (see the module docstring)."""

    prompt_style: str = "ours"
    prompt_format: str = "QCM-A"
    answer_format: str = "letter"
    training: bool = False
    answer_cue: str | None = None  # ours only; None: ANSWER_CUE

    def __post_init__(self) -> None:
        check_choice("prompt_style", self.prompt_style, PROMPT_STYLES)
        check_choice("prompt_format", self.prompt_format, PROMPT_FORMATS)
        check_choice("answer_format", self.answer_format, ANSWER_FORMATS)
        if self.answer_cue is None:
            return
        if self.prompt_style != "ours":
            raise ValueError(f"answer_cue={self.answer_cue!r} applies to prompt_style ours; the authors' cue is fixed "
                             f"({AUTHORS_ANSWER_LEAD!r})")
        # The answer follows as " B." or " teal.": a cue ending in a space would put two spaces before it.
        if not isinstance(self.answer_cue, str) or not self.answer_cue.strip() or self.answer_cue != self.answer_cue.rstrip():
            raise ValueError(f"answer_cue must be non-empty text not ending in a space or line break, got {self.answer_cue!r}")

    @property
    def cue(self) -> str:
        """What precedes the answer in the `ours` style."""
        return ANSWER_CUE if self.answer_cue is None else self.answer_cue


class ScienceQASampleMaker:
    """One ScienceQA question -> one sample: the image through the image processor (a blank placeholder and
    has_image = 0 without image), the texts in the split's QuestionFormat. The dataset and `predict` both use it."""

    def __init__(
        self,
        question_format: QuestionFormat,
        vis_processor: Callable[[Image.Image], torch.Tensor],
        text_processor: Callable[[str], str],
        placeholder_size: int = 224,
    ) -> None:
        self.format = question_format
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.placeholder = Image.new("RGB", (placeholder_size, placeholder_size))

    def texts(self, problem: dict, caption: str = "") -> dict[str, Any]:
        """The text fields: text_input + answer_cue + each candidate is a complete sequence; text_output is the
        training target (the correct candidate, "" when the problem has no answer)."""
        fmt = self.format
        letters = option_letters(len(problem["choices"]))
        authors = fmt.prompt_style == "authors"
        clean = str if authors else self.text_processor
        options = [clean(str(choice)) for choice in problem["choices"]]
        answers = letters if fmt.answer_format == "letter" else options
        if not authors:
            prompt, cue = build_prompt(problem, fmt.prompt_format, caption, clean), fmt.cue
            candidates = [answer_text(answer) for answer in answers]
        elif fmt.training:  # the authors learn "The answer is B." right after "Response:"
            prompt, cue = authors_prompt(problem, fmt.prompt_format, caption), ""
            candidates = [_authors_cleanup(f"{AUTHORS_ANSWER_LEAD}{answer_text(answer)}") for answer in answers]
        else:
            prompt, cue = authors_prompt(problem, fmt.prompt_format, caption), AUTHORS_ANSWER_LEAD
            candidates = [answer_text(answer) for answer in answers]
        index = problem.get("answer")
        return {
            "text_input": prompt,
            "answer_cue": cue,
            "text_output": "" if index is None else candidates[int(index)],
            "choices": letters,
            "options": options,
            "candidates": candidates,
            "answer_format": fmt.answer_format,
            "answer": "" if index is None else letters[int(index)],
        }

    def __call__(self, problem: dict, image: Image.Image | None, caption: str = "") -> dict[str, Any]:
        return {
            "image": self.vis_processor(self.placeholder if image is None else image),
            "has_image": int(image is not None),
            **self.texts(problem, caption),
            "subject": problem.get("subject", ""),
            "grade": problem.get("grade", ""),
            "has_context": int(bool((problem.get("hint") or "").strip())),
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch: lists per field, images stacked, has_image a tensor."""
    batch: dict[str, Any] = {key: [item[key] for item in items] for key in items[0]}
    batch["image"] = torch.stack(batch["image"])
    batch["has_image"] = torch.tensor(batch["has_image"], dtype=torch.long)
    return batch


class ScienceQADataset(Dataset):
    """One multiple-choice question per item, made by a ScienceQASampleMaker."""

    def __init__(
        self,
        problems: dict[str, dict],
        pids: list[str],
        image_paths: dict[str, str],
        make_sample: ScienceQASampleMaker,
        captions: dict[str, str] | None = None,
    ) -> None:
        self.problems = problems
        self.pids = pids
        self.image_paths = image_paths
        self.make_sample = make_sample
        self.captions = captions or {}

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pid = self.pids[index]
        image = load_image(self.image_paths[pid], f"of ScienceQA question {pid}") if pid in self.image_paths else None
        sample = self.make_sample(self.problems[pid], image, self.captions.get(pid, ""))
        return {**sample, "question_id": pid}

    def collater(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(items)
