"""What the package's command-line tools share: their arguments, one user-error exit, and train-or-reuse.

A tool is a module with `main(argv) -> int`, decorated with `entry_point`, whose parser comes from `tool_parser`:

    PARSER = tool_parser("mytool", __doc__)       # --cfg-path and --options
    PARSER.add_argument("--checkpoint")

    @entry_point
    def main(argv: list[str] | None = None) -> int:
        args = PARSER.parse_args(argv)
        ...

A bad input (a missing, unreadable or unwritable file or folder, an unknown key or value: USER_ERRORS) ends the tool
with `error: <message>` on stderr and exit status 2 (argparse's own status for bad arguments), a failed run
(`RunFailed`) with status 1; anything else is a bug and keeps its traceback. `train_or_reuse` runs
`python -m lavis_ademvl.train` for one experiment, or reuses its finished run, and returns its job folder and test
metrics.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lavis_ademvl.common.config_files import load_with_includes, written_config
from lavis_ademvl.common.results import finished_job, job_test_metrics, record_request

# The exceptions that mean "the input is wrong" (their messages name the file, key or value at fault). OSError: a
# file or folder that cannot be read or written (Python's own name the path; our writes add it, `atomic.write_atomically`).
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, KeyError, ValueError)
DEVICES = ("auto", "cpu", "cuda")


class RunFailed(RuntimeError):
    """A run that did not finish (a NaN loss, a checkpoint that could not be written, a run started in another
    process that failed): `error: <message>` and exit status 1."""


def tool_parser(command: str, doc: str | None, *, experiment: bool = True) -> argparse.ArgumentParser:
    """An argument parser for `ademvl <command>` described by the first paragraph of `doc`; `experiment` adds
    --cfg-path (required) and --options."""
    parser = argparse.ArgumentParser(prog=f"ademvl {command}", description=(doc or "").split("\n\n")[0])
    if experiment:
        parser.add_argument("--cfg-path", required=True, help="experiment config (yaml, may use `includes:`)")
        add_options_argument(parser)
    return parser


def add_options_argument(parser: argparse.ArgumentParser, help: str = "config overrides, key=value") -> None:
    parser.add_argument("--options", nargs="+", default=[], help=f"{help}, e.g. run.max_epoch=5")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when available")


def error_message(error: BaseException) -> str:
    """The message of an exception (a KeyError's without the quotes its str() adds)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error)


def entry_point(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """`main` returning an exit status: 0 when it returns None, 2 on a user error, 1 on a failed run."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or 0
        except USER_ERRORS as error:
            print(f"error: {error_message(error)}", file=sys.stderr)
            return 2
        except RunFailed as error:
            print(f"error: {error}", file=sys.stderr)
            return 1

    return run


def train_or_reuse(
    experiment: str | Path | DictConfig,
    run_dir: str | Path,
    options: Sequence[str] = (),
    *,
    label: str = "",
    force: bool = False,
) -> tuple[Path, dict]:
    """(job folder, test metrics) of the experiment's training run in `run_dir` (its `run.output_dir`).

    A run there that finished its test evaluation for the same config and options is reused (unless `force`); a
    changed request trains anew, in a new job folder; otherwise `python -m lavis_ademvl.train`
    trains and evaluates it in a subprocess, its output shown. `experiment` is a config file or an in-memory config
    (written to a temporary file for the subprocess); `options` are key=value overrides. RunFailed if it fails.
    """
    label = label or Path(run_dir).name
    request = run_request(experiment, options)
    if not force and (finished := finished_job(run_dir, request)) is not None:
        print(f"=== {label}: finished earlier, reused ({finished[0]}) ===", flush=True)
        return finished
    print(f"=== {label}: training and evaluating ({run_dir}) ===", flush=True)
    as_file = written_config(experiment) if isinstance(experiment, DictConfig) else contextlib.nullcontext(experiment)
    with as_file as cfg_path, tempfile.TemporaryDirectory(prefix="lavis_ademvl_job_") as scratch:
        # The run names the job folder it created: another run into run_dir at the same time creates one too.
        job_file = Path(scratch) / "job_dir"
        command = [sys.executable, "-m", "lavis_ademvl.train", "--cfg-path", str(cfg_path), "--job-file", str(job_file),
                   "--options", f"run.output_dir={run_dir}", *options]
        returncode = subprocess.run(command).returncode
        job = Path(job_file.read_text()) if job_file.is_file() else None
    metrics = job_test_metrics(job) if job is not None else None
    if returncode != 0 or metrics is None:
        where = f" in {job}" if job is not None else ""
        raise RunFailed(f"{label}: the run{where} did not finish (status {returncode}): {' '.join(command)}")
    record_request(job, request)
    return job, metrics


def run_request(experiment: str | Path | DictConfig, options: Sequence[str]) -> str:
    """What a run is asked to do, as text: the experiment config (its includes merged) and the options."""
    config = experiment if isinstance(experiment, DictConfig) else load_with_includes(experiment)
    return OmegaConf.to_yaml(OmegaConf.create({"experiment": config, "options": list(options)}))
