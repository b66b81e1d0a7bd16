"""Task `ademvl_captioning`: LAVIS's captioning task, evaluated offline.

LAVIS 1.0.2 downloads the Karpathy ground truth at evaluation time and runs COCOEvalCap (SPICE downloads
CoreNLP; tokenizer and METEOR need Java). This task takes the ground truth from local files
(`run.caption_gt_files: {val: ..., test: ...}`, COCO format) or, when none is given for a split, from the
evaluation dataset's own annotations, and scores with `caption_metrics.score_captions`.

`run.caption_pattern` (a regular expression with one group) keeps only part of each generated text, as the
authors' eval_caption.py does: their model continues "a picture of" with "a picture of <caption>" (it was trained on
that repeated prompt), and they keep the text after "picture of"; a text that does not match is kept whole.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.datasets.datasets.coco_caption_datasets import COCOCapEvalDataset
from lavis.tasks.captioning import CaptionTask

from lavis_ademvl.common.caption_metrics import CAPTION_METRICS, DEFAULT_CAPTION_METRICS, score_captions
from lavis_ademvl.common.registration import register
from lavis_ademvl.common.results import save_result, write_evaluation
from lavis_ademvl.common.validation import check_choice
from lavis_ademvl.datasets.datasets.coco_caption_datasets import CaptionImagesEvalDataset, caption_image_id


def load_coco_ground_truth(path: str) -> dict[int, list[str]]:
    """image id -> reference captions, from a COCO-format caption file ({"annotations": [{image_id, caption}]})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption ground-truth file not found: {path}")
    with open(path) as handle:
        data = json.load(handle)
    if "annotations" not in data:
        raise ValueError(f"caption ground-truth file {path} has no 'annotations' list (COCO caption format expected)")
    references: dict[int, list[str]] = {}
    for annotation in data["annotations"]:
        references.setdefault(int(annotation["image_id"]), []).append(annotation["caption"])
    return references


def compile_caption_pattern(pattern: str | None) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"run.caption_pattern={pattern!r} is not a regular expression: {error}") from error
    if compiled.groups != 1:
        raise ValueError(f"run.caption_pattern={pattern!r} needs exactly one group, the caption; it has {compiled.groups}")
    return compiled


def extract_caption(text: str, pattern: re.Pattern | None) -> str:
    """The pattern's group in the first match, else the whole text (the authors' eval_caption.py rule)."""
    match = pattern.search(text) if pattern is not None else None
    return match.group(1) if match else text


@register("task", "ademvl_captioning")
class OfflineCaptionTask(CaptionTask):
    save_result = staticmethod(save_result)  # LAVIS's after_evaluation writes its results with it: atomically

    def __init__(
        self,
        num_beams: int,
        max_len: int,
        min_len: int,
        evaluate: bool,
        report_metric: bool = True,
        caption_metrics: list[str] | None = None,
        ground_truth_files: dict[str, str] | None = None,
        caption_pattern: str | None = None,
    ) -> None:
        super().__init__(num_beams, max_len, min_len, evaluate, report_metric)
        self.caption_pattern = compile_caption_pattern(caption_pattern)
        self.caption_metrics = list(caption_metrics or DEFAULT_CAPTION_METRICS)
        for metric in self.caption_metrics:
            check_choice("run.caption_metrics entry", metric, CAPTION_METRICS)
        self.ground_truth_files = dict(ground_truth_files or {})
        for split, path in self.ground_truth_files.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"run.caption_gt_files.{split}: caption ground-truth file not found: {path}")
        self.ground_truth: dict[str, dict[int, list[str]]] = {}

    @classmethod
    def setup_task(cls, cfg: Any, **kwargs: Any) -> OfflineCaptionTask:
        run_cfg = cfg.run_cfg
        return cls(
            num_beams=run_cfg.get("num_beams", 5),
            max_len=run_cfg.get("max_len", 30),
            min_len=run_cfg.get("min_len", 1),
            evaluate=run_cfg.get("evaluate", False),
            report_metric=run_cfg.get("report_metric", True),
            caption_metrics=list(run_cfg.get("caption_metrics", DEFAULT_CAPTION_METRICS)),
            ground_truth_files=dict(run_cfg.get("caption_gt_files") or {}),
            caption_pattern=run_cfg.get("caption_pattern"),
        )

    def valid_step(self, model: Any, samples: dict) -> list[dict]:
        captions = model.generate(
            samples, use_nucleus_sampling=False, num_beams=self.num_beams, max_length=self.max_len, min_length=self.min_len
        )
        return [
            {"caption": extract_caption(caption, self.caption_pattern), "image_id": int(image_id)}
            for caption, image_id in zip(captions, samples["image_id"])
        ]

    def build_datasets(self, cfg: Any) -> dict:
        datasets = {}
        for name, dataset_cfg in cfg.datasets_cfg.items():  # as LAVIS's BaseTask.build_datasets, but:
            builder = registry.get_builder_class(name)(dataset_cfg)
            if builder.eval_dataset_cls is COCOCapEvalDataset:  # its image ids also from .png names
                builder.eval_dataset_cls = CaptionImagesEvalDataset
            datasets[name] = builder.build_datasets()
        for splits in datasets.values():
            for split, dataset in splits.items():
                if split == "train":
                    continue
                if split in self.ground_truth_files:
                    self.ground_truth[split] = load_coco_ground_truth(self.ground_truth_files[split])
                else:
                    self.ground_truth[split] = {
                        caption_image_id(ann["image"]): list(ann["caption"]) for ann in dataset.annotation
                    }
        return datasets

    @main_process
    def _report_metrics(self, eval_result_file: str, split_name: str) -> dict:
        if split_name not in self.ground_truth:
            raise KeyError(f"no caption ground truth for split {split_name!r}; give run.caption_gt_files.{split_name}")
        with open(eval_result_file) as handle:
            results = json.load(handle)
        predictions = {int(r["image_id"]): r["caption"] for r in results}
        scores = score_captions(self.ground_truth[split_name], predictions, self.caption_metrics)
        scores["num_images"] = len(predictions)
        scores["agg_metrics"] = scores.get("CIDEr", 0.0) + scores.get("Bleu_4", 0.0)
        logging.info("captioning %s: %s", split_name, scores)
        write_evaluation(split_name, scores)
        return scores
