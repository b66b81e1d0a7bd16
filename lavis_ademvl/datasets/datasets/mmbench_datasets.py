"""MMBench (Liu et al.) from its official TSV (e.g. mmbench_dev_20230712.tsv), read as its official evaluators
(VLMEvalKit, MMBench's own) read it; docs/mmbench.md has the details.

Columns: index, question, hint, A, B, C, D (unused options empty), answer (a letter), category, image (base64, or the
`index` of the row that holds it), source, l2-category, comment, split. The file already holds the circular
evaluation: a question of N options fills N rows, its main row at `index` (< 1,000,000) and its copies, options
shifted, at `index + k * 1,000,000` (k = 1 .. N-1); rows belong together by `index % 1,000,000`. Each row is one
prompt, asked as written. Only a file with no copy at all (no index >= 1,000,000) has its options rotated here, as the
MMBench paper rotates them (ABCD, BCDA, CDAB, DABC), into the rows the official file would hold.

A row is written as a ScienceQA question (`ScienceQASampleMaker`: the hint is the context) and answered by the
multiple-choice path of the `scienceqa_mc` task, so prompt style, answer format and inference method mean the same.
"""
from __future__ import annotations

import base64
import binascii
import csv
import io
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from lavis_ademvl.common.data_files import not_utf8
from lavis_ademvl.datasets.datasets.scienceqa_datasets import OPTION_LETTERS, ScienceQASampleMaker, collate

# Copy k of question q is row q + k * CIRCULAR_OFFSET (VLMEvalKit's mcq_circular_eval groups rows by index % 1e6).
CIRCULAR_OFFSET = 1_000_000
REQUIRED_COLUMNS = ("index", "question", "answer", "image", "A", "B")
OPTION_COLUMNS = OPTION_LETTERS[:4]  # A-D
MIN_OPTIONS = 2
# A missing value as pandas writes it (an empty field), or NaN written as text. Other spellings pandas would also
# read as missing ("None", "N/A", ...) stay text: they can be real options.
MISSING_VALUES = ("", "nan", "NaN")
# VLMEvalKit's rule: an image field this short is the index of the row holding the image, not base64.
IMAGE_REFERENCE_MAX = 64
# Where a question's rows come from: the `rotations` of every record and of evaluate.txt.
ROTATIONS_TSV = "tsv_copies"  # the file's own copies, as the official evaluators ask them
ROTATIONS_OURS = "rotated_here"  # no copy in the file: rotated here
ROTATIONS_NONE = "none"  # circular: false, main rows only
ROTATION_SOURCES = {
    ROTATIONS_TSV: f"the file's circular copies (index + k * {CIRCULAR_OFFSET:,}), asked as written",
    ROTATIONS_OURS: f"the file has no circular copies (no index >= {CIRCULAR_OFFSET:,}), so each question's options "
                    "are rotated here as the MMBench paper rotates them (ABCD, BCDA, ...)",
    ROTATIONS_NONE: "circular: false, the main rows only",
}


@dataclass(frozen=True)
class MMBenchRow:
    """One TSV row, one prompt: its options in the row's order, `answer` an index into them."""

    index: int
    question: str
    hint: str
    options: list[str]
    answer: int
    image: str  # base64 (a reference to another row already resolved)


@dataclass(frozen=True)
class MMBenchQuestion:
    """A question: its main row first (index < CIRCULAR_OFFSET), then copy k = 1 .. N-1; category from the main row."""

    index: int
    category: str
    l2_category: str
    rows: list[MMBenchRow]


@dataclass(frozen=True)
class MMBenchTSV:
    path: Path
    questions: list[MMBenchQuestion]
    rotations: str  # ROTATIONS_TSV or ROTATIONS_OURS


def _missing(value: str | None) -> bool:
    return value is None or value.strip() in MISSING_VALUES


def _read_table(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of every data row; a row with more or fewer fields than the header is an error."""
    if not path.is_file():
        raise FileNotFoundError(f"MMBench TSV not found: {path}")
    csv.field_size_limit(sys.maxsize)  # base64 images are longer than csv's default field limit
    table = []
    with open(path, newline="", encoding="utf-8-sig") as handle:  # a BOM, as pandas and VLMEvalKit read it
        reader = csv.DictReader(handle, delimiter="\t")
        try:
            for row in reader:
                if None in row or None in row.values():  # DictReader's marks of extra / absent fields
                    raise ValueError(f"MMBench TSV {path}, line {reader.line_num}: the row's fields do not match the "
                                     f"header's {len(reader.fieldnames)} columns")
                table.append((reader.line_num, row))
        except UnicodeDecodeError as error:
            raise not_utf8(path, "MMBench TSV") from error
        columns = reader.fieldnames or []
    if not table:
        raise ValueError(f"MMBench TSV {path} has no rows")
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        note = (" (MMBench's test split has no answers: it is scored by MMBench's submission server; evaluate dev here)"
                if "answer" in missing else "")
        raise KeyError(f"MMBench TSV {path} lacks column(s) {missing}; it has {sorted(columns)}{note}")
    return table


def _indexed(path: Path, table: list[tuple[int, dict[str, str]]]) -> dict[int, dict[str, str]]:
    """Rows by their integer `index`, which must be unique."""
    rows: dict[int, dict[str, str]] = {}
    lines: dict[int, int] = {}
    for line, row in table:
        text = row["index"].strip()
        if not (text.isascii() and text.isdigit()):  # str.isdigit() takes '¹', which int() refuses
            raise ValueError(f"MMBench TSV {path}, line {line}: column `index` is {row['index']!r}, not a "
                             "non-negative integer")
        index = int(text)
        if index in rows:
            raise ValueError(f"MMBench TSV {path}, index {index}: two rows (lines {lines[index]} and {line}) have "
                             "this `index`; each row needs its own, or one would replace the other")
        rows[index], lines[index] = row, line
    return rows


def _options(where: str, row: dict[str, str]) -> list[str]:
    """The row's options, A onwards: a gap would shift every later letter onto another option's text."""
    present = [not _missing(row.get(letter)) for letter in OPTION_COLUMNS]
    count = present.index(False) if False in present else len(present)
    if any(present[count:]):
        after = OPTION_COLUMNS[count + present[count:].index(True)]
        raise ValueError(f"{where}: column `{OPTION_COLUMNS[count]}` is empty but column `{after}` is not; options "
                         "must fill A, B, ... without a gap")
    if count < MIN_OPTIONS:
        raise ValueError(f"{where}: column `{OPTION_COLUMNS[count]}` is empty; a question needs at least "
                         f"{MIN_OPTIONS} options")
    return [row[letter] for letter in OPTION_COLUMNS[:count]]


def _answer(where: str, row: dict[str, str], count: int) -> int:
    if _missing(row["answer"]):
        raise ValueError(f"{where}: column `answer` is empty; every row needs its answer letter")
    letter = row["answer"].strip()
    if len(letter) != 1 or letter not in OPTION_COLUMNS:
        raise ValueError(f"{where}: column `answer` is {letter!r}; one option letter ({', '.join(OPTION_COLUMNS)}) "
                         "expected")
    if letter not in OPTION_COLUMNS[:count]:
        raise ValueError(f"{where}: column `answer` is {letter!r} but column `{letter}` is empty (its options: "
                         f"{list(OPTION_COLUMNS[:count])})")
    return OPTION_COLUMNS.index(letter)


def _image(where: str, value: str, images: dict[int, str]) -> str:
    if len(value) > IMAGE_REFERENCE_MAX:
        return value
    reference = value.strip()
    if reference.isascii() and reference.isdigit() and int(reference) in images:
        return images[int(reference)]
    raise ValueError(f"{where}: column `image` is {value!r}, neither base64 nor the index of a row holding an image")


def rotated(row: MMBenchRow, k: int) -> MMBenchRow:
    """Copy k of a row as the MMBench paper rotates its options (ABCD -> BCDA -> ...): option (i + k) mod N at
    letter i, at index + k * CIRCULAR_OFFSET as the official file places its copies."""
    count = len(row.options)
    return replace(row, index=row.index + k * CIRCULAR_OFFSET, answer=(row.answer - k) % count,
                   options=[row.options[(i + k) % count] for i in range(count)])


def _questions(path: Path, rows: dict[int, MMBenchRow], categories: dict[int, tuple[str, str]]) -> MMBenchTSV:
    """Rows grouped into questions by index % CIRCULAR_OFFSET; the file's copies, complete, or (none at all) ours."""
    copies: dict[int, dict[int, MMBenchRow]] = defaultdict(dict)
    for index, row in rows.items():
        if index >= CIRCULAR_OFFSET:
            question = index % CIRCULAR_OFFSET
            if question not in rows:
                raise ValueError(f"MMBench TSV {path}, index {index}: a circular copy of question {question} "
                                 f"(index % {CIRCULAR_OFFSET:,}), which has no row with index {question}")
            copies[question][index // CIRCULAR_OFFSET] = row
    questions = []
    for index in sorted(index for index in rows if index < CIRCULAR_OFFSET):
        main = rows[index]
        count = len(main.options)
        if not copies:
            grouped = [rotated(main, k) for k in range(count)]
        else:
            found = copies.get(index, {})
            for k, copy in sorted(found.items()):
                if k >= count:
                    raise ValueError(f"MMBench TSV {path}, index {copy.index}: copy {k} of question {index}, which "
                                     f"has {count} options (copies k = 1 .. {count - 1})")
                if len(copy.options) != count:
                    raise ValueError(f"MMBench TSV {path}, index {copy.index}: {len(copy.options)} options, but its "
                                     f"question's main row {index} has {count}")
            absent = [index + k * CIRCULAR_OFFSET for k in range(1, count) if k not in found]
            if absent:
                raise ValueError(f"MMBench TSV {path}, index {index}: its circular copies are incomplete: {count} "
                                 f"options but no row with index {absent} (the file holds copies at index + k * "
                                 f"{CIRCULAR_OFFSET:,}, so each question needs one per option after the first)")
            grouped = [main, *(found[k] for k in range(1, count))]
        questions.append(MMBenchQuestion(index, *categories[index], grouped))
    return MMBenchTSV(path, questions, ROTATIONS_TSV if copies else ROTATIONS_OURS)


def read_tsv(path: Path) -> MMBenchTSV:
    """Every row of an MMBench TSV checked (index, options, answer, image reference), then its questions with their
    rows; errors name the TSV, the index and the column."""
    table = _read_table(path)
    raw = _indexed(path, table)
    images = {index: row["image"] for index, row in raw.items() if len(row["image"]) > IMAGE_REFERENCE_MAX}
    rows = {}
    for index, row in raw.items():
        where = f"MMBench TSV {path}, index {index}"
        options = _options(where, row)
        rows[index] = MMBenchRow(index, row["question"], "" if _missing(row.get("hint")) else row["hint"].strip(),
                                 options, _answer(where, row, len(options)), _image(where, row["image"], images))
    categories = {index: (row.get("category") or "", row.get("l2-category") or "")
                  for index, row in raw.items() if index < CIRCULAR_OFFSET}
    return _questions(path, rows, categories)


def decode_image(data: str, owner: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            return image.convert("RGB")
    except (binascii.Error, OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot decode the base64 image of {owner}: {error}") from error


class MMBenchDataset(Dataset):
    """One item per prompt: every row of every question (`circular: false`: the main rows only)."""

    def __init__(self, tsv: MMBenchTSV, make_sample: ScienceQASampleMaker, circular: bool = True) -> None:
        self.path = tsv.path
        self.make_sample = make_sample
        self.rotations = tsv.rotations if circular else ROTATIONS_NONE
        self.items = [(q, row) for q in tsv.questions for row in (q.rows if circular else q.rows[:1])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        question, row = self.items[index]
        image = decode_image(row.image, f"MMBench TSV {self.path}, index {row.index}")
        problem = {"question": row.question, "hint": row.hint, "choices": row.options, "answer": row.answer}
        return {**self.make_sample(problem, image), "question_id": str(row.index), "index": row.index,
                "category": question.category, "l2_category": question.l2_category, "rotations": self.rotations}

    def collater(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(items)
