"""An MMBench dev TSV in the official file's shape, for tests: written by pandas (`to_csv(sep="\\t", index=False)`, so a
missing hint or option is an empty field), base64 PNG and JPEG images, each question's circular copies at index +
k * 1,000,000 with its options shifted (ABCD -> BCDA -> ...), the copies' images given by the main row's index."""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import pandas as pd
from PIL import Image

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
           "comment", "split"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
OFFSET = 1_000_000
LETTERS = "ABCD"

# (index, question, hint, options, answer letter, category, l2-category, image: a colour, or another row's index)
QUESTIONS = [
    (0, "What colour is the square?", math.nan, ["red", "green"], "A", "attribute_recognition",
     "finegrained_perception (instance-level)", ("red", "PNG")),
    (1, "Which colour is it?", 'A "square" is drawn.', ["blue", "green", "red"], "B", "attribute_recognition",
     "finegrained_perception (instance-level)", ("green", "JPEG")),
    (2, "What is the square's colour?", "nan", ["green", "red", "white", "blue"], "D", "color_reasoning",
     "attribute_reasoning", ("blue", "PNG")),
    (3, "Is it red or blue?", math.nan, ["blue", "red"], "B", "color_reasoning", "attribute_reasoning", 0),
]


def image_base64(colour: str, image_format: str) -> str:
    buffer = io.BytesIO()
    image = Image.new("RGB", (40, 40), (255, 255, 255))
    image.paste(COLOURS[colour], (10, 10, 30, 30))
    image.save(buffer, format=image_format)
    return base64.b64encode(buffer.getvalue()).decode()


def official_rows(questions: list[tuple] = QUESTIONS) -> list[dict]:
    """Every question's main row, then its copies (copy k: option (i + k) mod N at letter i), sorted by index."""
    rows = []
    for index, question, hint, options, answer, category, l2, image in questions:
        count = len(options)
        holder = index if isinstance(image, tuple) else image  # the row whose field holds the base64 image
        for k in range(count):
            shifted = [options[(i + k) % count] for i in range(count)]
            rows.append({
                "index": index + k * OFFSET, "question": question, "hint": hint,
                **{letter: shifted[i] if i < count else math.nan for i, letter in enumerate(LETTERS)},
                "answer": LETTERS[(LETTERS.index(answer) - k) % count], "category": category,
                # the official file stores an image once: its copies (and some questions) name the row holding it
                "image": image_base64(*image) if k == 0 and holder == index else str(holder),
                "source": "synthetic", "l2-category": l2, "comment": math.nan, "split": "dev",
            })
    return sorted(rows, key=lambda row: row["index"])


def write_tsv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(path, sep="\t", index=False)
    return path


def make_official_mmbench(path: Path) -> Path:
    """4 questions (2, 3, 4 and 2 options) in 11 rows."""
    return write_tsv(path, official_rows())
