"""A small ScienceQA copy in the official layout, generated for tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SUBJECTS = ("natural science", "social science", "language science")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SHAPE = "square"


def make_scienceqa(root: Path, per_split: dict[str, int] | None = None, seed: int = 0, captions: bool = False) -> Path:
    """Questions alternate: with image (colour of a square), with hint only, with both, with neither. `captions`:
    also captions.json, with a caption for every question that has an image (as in the release)."""
    per_split = per_split or {"train": 16, "val": 8, "test": 8}
    rng = np.random.default_rng(seed)
    problems, pid_splits = {}, {}
    pid = 0
    for split, count in per_split.items():
        pid_splits[split] = []
        for index in range(count):
            pid += 1
            key = str(pid)
            kind = index % 4  # 0 image, 1 hint, 2 image + hint, 3 neither
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            choices = list(COLOURS)[: 2 + index % 2]
            if colour not in choices:
                choices[-1] = colour
            problem = {
                "question": "What colour is the square?",
                "choices": choices,
                "answer": choices.index(colour),
                "hint": f"The square is {colour}." if kind in (1, 2) else "",
                "image": "image.png" if kind in (0, 2) else None,
                "subject": SUBJECTS[index % 3],
                "grade": f"grade{1 + (index * 5) % 12}",
                "split": split,
                "task": "closed choice",
                "category": "Colours",
                "lecture": "",
                "solution": "",
            }
            problems[key] = problem
            pid_splits[split].append(key)
            if problem["image"]:
                folder = root / "images" / split / key
                folder.mkdir(parents=True, exist_ok=True)
                pixels = np.zeros((40, 40, 3), dtype=np.uint8)
                pixels[8:32, 8:32] = COLOURS[colour]
                Image.fromarray(pixels).save(folder / "image.png")
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(pid_splits))
    if captions:
        written = {pid: f"A photo of a {SHAPE} on black." for pid, problem in problems.items() if problem["image"]}
        (root / "captions.json").write_text(json.dumps({"captions": written}))
    return root
