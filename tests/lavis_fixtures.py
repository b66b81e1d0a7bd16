"""Small copies of COCO caption (Karpathy), VQAv2 and GQA in the annotation formats LAVIS 1.0.2 reads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _image(path: Path, colour: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((48, 48, 3), 255, dtype=np.uint8)
    pixels[10:38, 10:38] = COLOURS[colour]
    Image.fromarray(pixels).save(path)  # the format of its suffix


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make_coco_caption(root: Path, num_train: int = 8, num_eval: int = 4, suffix: str = ".jpg") -> Path:
    """annotations/coco_karpathy_{train,val,test}.json, images/ (files of `suffix`'s format), and COCO-format ground
    truth for val and test."""
    colours = list(COLOURS)
    train, evals = [], {"val": [], "test": []}
    for index in range(num_train):
        colour = colours[index % 3]
        image = f"train2014/COCO_train2014_{index + 1:012d}{suffix}"
        _image(root / "images" / image, colour)
        train.append({"caption": f"A {colour} square on a white background.", "image": image, "image_id": f"coco_{index + 1}"})
    image_number = 100
    for split in ("val", "test"):
        for index in range(num_eval):
            image_number += 1
            colour = colours[index % 3]
            image = f"val2014/COCO_val2014_{image_number:012d}{suffix}"
            _image(root / "images" / image, colour)
            captions = [f"a {colour} square", f"a {colour} box on white", f"the square is {colour}",
                        f"one {colour} square", f"a white picture with a {colour} square"]
            evals[split].append({"image": image, "caption": captions})
    _write(root / "annotations" / "coco_karpathy_train.json", train)
    for split, entries in evals.items():
        _write(root / "annotations" / f"coco_karpathy_{split}.json", entries)
    for split in ("val", "test"):
        ground_truth = {
            "images": [{"id": int(Path(a["image"]).stem[-12:])} for a in evals[split]],
            "annotations": [
                {"image_id": int(Path(a["image"]).stem[-12:]), "caption": c, "id": n}
                for n, (a, c) in enumerate((a, c) for a in evals[split] for c in a["caption"])
            ],
        }
        _write(root / "annotations" / f"coco_karpathy_{split}_gt.json", ground_truth)
    return root


def make_vqav2(root: Path, num_train: int = 8, num_eval: int = 6) -> Path:
    """LAVIS's vqa_train/val/val_eval/test json, answer_list.json, and the official questions/annotations files."""
    colours = list(COLOURS)
    train, val, val_train, test, questions, annotations = [], [], [], [], [], []
    for index in range(num_train + 2 * num_eval):
        colour = colours[index % 3]
        split = "train" if index < num_train else "val" if index < num_train + num_eval else "test"
        image = f"{'train' if split == 'train' else 'val'}2014/COCO_{split}2014_{index + 1:012d}.jpg"
        _image(root / "images" / image, colour)
        question_id = 1000 + index
        answers = [colour] * 7 + ["pink", "white", colour]
        entry = {"question_id": question_id, "question": "What colour is the square?", "image": image}
        if split == "train":
            train.append({**entry, "answer": answers, "dataset": "vqa"})
        elif split == "val":
            val.append(entry)
            val_train.append({**entry, "answer": answers, "dataset": "vqa"})
            questions.append({"image_id": index + 1, "question": entry["question"], "question_id": question_id})
            annotations.append({
                "question_id": question_id, "image_id": index + 1, "question_type": "what color is the",
                "answer_type": "other", "multiple_choice_answer": colour,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1} for n, a in enumerate(answers)],
            })
        else:
            test.append(entry)
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {}}
    _write(root / "annotations" / "vqa_train.json", train)
    _write(root / "annotations" / "vqa_val.json", val_train)  # LAVIS trains on train + val
    _write(root / "annotations" / "vqa_val_eval.json", val)
    _write(root / "annotations" / "vqa_test.json", test)
    _write(root / "annotations" / "answer_list.json", colours + ["pink", "white"])
    _write(root / "annotations" / "v2_OpenEnded_mscoco_val2014_questions.json", {**header, "questions": questions})
    _write(root / "annotations" / "v2_mscoco_val2014_annotations.json", {**header, "annotations": annotations})
    return root


def make_gqa(root: Path, num_train: int = 8, num_eval: int = 4) -> Path:
    """LAVIS's GQA balanced question json lists (image, question, question_id, answer) and an answer list."""
    colours = list(COLOURS)
    splits = {"train": num_train, "val": num_eval, "testdev": num_eval}
    number = 0
    for split, count in splits.items():
        entries = []
        for index in range(count):
            number += 1
            colour = colours[index % 3]
            _image(root / "images" / f"n{number}.jpg", colour)
            entries.append({"image": f"n{number}.jpg", "question": "What color is the square?",
                            "question_id": number, "answer": colour})
        _write(root / "annotations" / f"{split}_balanced_questions.json", entries)
    _write(root / "annotations" / "answer_list.json", colours)
    return root
