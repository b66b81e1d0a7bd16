"""Run an ablation grid (one of the paper's Tables VI-X) row by row and write its markdown table.

  ademvl ablate --grid projects/ademvl/ablations/table8.yaml [--base CONFIG] [--options k=v ...]

A grid yaml has a `title` and `rows`, each a `name` and a row `config` (overrides of a base experiment, via
`includes`). `--base` swaps the rows' own base for another experiment (e.g. the offline demo). Rows train and
evaluate one after another; a row whose run already finished its test evaluation with the same config and options
is not rerun, so an interrupted grid continues where it stopped (changed options train the row again). The table is
rewritten after every row to OUTPUT/results.md.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lavis_ademvl.common.cli import add_options_argument, entry_point, tool_parser, train_or_reuse
from lavis_ademvl.common.config_files import load_with_includes
from lavis_ademvl.tasks.scienceqa import TABLE_COLUMNS, format_table

PARSER = tool_parser("ablate", __doc__, experiment=False)
PARSER.add_argument("--grid", type=Path, required=True)
PARSER.add_argument("--base", type=Path, help="experiment config replacing the rows' own base")
PARSER.add_argument("--output-dir", type=Path, help="default: output/ademvl/ablations/<grid name>")
add_options_argument(PARSER, "overrides for every row")


def row_config(row_path: Path, base: Path | None) -> Path | DictConfig:
    """The row's config file, or `base` with the row's own overrides on top."""
    if not row_path.is_file():
        raise FileNotFoundError(f"row config not found: {row_path}")
    if base is None:
        return row_path
    overrides = OmegaConf.load(row_path)
    overrides.pop("includes", None)
    return OmegaConf.merge(load_with_includes(base), overrides)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "row"


def row_folders(grid: Path, names: list[str]) -> dict[str, str]:
    """Each row's run folder (the slug of its name); two rows that would share one are an error naming them."""
    folders: dict[str, str] = {}
    for name in names:
        folder = slug(name)
        clash = [other for other, taken in folders.items() if taken == folder]
        if clash:
            raise ValueError(f"{grid}: rows {clash[0]!r} and {name!r} would share the run folder {folder!r}; "
                             f"give them names that differ in letters or digits")
        folders[name] = folder
    return folders


def markdown(title: str, results: dict[str, dict]) -> str:
    if all(set(TABLE_COLUMNS) <= set(m) for m in results.values()):
        table = format_table(results)
    else:
        lines = ["| Row | agg_metrics |", "|---|---|"]
        lines += [f"| {name} | {m.get('agg_metrics', float('nan')):.2f} |" for name, m in results.items()]
        table = "\n".join(lines)
    return f"### {title}\n\n{table}\n"


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = PARSER.parse_args(argv)
    if not args.grid.is_file():
        raise FileNotFoundError(f"grid file not found: {args.grid}")
    grid = OmegaConf.load(args.grid)
    rows = list(grid.get("rows") or [])
    if not rows:
        raise ValueError(f"{args.grid} lists no rows")
    title = grid.get("title", args.grid.stem)
    output_dir = args.output_dir or Path("output/ademvl/ablations") / args.grid.stem
    output_dir.mkdir(parents=True, exist_ok=True)
    folders = row_folders(args.grid, [str(row.name) for row in rows])
    results: dict[str, dict] = {}
    for row in rows:
        config = row_config((args.grid.parent / row.config).resolve(), args.base)
        _, results[row.name] = train_or_reuse(config, output_dir / folders[row.name], args.options, label=row.name)
        (output_dir / "results.md").write_text(markdown(title, results))
    print(markdown(title, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
