from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scienceqa_fixture import make_scienceqa  # noqa: E402

import lavis_ademvl  # noqa: E402,F401


@pytest.fixture(scope="session")
def sqa_root(tmp_path_factory) -> Path:
    return make_scienceqa(tmp_path_factory.mktemp("scienceqa"))
