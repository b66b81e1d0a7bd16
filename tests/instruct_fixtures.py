"""Instruction-following data and benchmarks in their published layouts, generated for tests (images drawn here)."""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def square(path: Path, colour: str, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    image.paste(COLOURS[colour], (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    image.save(path)


def make_all_data(root: Path, split: str = "all") -> Path:
    """all_data.json as LaVIN's data script writes it: an Alpaca entry (no image), COCO entries ("mscoco" source) and a
    ScienceQA entry ("sqa" source), with their images in the authors' folders."""
    entries = [
        {"qid": "alpaca_0", "instruction": "Instruction: Name a primary colour.\nResponse:", "answer": "Red.",
         "image": None, "image_source": None, "options": None},
        {"qid": "gpt4_0", "instruction": "Instruction: What colour is the square?\nResponse:",
         "answer": "The square is green.", "image": "000000000009.jpg", "image_source": "mscoco", "options": None},
        {"qid": "gpt4_2_0_0", "instruction": "Instruction: Describe the image.\nResponse:",
         "answer": "A blue square on white.", "image": "000000000025.jpg", "image_source": "mscoco", "options": None},
        {"qid": "sqa_17", "instruction": "Instruction: Which colour is shown?\nResponse:", "answer": "Red",
         "image": "image.png", "image_source": "sqa", "options": None},
    ]
    square(root / "cocoimages" / "train" / "COCO_train2014_000000000009.jpg", "green")
    square(root / "cocoimages" / "train" / "COCO_train2014_000000000025.jpg", "blue")
    square(root / "images" / "train" / "sqa_17" / "image.png", "red")
    (root / "all_data.json").write_text(json.dumps({split: entries}))
    return root


LLAVA_ENTRIES = [
    {"id": "000000000009", "image": "000000000009.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"},
        {"from": "gpt", "value": "It is green."},
        {"from": "human", "value": "Is it large?"},
        {"from": "gpt", "value": "No, it is small."},
        {"from": "human", "value": "What is around it?"},
        {"from": "gpt", "value": "White space."},
    ]},
    {"id": "000000000025", "image": "000000000025.jpg", "conversations": [
        {"from": "human", "value": "Describe the picture.\n<image>"},
        {"from": "gpt", "value": "A blue square."},
    ]},
    {"id": "000000000030", "image": "000000000030.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat shape is it?"},
        {"from": "gpt", "value": "A square."},
    ]},
    {"id": "000000000034", "image": "000000000034.jpg", "conversations": [
        {"from": "human", "value": "What colour?\n<image>"},
        {"from": "gpt", "value": "Green."},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "Yes."},
    ]},
]


def make_llava(root: Path, entries: list[dict] | None = None) -> Path:
    """llava_instruct_150k.json's layout holding `entries` (default LLAVA_ENTRIES), with LLAVA_ENTRIES' images (COCO
    file names) in root/train2014."""
    for entry, colour in zip(LLAVA_ENTRIES, ["green", "blue", "red", "green"]):
        square(root / "train2014" / entry["image"], colour)
    (root / "llava_instruct_150k.json").write_text(json.dumps(LLAVA_ENTRIES if entries is None else entries))
    return root


# MME: two subtasks in each folder layout (one image/question pair per colour), images named as in the release.
MME_SIDE_BY_SIDE = {"existence": ".jpg", "numerical_calculation": ".png"}  # <name>.jpg|png beside <name>.txt
MME_SEPARATE = {"artwork": ".jpg", "celebrity": ".jpg"}  # images/ and questions_answers_YN/


def make_mme(root: Path) -> Path:
    """MME_Benchmark_release_version/ with 2 images per subtask, each asked 'Is the square <colour>?' twice (one Yes,
    one No), as the release pairs its questions."""
    mme = root / "MME_Benchmark_release_version"
    subtasks = {**{name: (suffix, False) for name, suffix in MME_SIDE_BY_SIDE.items()},
                **{name: (suffix, True) for name, suffix in MME_SEPARATE.items()}}
    for subtask, (suffix, separate) in subtasks.items():
        images = mme / subtask / "images" if separate else mme / subtask
        questions = mme / subtask / "questions_answers_YN" if separate else mme / subtask
        for number, (colour, other) in enumerate([("red", "blue"), ("green", "red")]):
            name = f"{number:04d}"
            square(images / f"{name}{suffix}", colour)
            questions.mkdir(parents=True, exist_ok=True)
            (questions / f"{name}.txt").write_text(
                f"Is the square {colour}? Please answer yes or no.\tYes\nIs the square {other}? Please answer yes or no.\tNo\n"
            )
    return mme


def image_base64(colour: str) -> str:
    buffer = io.BytesIO()
    image = Image.new("RGB", (40, 40), (255, 255, 255))
    image.paste(COLOURS[colour], (10, 10, 30, 30))
    image.save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split"]


def make_mmbench(path: Path) -> Path:
    """A dev TSV as MMBench publishes it (pandas' tab-separated writing): 2, 3 and 4 options, an empty hint, a hint
    with a tab-free quote, and a row whose image field is the index of the row holding the image."""
    rows = [
        ["0", "What colour is the square?", "", "red", "green", "", "", "A", "attribute_recognition",
         image_base64("red"), "synthetic", "finegrained_perception (instance-level)", "", "dev"],
        ["1", "Which colour is it?", 'A "square" is drawn.', "blue", "green", "red", "", "B", "attribute_recognition",
         image_base64("green"), "synthetic", "finegrained_perception (instance-level)", "", "dev"],
        ["2", "What is the square's colour?", "Look at the centre.", "green", "red", "white", "blue", "D", "color_reasoning",
         image_base64("blue"), "synthetic", "attribute_reasoning", "", "dev"],
        ["3", "Is it red or blue?", "", "blue", "red", "", "", "B", "color_reasoning", "0", "synthetic",
         "attribute_reasoning", "", "dev"],
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(MMBENCH_COLUMNS)
        writer.writerows(rows)
    return path
