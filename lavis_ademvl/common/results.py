"""Reading the test metrics a finished `lavis_ademvl.train` run wrote to its evaluate.txt."""
from __future__ import annotations

import json
from pathlib import Path


def finished_test_metrics(run_dir: Path) -> dict | None:
    """The test-split metrics of the newest job under run_dir that finished its test evaluation, else None.

    evaluate.txt holds one JSON line per evaluation: {"split": "test", ...} (ScienceQA) or {"test": {...}}.
    """
    for evaluate_file in sorted(Path(run_dir).glob("*/evaluate.txt"), reverse=True):
        for line in reversed(evaluate_file.read_text().splitlines()):
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("split") == "test":
                return record
            if isinstance(record.get("test"), dict):
                return record["test"]
    return None
