"""The `ademvl` command: one subcommand per tool, each also a module (`python -m lavis_ademvl.cli.<name>`).

    ademvl train --cfg-path projects/ademvl/sqa.yaml          # = python -m lavis.train / python -m lavis_ademvl.train
    ademvl predict --cfg-path CONFIG --checkpoint CKPT --image x.png --question "..." --choices a b c
    ademvl --help                                              # the subcommands

Each tool's module is imported only when its subcommand runs (the package itself, which registers the plugin with
LAVIS, is imported by every command).
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> what it does (the tool is lavis_ademvl.cli.<subcommand>, its `main(argv) -> int`)
COMMANDS = {
    "train": "train and evaluate an experiment config with LAVIS (python -m lavis.train)",
    "evaluate": "evaluate a checkpoint on an experiment config (python -m lavis.evaluate)",
    "predict": "answer a question about an image, as the config's evaluation would",
    "visualize": "draw which visual features the adaptive drop keeps (paper Fig. 3)",
    "params": "trainable and frozen parameter counts of a config, without weights",
    "compare": "train and evaluate ADEM-VL and other models on one experiment, one table",
    "ablate": "train and evaluate a grid of the paper's ablation rows (Tables VI-X)",
    "demo": "the offline demo: ADEM-VL and a text-only baseline on CPU (needs the demo extra)",
    "assets": "build the offline demo's assets (needs the demo extra)",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {meaning}" for name, meaning in COMMANDS.items()]
    return "usage: ademvl <command> [options]   (ademvl <command> --help: its options)\n\ncommands:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, *rest = argv
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(f"lavis_ademvl.cli.{command}").main(rest)
