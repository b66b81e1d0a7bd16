"""MMBench (Liu et al.) from its official TSV (e.g. mmbench_dev_20230712.tsv), with circular evaluation.

Columns: index, question, hint, A, B, C, D (unused options empty), answer (a letter), category, l2-category, image
(base64; in some releases a row's image is the `index` of an earlier row that holds it). Each question of N options
is asked N times, its options rotated (rotation r puts original option (i + r) mod N at letter i), and counts as
right only if every rotation is answered right (MMBench's circular evaluation).

A question is written as a ScienceQA one (`ScienceQASampleMaker`: the hint is the context) and answered by the
multiple-choice path of the `scienceqa_mc` task, so prompt style, answer format and inference method mean the same.
"""
from __future__ import annotations

import base64
import binascii
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from lavis_ademvl.datasets.datasets.scienceqa_datasets import OPTION_LETTERS, ScienceQASampleMaker, collate

REQUIRED_COLUMNS = ("index", "question", "answer", "image", "A", "B")
MAX_OPTIONS = 4  # A-D


@dataclass(frozen=True)
class MMBenchQuestion:
    index: str
    question: str
    hint: str
    options: list[str]
    answer: int  # index into options
    category: str
    l2_category: str
    image: str  # base64


def read_tsv(path: Path) -> list[MMBenchQuestion]:
    """Every row of an MMBench TSV, checked now (columns, options, answer letter, image reference)."""
    if not path.is_file():
        raise FileNotFoundError(f"MMBench TSV not found: {path}")
    csv.field_size_limit(sys.maxsize)  # base64 images are longer than csv's default field limit
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows:
        raise ValueError(f"MMBench TSV {path} has no rows")
    missing = [column for column in REQUIRED_COLUMNS if column not in rows[0]]
    if missing:
        raise KeyError(f"MMBench TSV {path} lacks column(s) {missing}; it has {sorted(rows[0])}")
    images = {row["index"]: row["image"] for row in rows if len(row["image"]) > 64}
    questions = []
    for row in rows:
        options = [row[letter] for letter in OPTION_LETTERS[:MAX_OPTIONS] if (row.get(letter) or "").strip()]
        letter = (row["answer"] or "").strip()
        if letter not in OPTION_LETTERS[: len(options)]:
            raise ValueError(f"MMBench TSV {path}, index {row['index']}: answer {letter!r} is not one of its options "
                             f"{list(OPTION_LETTERS[:len(options)])}")
        image = images.get(row["image"], row["image"])  # a short field names the row holding the image
        if len(image) <= 64:
            raise ValueError(f"MMBench TSV {path}, index {row['index']}: image {row['image']!r} is neither base64 nor "
                             "the index of a row with an image")
        questions.append(MMBenchQuestion(
            row["index"], row["question"], (row.get("hint") or "").strip(), options, OPTION_LETTERS.index(letter),
            row.get("category") or "", row.get("l2-category") or "", image,
        ))
    return questions


def decode_image(data: str, owner: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            return image.convert("RGB")
    except (binascii.Error, OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot decode the base64 image of {owner}: {error}") from error


def rotated(question: MMBenchQuestion, rotation: int) -> dict[str, Any]:
    """The question as a ScienceQA problem with its options rotated by `rotation`."""
    count = len(question.options)
    choices = [question.options[(i + rotation) % count] for i in range(count)]
    return {"question": question.question, "hint": question.hint, "choices": choices,
            "answer": (question.answer - rotation) % count}


class MMBenchDataset(Dataset):
    """Every rotation of every question, one item each (`circular: false`: the original order only)."""

    def __init__(self, questions: list[MMBenchQuestion], make_sample: ScienceQASampleMaker, circular: bool = True) -> None:
        self.questions = questions
        self.make_sample = make_sample
        self.items = [(q, r) for q in questions for r in (range(len(q.options)) if circular else [0])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        question, rotation = self.items[index]
        image = decode_image(question.image, f"MMBench question {question.index}")
        sample = self.make_sample(rotated(question, rotation), image)
        return {**sample, "question_id": f"{question.index}/{rotation}", "index": question.index, "rotation": rotation,
                "category": question.category, "l2_category": question.l2_category}

    def collater(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(items)
