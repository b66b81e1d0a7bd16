from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli import REPO, job_dirs, run_module  # noqa: E402
from instruct_fixtures import make_all_data  # noqa: E402
from scienceqa_fixture import make_scienceqa  # noqa: E402

import lavis_ademvl  # noqa: E402,F401


@pytest.fixture(scope="session")
def sqa_root(tmp_path_factory) -> Path:
    return make_scienceqa(tmp_path_factory.mktemp("scienceqa"))


@pytest.fixture(scope="session")
def instruct_checkpoint(tmp_path_factory) -> Path:
    """A tiny model instruction-tuned for 2 iterations on a generated all_data.json (its checkpoint_0.pth), by
    `python -m lavis_ademvl.train` on projects/ademvl/debug/instruct_tiny.yaml."""
    tmp = tmp_path_factory.mktemp("instruct")
    root = make_all_data(tmp / "data")
    options = [f"datasets.ademvl_instruct.build_info.data_root={root}", f"run.output_dir={tmp / 'out'}"]
    run_module("lavis_ademvl.train", REPO / "projects" / "ademvl" / "debug" / "instruct_tiny.yaml", options, tmp)
    (job,) = job_dirs(tmp / "out")
    return job / "checkpoint_0.pth"
