"""ScienceQA- and VQAv2-format demo data built from the PyPI package `easy-vqa` (MIT licence).

easy-VQA has 64x64 images of one coloured shape (3 shapes x 8 colours) and templated questions whose
answers are a shape, a colour or yes/no (4,000 train / 1,000 test images, 13 answers). Image splits:
easy-VQA's test images make our test split; its train images are divided by id (every 8th image to val) so
that no image is shared between train, val and test.

ScienceQA copy (`build_scienceqa_from_easyvqa`), one colour or shape question per pid, in four kinds so that
every Table I column is populated in every split:
- image only (IMG): an easy-VQA question on its image;
- image + neutral hint (IMG and TXT): the same, with a hint that does not give the answer away;
- hint only (TXT): the question with no image, its hint describing the picture ("The shape in the picture
  is a red circle."), so the answer follows from the text alone;
- neither (NO): a general-knowledge question about shapes and colours from a small fixed bank.
Choices are the right answer plus distractors of the same family (colours or shapes). easy-VQA's yes/no
questions are left out: the frozen 135M LLM of the demo answers them at chance even when the hint states the
facts in words (it copies a word from its context but does not compare one with a description), so no fusion
could show anything on them (projects/ademvl/demo/README.md). The training split holds mostly questions about an
image (what the demo trains: seeing); the test split keeps every kind in useful numbers.
Subjects (natural, social, language science) and grade bands are drawn in equal parts, independently of the
question, only to fill the NAT/SOC/LAN and G1-6/G7-12 columns.
"""
from __future__ import annotations

import json
import math
import random
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lavis_ademvl.assets._atomic import DEMO_EXTRA, build_atomically

FORMAT_VERSION = 5

COLOURS = ("red", "green", "blue", "gray", "teal", "black", "yellow", "brown")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
FAMILIES = {"colour": COLOURS, "shape": SHAPES, "yes/no": YES_NO}  # easy-VQA's answer families
SUBJECTS = ("natural science", "social science", "language science")
CATEGORY = {"colour": "Colors", "shape": "Shapes"}
MAX_CHOICES = {"colour": 5, "shape": 3}
SPLITS = ("train", "val", "test")
VAL_EVERY = 8  # easy-VQA train image ids divisible by this go to val
# easy-VQA numbers train and test questions/images from 0 each; offsets make our ids unique and traceable.
QUESTION_ID_OFFSET = {"train": 0, "test": 1_000_000}
IMAGE_ID_OFFSET = {"train": 0, "test": 100_000}

# Share of each question kind, by split. Training: nine in ten questions show an image, since the frozen LLM
# already answers from a descriptive hint (the demo's budget goes to learning to see); the rest keep the text paths
# in use. Evaluation: a quarter hint-only and a tenth general knowledge, so that every Table I column has tens of
# questions.
KIND_WEIGHTS = {
    "train": {"image": 0.75, "image+hint": 0.15, "hint": 0.05, "none": 0.05},
    "eval": {"image": 0.5, "image+hint": 0.15, "hint": 0.25, "none": 0.1},
}
# The ScienceQA copy's answer families, in equal parts; see the module docstring for yes/no.
FAMILY_WEIGHTS = {"colour": 0.5, "shape": 0.5}

# Short on purpose: every token of a demo question costs CPU time in training.
HINTS = (
    "The picture shows a {colour} {shape}.",
    "It is a {colour} {shape}.",
    "There is a {colour} {shape}.",
    "Someone drew a {colour} {shape}.",
)
NEUTRAL_HINTS = (
    "Look at the picture.",
    "One shape is shown.",
    "Use the picture.",
    "The picture is small.",
)
# (question, answer, family): answerable without image or hint, for the NO column.
GENERAL_KNOWLEDGE = (
    ("What color is a ripe banana?", "yellow", "colour"),
    ("What color is fresh grass?", "green", "colour"),
    ("What color is a clear sky on a sunny day?", "blue", "colour"),
    ("What color is a ripe strawberry?", "red", "colour"),
    ("What color is coal?", "black", "colour"),
    ("What color is milk chocolate?", "brown", "colour"),
    ("Which color do you get by mixing black and white paint?", "gray", "colour"),
    ("Which color is a mix of blue and green?", "teal", "colour"),
    ("Which shape has exactly three sides?", "triangle", "shape"),
    ("Which shape has no corners?", "circle", "shape"),
    ("Which shape has four sides and four right angles?", "rectangle", "shape"),
    ("What shape is a coin usually?", "circle", "shape"),
    ("What shape is a door usually?", "rectangle", "shape"),
    ("What shape is a slice of pizza usually?", "triangle", "shape"),
)


@dataclass(frozen=True)
class _Question:
    """One easy-VQA question, with a question id and image id unique over train and test."""

    question_id: int
    question: str
    answer: str
    image_id: int
    image_path: str
    source_split: str

    @property
    def family(self) -> str:
        return family_of(self.answer)


def is_negated(question: str) -> bool:
    """A negated yes/no question ("Is there not a red shape?", "Is no circle present?")."""
    return bool(set(re.findall(r"[a-z]+", question.lower())) & {"not", "no"})


def family_of(answer: str) -> str:
    for family, answers in FAMILIES.items():
        if answer in answers:
            return family
    raise ValueError(f"easy-VQA answer {answer!r} is not a known colour, shape or yes/no")


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError:
        raise ImportError(f"the demo data is built from the PyPI package `easy-vqa`, part of the demo extra: {DEMO_EXTRA}"
                          ) from None
    return easy_vqa


def _load_easy_vqa() -> tuple[dict[str, list[_Question]], dict[int, tuple[str, str]]]:
    """easy-VQA questions by our split, and (colour, shape) of each image whose questions tell both.

    Question and image ids from easy-VQA's test set are offset so that ids are unique across splits.
    """
    easy_vqa = _easy_vqa()
    by_split: dict[str, list[_Question]] = {split: [] for split in SPLITS}
    facts: dict[int, dict[str, set[str]]] = {}
    sources = (
        ("train", easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        ("test", easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    )
    for source, (texts, answers, image_ids), paths in sources:
        for index, (text, answer, image) in enumerate(zip(texts, answers, image_ids)):
            image_id = IMAGE_ID_OFFSET[source] + int(image)
            question = _Question(
                question_id=QUESTION_ID_OFFSET[source] + index,
                question=text,
                answer=answer,
                image_id=image_id,
                image_path=paths[int(image)],
                source_split=source,
            )
            split = "test" if source == "test" else ("val" if int(image) % VAL_EVERY == 0 else "train")
            by_split[split].append(question)
            _record_fact(facts.setdefault(image_id, {"present": set(), "absent": set()}), text, answer)
    resolved = {image_id: _resolve_fact(fact) for image_id, fact in facts.items()}
    # About 11% of images are asked only yes/no questions that leave their colour or shape open; they get
    # no descriptive hint. (Where the pixels show a pure colour, it agrees with these facts for every image.)
    return by_split, {image_id: (f["colour"], f["shape"]) for image_id, f in resolved.items() if len(f) == 2}


def _record_fact(fact: dict[str, set[str]], text: str, answer: str) -> None:
    """Collect what one question says about its image: words known present and known absent."""
    words = set(re.findall(r"[a-z]+", text)) & (set(COLOURS) | set(SHAPES))
    if answer in YES_NO:
        # "is there (not|no) a red shape?": the named word is present iff (answer is yes) != negated.
        fact["present" if (answer == "yes") != is_negated(text) else "absent"].update(words)
    else:
        # "what color is the triangle?" -> blue: the answer and the named colour/shape are both present.
        fact["present"].update(words | {answer})


def _resolve_fact(fact: dict[str, set[str]]) -> dict[str, str]:
    """An image's colour and shape from its collected facts; a single candidate left by elimination counts."""
    resolved = {}
    for name, options in (("colour", COLOURS), ("shape", SHAPES)):
        present = fact["present"] & set(options)
        candidates = present or set(options) - fact["absent"]
        if len(candidates) == 1:
            resolved[name] = candidates.pop()
    return resolved



def labelled_images(split: str) -> list[tuple[str, str, str]]:
    """(image path, colour, shape) of every image of our `split` whose colour and shape its questions tell,
    sorted by image id. The splits share no image, so a model fitted on "train" can be checked on "test"."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {list(SPLITS)}")
    questions, facts = _load_easy_vqa()
    paths = {question.image_id: question.image_path for question in questions[split]}
    return [(paths[image_id], *facts[image_id]) for image_id in sorted(paths) if image_id in facts]

def _allocate(total: int, weights: dict[str, float], required: Iterable[str]) -> dict[str, int]:
    """Split `total` by `weights` (largest remainder), giving each `required` key at least one."""
    required = list(required)
    counts = {key: 0 for key in weights}
    for key in required:
        counts[key] = 1
    rest = total - len(required)
    if rest < 0:
        raise ValueError(f"need at least {len(required)} items, got {total}")
    norm = sum(weights.values())
    shares = {key: rest * weight / norm for key, weight in weights.items()}
    for key, share in shares.items():
        counts[key] += math.floor(share)
    leftover = total - sum(counts.values())
    for key in sorted(shares, key=lambda k: (math.floor(shares[k]) - shares[k], k))[:leftover]:
        counts[key] += 1
    return counts


def _shuffled_slots(counts: dict[str, int], rng: random.Random) -> list[str]:
    slots = [key for key, count in counts.items() for _ in range(count)]
    rng.shuffle(slots)
    return slots


def _pop(pool: list[_Question], usable: Callable[[_Question], bool]) -> _Question | None:
    """Remove and return the last usable question of `pool` (the pool is already shuffled)."""
    for index in range(len(pool) - 1, -1, -1):
        if usable(pool[index]):
            return pool.pop(index)
    return None


def _choices(answer: str, family: str, rng: random.Random) -> tuple[list[str], int]:
    """2..MAX_CHOICES options of the answer's family, in random order; returns (choices, answer index)."""
    options = FAMILIES[family]
    count = rng.randint(2, MAX_CHOICES[family])
    distractors = rng.sample([option for option in options if option != answer], count - 1)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _check_sizes(sizes: dict[str, int | None], minimum: int, allow_none: bool = False) -> None:
    for split, size in sizes.items():
        if size is None and allow_none:
            continue
        if not isinstance(size, int) or size < minimum:
            raise ValueError(f"num_{split} must be an integer >= {minimum}, got {size!r}")


def build_scienceqa_from_easyvqa(out_dir: Path, num_train: int, num_val: int, num_test: int, seed: int = 0) -> Path:
    """Write a ScienceQA-layout multiple-choice set of easy-VQA questions under `out_dir`; return it.

    Layout (as the official release): `problems.json` (pid -> question, choices, answer index, hint, image
    file name or null, subject, grade, split, task, category, lecture, solution), `pid_splits.json`
    (split -> pids) and `images/<split>/<pid>/image.png`. Each split needs at least 3 questions, so that
    every Table I column (NAT, SOC, LAN, TXT, IMG, NO, G1-6, G7-12) is non-empty in it. Deterministic for a
    given seed; returns at once if `out_dir` already holds the same build.
    """
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    _check_sizes(sizes, minimum=3)
    params = {"asset": "scienceqa_easyvqa", "format_version": FORMAT_VERSION, "seed": seed, "sizes": sizes}
    return build_atomically(Path(out_dir), params, lambda tmp: _write_scienceqa(tmp, sizes, seed))


def _write_scienceqa(out_dir: Path, sizes: dict[str, int], seed: int) -> None:
    from tqdm import tqdm

    questions, facts = _load_easy_vqa()
    problems: dict[str, dict[str, Any]] = {}
    pid_splits: dict[str, list[str]] = {}
    next_pid = 1
    for split in SPLITS:
        rng = random.Random(f"scienceqa-easyvqa:{seed}:{split}")
        # Questions with an image or a descriptive hint come from easy-VQA, without repeats in a split.
        pools: dict[str, list[_Question]] = {family: [] for family in FAMILY_WEIGHTS}
        for question in questions[split]:
            if question.family in pools:
                pools[question.family].append(question)
        for pool in pools.values():
            rng.shuffle(pool)
        kind_weights = KIND_WEIGHTS["train" if split == "train" else "eval"]
        kinds = _shuffled_slots(_allocate(sizes[split], kind_weights, ("image", "hint", "none")), rng)
        families = _shuffled_slots(_allocate(sizes[split], FAMILY_WEIGHTS, FAMILY_WEIGHTS), rng)
        bands = _shuffled_slots(_allocate(sizes[split], {"1-6": 0.5, "7-12": 0.5}, ("1-6", "7-12")), rng)
        subjects = _shuffled_slots(_allocate(sizes[split], dict.fromkeys(SUBJECTS, 1.0), SUBJECTS), rng)
        pid_splits[split] = []
        image_files: dict[str, str] = {}
        for kind, family, band, subject in zip(kinds, families, bands, subjects):
            if kind == "none":
                text, answer, family = rng.choice([item for item in GENERAL_KNOWLEDGE if item[2] == family])
                source, hint = None, ""
            else:
                # A descriptive hint needs an image whose colour and shape are both known.
                usable = (lambda q: q.image_id in facts) if kind == "hint" else (lambda q: True)
                source = _pop(pools[family], usable)
                if source is None:
                    # This family ran out (large splits): take the family with the most questions left.
                    family = max(pools, key=lambda f: len(pools[f]))
                    source = _pop(pools[family], usable)
                    if source is None:
                        raise ValueError(f"easy-VQA has too few {split} questions for num_{split}={sizes[split]}")
                text, answer = _sentence(source.question), source.answer
                if kind == "hint":
                    colour, shape = facts[source.image_id]
                    hint = rng.choice(HINTS).format(colour=colour, shape=shape)
                elif kind == "image+hint":
                    hint = rng.choice(NEUTRAL_HINTS)
                else:
                    hint = ""
            low, high = (1, 6) if band == "1-6" else (7, 12)
            choices, answer_index = _choices(answer, family, rng)
            pid = str(next_pid)
            next_pid += 1
            has_image = kind in ("image", "image+hint")
            problems[pid] = {
                "question": text,
                "choices": choices,
                "answer": answer_index,
                "hint": hint,
                "image": "image.png" if has_image else None,
                "task": "closed choice",
                "grade": f"grade{rng.randint(low, high)}",
                "subject": subject,
                "topic": "shapes and colors",
                "category": CATEGORY[family],
                "skill": "easy-VQA",
                "lecture": "",
                "solution": "",
                "split": split,
            }
            pid_splits[split].append(pid)
            if has_image:
                image_files[pid] = source.image_path
        for pid, path in tqdm(image_files.items(), desc=f"ScienceQA {split} images", unit="img", leave=False):
            folder = out_dir / "images" / split / pid
            folder.mkdir(parents=True)
            shutil.copyfile(path, folder / "image.png")
    (out_dir / "problems.json").write_text(json.dumps(problems, indent=1) + "\n")
    (out_dir / "pid_splits.json").write_text(json.dumps(pid_splits, indent=1) + "\n")


def build_vqa_from_easyvqa(
    out_dir: Path,
    num_train: int | None = None,
    num_val: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
) -> Path:
    """Write easy-VQA in LAVIS's `coco_vqa` (VQAv2) layout under `out_dir`; return it.

    `None` takes every question of a split (train 33,7xx / val 4,8xx / test 9,673); otherwise a random
    sample of that many questions. Files (paths relative to `out_dir`):

    - `images/<split>/<image_id>.png`: the LAVIS `vis_root` is `out_dir/images`;
    - `annotations/vqa_train.json`: [{question_id, question, answer: [10 answers], image, dataset: "vqa"}];
    - `annotations/vqa_val_eval.json`, `annotations/vqa_test.json`: [{question_id, question, image,
      answer: [10 answers], dataset}];
    - `annotations/answer_list.json`: every answer (the candidates for rank inference);
    - `annotations/v2_OpenEnded_easyvqa_<split>_questions.json` and `v2_easyvqa_<split>_annotations.json`
      for val and test: the official VQAv2 question/annotation files that LAVIS's VQA evaluation reads.

    A LAVIS val split is then `[vqa_val_eval.json, answer_list.json, <questions>, <annotations>]`.
    """
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    _check_sizes(sizes, minimum=1, allow_none=True)
    params = {"asset": "vqa_easyvqa", "format_version": FORMAT_VERSION, "seed": seed, "sizes": sizes}
    return build_atomically(Path(out_dir), params, lambda tmp: _write_vqa(tmp, sizes, seed))


def vqa_question_type(question: str) -> str:
    """VQAv2-style question type: the words before the first colour or shape name ("is there a",
    "what color is the"), or the whole question when it names none ("what shape is in the image")."""
    words = question.rstrip("?").split()
    for index, word in enumerate(words):
        if word in COLOURS or word in SHAPES:
            return " ".join(words[:index])
    return " ".join(words)


def _write_vqa(out_dir: Path, sizes: dict[str, int | None], seed: int) -> None:
    from tqdm import tqdm

    questions, _ = _load_easy_vqa()
    annotations = out_dir / "annotations"
    annotations.mkdir(parents=True)
    for split in SPLITS:  # check every size before writing anything
        if sizes[split] is not None and sizes[split] > len(questions[split]):
            raise ValueError(f"num_{split}={sizes[split]} but easy-VQA has {len(questions[split])} {split} questions")
    for split in SPLITS:
        rng = random.Random(f"vqa-easyvqa:{seed}:{split}")
        chosen = list(questions[split])
        if sizes[split] is not None:
            chosen = sorted(rng.sample(chosen, sizes[split]), key=lambda q: q.question_id)
        records = []
        for question in chosen:
            record = {
                "question_id": question.question_id,
                "question": question.question,
                "answer": [question.answer] * 10,  # ten identical annotators: VQA accuracy is 0 or 1
                "image": f"{split}/{question.image_id}.png",
                "dataset": "vqa",
            }
            records.append(record)
        name = {"train": "vqa_train.json", "val": "vqa_val_eval.json", "test": "vqa_test.json"}[split]
        (annotations / name).write_text(json.dumps(records) + "\n")
        if split != "train":
            _write_official(annotations, split, chosen)
        images = {question.image_id: question.image_path for question in chosen}
        (out_dir / "images" / split).mkdir(parents=True)
        for image_id, path in tqdm(sorted(images.items()), desc=f"VQA {split} images", unit="img", leave=False):
            shutil.copyfile(path, out_dir / "images" / split / f"{image_id}.png")
    answers = _easy_vqa().get_answers()
    (annotations / "answer_list.json").write_text(json.dumps(answers) + "\n")


def _write_official(annotations: Path, split: str, chosen: Sequence[_Question]) -> None:
    """VQAv2's official question and annotation files, with the header fields `VQA.loadRes` copies."""
    header = {
        "info": {"description": f"easy-VQA {split} questions in VQAv2 format", "version": "1.0", "year": 2020},
        "license": {"name": "MIT", "url": "https://github.com/vzhou842/easy-VQA/blob/master/LICENSE"},
        "data_type": "easyvqa",
        "data_subtype": split,
    }
    questions = {
        **header,
        "task_type": "Open-Ended",
        "questions": [
            {"image_id": q.image_id, "question": q.question, "question_id": q.question_id} for q in chosen
        ],
    }
    annotation_file = {
        **header,
        "annotations": [
            {
                "question_id": q.question_id,
                "image_id": q.image_id,
                "question_type": vqa_question_type(q.question),
                "answer_type": "yes/no" if q.answer in YES_NO else "other",
                "multiple_choice_answer": q.answer,
                "answers": [
                    {"answer": q.answer, "answer_confidence": "yes", "answer_id": answer_id}
                    for answer_id in range(1, 11)
                ],
            }
            for q in chosen
        ],
    }
    (annotations / f"v2_OpenEnded_easyvqa_{split}_questions.json").write_text(json.dumps(questions) + "\n")
    (annotations / f"v2_easyvqa_{split}_annotations.json").write_text(json.dumps(annotation_file) + "\n")
