"""Issue #17: nothing lost, nothing silently wrong. Each test reproduces a case where a run lost work, produced a wrong
result, or failed with a raw traceback or a misleading message."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from cli import REPO, TINY_SQA, run_module
from helpers import tiny_config, tiny_model
from lavis.common.registry import registry
from lavis_fixtures import make_coco_caption
from omegaconf import OmegaConf
from PIL import Image
from test_scienceqa import build

from lavis_ademvl.cli import ablate, train, visualize
from lavis_ademvl.common import cli
from lavis_ademvl.common.cli import RunFailed, train_or_reuse
from lavis_ademvl.common.config_files import load_experiment, load_with_includes, parse_options
from lavis_ademvl.common.images import load_image
from lavis_ademvl.common.launch import prepare
from lavis_ademvl.common.results import (
    finished_test_metrics,
    read_evaluations,
    record_request,
    write_evaluation,
)
from lavis_ademvl.common.run_config import check_run_config, dist_timeout_minutes
from lavis_ademvl.models.ademvl import AdemVL
from lavis_ademvl.models.config import AdemVLConfig
from lavis_ademvl.runners import runner_ademvl

DEBUG = REPO / "projects" / "ademvl" / "debug"


def sqa_options(root, output_dir, *extra):
    return [f"datasets.scienceqa_mc.build_info.data_root={root}", f"run.output_dir={output_dir}", *extra]


@pytest.fixture
def experiment(sqa_root, tmp_path):
    """The tiny ScienceQA experiment, prepared as `python -m lavis_ademvl.train` prepares it (one epoch, no validation)."""
    return prepare(TINY_SQA, sqa_options(sqa_root, tmp_path / "out", "run.max_epoch=1", "run.valid_splits=[]"))


# ------------------------------------------------------------------ 1. job folders


def test_runs_started_in_the_same_second_get_their_own_job_folders(experiment):
    first, second = experiment.build_runner(), experiment.build_runner()  # the same job id (time to the second)
    assert first.output_dir != second.output_dir
    assert first.output_dir.is_dir() and second.output_dir.is_dir()
    assert second.output_dir.name == f"{experiment.job_id}_1"


def test_a_job_folder_is_held_by_one_run_at_a_time(experiment, sqa_root, tmp_path):
    """Two resumes of one checkpoint both ran in its folder, one's checkpoint_latest.pth replacing the other's. A lock
    naming a live process refuses a resume; one left by a dead process is taken over; a run removes its own at its end,
    also when it fails."""
    first = experiment.build_runner()
    first.save_checkpoint(0, name="latest")
    job, lock = first.output_dir, first.output_dir / "job.lock"
    assert json.loads(lock.read_text())["pid"] == os.getpid()  # a fresh run holds its folder too
    first.release_job_folder()
    assert not lock.exists()
    resume = sqa_options(sqa_root, tmp_path / "out", "run.max_epoch=2", "run.valid_splits=[]",
                         f"run.resume_ckpt_path={job / 'checkpoint_latest.pth'}")
    other = subprocess.Popen(["sleep", "120"])  # the process of another run in the folder, still training
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "started": "2026-01-01T00:00:00"}))
        held = lock.read_text()
        with pytest.raises(RunFailed, match=rf"another run holds the job folder {job}: pid {other.pid} on .*, started 2026"):
            prepare(TINY_SQA, resume).build_runner()
        refused = run_module("lavis_ademvl.train", TINY_SQA, resume, tmp_path, check=False)
        assert refused.returncode == 1 and f"error: another run holds the job folder {job}" in refused.stderr
        assert lock.read_text() == held  # the refused run leaves the holder's lock alone
    finally:
        other.kill()
        other.wait()
    # Its holder died without removing it: taken over with a warning, and removed when this run fails.
    failed = run_module("lavis_ademvl.train", TINY_SQA, [*resume, "run.valid_splits=[nosuchsplit]"], tmp_path, check=False)
    assert failed.returncode == 2 and "nosuchsplit" in failed.stderr
    assert f"taking over the job folder {job}: its lock {lock} was left by pid {other.pid}" in failed.stdout + failed.stderr
    assert not lock.exists()
    run_module("lavis_ademvl.train", TINY_SQA, resume, tmp_path)
    assert not lock.exists()
    assert torch.load(job / "checkpoint_latest.pth", weights_only=True)["epoch"] == 1


# ------------------------------------------------------------------ 3. NaN loss, non-finite weights, failed writes


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(experiment):
    runner = experiment.build_runner()
    runner.save_checkpoint(0, name="latest")
    latest = runner.output_dir / "checkpoint_latest.pth"
    good = latest.read_bytes()
    with torch.no_grad():
        experiment.model.cls_proj.fc2.bias.fill_(float("nan"))  # every sample's [cls] slot: a NaN loss at once
    with pytest.raises(RunFailed, match=r"loss is nan at epoch 0, iteration 0 of 4"):
        runner.train()
    assert latest.read_bytes() == good


def test_non_finite_weights_never_replace_a_checkpoint(experiment):
    runner = experiment.build_runner()
    runner.save_checkpoint(0, name="latest")
    latest = runner.output_dir / "checkpoint_latest.pth"
    good = latest.read_bytes()
    with torch.no_grad():
        experiment.model.visual_value_offset[0, 1, 2] = float("inf")
    with pytest.raises(RunFailed, match=r"not saving .*checkpoint_latest.pth.*'visual_value_offset'"):
        runner.save_checkpoint(1, name="latest")
    assert latest.read_bytes() == good
    assert not list(runner.output_dir.glob("*.partial"))


def test_a_full_disk_ends_the_run_naming_the_checkpoint_and_leaving_no_partial_file(sqa_root, tmp_path):
    """A real failed write: a file-size limit below the checkpoint's size makes its write fail with EFBIG, as a full
    disk fails it with ENOSPC (torch's own writer turned both into a RuntimeError and a traceback)."""

    def limit_file_size():  # in the child: the write fails instead of the process being killed
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    options = sqa_options(sqa_root, tmp_path / "out", "run.max_epoch=1", "run.valid_splits=[]")  # logs < 32 kB < checkpoint
    command = [sys.executable, "-m", "lavis_ademvl.train", "--cfg-path", str(TINY_SQA), "--options", *options]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                            preexec_fn=limit_file_size)
    (job,) = (tmp_path / "out").iterdir()
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"error: cannot write checkpoint {job}/checkpoint_0.pth: File too large" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(job.glob("*.pth*"))


def test_a_job_folder_gone_at_a_save_ends_the_run_naming_the_checkpoint(experiment):
    """Its path now a regular file (root writes anywhere else, so no permission bits would stop the test)."""
    runner = experiment.build_runner()
    shutil.rmtree(runner.output_dir)
    runner.output_dir.write_text("not a folder")
    with pytest.raises(RunFailed, match=rf"cannot write checkpoint {runner.output_dir}/checkpoint_latest.pth: Not a directory"):
        runner.save_checkpoint(0, name="latest")
    assert runner.output_dir.read_text() == "not a folder"


def test_an_unwritable_output_dir_is_named(sqa_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunFailed, match=f"cannot create the run folder {blocker}"):
        prepare(TINY_SQA, sqa_options(sqa_root, blocker, "run.max_epoch=1")).build_runner()


# ------------------------------------------------------------------ 2. ablation rows


def test_ablation_rows_whose_names_share_a_folder_are_refused(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("title: t\nrows:\n  - {name: SiLU+x, config: a.yaml}\n  - {name: SiLU x, config: b.yaml}\n")
    assert ablate.main(["--grid", str(grid), "--output-dir", str(tmp_path / "out")]) == 2
    assert "rows 'SiLU+x' and 'SiLU x' would share the run folder 'silu_x'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "silu_x").exists()


def finished_run(run_dir, options, avg=50.0):
    job = run_dir / "20250101000000"
    job.mkdir(parents=True)
    write_evaluation("test", {"Avg": avg, "agg_metrics": avg}, output_dir=job)
    record_request(job, cli.run_request(TINY_SQA, options))
    return job


def test_a_finished_run_is_reused_only_for_the_same_options(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(cli.subprocess, "run", lambda command: started.append(command) or _Exit(0))
    finished_run(tmp_path / "row", ["run.max_epoch=1"])
    assert train_or_reuse(TINY_SQA, tmp_path / "row", ["run.max_epoch=1"])[1]["Avg"] == 50.0
    assert started == []
    # Other options: trained anew (here the stand-in run finishes nothing, so the row fails instead of reusing).
    with pytest.raises(RunFailed, match="did not finish"):
        train_or_reuse(TINY_SQA, tmp_path / "row", ["run.max_epoch=2"])
    assert len(started) == 1 and "run.max_epoch=2" in started[0]


class _Exit:
    def __init__(self, returncode):
        self.returncode = returncode


def test_concurrent_runs_into_one_folder_each_record_their_own_job(sqa_root, tmp_path):
    """Another run into the same folder (another alpha of a concurrent ablation) creates its job folder while this one
    trains, and finishes first: it sorts as the newer job, and was taken as this run's, its metrics returned and this
    run's request recorded in it."""
    run_dir = tmp_path / "row"
    options = [f"datasets.scienceqa_mc.build_info.data_root={sqa_root}", "run.max_epoch=1", "run.valid_splits=[]"]
    other_jobs = []

    def other_run():  # the other run's job, as its runner creates and writes it: <this run's job id>_1, finished
        while not run_dir.is_dir() or not any(run_dir.iterdir()):
            time.sleep(0.02)
        (started,) = run_dir.iterdir()
        job = runner_ademvl.new_job_dir(run_dir, started.name)
        write_evaluation("test", {"Avg": 99.0, "agg_metrics": 99.0, "epoch": 0}, output_dir=job)
        other_jobs.append(job)

    thread = threading.Thread(target=other_run)
    thread.start()
    job, metrics = train_or_reuse(TINY_SQA, run_dir, options)
    thread.join()
    (other,) = other_jobs
    assert job != other and job.parent == run_dir
    assert metrics == read_evaluations(job / "evaluate.txt")[-1][1] and metrics["Avg"] != 99.0
    assert (job / "request.yaml").read_text() == cli.run_request(TINY_SQA, options)
    assert not (other / "request.yaml").exists()  # the other run records its own request when it ends


def test_a_truncated_evaluate_line_is_named_and_the_job_counts_as_unfinished(tmp_path):
    job = finished_run(tmp_path / "row", [])
    with open(job / "evaluate.txt", "a") as handle:
        handle.write('{"test": {"Avg": 6')
    with pytest.raises(ValueError, match=r"evaluate.txt, line 2 is not a JSON record"):
        read_evaluations(job / "evaluate.txt")
    assert finished_test_metrics(tmp_path / "row") is None


# ------------------------------------------------------------------ 4, 5. options


def test_model_type_option_chooses_the_defaults_and_unknown_types_are_refused(capsys):
    smollm2 = OmegaConf.load(AdemVL.default_config_path("smollm2_135m")).model
    config = load_experiment(TINY_SQA, ["model.model_type=smollm2_135m"]).config
    assert config.model.model_type == "smollm2_135m" and config.model.llm_model == smollm2.llm_model
    assert train.main(["--cfg-path", str(TINY_SQA), "--options", "model.model_type=llama99b"]) == 2
    assert "unknown ademvl model_type 'llama99b'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, named",
    [
        (["run.max_epoch=1", "run.seed"], "'run.seed'"),  # a bare word after key=value items
        (["run.max_epoch", "1", "run.seed"], "'run.seed' has no value"),  # an odd trailing item of key value pairs
        (["=5"], "'=5'"),
    ],
)
def test_malformed_options_are_refused(options, named):
    with pytest.raises(ValueError, match=named):
        parse_options(options)


# ------------------------------------------------------------------ 6. ScienceQA problems


@pytest.mark.parametrize(
    "change, message",
    [
        ({"answer": -1}, r"`answer` must be an integer index into its 3 choices \(0-2\), got -1"),
        ({"answer": 1.7}, "got 1.7"),
        ({"answer": True}, "got True"),
        ({"answer": 3}, "got 3"),
        ({"choices": "red"}, "`choices` must be a non-empty list of options, got 'red'"),
        ({"choices": []}, "`choices` must be a non-empty list"),
        ({"choices": [f"c{i}" for i in range(27)], "answer": 0}, "has 27 choices; options are lettered A-Z"),
        ({"question": ""}, "`question` must be a non-empty string"),
        # issue #36: JSON's NaN was trained on as the text "nan"; a list hint ended in a TypeError naming no problem
        ({"choices": ["red", float("nan"), "blue"]}, r"every choice must be a string \(or finite number\), got \['red', nan"),
        ({"choices": ["red", None, "blue"]}, r"every choice must be a string \(or number\), got \['red', None"),
        ({"hint": ["a", "list"]}, r"`hint` must be a string \(or null\), got \['a', 'list'\]"),
    ],
)
def test_bad_scienceqa_problems_are_named_when_the_dataset_is_built(sqa_root, tmp_path, change, message):
    root = tmp_path / "sqa"
    shutil.copytree(sqa_root, root)
    problems = json.loads((root / "problems.json").read_text())
    pid = json.loads((root / "pid_splits.json").read_text())["val"][1]
    problems[pid] = {**problems[pid], "choices": ["red", "green", "blue"], "answer": 0, **change}
    (root / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(ValueError, match=rf"{root / 'problems.json'}: problem {pid}.*{message}"):
        build(root)


@pytest.mark.parametrize(
    "content, message", [(b"\xff\xfe{}", "is not UTF-8 text"), (b"[1, 2]", "holds a JSON list, not an object")]
)
def test_unreadable_problems_file_is_named(sqa_root, tmp_path, content, message):
    root = tmp_path / "sqa"
    shutil.copytree(sqa_root, root)
    (root / "problems.json").write_bytes(content)
    with pytest.raises(ValueError, match=f"problems file {root / 'problems.json'} {message}"):
        build(root)


# ------------------------------------------------------------------ 7. images


def write_png(path, pixels: np.ndarray) -> None:
    """A 16-bit PNG written byte by byte (colour type 0: grey, 2: RGB), so the test does not depend on Pillow's
    writer."""
    height, width = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_greyscale_and_rgb_pngs_keep_their_brightness(tmp_path):
    grey = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    write_png(tmp_path / "grey.png", grey)
    loaded = np.asarray(load_image(tmp_path / "grey.png"))
    assert loaded.shape == (2, 2, 3) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded[..., 0], np.rint(grey / 257.0).astype(np.uint8))
    assert (loaded[..., 0] == loaded[..., 2]).all()

    rgb = np.array([[[65535, 32768, 0], [4096, 8192, 12288]]], dtype=np.uint16)
    write_png(tmp_path / "rgb.png", rgb)
    loaded = np.asarray(load_image(tmp_path / "rgb.png")).astype(int)
    assert np.abs(loaded - rgb / 257.0).max() <= 1


def test_decompression_bomb_is_named(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match=f"image {tmp_path / 'big.png'} is too large to decode safely"):
        load_image(tmp_path / "big.png")


# ------------------------------------------------------------------ 8. config values


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_proj": 0}, "hidden_proj=0 must be at least 1"),
        ({"adapter_dim": -4}, "adapter_dim=-4 must be at least 1"),
        ({"with_cls": "nope"}, "with_cls='nope' must be true or false"),
        ({"alpha": "0.1"}, "alpha='0.1' must be a finite number"),
        ({"alpha": float("nan")}, "alpha=nan must be a finite number"),
        ({"beta": None}, "beta=None must be a finite number"),
        ({"drop_ratio": "x"}, "drop_ratio='x' must be a finite number"),
        ({"max_len": 12.5}, "max_len=12.5 must be an integer"),
        ({"down_sample_num": [16, "4"]}, r"down_sample_num\[1\]='4' must be an integer"),
        ({"down_sample_num": 16}, "down_sample_num=16 must be a non-empty list"),
        ({"adapter_dropout": 1.0}, r"adapter_dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_model_options_that_would_build_a_broken_model_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        AdemVLConfig.from_dict(tiny_config(**overrides))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("warmup_epochs", -1, "run.warmup_epochs=-1.0 must be at least 0.0"),
        ("accum_grad_iters", 0, "run.accum_grad_iters=0 must be at least 1"),
        ("log_freq", 0, "run.log_freq=0 must be at least 1"),
        ("max_epoch", 0, "run.max_epoch=0 must be at least 1"),
        ("epochs_per_job", 0, "run.epochs_per_job=0 must be at least 1"),
        ("init_lr", "fast", "run.init_lr='fast' must be a finite number"),
        ("seed", 1.5, "run.seed=1.5 must be an integer"),
        ("max_len", "ten", "run.max_len='ten' must be an integer"),
        ("amp", "yes", "run.amp='yes' must be true or false"),
        ("valid_splits", "val", r"run.valid_splits='val' must be a list of split names"),
        ("dist_timeout_minutes", 0, "run.dist_timeout_minutes=0.0 must be at least 0.1"),
        ("max_grad_norm", 0, r"run.max_grad_norm=0 must be positive \(null: no clipping\)"),
        ("max_grad_norm", -1.0, r"run.max_grad_norm=-1.0 must be positive"),
        ("max_grad_norm", "inf", "run.max_grad_norm='inf' must be a finite number"),
    ],
)
def test_run_values_out_of_range_are_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        check_run_config(OmegaConf.create({key: value}))


def test_a_bad_run_value_ends_train_before_anything_is_built(sqa_root, tmp_path, capsys):
    argv = ["--cfg-path", str(TINY_SQA), "--options", *sqa_options(sqa_root, tmp_path / "out", "run.max_epoch=0")]
    assert train.main(argv) == 2
    assert "error: run.max_epoch=0 must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_empty_output_dir_is_refused_before_anything_is_built(sqa_root, tmp_path, capsys, monkeypatch):
    """`run.output_dir=` (null) ended with Path's TypeError; `run.output_dir=""` put the job in the working directory."""
    monkeypatch.chdir(tmp_path)
    for option, shown in (("run.output_dir=", "None"), ('run.output_dir=""', "''")):
        argv = ["--cfg-path", str(TINY_SQA), "--options", f"datasets.scienceqa_mc.build_info.data_root={sqa_root}",
                option, "run.max_epoch=1"]
        assert train.main(argv) == 2
        assert f"error: run.output_dir={shown} must name a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_dist_timeout_is_a_run_key_with_a_shorter_cpu_default():
    assert dist_timeout_minutes(OmegaConf.create({}), "gloo") == 10.0
    assert dist_timeout_minutes(OmegaConf.create({}), "nccl") == 60.0
    assert dist_timeout_minutes(OmegaConf.create({"dist_timeout_minutes": 2}), "gloo") == 2.0


# ------------------------------------------------------------------ 9. evaluation needs a checkpoint


def test_evaluate_without_a_checkpoint_is_refused(sqa_root, tmp_path):
    result = run_module("lavis_ademvl.evaluate", TINY_SQA, sqa_options(sqa_root, tmp_path / "eval"), tmp_path, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "names no checkpoint, so it would score the untrained model" in result.stderr
    assert "run.allow_untrained=true" in result.stderr


def test_evaluations_name_the_checkpoint_they_scored(sqa_root, tmp_path):
    trained = prepare(TINY_SQA, sqa_options(sqa_root, tmp_path / "train", "run.max_epoch=1"))
    runner = trained.build_runner()
    runner.train()
    labels = {split: metrics["checkpoint"] for split, metrics in read_evaluations(runner.output_dir / "evaluate.txt")}
    assert labels == {"val": str(runner.output_dir / "checkpoint_latest.pth"),
                      "test": str(runner.output_dir / "checkpoint_best.pth")}

    untrained = prepare(TINY_SQA, sqa_options(sqa_root, tmp_path / "eval", "run.allow_untrained=true"), evaluating=True)
    runner = untrained.build_runner()
    runner.evaluate(cur_epoch="untrained", skip_reload=True)
    ((split, metrics),) = read_evaluations(runner.output_dir / "evaluate.txt")
    assert split == "test" and metrics["checkpoint"] == "untrained" and metrics["epoch"] == "untrained"
    assert registry.get("evaluated_checkpoint", no_warning=True) is None  # no label left for a later evaluation


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is not a readable torch checkpoint"),
        (b"model weights, honestly", "is not a readable torch checkpoint"),
        (b"hello, these are the weights\n", r"is not a readable torch checkpoint: it starts with b'hell'"),  # was `101`
        ("truncated", "is not a readable torch checkpoint"),
        ({"weights": 1}, "holds no weights"),
        ({"model": 5}, "holds no weights"),
        ({"model": {"visual_key_offset": "x"}}, "holds no weights"),
    ],
)
def test_unusable_checkpoints_are_named(tmp_path, content, message):
    path = tmp_path / "checkpoint.pth"
    model = tiny_model()
    if content == "truncated":
        torch.save({"model": model.trainable_state_dict()}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        model.load_checkpoint(str(path))


def test_checkpoints_with_nan_weights_or_other_model_options_are_refused(tmp_path):
    model = tiny_model()
    state = {name: value.clone() for name, value in model.trainable_state_dict().items()}
    state["cls_proj.fc1.weight"][0, 0] = float("nan")
    torch.save({"model": state}, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"nan.pth: the weights \['cls_proj.fc1.weight'\] hold NaN or inf"):
        model.load_checkpoint(str(tmp_path / "nan.pth"))

    other = {"model": tiny_config(alpha=0.5, activation="relu"), "run": {"task": "scienceqa_mc"}}
    torch.save({"model": model.trainable_state_dict(), "config": other}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"trained with other model options: activation='relu' there, 'silu' here; "
                                         r"alpha=0.5 there, 0.1 here"):
        model.load_checkpoint(str(tmp_path / "other.pth"))


def test_resume_from_a_checkpoint_it_cannot_continue_is_named(experiment, sqa_root, tmp_path):
    runner = experiment.build_runner()
    runner.save_checkpoint(0, name="latest")
    saved = torch.load(runner.output_dir / "checkpoint_latest.pth", weights_only=True)["config"]
    torch.save({"model": {}}, tmp_path / "weights_only.pth")
    options = sqa_options(sqa_root, tmp_path / "out", "run.max_epoch=2", f"run.resume_ckpt_path={tmp_path / 'weights_only.pth'}")
    with pytest.raises(ValueError, match=r"weights_only.pth lacks \['optimizer', 'epoch'\]"):
        prepare(TINY_SQA, options).build_runner().train()
    other_task = {**saved, "run": {**saved["run"], "task": "vqa"}}
    with pytest.raises(ValueError, match="comes from a run of task 'vqa', not 'scienceqa_mc'"):
        runner_ademvl.check_same_task(other_task, saved, "latest.pth")
    other_model = {**saved, "model": {**saved["model"], "drop_ratio": 0.3}}
    with pytest.raises(ValueError, match="latest.pth was trained with other model options: drop_ratio=0.3 there, 0.1 here"):
        runner.unwrap_dist_model(runner.model).check_resumable({"config": other_model}, "latest.pth")


def resumed_from(checkpoint, sqa_root, tmp_path, job):
    """A resume of `checkpoint`, written into a copy of `job` (as its checkpoint_latest.pth)."""
    folder = tmp_path / "resumed"
    shutil.copytree(job, folder)
    torch.save(checkpoint, folder / "checkpoint_latest.pth")
    path = folder / "checkpoint_latest.pth"
    return path, prepare(TINY_SQA, sqa_options(sqa_root, tmp_path / "out", "run.max_epoch=2", "run.valid_splits=[]",
                                               f"run.resume_ckpt_path={path}")).build_runner()


def test_a_resumed_checkpoint_with_a_bad_epoch_or_optimizer_state_is_named(experiment, sqa_root, tmp_path):
    """An epoch of "abc" ended with int()'s own message, an optimizer state of other shapes with torch's, mid-epoch."""
    runner = experiment.build_runner()
    runner.save_checkpoint(0, name="latest")
    runner.release_job_folder()
    saved = torch.load(runner.output_dir / "checkpoint_latest.pth", weights_only=True)

    path, resumed = resumed_from({**saved, "epoch": "abc"}, sqa_root, tmp_path / "epoch", runner.output_dir)
    with pytest.raises(ValueError, match=f"run.resume_ckpt_path={path}: epoch='abc' must be an integer"):
        resumed.train()
    resumed.release_job_folder()

    # The state of a real AdamW step on a model with other projection widths: as many parameters, other shapes.
    other = tiny_model(hidden_proj=8)
    trainable = [parameter for parameter in other.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if p.ndim >= 2]},
                                   {"params": [p for p in trainable if p.ndim < 2]}])
    sum((parameter ** 2).sum() for parameter in trainable).backward()
    optimizer.step()
    path, resumed = resumed_from({**saved, "optimizer": optimizer.state_dict()}, sqa_root, tmp_path / "optim",
                                 runner.output_dir)
    with pytest.raises(ValueError, match=rf"{path}: its optimizer state: `exp_avg` of visual_proj.fc1.weight has "
                                         r"shape \(8, 32\), the parameter \(16, 32\)"):
        resumed.train()
    resumed.release_job_folder()
    fewer = {**saved["optimizer"], "param_groups": [{**saved["optimizer"]["param_groups"][0], "params": [0]},
                                                    saved["optimizer"]["param_groups"][1]]}
    path, resumed = resumed_from({**saved, "optimizer": fewer}, sqa_root, tmp_path / "groups", runner.output_dir)
    with pytest.raises(ValueError, match=rf"{path}: its optimizer state holds parameter groups of \[1, 4\] "
                                         r"parameters, this run's optimizer \[10, 4\]"):
        resumed.train()


def test_resuming_a_copied_latest_checkpoint_without_its_best_is_named_before_training(experiment, sqa_root, tmp_path):
    runner = experiment.build_runner()
    runner.best_epoch, runner.best_agg_metric = 0, 50.0
    runner.save_checkpoint(0, name="latest")
    copy = tmp_path / "copied" / "checkpoint_latest.pth"
    copy.parent.mkdir()
    shutil.copy(runner.output_dir / "checkpoint_latest.pth", copy)
    resumed = prepare(TINY_SQA, sqa_options(sqa_root, tmp_path / "out", "run.max_epoch=3", f"run.resume_ckpt_path={copy}"))
    with pytest.raises(FileNotFoundError, match=f"best epoch \\(0\\) was saved as {copy.parent / 'checkpoint_best.pth'}"):
        resumed.build_runner().train()
    assert not (copy.parent / "log.txt").read_text().count('"train_loss"')


# ------------------------------------------------------------------ configs and splits


@pytest.mark.parametrize(
    "text, message",
    [
        ("includes: ../sqa.yaml\n", "`includes:` must be a list of yaml paths"),
        ("model: [unclosed\n", "is not readable YAML"),
        ("- a\n- b\n", "holds a ListConfig, not a mapping"),
    ],
)
def test_malformed_config_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_with_includes(path)


@pytest.mark.parametrize(
    "options, message",
    [
        (["run.task=scienceqa"], "run.task: unknown task 'scienceqa'"),
        (["datasets.sqa.build_info.data_root=x"], "datasets.sqa: unknown dataset 'sqa'"),
        (["model.arch=adem"], "model.arch: unknown model 'adem'"),
    ],
)
def test_unknown_task_dataset_and_model_are_named(options, message):
    with pytest.raises(KeyError, match=message):
        load_experiment(TINY_SQA, options)


def test_unknown_valid_split_is_named_before_training(sqa_root, tmp_path):
    runner = prepare(TINY_SQA, sqa_options(sqa_root, tmp_path / "out", "run.valid_splits=[validation]")).build_runner()
    with pytest.raises(KeyError, match=r"run.valid_splits names \['validation'\].*built splits: \['test', 'train', 'val'\]"):
        runner.train()
    assert not list(runner.output_dir.glob("checkpoint_*"))


def test_visualize_out_names_the_file_it_writes(tmp_path):
    assert visualize.png_path(str(tmp_path / "maps")) == tmp_path / "maps.png"
    assert visualize.png_path(str(tmp_path / "maps.PNG")) == tmp_path / "maps.PNG"
    with pytest.raises(ValueError, match="is a folder"):
        visualize.png_path(str(tmp_path))


def test_an_empty_batch_is_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="the batch holds no samples"):
        model.next_token_logprobs({"image": torch.zeros(0, 3, 32, 32), "has_image": torch.zeros(0), "text_input": []})


def test_a_broken_annotation_json_of_lavis_datasets_is_named(tmp_path, capsys):
    root = make_coco_caption(tmp_path / "coco")
    annotation = root / "annotations" / "coco_karpathy_val.json"
    annotation.write_text(annotation.read_text()[:40])
    argv = ["--cfg-path", str(DEBUG / "coco_caption_tiny.yaml"), "--options",
            f"datasets.coco_caption.build_info.data_root={root}", f"run.output_dir={tmp_path / 'out'}"]
    assert train.main(argv) == 2
    assert f"annotation file {annotation} is not UTF-8 JSON" in capsys.readouterr().err


def test_an_evaluation_image_size_the_tower_cannot_take_is_named_before_training(sqa_root, tmp_path):
    options = sqa_options(sqa_root, tmp_path / "out", "datasets.scienceqa_mc.vis_processor.eval.image_size=64")
    runner = prepare(TINY_SQA, options).build_runner()
    with pytest.raises(ValueError, match="datasets.scienceqa_mc.vis_processor.eval.image_size=64, but the vision tower "
                                         "reads 32x32 images"):
        runner.train()
    assert not list(runner.output_dir.glob("checkpoint_*"))


def test_configs_with_includes_leave_no_file_behind(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = load_experiment(DEBUG / "vqav2_tiny.yaml").config
    assert config.model.model_type == "tiny" and "coco_vqa" in config.datasets
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_trained_for_another_task_is_flagged(tmp_path, caplog):
    from lavis_ademvl.inference import load_for_inference

    saved = {"model": tiny_config(), "run": {"task": "ademvl_captioning"}}
    torch.save({"model": tiny_model().trainable_state_dict(), "config": saved}, tmp_path / "caption.pth")
    with caplog.at_level("WARNING"):
        model, _, _ = load_for_inference(TINY_SQA, str(tmp_path / "caption.pth"), device="cpu")
    assert model.checkpoint_task == "ademvl_captioning"
    assert "was trained for task 'ademvl_captioning', and this run's task is 'scienceqa_mc'" in caplog.text
