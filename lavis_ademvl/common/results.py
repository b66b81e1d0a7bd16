"""evaluate.txt, a run's metrics: one JSON line per evaluation, in LAVIS's record shape {split: {metric: value}}.

Our tasks write it with `write_evaluation`; `read_evaluations` and `finished_test_metrics` read it, also the flat
records {metric: value} that some of LAVIS's own tasks (e.g. `gqa`) write without their split, and the ScienceQA
records of runs from before this shape, {"split": split, metric: value}, so that their finished runs are reused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lavis.common.registry import registry

EVALUATION_FILE = "evaluate.txt"


def write_evaluation(split: str, metrics: dict[str, Any], output_dir: str | Path | None = None) -> None:
    """Append {split: metrics} to the run's evaluate.txt (default folder: the runner's output_dir)."""
    folder = Path(output_dir if output_dir is not None else registry.get_path("output_dir"))
    with open(folder / EVALUATION_FILE, "a") as handle:
        handle.write(json.dumps({split: metrics}) + "\n")


def read_evaluations(path: str | Path) -> list[tuple[str | None, dict[str, Any]]]:
    """(split, metrics) of each record of an evaluate.txt, in order; split None for a flat record."""
    evaluations = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if len(record) == 1 and isinstance(next(iter(record.values())), dict):
            ((split, metrics),) = record.items()
            evaluations.append((split, metrics))
        elif isinstance(record.get("split"), str):
            evaluations.append((record["split"], {k: v for k, v in record.items() if k != "split"}))
        else:
            evaluations.append((None, record))
    return evaluations


def finished_test_run(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(job folder, test-split metrics) of the newest job under run_dir that finished its test evaluation, else None."""
    for evaluate_file in sorted(Path(run_dir).glob(f"*/{EVALUATION_FILE}"), reverse=True):
        tests = [metrics for split, metrics in read_evaluations(evaluate_file) if split == "test"]
        if tests:
            return evaluate_file.parent, tests[-1]
    return None


def finished_test_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """The test-split metrics of the newest job under run_dir that finished its test evaluation, else None."""
    found = finished_test_run(run_dir)
    return None if found is None else found[1]


def result_records(job_dir: str | Path, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-question records behind a job's test `metrics`: result/test_epoch<epoch>.json, which tasks that log
    their epoch with the metrics (scienceqa_mc) save through LAVIS's `save_result`."""
    if "epoch" not in metrics:
        raise KeyError(f"{Path(job_dir) / EVALUATION_FILE}: the test record names no epoch, so no result file")
    result_file = Path(job_dir) / "result" / f"test_epoch{metrics['epoch']}.json"
    if not result_file.is_file():
        raise FileNotFoundError(f"{Path(job_dir) / EVALUATION_FILE} records a test evaluation but {result_file} is missing")
    return json.loads(result_file.read_text())
