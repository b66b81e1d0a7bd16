"""Instruction-following data (paper Tables III and IV) in its two published layouts, read into conversations.

`all_data` -- the authors' (and LaVIN's) all_data.json, {split: [entry, ...]}, entry = {"qid", "instruction",
"answer", "image" (file name or null), "image_source"}. The instruction already holds the whole prompt ("Instruction:
...\\nResponse:", written so by LaVIN's data script); the answer follows it with no separator, and the loss covers the
answer (and eos) only, exactly as the authors' InstrcutDataSet. Images: data_root/images/train/<qid>/image.png
(image_source "sqa") or data_root/cocoimages/train/COCO_train2014_<image> (any other source: "coco", LaVIN's "mscoco").
An entry without an image is text-only (Alpaca) and gets the "no image" prefix.

`llava` -- LLaVA's conversation json (llava_instruct_150k.json): [{"id", "image", "conversations": [{"from": "human" |
"gpt", "value"}, ...]}]. Every human turn becomes a prompt written as all_data.json writes it (the `<image>` marker and
its line break removed: the image enters through the fusion and the [cls] slot), every gpt turn its answer; the loss
covers every answer and nothing else. Images: image_dir/<image>.

Both give the same sample: the image (placeholder and has_image 0 without one) and `conversation`, the list of
(prompt, answer) turns that the model's prompt encoder reads (`models.processing`).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from lavis_ademvl.common.data_files import read_utf8
from lavis_ademvl.common.images import load_image
from lavis_ademvl.datasets.datasets.scienceqa_datasets import collate

INSTRUCTION_TEMPLATE = "Instruction: {}\nResponse:"  # all_data.json's prompts, and the authors' MME/demo prompts
IMAGE_MARKER = "<image>"
SQA_SOURCE = "sqa"
ALL_DATA_KEYS = ("qid", "instruction", "answer", "image", "image_source")
LLAVA_ROLES = ("human", "gpt")  # a conversation alternates them, starting with human


def instruction_prompt(instruction: str) -> str:
    """The authors' prompt around a free-form instruction (MME, their demo): no clean-up."""
    return INSTRUCTION_TEMPLATE.format(instruction)


def conversation_prompt(human_turn: str) -> str:
    """A LLaVA human turn written as all_data.json's instructions are: the image marker and its line break removed,
    one pass of "  " -> " ", stripped."""
    text = human_turn.replace(IMAGE_MARKER + "\n", "").replace("\n" + IMAGE_MARKER, "").replace(IMAGE_MARKER, "")
    return instruction_prompt(text).replace("  ", " ").strip()


@dataclass(frozen=True)
class Conversation:
    """One training example: its id, (prompt, answer) turns, and image file (None: text only)."""

    id: str
    turns: list[tuple[str, str]]
    image: str | None


class MalformedEntry(ValueError):
    """An entry of an instruction file that cannot be used; the message names the file and the entry."""

    def __init__(self, path: Path, entry_id: Any, problem: str) -> None:
        super().__init__(f"{path}: entry {entry_id!r}: {problem}")


def check_text(path: Path, entry_id: Any, field: str, value: Any) -> str:
    """`value` if it is a non-empty string; anything else is refused, since str() of a JSON null, number or list
    would be trained on as text ("None", "['The', 'square']")."""
    if not isinstance(value, str) or not value.strip():
        raise MalformedEntry(path, entry_id, f"{field} is {value!r}; it must be a non-empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # the tokenizer would fail on it after the first iteration
        raise MalformedEntry(path, entry_id, f"{field} holds {value[error.start:error.end]!r} at character "
                             f"{error.start}, a lone surrogate (a JSON \\ud800 escape) that no tokenizer encodes") from error
    return value


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(read_utf8(path, what))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from error


def all_data_conversations(path: Path, split: str, data_root: Path) -> list[Conversation]:
    """The entries of all_data.json's `split`, each checked (keys, image file) now rather than during training."""
    data = read_json(path, "instruction file")
    if not isinstance(data, dict) or split not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise KeyError(f"{path}: no split {split!r} (build_info.split); the file holds {keys}")
    if not isinstance(data[split], list):
        raise ValueError(f"{path}: split {split!r} (build_info.split) holds a {type(data[split]).__name__}; a "
                         "split is a list of entries, [{\"qid\", \"instruction\", \"answer\", ...}, ...]")
    conversations = []
    for index, entry in enumerate(data[split]):
        entry_id = entry.get("qid", f"#{index}") if isinstance(entry, dict) else f"#{index}"
        missing = [key for key in ALL_DATA_KEYS if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise MalformedEntry(path, entry_id, f"missing key(s) {missing}; an entry needs {list(ALL_DATA_KEYS)}")
        qid = check_text(path, entry_id, "qid", entry["qid"])
        turns = [(check_text(path, qid, "instruction", entry["instruction"]), check_text(path, qid, "answer", entry["answer"]))]
        image = None
        if entry["image"] is not None:
            check_text(path, qid, "image", entry["image"])
            if entry["image_source"] == SQA_SOURCE:
                image = data_root / "images" / "train" / qid / "image.png"
            else:
                image = data_root / "cocoimages" / "train" / f"COCO_train2014_{entry['image']}"
            if not image.is_file():
                raise MalformedEntry(path, qid, f"image not found: {image}")
        conversations.append(Conversation(qid, turns, None if image is None else str(image)))
    return conversations


def llava_conversations(path: Path, image_dir: Path) -> list[Conversation]:
    """The conversations of a LLaVA instruction file, each checked (turns, roles, image file) now."""
    data = read_json(path, "instruction file")
    if not isinstance(data, list):
        raise ValueError(f"{path}: a LLaVA conversation file is a list of entries, got {type(data).__name__}")
    conversations = []
    for index, entry in enumerate(data):
        entry_id = entry.get("id", f"#{index}") if isinstance(entry, dict) else f"#{index}"
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or not turns:
            raise MalformedEntry(path, entry_id, "no `conversations` list")
        for number, turn in enumerate(turns):
            role = turn.get("from") if isinstance(turn, dict) else None
            if role not in LLAVA_ROLES:
                raise MalformedEntry(path, entry_id, f"turn {number} is from {role!r}; allowed: {list(LLAVA_ROLES)}")
            if role != LLAVA_ROLES[number % 2]:
                raise MalformedEntry(path, entry_id, f"turn {number} is from {role!r}: turns alternate human, gpt")
            check_text(path, entry_id, f"turn {number}'s `value`", turn.get("value"))
        if len(turns) % 2:
            raise MalformedEntry(path, entry_id, "the last human turn has no gpt answer")
        image = None
        if entry.get("image") is not None:
            image = image_dir / check_text(path, entry_id, "image", entry["image"])
            if not image.is_file():
                raise MalformedEntry(path, entry_id, f"image not found: {image}")
        pairs = [(conversation_prompt(turns[i]["value"]), turns[i + 1]["value"]) for i in range(0, len(turns), 2)]
        conversations.append(Conversation(str(entry_id), pairs, None if image is None else str(image)))
    return conversations


class InstructionDataset(Dataset):
    """One conversation per item: the image through the image processor (a blank placeholder and has_image = 0 for
    text-only entries) and its turns."""

    def __init__(
        self, conversations: list[Conversation], vis_processor: Callable[[Image.Image], torch.Tensor], placeholder_size: int = 224
    ) -> None:
        self.conversations = conversations
        self.vis_processor = vis_processor
        self.placeholder = Image.new("RGB", (placeholder_size, placeholder_size))

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, Any]:
        conversation = self.conversations[index]
        image = None if conversation.image is None else load_image(conversation.image, f"of instruction entry {conversation.id}")
        return {
            "image": self.vis_processor(self.placeholder if image is None else image),
            "has_image": int(image is not None),
            "conversation": [list(turn) for turn in conversation.turns],
            "question_id": conversation.id,
        }

    def collater(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(items)
