"""Local lmms-eval datasets: ScienceQA-format questions as lmms-eval's `scienceqa_img` task reads them, offline.

lmms-eval reads a task's data from the hub; a `DatasetDict` with the hub dataset's features saved with
`save_to_disk` is read instead when a yaml in an `--include_path` folder includes the stock task yaml under a new
task name and points `dataset_path` at the copy (`dataset_kwargs: {load_from_disk: true}`). This module writes both:

    python -m lavis_ademvl.integrations.lmms_eval_data --scienceqa-root ~/.cache/lavis_ademvl/scienceqa_easyvqa \
        --output local/lmms_tasks            # -> local/lmms_tasks/sqa_img_demo.yaml, local/lmms_tasks/data/...
    lmms-eval --model ademvl --model_args ... --tasks sqa_img_demo --include_path local/lmms_tasks

The input is ScienceQA's official layout (problems.json, pid_splits.json, images/<split>/<pid>/image.png), the
layout of the demo's data (`ademvl assets --what scienceqa`) and of the original ScienceQA release; the output is
lmms-lab/ScienceQA's schema, config ScienceQA-IMG (only the questions with an image), split test.
tests/test_lmms_eval.py writes its local tasks through `write_task` as well.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# lmms-lab/ScienceQA's columns after image, question, choices and answer (an index, int8): all strings.
SCIENCEQA_TEXT_COLUMNS = ("hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")
SCIENCEQA_STOCK_YAML = ("scienceqa", "scienceqa_img.yaml")
DEFAULT_TASK = "sqa_img_demo"


def scienceqa_features():
    """The features of lmms-lab/ScienceQA (configs ScienceQA-IMG and ScienceQA-FULL)."""
    import datasets

    return datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "answer": datasets.Value("int8"),
        **{key: datasets.Value("string") for key in SCIENCEQA_TEXT_COLUMNS},
    })


def stock_yaml(*parts: str) -> Path:
    """A yaml of lmms-eval's installed tasks, e.g. stock_yaml("scienceqa", "scienceqa_img.yaml")."""
    import lmms_eval.tasks

    return Path(lmms_eval.tasks.__file__).parent.joinpath(*parts)


def scienceqa_rows(root: str | Path, split: str = "test", images_only: bool = True) -> list[dict[str, Any]]:
    """The questions of `split` of a ScienceQA-layout folder as lmms-lab/ScienceQA rows, in pid_splits.json's order;
    `images_only` (ScienceQA-IMG) keeps only those with an image (images/<split>/<pid>/<problem's image>)."""
    from PIL import Image

    root = Path(root).expanduser()
    problems = json.loads((root / "problems.json").read_text())
    pids = json.loads((root / "pid_splits.json").read_text())
    if split not in pids:
        raise ValueError(f"{root / 'pid_splits.json'} has no split {split!r} (it has {', '.join(pids)})")
    rows = []
    for pid in pids[split]:
        problem = problems[pid]
        image = None
        if problem.get("image"):
            path = root / "images" / split / str(pid) / problem["image"]
            if not path.is_file():
                raise FileNotFoundError(f"question {pid}: its image {path} is missing")
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        if image is None and images_only:
            continue
        rows.append({"image": image, "question": problem["question"], "choices": list(problem["choices"]),
                     "answer": int(problem["answer"]),
                     **{key: str(problem.get(key) or "") for key in SCIENCEQA_TEXT_COLUMNS}})
    return rows


def write_task(folder: str | Path, name: str, stock: Sequence[str], rows: list[dict] | Callable[[], list[dict]],
               split: str, features=None) -> Path:
    """`rows` saved with save_to_disk as a DatasetDict {split: ...} under folder/data/name, and folder/name.yaml,
    which includes the stock yaml (lmms_eval/tasks/<stock...>) as task `name` on that copy; returns the yaml."""
    import datasets

    folder = Path(folder).resolve()
    table = rows() if callable(rows) else rows
    data = datasets.Dataset.from_list(table, features=features)
    datasets.DatasetDict({split: data}).save_to_disk(str(folder / "data" / name))
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(
        f"include: {stock_yaml(*stock)}\ntask: {name}\ndataset_path: {folder / 'data' / name}\n"
        "dataset_kwargs:\n  load_from_disk: true\n"
    )
    return yaml_path


def write_scienceqa_task(root: str | Path, folder: str | Path, name: str = DEFAULT_TASK, split: str = "test",
                         images_only: bool = True) -> tuple[Path, int]:
    """A ScienceQA-layout folder's `split` as a local copy of lmms-eval's scienceqa_img (the copy's split is always
    test, as the stock yaml reads it); returns the yaml and the number of questions."""
    rows = scienceqa_rows(root, split, images_only)
    if not rows:
        raise ValueError(f"{root}: no question in split {split!r}" + (" has an image" if images_only else ""))
    return write_task(folder, name, SCIENCEQA_STOCK_YAML, rows, "test", scienceqa_features()), len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lavis_ademvl.integrations.lmms_eval_data",
        description="Write ScienceQA-layout questions (problems.json, pid_splits.json, images/) as a local copy of "
                    "lmms-eval's scienceqa_img task (lmms-lab/ScienceQA's schema, config ScienceQA-IMG, split test) "
                    "and the yaml that includes the stock task: run it with --tasks NAME --include_path OUTPUT.")
    parser.add_argument("--scienceqa-root", required=True, type=Path,
                        help="the ScienceQA-layout folder, e.g. ~/.cache/lavis_ademvl/scienceqa_easyvqa (the demo's)")
    parser.add_argument("--output", required=True, type=Path, help="the --include_path folder to write")
    parser.add_argument("--task", default=DEFAULT_TASK, help=f"the new task's name (default {DEFAULT_TASK}; not the "
                                                             "name of a stock task, which would be shadowed)")
    parser.add_argument("--split", default="test", help="the split of pid_splits.json to write (default test)")
    parser.add_argument("--all-questions", action="store_true",
                        help="also the questions without image (ScienceQA-FULL's rows; image None)")
    args = parser.parse_args(argv)
    yaml_path, count = write_scienceqa_task(args.scienceqa_root, args.output, args.task, args.split,
                                            images_only=not args.all_questions)
    print(f"{count} questions of split {args.split} -> task {args.task}: {yaml_path}")
    print(f"lmms-eval --model ademvl --model_args cfg_path=...,checkpoint=... --tasks {args.task} "
          f"--include_path {yaml_path.parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
