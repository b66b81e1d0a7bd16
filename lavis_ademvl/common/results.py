"""evaluate.txt, a run's metrics: one JSON line per evaluation, in LAVIS's record shape {split: {metric: value}}.

Our tasks write it with `write_evaluation`; `read_evaluations` and `finished_test_metrics` read it, also the flat
records {metric: value} that some of LAVIS's own tasks (e.g. `gqa`) write without their split, and the ScienceQA
records of runs from before this shape, {"split": split, metric: value}, so that their finished runs are reused.
`save_result` writes an evaluation's per-question records (result/<split>_epoch<epoch>.json) for every task of ours.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lavis.common.dist_utils import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process
from lavis.common.registry import registry

from lavis_ademvl.common.atomic_files import write_atomically

EVALUATION_FILE = "evaluate.txt"
# What a finished job was asked to run (written by `train_or_reuse`), so that a changed request is not reused.
REQUEST_FILE = "request.yaml"
# The registry key under which the runner names the checkpoint an evaluation scores (see `write_evaluation`).
EVALUATED_CHECKPOINT = "evaluated_checkpoint"


def write_evaluation(split: str, metrics: dict[str, Any], output_dir: str | Path | None = None) -> None:
    """Append {split: metrics} to the run's evaluate.txt (default folder: the runner's output_dir), with the
    checkpoint the scores came from (metrics["checkpoint"]: a path or "untrained") when the runner named it."""
    folder = Path(output_dir if output_dir is not None else registry.get_path("output_dir"))
    checkpoint = registry.get(EVALUATED_CHECKPOINT, no_warning=True)
    if checkpoint is not None:
        metrics = {**metrics, "checkpoint": checkpoint}
    with open(folder / EVALUATION_FILE, "a") as handle:
        handle.write(json.dumps({split: metrics}) + "\n")


def gathered_records(val_result: list[dict], split_name: str, epoch: Any) -> list[dict] | None:
    """Every rank's records of one evaluation, merged by question_id through `save_result` (which writes
    result/<split>_epoch<epoch>.json), on the main process; None on the other ranks."""
    result_file = save_result(val_result, result_dir=registry.get_path("result_dir"),
                              filename=f"{split_name}_epoch{epoch}", remove_duplicate="question_id")
    if not is_main_process():
        return None
    with open(result_file) as handle:
        return json.load(handle)


def save_result(result: list[dict], result_dir: str, filename: str, remove_duplicate: str = "") -> str:
    """LAVIS's `BaseTask.save_result` (our tasks' own), every file written whole or not at all (`write_atomically`;
    LAVIS's left a truncated file and a traceback naming none on a full disk): this rank's records as
    <filename>_rank<r>.json, then on the main process every rank's, merged, as <filename>.json (the first record of
    each `remove_duplicate` value), whose path it returns."""
    folder = Path(result_dir)
    write_atomically(folder / f"{filename}_rank{get_rank()}.json", json.dumps(result).encode(), "evaluation result")
    if is_dist_avail_and_initialized():
        dist.barrier()
    final = folder / f"{filename}.json"
    if is_main_process():
        merged = [record for rank in range(get_world_size())
                  for record in json.loads((folder / f"{filename}_rank{rank}.json").read_text())]
        if remove_duplicate:
            merged = first_of_each(merged, remove_duplicate)
        write_atomically(final, json.dumps(merged).encode(), "evaluation result")
        logging.info("result file saved to %s", final)
    return str(final)


def first_of_each(records: list[dict], key: str) -> list[dict]:
    """The first record of each value of `key` (a DDP sampler pads the last batch with repeated samples)."""
    seen, kept = set(), []
    for record in records:
        if record[key] not in seen:
            seen.add(record[key])
            kept.append(record)
    return kept


def read_evaluations(path: str | Path) -> list[tuple[str | None, dict[str, Any]]]:
    """(split, metrics) of each record of an evaluate.txt, in order; split None for a flat record. A line that is
    not a JSON object (e.g. cut short by a crash) is a ValueError naming the file and line."""
    evaluations = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number} is not a JSON record ({error}): {line[:80]!r}") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number} is not a JSON object: {line[:80]!r}")
        if len(record) == 1 and isinstance(next(iter(record.values())), dict):
            ((split, metrics),) = record.items()
            evaluations.append((split, metrics))
        elif isinstance(record.get("split"), str):
            evaluations.append((record["split"], {k: v for k, v in record.items() if k != "split"}))
        else:
            evaluations.append((None, record))
    return evaluations


def _job_order(job_dir: Path) -> tuple[str, int]:
    """Jobs by start: <time> then its same-second siblings <time>_1, <time>_2, ..."""
    stamp, _, attempt = job_dir.name.partition("_")
    return stamp, int(attempt) if attempt.isdigit() else 0


def finished_job(run_dir: str | Path, request: str | None = None) -> tuple[Path, dict[str, Any]] | None:
    """(job folder, test-split metrics) of the newest job under run_dir that finished its test evaluation, else
    None. With `request`, only a job recorded with that request (`record_request`) counts. A job whose evaluate.txt
    cannot be read (a crash cut a line short) did not finish."""
    jobs = sorted((path.parent for path in Path(run_dir).glob(f"*/{EVALUATION_FILE}")), key=_job_order, reverse=True)
    for job in jobs:
        if request is not None and recorded_request(job) != request:
            continue
        if (metrics := job_test_metrics(job)) is not None:
            return job, metrics
    return None


def job_test_metrics(job_dir: str | Path) -> dict[str, Any] | None:
    """The metrics of the last test evaluation of one job, else None (also when its evaluate.txt is missing, or cut
    short by a crash)."""
    path = Path(job_dir) / EVALUATION_FILE
    if not path.is_file():
        return None
    try:
        tests = [metrics for split, metrics in read_evaluations(path) if split == "test"]
    except ValueError as error:
        logging.warning("not counted as finished: %s", error)
        return None
    return tests[-1] if tests else None


def finished_test_metrics(run_dir: str | Path, request: str | None = None) -> dict[str, Any] | None:
    """The test-split metrics of `finished_job`, else None."""
    finished = finished_job(run_dir, request)
    return finished[1] if finished else None


def record_request(job_dir: str | Path, request: str) -> None:
    """Note in a finished job what it was asked to run (its config and options), so it is reused only for that."""
    (Path(job_dir) / REQUEST_FILE).write_text(request)


def recorded_request(job_dir: str | Path) -> str | None:
    path = Path(job_dir) / REQUEST_FILE
    return path.read_text() if path.is_file() else None


def result_records(job_dir: str | Path, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-question records behind a job's test `metrics`: result/test_epoch<epoch>.json, which tasks that log
    their epoch with the metrics (scienceqa_mc) save through LAVIS's `save_result`."""
    if "epoch" not in metrics:
        raise KeyError(f"{Path(job_dir) / EVALUATION_FILE}: the test record names no epoch, so no result file")
    result_file = Path(job_dir) / "result" / f"test_epoch{metrics['epoch']}.json"
    if not result_file.is_file():
        raise FileNotFoundError(f"{Path(job_dir) / EVALUATION_FILE} records a test evaluation but {result_file} is missing")
    return json.loads(result_file.read_text())
