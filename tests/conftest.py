from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lavis_ademvl  # noqa: E402,F401
from omegaconf import OmegaConf  # noqa: E402

from lavis_ademvl.models.ademvl import AdemVL  # noqa: E402
from scienceqa_fixture import make_scienceqa  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = OmegaConf.to_container(OmegaConf.load(AdemVL.default_config_path("tiny")).model)


def tiny_config(**overrides) -> dict:
    config = copy.deepcopy(TINY_CONFIG)
    config.update(overrides)
    return config


def tiny_model(**overrides) -> AdemVL:
    return AdemVL.from_config(tiny_config(**overrides))


@pytest.fixture(scope="session")
def sqa_root(tmp_path_factory) -> Path:
    return make_scienceqa(tmp_path_factory.mktemp("scienceqa"))
