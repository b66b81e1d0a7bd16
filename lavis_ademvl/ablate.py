"""Run an ablation grid (one of the paper's Tables VI-X) row by row and write its markdown table.

  python -m lavis_ademvl.ablate --grid projects/ademvl/ablations/table8.yaml [--base CONFIG] [--options k=v ...]

A grid yaml has a `title` and `rows`, each a `name` and a row `config` (overrides of a base experiment, via
`includes`). `--base` swaps the rows' own base for another experiment (e.g. the offline demo). Rows train and
evaluate one after another; a row whose run already finished its test evaluation is not rerun, so an interrupted
grid continues where it stopped. The table is rewritten after every row to OUTPUT/results.md.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from lavis_ademvl.common.config_files import load_with_includes
from lavis_ademvl.common.results import finished_test_metrics
from lavis_ademvl.tasks.scienceqa import TABLE_COLUMNS, format_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lavis_ademvl.ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Path, required=True)
    parser.add_argument("--base", type=Path, help="experiment config replacing the rows' own base")
    parser.add_argument("--output-dir", type=Path, help="default: output/ademvl/ablations/<grid name>")
    parser.add_argument("--options", nargs="+", default=[], help="overrides for every row, key=value")
    return parser.parse_args(argv)


def row_config(row_path: Path, base: Path | None) -> Path:
    """The row's config file, or a merged copy of `base` + the row's own overrides."""
    if base is None:
        return row_path
    overrides = OmegaConf.load(row_path)
    overrides.pop("includes", None)
    merged = OmegaConf.merge(load_with_includes(base), overrides)
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"ablate_{row_path.stem}_", delete=False)
    with handle:
        handle.write(OmegaConf.to_yaml(merged))
    return Path(handle.name)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "row"


def markdown(title: str, results: dict[str, dict]) -> str:
    if all(set(TABLE_COLUMNS) <= set(m) for m in results.values()):
        table = format_table(results)
    else:
        lines = ["| Row | agg_metrics |", "|---|---|"]
        lines += [f"| {name} | {m.get('agg_metrics', float('nan')):.2f} |" for name, m in results.items()]
        table = "\n".join(lines)
    return f"### {title}\n\n{table}\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.grid.is_file():
        print(f"error: grid file not found: {args.grid}", file=sys.stderr)
        return 2
    grid = OmegaConf.load(args.grid)
    rows = list(grid.get("rows") or [])
    if not rows:
        print(f"error: {args.grid} lists no rows", file=sys.stderr)
        return 2
    output_dir = args.output_dir or Path("output/ademvl/ablations") / args.grid.stem
    output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for row in rows:
        run_dir = output_dir / slug(row.name)
        metrics = finished_test_metrics(run_dir)
        if metrics is None:
            row_path = (args.grid.parent / row.config).resolve()
            if not row_path.is_file():
                print(f"error: row {row.name!r}: config not found: {row_path}", file=sys.stderr)
                return 2
            print(f"=== {row.name} ===", flush=True)
            command = [sys.executable, "-m", "lavis_ademvl.train", "--cfg-path", str(row_config(row_path, args.base)),
                       "--options", f"run.output_dir={run_dir}", *args.options]
            if subprocess.run(command).returncode != 0 or (metrics := finished_test_metrics(run_dir)) is None:
                print(f"error: row {row.name!r} failed: {' '.join(command)}", file=sys.stderr)
                return 1
        else:
            print(f"=== {row.name}: finished earlier, reused ===", flush=True)
        results[row.name] = metrics
        (output_dir / "results.md").write_text(markdown(grid.get("title", args.grid.stem), results))
    print(markdown(grid.get("title", args.grid.stem), results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
