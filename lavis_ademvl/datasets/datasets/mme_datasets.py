"""MME (Fu et al.), read from the official MME_Benchmark_release_version/ folder.

Each of the 14 subtasks is a folder in one of two layouts: `<name>.jpg|png` beside `<name>.txt` (e.g. existence, OCR,
code_reasoning), or `images/<name>.jpg|png` and `questions_answers_YN/<name>.txt` (artwork, celebrity, landmark,
posters, scene). Each txt line is `question<TAB>Yes|No`, two questions per image. A copy may hold only some subtasks.
The question is asked as the authors' eval_mme.py asks it: "Instruction: {question}\\nResponse:".
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from lavis_ademvl.common.data_files import read_utf8
from lavis_ademvl.common.images import load_image
from lavis_ademvl.datasets.datasets.instruct_datasets import instruction_prompt
from lavis_ademvl.datasets.datasets.scienceqa_datasets import collate

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
SEPARATE_FOLDERS = ("images", "questions_answers_YN")  # the second layout's image and question folders
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")
GROUND_TRUTHS = ("yes", "no")  # case-insensitive, as MME's calculation.py
QUESTIONS_PER_IMAGE = 2  # calculation.py pairs consecutive lines: one image, two questions


@dataclass(frozen=True)
class MMEQuestion:
    subtask: str
    image_name: str  # as the result files name it: the image's file name
    image_path: str
    question: str
    answer: str  # Yes | No, as written in the txt
    index: int  # the question's line in its txt

    @property
    def question_id(self) -> str:
        return f"{self.subtask}/{self.image_name}/{self.index}"


def subtask_files(folder: Path) -> tuple[Path, Path]:
    """(question folder, image folder) of a subtask, in whichever layout it has."""
    questions, images = (folder / name for name in reversed(SEPARATE_FOLDERS))
    if questions.is_dir():
        if not images.is_dir():
            raise FileNotFoundError(f"MME subtask {folder.name}: {questions} has no image folder beside it: {images}")
        return questions, images
    return folder, folder


def _image_of(txt: Path, images: Path) -> Path:
    for suffix in IMAGE_SUFFIXES:
        path = images / (txt.stem + suffix)
        if path.is_file():
            return path
    raise FileNotFoundError(f"MME: no image for {txt} (looked for {txt.stem}{{{','.join(IMAGE_SUFFIXES)}}} in {images})")


def read_subtask(root: Path, subtask: str) -> list[MMEQuestion]:
    """The questions of one subtask, images sorted by name, each checked now (its image, its two yes/no lines)."""
    questions_dir, images_dir = subtask_files(root / subtask)
    questions = []
    for txt in sorted(questions_dir.glob("*.txt")):
        image = _image_of(txt, images_dir)
        lines = [line for line in read_utf8(txt, "MME question file").splitlines() if line.strip()]
        if len(lines) != QUESTIONS_PER_IMAGE:
            raise ValueError(f"MME: {txt} has {len(lines)} questions; MME asks {QUESTIONS_PER_IMAGE} per image")
        for index, line in enumerate(lines):
            fields = line.split("\t")
            if len(fields) != 2 or fields[1].strip().lower() not in GROUND_TRUTHS:
                raise ValueError(f"MME: {txt} line {index + 1} is not 'question<TAB>Yes|No': {line!r}")
            questions.append(MMEQuestion(subtask, image.name, str(image), fields[0], fields[1].strip(), index))
    if not questions:
        raise FileNotFoundError(f"MME subtask {subtask}: no question files (*.txt) in {questions_dir}")
    # An image without its questions would leave its subtask scored on fewer images than MME's.
    for image in sorted(images_dir.iterdir()):
        if image.suffix in IMAGE_SUFFIXES and not (questions_dir / f"{image.stem}.txt").is_file():
            raise FileNotFoundError(f"MME subtask {subtask}: image {image} has no question file {questions_dir / image.stem}.txt")
    return questions


class MMEDataset(Dataset):
    """One yes/no question per item: the image through the image processor, the question in the authors' prompt."""

    def __init__(self, questions: list[MMEQuestion], vis_processor: Callable[[Image.Image], torch.Tensor]) -> None:
        self.questions = questions
        self.vis_processor = vis_processor

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        question = self.questions[index]
        return {
            "image": self.vis_processor(load_image(question.image_path, f"of MME subtask {question.subtask}")),
            "has_image": 1,
            "text_input": instruction_prompt(question.question),
            "question_id": question.question_id,
            "subtask": question.subtask,
            "image_name": question.image_name,
            "question": question.question,
            "answer": question.answer,
        }

    def collater(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(items)
