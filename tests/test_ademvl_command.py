"""The `ademvl` console script (lavis_ademvl/cli/), and the module paths that keep working beside it:
`python -m lavis_ademvl.train` / `.evaluate`, also under `torchrun -m`."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli import REPO, TINY_SQA, job_dirs

from lavis_ademvl.cli import COMMANDS, main
from lavis_ademvl.common.results import read_evaluations

BIN = Path(sys.executable).parent  # where the install put the console script, beside this Python


def offline_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")


def test_help_lists_every_command(capsys):
    """(The console script itself runs in the training test below.)"""
    assert main(["--help"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_is_a_tool_named_after_it(command, capsys):
    """Each subcommand is lavis_ademvl.cli.<command>, whose --help names it `ademvl <command>`."""
    assert callable(importlib.import_module(f"lavis_ademvl.cli.{command}").main)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: ademvl {command} ")


def test_an_unknown_command_is_named(capsys):
    assert main(["traing"]) == 2
    assert "error: unknown command 'traing'" in capsys.readouterr().err
    assert main([]) == 2


def test_ademvl_train_then_the_old_module_path_under_torchrun_evaluates_the_same(sqa_root, tmp_path):
    """`ademvl train` (the console script) trains and tests; `torchrun -m lavis_ademvl.evaluate` (the path kept for
    launchers) scores its checkpoint with the same test metrics."""
    options = [f"datasets.scienceqa_mc.build_info.data_root={sqa_root}", "run.max_epoch=1", "run.batch_size_train=8",
               "run.valid_splits=[]"]
    train = [str(BIN / "ademvl"), "train", "--cfg-path", str(TINY_SQA), "--options", *options,
             f"run.output_dir={tmp_path / 'train'}"]
    result = subprocess.run(train, cwd=tmp_path, capture_output=True, text=True, env=offline_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = job_dirs(tmp_path / "train")
    trained = [metrics for split, metrics in read_evaluations(job / "evaluate.txt") if split == "test"]

    torchrun = shutil.which("torchrun", path=str(BIN))
    evaluate = [torchrun, "--nproc_per_node", "1", "-m", "lavis_ademvl.evaluate", "--cfg-path", str(TINY_SQA),
                "--options", *options, f"run.output_dir={tmp_path / 'evaluate'}", "model.load_finetuned=true",
                f"model.finetuned={job / 'checkpoint_0.pth'}"]
    result = subprocess.run(evaluate, cwd=REPO, capture_output=True, text=True, env=offline_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (evaluation_job,) = job_dirs(tmp_path / "evaluate")
    evaluated = [metrics for split, metrics in read_evaluations(evaluation_job / "evaluate.txt") if split == "test"]
    columns = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg", "counts")
    assert [{key: m[key] for key in columns} for m in evaluated] == [{key: m[key] for key in columns} for m in trained]
