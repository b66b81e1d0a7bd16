"""Evaluate several models on one dataset and task through LAVIS, and print one table.

  ademvl compare --cfg-path projects/ademvl/compare/sqa.yaml [--options k=v ...]

The config is an experiment config (datasets, run) plus `compare.models`: a list of {name, model, checkpoint?},
where `model` is a LAVIS model section (any registered arch: ademvl variants, blip2_opt, ...); an entry without
`checkpoint` is evaluated as built (`run.allow_untrained`: pretrained LAVIS weights, or an untrained ADEM-VL). Each entry is
evaluated in its own process, so its peak memory is its own; an entry whose weights cannot be loaded (e.g. offline)
is reported as skipped with the reason. Columns: the task's metrics, trainable and total parameters, evaluation
throughput (samples/s, model loading excluded) and peak memory (CUDA allocation, else the process's peak RSS).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lavis_ademvl.common.cli import entry_point, tool_parser
from lavis_ademvl.common.config_files import load_with_includes, parse_options

RESULT_PREFIX = "COMPARE_RESULT "
PARSER = tool_parser("compare", __doc__)
PARSER.add_argument("--out", type=Path, help="markdown file for the table (default: print only)")
PARSER.add_argument("--entry", type=int, help=argparse.SUPPRESS)  # worker mode


def compare_config(cfg_path: Path, options: list[str]) -> tuple[DictConfig, list]:
    """(the experiment with the options applied, its compare.models entries)."""
    merged = OmegaConf.merge(load_with_includes(cfg_path), parse_options(options))
    entries = list((merged.get("compare") or {}).get("models") or [])
    if not entries:
        raise KeyError(f"{cfg_path}: compare.models lists no model")
    return merged, entries


def entry_config(cfg_path: Path, index: int, options: list[str]) -> tuple[str, DictConfig]:
    """(entry name, the experiment whose `model` is the entry's, evaluation only)."""
    merged, entries = compare_config(cfg_path, options)
    entry = entries[index]
    merged.model = entry.model
    merged.run.evaluate = True
    if entry.get("checkpoint"):
        merged.model.load_finetuned = True
        merged.model.finetuned = entry.checkpoint
    else:  # evaluated as built: a LAVIS model with its own pretrained weights, or an untrained baseline
        merged.run.allow_untrained = True
    del merged["compare"]
    return str(entry.name), merged


def evaluate_entry(cfg_path: Path, index: int, options: list[str]) -> dict:
    """Runs in the worker process: build, evaluate the test splits, measure."""
    import lavis_ademvl  # noqa: F401
    from lavis_ademvl.common.launch import prepare

    name, experiment = entry_config(cfg_path, index, options)
    try:
        runner = prepare(experiment).build_runner()
    except Exception as error:  # noqa: BLE001  (any loading failure means: report and go on)
        return {"name": name, "skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    model = runner.unwrap_dist_model(runner.model)  # moved to the device once, before timing
    runner.dataloaders  # noqa: B018  (groups the datasets by split)
    num_samples = sum(len(runner.datasets[split]) for split in runner.test_splits)
    if runner.cuda_enabled:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    logs = runner.evaluate(skip_reload=True) or {}
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if runner.cuda_enabled else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    metrics = next((m for m in logs.values() if m), {})
    return {
        "name": name,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        "samples_per_s": num_samples / elapsed,
        "peak_memory_mb": peak / 2**20,
        "memory_kind": "CUDA peak" if runner.cuda_enabled else "peak RSS",
    }


def table(results: list[dict]) -> str:
    metric_names = sorted({k for r in results for k in r.get("metrics", {}) if k != "counts"},
                          key=lambda k: (k != "agg_metrics", k))
    shown = [m for m in metric_names if m in ("agg_metrics", "IMG", "TXT", "NO", "CIDEr", "Bleu_4")] or metric_names[:4]
    lines = ["| model | " + " | ".join(shown) + " | trainable | total | samples/s | peak MB |",
             "|---" * (len(shown) + 5) + "|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} |")
            continue
        cells = [f"{r['metrics'].get(m, float('nan')):.2f}" for m in shown]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['trainable']:,} | {r['total']:,} | "
                     f"{r['samples_per_s']:.1f} | {r['peak_memory_mb']:.0f} ({r['memory_kind']}) |")
    return "\n".join(lines)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = PARSER.parse_args(argv)
    if args.entry is not None:
        print(RESULT_PREFIX + json.dumps(evaluate_entry(args.cfg_path, args.entry, args.options)), flush=True)
        return 0
    _, entries = compare_config(args.cfg_path, args.options)
    results = []
    for index in range(len(entries)):
        command = [sys.executable, "-m", "lavis_ademvl.cli.compare", "--cfg-path", str(args.cfg_path), "--entry", str(index)]
        if args.options:
            command += ["--options", *args.options]
        finished = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in finished.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if finished.returncode != 0 or not lines:
            tail = (finished.stderr or finished.stdout).strip().splitlines()[-1:] or ["no output"]
            results.append({"name": f"entry {index}", "skipped": f"evaluation failed: {tail[0][:300]}"})
        else:
            results.append(json.loads(lines[-1][len(RESULT_PREFIX):]))
        print(f"{results[-1]['name']}: {'skipped' if 'skipped' in results[-1] else 'done'}", flush=True)
    output = table(results)
    print(output)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(output + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
