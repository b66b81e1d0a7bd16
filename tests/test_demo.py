"""`ademvl demo` end to end, with the demo's real assets but a tiny random LLM in place of SmolLM2 (the
SmolLM2 recipe itself is trained twice in test_assets.py): the same command prints the same results, `--seeds`
adds the spread, a finished run is reused, and the output ends with Table I and the drop-map pictures."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from cli import REPO, job_dirs
from conftest import TEST_CLIP_STEPS

from lavis_ademvl.assets.demo_clip import RECIPE
from lavis_ademvl.assets.easyvqa_sqa import FAMILY_WEIGHTS, family_of
from lavis_ademvl.cli import demo
from lavis_ademvl.common.results import finished_job, result_records
from lavis_ademvl.models.cpu_arithmetic import describe_cpu_dtype

DEMO_CONFIG = REPO / "projects" / "ademvl" / "demo" / "sqa_smollm2.yaml"


def tiny_demo_config(folder: Path) -> Path:
    """The demo's config with the tiny random LLaMA of model type `tiny`; the vision tower stays the demo's CLIP."""
    config = folder / "demo_tiny.yaml"
    config.write_text(
        f"includes: [{DEMO_CONFIG}]\n"
        "model:\n"
        "  model_type: tiny\n"
        "  vision_config: null        # the demo passes its pretrained CLIP as model.vision_model\n"
        "  down_sample_num: [64, 16]\n"
        "  hidden_proj: 16\n"
    )
    return config


def section(output: str, start: str, end: str | None = None) -> str:
    text = output[output.index(start):]
    return text[: text.index(end)] if end else text


def weights(job: Path) -> dict[str, torch.Tensor]:
    return torch.load(job / "checkpoint_latest.pth", weights_only=True)["model"]


def test_demo_is_deterministic_reuses_runs_and_ends_with_table_and_pictures(
    asset_cache, smollm2_dir, demo_clip_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(RECIPE, "steps", TEST_CLIP_STEPS)  # the session's CLIP build is found in the cache
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    argv = ["--cfg-path", str(tiny_demo_config(tmp_path)), "--output-dir", str(out), "--cache-dir", str(asset_cache),
            "--num-train", "16", "--num-test", "12",
            "--options", "model.llm_model=null", "run.max_epoch=1", "run.batch_size_train=4"]

    assert demo.main([*argv, "--seeds", "2"]) == 0
    first = capsys.readouterr().out
    # It says which arithmetic it ran and why (the demo config's cpu_dtype: auto, resolved on this CPU).
    assert f"arithmetic: {describe_cpu_dtype('auto')[1]}\n" in first
    table = section(first, "ScienceQA-format easy-VQA test set", "\nOver training seeds")
    assert "| ADEM-VL |" in table and "| text only (fusion: none) |" in table
    assert "Over training seeds 42, 43" in first and "| ADEM-VL, sample sd |" in first
    assert re.search(r"\| colour \| \d+ \| [\d.]+ ± [\d.]+ \(min", first)  # per-type accuracy, mean ± sd
    pictures = [Path(line) for line in first.strip().splitlines()[-2:]]
    assert all(path.suffix == ".png" and path.is_file() for path in pictures)
    picture_bytes = [path.read_bytes() for path in pictures]
    (adem_job,) = job_dirs(out / "seed42" / "adem")
    first_weights = weights(adem_job)

    # The same command again, retrained: the same examples, Table I and drop maps; the same weights.
    assert demo.main([*argv, "--force"]) == 0
    second = capsys.readouterr().out
    assert section(second, "Example test questions", "\nTest questions with an image") == \
        section(first, "Example test questions", "\nTest questions with an image")
    lines = second.strip().splitlines()
    assert lines[-3].startswith("Drop maps") and [Path(line) for line in lines[-2:]] == pictures
    assert lines[-5].startswith("| text only (fusion: none) |") and lines[-6].startswith("| ADEM-VL |")
    assert section(second, "ScienceQA-format easy-VQA test set", "\nDrop maps") == table
    assert [path.read_bytes() for path in pictures] == picture_bytes
    old_job, new_job = job_dirs(out / "seed42" / "adem")
    assert old_job == adem_job
    new_weights = weights(new_job)
    assert first_weights.keys() == new_weights.keys()
    assert all(torch.equal(first_weights[name], new_weights[name]) for name in first_weights)

    # Without --force, finished runs made with the same settings are reused: nothing is trained.
    assert demo.main(argv) == 0
    third = capsys.readouterr().out
    assert "ADEM-VL: finished earlier, reused" in third and "training and evaluating" not in third
    assert len(job_dirs(out / "seed42" / "adem")) == 2
    assert section(third, "ScienceQA-format easy-VQA test set", "\nDrop maps") == table

    # The per-type table of the questions told in words is what the run's own test results give.
    problems = json.loads((asset_cache / "scienceqa_easyvqa" / "problems.json").read_text())
    correct: dict[str, list[bool]] = {}
    for name, fusion in demo.RUNS.items():
        job, metrics = finished_job(out / "seed42" / fusion)
        for record in result_records(job, metrics):
            problem = problems[str(record["question_id"])]
            if problem["image"] is None and problem["hint"]:
                family = family_of(problem["choices"][problem["answer"]])
                correct.setdefault(family, [[], []])[list(demo.RUNS).index(name)].append(
                    record["prediction"] == record["answer"])
    told = section(third, "Test questions without an image, whose hint", "\nIMG questions").strip().splitlines()[4:]
    assert correct and told == [
        f"| {family} | {len(runs[0])} | {100 * sum(runs[0]) / len(runs[0]):.2f} | {100 * sum(runs[1]) / len(runs[1]):.2f} |"
        for family, runs in sorted(correct.items(), key=lambda item: list(FAMILY_WEIGHTS).index(item[0]))
    ]


def test_the_default_config_is_the_shipped_demo_config():
    """`make demo` passes no --cfg-path: the default must be projects/ademvl/demo/sqa_smollm2.yaml of the checkout
    (moving the tool into cli/ once pointed it at lavis_ademvl/projects/...)."""
    assert demo.PARSER.get_default("cfg_path") == REPO / "projects" / "ademvl" / "demo" / "sqa_smollm2.yaml"
    assert demo.PARSER.get_default("cfg_path").is_file()
