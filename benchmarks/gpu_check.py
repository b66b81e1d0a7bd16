"""GPU correctness checks in one command, for one H100/H200 without network: `make gpu-check`, or
`bash benchmarks/gpu_check.sh [--only CHECK ...]` (this module, with the project's virtualenv).

Each check runs its commands in their own processes under a time limit, and nothing is installed: what is missing
(bitsandbytes) is skipped with a line saying so. With a GPU the whole set is sized to take under 10 minutes on one
H200 (an estimate: no GPU has run it yet):

  commands              every training/evaluation command below: its config and options load and validate
  cpu-tests             tests/test_fused_attend.py and test_fusion.py without their cuda cases (seconds)
  fusion-speed-tiny     python -m benchmarks.fusion_speed --shape tiny (on the GPU where there is one)
  cuda-tests            every test marked cuda (pytest -m cuda tests): the GPU case of each device-taking test
  tiny-train-eval       python -m lavis_ademvl.train, projects/ademvl/debug/sqa_tiny.yaml: train, validate, test
  tiny-deterministic    the same run twice under run.deterministic=true: the same losses and weights, bit for bit
  tiny-resume           epoch 1 alone, then resumed from checkpoint_latest.pth: equal to the uninterrupted run
  tiny-torchrun         under torchrun --nproc_per_node 1 (nccl)
  tiny-fsdp             under torchrun on every GPU (nccl), run.distributed_strategy=fsdp on a random LLaMA folder (the
                        meta-device, shard-by-shard load): trains and tests; its weights equal the ddp run's (1e-5)
  tiny-bf16             model.llm_dtype=bfloat16
  tiny-fp16-amp         model.llm_dtype=float16 run.amp=true (the loss scaler)
  quant-8bit            a random LLaMA saved to a folder, loaded with model.llm_quantization=8bit
  quant-4bit            the same, 4bit
  smollm2-demo          projects/ademvl/demo/sqa_smollm2.yaml on its assets (ademvl assets, a small
                        question set, built in the background from the start): train and test, then the evaluation
                        config on its checkpoint gives the same accuracy
  fusion-speed-llama7b  python -m benchmarks.fusion_speed --shape llama7b (bfloat16, built on the GPU)

Every training run passes run.device=cuda. Without a GPU the first three run and the others are skipped; the last
line is then `no GPU: N checks skipped`. Outputs: $GPU_CHECK_OUT (default benchmarks/results)/gpu_check_<cuda|cpu>/
(summary.md and one log per check), and the LLaMA-7B figures as fusion_speed_llama7b_cuda.{json,md} in
$GPU_CHECK_OUT. Exit status 1 when a check that ran failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "projects" / "ademvl" / "demo"
TINY_SQA = REPO / "projects" / "ademvl" / "debug" / "sqa_tiny.yaml"
CPU_TESTS = ["tests/test_fused_attend.py", "tests/test_fusion.py"]  # the fast ones: a few seconds on 2 cores
# The tiny runs' ScienceQA-layout questions (ademvl assets' builder), and the SmolLM2 demo's: one
# epoch of 48 questions in batches of 2 and 24 test questions keep it to a minute on a GPU.
TINY_QUESTIONS = {"num_train": 16, "num_val": 8, "num_test": 8}
DEMO_QUESTIONS = {"num_train": 48, "num_val": 3, "num_test": 24}

# The training and evaluation commands: module, config and options. `{...}` are filled in when a command runs
# (`commands` fills them with placeholders): device, out (run.output_dir), data (the tiny runs' questions),
# checkpoint, llama (the random LLaMA's folder).
COMMON = ["run.device={device}", "run.output_dir={out}"]
TINY = ["datasets.scienceqa_mc.build_info.data_root={data}", "run.batch_size_train=8", "run.max_epoch=1"]  # 2 steps
DETERMINISTIC = [*TINY, "run.max_epoch=2", "run.deterministic=true", "run.valid_splits=[]", "run.test_splits=[]"]
QUANTIZED = [*TINY, "model.llm_model={llama}", "model.llm_config=null"]
# No adapter dropout or random crop: each rank would draw its own, and the fsdp run is compared with the ddp one.
SHARDABLE = [*QUANTIZED, "model.adapter_dropout=0.0", "datasets.scienceqa_mc.vis_processor.train.resize=squash",
             "run.inference_method=rank"]
RUNS: dict[str, tuple[str, Path, list[str]]] = {
    "tiny": ("lavis_ademvl.train", TINY_SQA, TINY),
    "tiny-bf16": ("lavis_ademvl.train", TINY_SQA, [*TINY, "model.llm_dtype=bfloat16"]),
    "tiny-fp16-amp": ("lavis_ademvl.train", TINY_SQA, [*TINY, "model.llm_dtype=float16", "run.amp=true"]),
    "tiny-deterministic": ("lavis_ademvl.train", TINY_SQA, DETERMINISTIC),
    "tiny-first-epoch": ("lavis_ademvl.train", TINY_SQA, [*DETERMINISTIC, "run.epochs_per_job=1"]),
    "tiny-resumed": ("lavis_ademvl.train", TINY_SQA, [*DETERMINISTIC, "run.resume_ckpt_path={checkpoint}"]),
    "tiny-fsdp": ("lavis_ademvl.train", TINY_SQA, [*SHARDABLE, "run.distributed_strategy=fsdp"]),
    "tiny-fsdp-ddp": ("lavis_ademvl.train", TINY_SQA, SHARDABLE),
    "tiny-8bit": ("lavis_ademvl.train", TINY_SQA, [*QUANTIZED, "model.llm_quantization=8bit"]),
    "tiny-4bit": ("lavis_ademvl.train", TINY_SQA, [*QUANTIZED, "model.llm_quantization=4bit"]),
    # Data, SmolLM2 and the CLIP come from $LAVIS_ADEMVL_CACHE, as the demo configs read them.
    "smollm2": ("lavis_ademvl.train", DEMO / "sqa_smollm2.yaml", []),
    "smollm2-eval": ("lavis_ademvl.evaluate", DEMO / "sqa_smollm2_eval.yaml", ["model.finetuned={checkpoint}"]),
}


class CheckFailed(Exception):
    """A check's command failed or its result is wrong; the message says which."""


class CheckSkipped(Exception):
    """A check cannot run here; the message says why."""


@dataclass
class Check:
    name: str
    needs_gpu: bool
    timeout_s: int
    run: Callable[[Context], str]  # returns a note for the summary


@dataclass
class Result:
    name: str
    status: str  # passed | failed | skipped
    seconds: float
    note: str


@dataclass
class Context:
    """What the checks share: the device, the scratch folder, the log of the running check and its deadline."""

    device: str
    work: Path
    out: Path
    logs: Path
    log: Path = Path(os.devnull)
    deadline: float = math.inf
    assets: subprocess.Popen | None = None
    _made: dict[str, Any] = field(default_factory=dict)

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> str:
        """Run a command (in its own process group, killed whole at the deadline) with its output appended to the
        check's log; returns that output, raises CheckFailed on a non-zero exit."""
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            start = log.tell()
            process = subprocess.Popen(argv, cwd=REPO, env={**child_env(), **(env or {})}, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            returncode = wait(process, self.deadline)
        output = self.log.read_bytes()[start:].decode(errors="replace")  # tell() counts bytes
        if returncode != 0:
            raise CheckFailed(f"python {' '.join(argv[1:3])} exited {returncode}: {last_lines(output)}")
        return output

    def train(self, run: str, out: str, env: dict[str, str] | None = None, launcher: tuple[str, ...] = (),
              **values: str | Path) -> Path:
        """Run RUNS[run] on this device with run.output_dir work/out; returns that folder."""
        output_dir = self.work / out
        self.run(command(run, device=self.device, out=output_dir, **values, launcher=launcher), env)
        return output_dir

    def made(self, name: str, build: Callable[[], Any]) -> Any:
        """`build()`, once per gpu-check: what several checks share (data, a reference run)."""
        if name not in self._made:
            self._made[name] = build()
        return self._made[name]

    def tiny_data(self) -> Path:
        from lavis_ademvl.assets import build_scienceqa_from_easyvqa

        return self.made("tiny_data", lambda: build_scienceqa_from_easyvqa(self.work / "scienceqa", **TINY_QUESTIONS))

    def deterministic_run(self) -> Path:
        """The uninterrupted deterministic run (2 epochs) that tiny-deterministic and tiny-resume compare with."""
        return self.made("deterministic", lambda: self.train("tiny-deterministic", "deterministic-1", data=self.tiny_data()))

    def start_assets(self) -> None:
        """The SmolLM2 demo's assets, built in the background while the other checks run (CPU only, minutes)."""
        argv = [sys.executable, "-m", "lavis_ademvl.cli", "assets", "--cache-dir", str(self.work / "assets"),
                "--what", "smollm2", "clip", "scienceqa", *(f"--{k.replace('_', '-')}={v}" for k, v in DEMO_QUESTIONS.items())]
        with (self.logs / "smollm2-assets.log").open("w") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            self.assets = subprocess.Popen(argv, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)


def child_env() -> dict[str, str]:
    """The environment of every command: offline (the GPU machine has no network)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def wait(process: subprocess.Popen, deadline: float) -> int:
    """The exit status of `process`; at the deadline (or on Ctrl-C) its whole process group is killed."""
    try:
        return process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        kill(process)
        raise CheckFailed("timed out") from None
    except BaseException:
        kill(process)
        raise


def kill(process: subprocess.Popen) -> None:
    """Kill the process group this script started for `process` (torchrun's workers included)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def last_lines(output: str, count: int = 3) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return " | ".join(lines[-count:])[-400:]


def command(run: str, launcher: tuple[str, ...] = (), **values: Any) -> list[str]:
    """The argv of RUNS[run] with its `{...}` filled from `values`; `launcher`: e.g. torchrun's arguments."""
    module, cfg, options = RUNS[run]
    python = [sys.executable, "-m", *launcher] if launcher else [sys.executable]
    return [*python, "-m", module, "--cfg-path", str(cfg), "--options",
            *(option.format(**values) for option in [*COMMON, *options])]


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ------------------------------------------------------------------------------------------- reading a run's files


def only_job(output_dir: Path) -> Path:
    jobs = [path for path in output_dir.iterdir() if path.is_dir()]
    expect(len(jobs) == 1, f"{output_dir}: {len(jobs)} job folders, expected 1")
    return jobs[0]


def checked_job(output_dir: Path, device: str, epochs: int) -> Path:
    """The one job folder of a training run, after checking that it ran on `device` and logged `epochs` finite
    training losses."""
    job = only_job(output_dir)
    expect(run_config(job)["device"] == device, f"{job}: ran on {run_config(job)['device']}, not {device}")
    losses = train_losses(job)
    expect(len(losses) == epochs and all(math.isfinite(loss) for loss in losses),
           f"{job}: training losses {losses}, expected {epochs} finite ones")
    return job


def run_config(job: Path) -> dict[str, Any]:
    """The `run` section of the config the job printed at the top of its log.txt."""
    config, _ = json.JSONDecoder().raw_decode((job / "log.txt").read_text())
    return config["run"]


def train_losses(job: Path) -> list[float]:
    records = [json.loads(line) for line in (job / "log.txt").read_text().splitlines()
               if line.startswith("{") and line.endswith("}")]
    return [float(record["train_loss"]) for record in records if "train_loss" in record]


def evaluations(job: Path) -> list[tuple[str | None, dict[str, Any]]]:
    from lavis_ademvl.common.results import read_evaluations

    path = job / "evaluate.txt"
    return read_evaluations(path) if path.is_file() else []


def metrics_of_test(job: Path) -> dict[str, Any]:
    """The last test-split metrics the job wrote to evaluate.txt."""
    tests = [metrics for split, metrics in evaluations(job) if split == "test"]
    expect(bool(tests), f"{job}: no test evaluation in evaluate.txt")
    return tests[-1]


def same_weights(first: Path, second: Path) -> None:
    """The trainable weights of the two jobs' checkpoint_latest.pth are equal, bit for bit."""
    a, b = (torch.load(job / "checkpoint_latest.pth", map_location="cpu", weights_only=True)["model"] for job in (first, second))
    expect(a.keys() == b.keys(), f"{first} and {second} hold different keys")
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    expect(not differ, f"{first} and {second} differ in {differ}")


# ------------------------------------------------------------------------------------------------------- checks


def validate_commands(ctx: Context) -> str:
    """Load every command's config with its options (placeholders for the paths) and validate the run and model
    sections, as the commands themselves do before building anything: a typo costs no GPU time."""
    warnings.filterwarnings("ignore", "Importing from timm", FutureWarning)  # LAVIS's imports, as setup.cfg has it
    import lavis_ademvl  # noqa: F401  (registers the model for the config loader)
    from lavis_ademvl.common.config_files import load_experiment
    from lavis_ademvl.common.run_config import check_run_config
    from lavis_ademvl.models.config import AdemVLConfig

    placeholders = {"device": "cuda", "out": ctx.work / "out", "data": ctx.work / "data", "llama": ctx.work / "llama",
                    "checkpoint": ctx.work / "checkpoint_latest.pth"}
    for run in RUNS:
        argv = command(run, **placeholders)
        try:
            config = load_experiment(argv[argv.index("--cfg-path") + 1], argv[argv.index("--options") + 1 :])
            check_run_config(config.run_cfg, known_keys=True)
            AdemVLConfig.from_dict(config.model_cfg)
        except Exception as error:
            raise CheckFailed(f"{run}: {type(error).__name__}: {error}") from error
    return f"{len(RUNS)} commands"


def pytest(ctx: Context, *args: str) -> str:
    output = ctx.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args])
    return last_lines(output, 1)


def cpu_tests(ctx: Context) -> str:
    return pytest(ctx, "-m", "not cuda", *CPU_TESTS)


def cuda_tests(ctx: Context) -> str:
    return pytest(ctx, "-m", "cuda", "tests")  # every test marked cuda: the `device` fixture's GPU cases, and any other


def fusion_speed(shape: str, *args: str) -> Callable[[Context], str]:
    def check(ctx: Context) -> str:
        out = ctx.out if shape == "llama7b" else ctx.work / "fusion_speed"  # the tiny shape's figures are not kept
        ctx.run([sys.executable, "-m", "benchmarks.fusion_speed", "--shape", shape, "--out", str(out), *args])
        result = json.loads((out / f"fusion_speed_{shape}_{ctx.device}.json").read_text())
        path, ratios, memory = result["dtypes"][0], result["ratios"], result["deterministic"]  # one arithmetic path
        return (f"train adem/llm {ratios[f'{path}: train adem/llm']['median']:.3f}, generate tokens/s adem/none "
                f"{ratios[f'{path}: generate tokens/s adem/none']['median']:.3f}, memory adem/llm "
                f"{memory[f'{path}: memory adem/llm']:.3f} ({path})")

    return check


def tiny_train_eval(ctx: Context) -> str:
    job = checked_job(ctx.train("tiny", "train-eval", data=ctx.tiny_data()), ctx.device, epochs=1)
    splits = [split for split, _ in evaluations(job)]
    expect(splits == ["val", "test"], f"{job}: evaluations of {splits}, expected val then test")
    return f"loss {train_losses(job)[0]:.3f}, test Avg {metrics_of_test(job)['Avg']:.2f}"


def tiny_deterministic(ctx: Context) -> str:
    first = checked_job(ctx.deterministic_run(), ctx.device, epochs=2)
    second = checked_job(ctx.train("tiny-deterministic", "deterministic-2", data=ctx.tiny_data()), ctx.device, epochs=2)
    expect(train_losses(first) == train_losses(second), f"losses {train_losses(first)} then {train_losses(second)}")
    same_weights(first, second)
    return "two runs: the same losses and weights"


def tiny_resume(ctx: Context) -> str:
    uninterrupted = checked_job(ctx.deterministic_run(), ctx.device, epochs=2)
    output_dir = ctx.train("tiny-first-epoch", "resume", data=ctx.tiny_data())
    first = checked_job(output_dir, ctx.device, epochs=1)
    ctx.train("tiny-resumed", "resume", data=ctx.tiny_data(), checkpoint=first / "checkpoint_latest.pth")
    resumed = checked_job(output_dir, ctx.device, epochs=2)  # the resumed run continues in the first one's folder
    expect(train_losses(resumed) == train_losses(uninterrupted),
           f"losses {train_losses(resumed)}, uninterrupted {train_losses(uninterrupted)}")
    same_weights(resumed, uninterrupted)
    return "the same losses and weights as the uninterrupted run"


def tiny_torchrun(ctx: Context) -> str:
    launcher = ("torch.distributed.run", "--standalone", "--nproc_per_node", "1")
    job = checked_job(ctx.train("tiny", "torchrun", launcher=launcher, data=ctx.tiny_data()), ctx.device, epochs=1)
    expect(run_config(job)["distributed"] is True, f"{job}: did not join a process group")
    scored = metrics_of_test(job)["counts"]["Avg"]
    expect(scored == TINY_QUESTIONS["num_test"], f"{job}: {scored} test questions scored")
    return f"one process group ({'nccl' if ctx.device == 'cuda' else 'gloo'}), {scored} test questions"


def tiny_fsdp(ctx: Context) -> str:
    gpus = torch.cuda.device_count()
    launcher = ("torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus))
    llama = ctx.made("llama", lambda: random_llama(ctx.work / "llama"))
    sharded = checked_job(ctx.train("tiny-fsdp", "fsdp", launcher=launcher, data=ctx.tiny_data(), llama=llama),
                          ctx.device, epochs=1)
    expect(run_config(sharded)["distributed_strategy"] == "fsdp", f"{sharded}: not run with fsdp")
    whole = checked_job(ctx.train("tiny-fsdp-ddp", "fsdp-ddp", launcher=launcher, data=ctx.tiny_data(), llama=llama),
                        ctx.device, epochs=1)
    a, b = (torch.load(job / "checkpoint_latest.pth", map_location="cpu", weights_only=True)["model"] for job in (sharded, whole))
    worst = max((a[key] - b[key]).abs().max().item() for key in a)
    expect(worst <= 1e-5, f"{sharded}: the weights differ from the ddp run's by {worst:.2e}")
    expect(metrics_of_test(sharded)["counts"]["Avg"] == TINY_QUESTIONS["num_test"], f"{sharded}: not every test question scored")
    return f"{gpus} GPU(s), nccl: trained and tested; weights within {worst:.1e} of the ddp run's"


def tiny_dtype(run: str) -> Callable[[Context], str]:
    def check(ctx: Context) -> str:
        job = checked_job(ctx.train(run, run, data=ctx.tiny_data()), ctx.device, epochs=1)
        return f"loss {train_losses(job)[0]:.3f}, test Avg {metrics_of_test(job)['Avg']:.2f}"

    return check


def quantized(bits: str) -> Callable[[Context], str]:
    def check(ctx: Context) -> str:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise CheckSkipped("bitsandbytes not installed")
        llama = ctx.made("llama", lambda: random_llama(ctx.work / "llama"))
        job = checked_job(ctx.train(f"tiny-{bits}", f"quant-{bits}", data=ctx.tiny_data(), llama=llama), ctx.device, epochs=1)
        return f"loss {train_losses(job)[0]:.3f}, test Avg {metrics_of_test(job)['Avg']:.2f}"

    return check


def random_llama(folder: Path) -> Path:
    """The tiny model type's LLaMA, random weights, saved as a pretrained folder (what quantized loading reads)."""
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    from lavis_ademvl.models.ademvl import AdemVL

    llm_config = OmegaConf.to_container(OmegaConf.load(AdemVL.default_config_path("tiny")).model.llm_config)
    LlamaForCausalLM(LlamaConfig(**llm_config)).save_pretrained(folder)
    return folder


def smollm2_demo(ctx: Context) -> str:
    expect(ctx.assets is not None, "the assets were not started")
    if wait(ctx.assets, ctx.deadline) != 0:
        raise CheckFailed(f"ademvl assets failed: see {ctx.logs / 'smollm2-assets.log'}")
    cache = {"LAVIS_ADEMVL_CACHE": str(ctx.work / "assets")}
    trained = checked_job(ctx.train("smollm2", "smollm2", env=cache), ctx.device, epochs=1)
    metrics = metrics_of_test(trained)
    evaluation = ctx.train("smollm2-eval", "smollm2-eval", env=cache, checkpoint=trained / "checkpoint_latest.pth")
    evaluated = metrics_of_test(only_job(evaluation))
    expect(evaluated["Avg"] == metrics["Avg"], f"the evaluation config scored Avg {evaluated['Avg']}, training {metrics['Avg']}")
    return f"test Avg {metrics['Avg']:.2f} on {metrics['counts']['Avg']} questions, the same from the evaluation config"


CHECKS = [
    Check("commands", False, 120, validate_commands),
    Check("cpu-tests", False, 180, cpu_tests),
    Check("fusion-speed-tiny", False, 180, fusion_speed("tiny", "--repeats", "2", "--target-spread", "0", "--new-tokens", "4")),
    Check("cuda-tests", True, 420, cuda_tests),
    Check("tiny-train-eval", True, 180, tiny_train_eval),
    Check("tiny-deterministic", True, 240, tiny_deterministic),
    Check("tiny-resume", True, 240, tiny_resume),
    Check("tiny-torchrun", True, 180, tiny_torchrun),
    Check("tiny-fsdp", True, 240, tiny_fsdp),
    Check("tiny-bf16", True, 180, tiny_dtype("tiny-bf16")),
    Check("tiny-fp16-amp", True, 180, tiny_dtype("tiny-fp16-amp")),
    Check("quant-8bit", True, 180, quantized("8bit")),
    Check("quant-4bit", True, 180, quantized("4bit")),
    Check("smollm2-demo", True, 420, smollm2_demo),
    Check("fusion-speed-llama7b", True, 420, fusion_speed("llama7b", "--max-repeats", "10")),  # within its time limit
]


def run_check(check: Check, ctx: Context, gpu: bool) -> Result:
    start = time.monotonic()
    if check.needs_gpu and not gpu:
        return Result(check.name, "skipped", 0.0, "no GPU")
    ctx.log = ctx.logs / f"{check.name}.log"
    ctx.log.write_text("")
    ctx.deadline = start + check.timeout_s
    try:
        note, status = check.run(ctx), "passed"
    except CheckSkipped as skipped:
        note, status = str(skipped), "skipped"
    except CheckFailed as failed:
        note, status = f"{failed} (log: {ctx.log})", "failed"
    except Exception as error:  # a check's own bug fails that check, not the ones after it
        note, status = f"{type(error).__name__}: {error} (log: {ctx.log})", "failed"
    return Result(check.name, status, time.monotonic() - start, note)


def tally(results: list[Result]) -> str:
    return ", ".join(f"{sum(r.status == status for r in results)} {status}" for status in ("passed", "failed", "skipped"))


def summary(results: list[Result], device_name: str, seconds: float) -> str:
    lines = [f"# gpu-check on {device_name}, {datetime.now():%Y-%m-%d %H:%M}, {seconds:.0f} s", "", tally(results), "",
             "| check | result | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.note.replace('|', '/')} |" for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bash benchmarks/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=[check.name for check in CHECKS], help="run these checks only")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    device_name = torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()})"
    checks = [check for check in CHECKS if not args.only or check.name in args.only]
    out = Path(os.environ.get("GPU_CHECK_OUT") or REPO / "benchmarks" / "results").absolute()
    logs = out / f"gpu_check_{device}"
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = Context(device, work, out, logs)
    start = time.monotonic()
    results = []
    try:
        if gpu and any(check.run is smollm2_demo for check in checks):
            ctx.start_assets()
        for check in checks:
            result = run_check(check, ctx, gpu)
            print(f"{result.name}: {result.status}" + (f": {result.note}" if result.note else "")
                  + (f" ({result.seconds:.1f} s)" if result.status != "skipped" else ""), flush=True)
            results.append(result)
    finally:
        if ctx.assets is not None and ctx.assets.poll() is None:
            kill(ctx.assets)
        shutil.rmtree(work, ignore_errors=True)
    text = summary(results, device_name, time.monotonic() - start)
    (logs / "summary.md").write_text(text)
    print(f"\n{text}summary: {logs / 'summary.md'}")
    print(f"no GPU: {sum(check.needs_gpu for check in checks)} checks skipped" if not gpu else f"gpu-check: {tally(results)}")
    return 1 if any(result.status == "failed" for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
