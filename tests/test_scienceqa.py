"""ScienceQA: builder on the official layout, Table I metrics, end-to-end train/evaluate, bad inputs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli import TINY_SQA, job_dirs, read_jsonl, run_module
from lavis.common.registry import registry
from omegaconf import OmegaConf
from scienceqa_fixture import make_scienceqa

from lavis_ademvl.cli import evaluate, train
from lavis_ademvl.common.results import read_evaluations
from lavis_ademvl.datasets.datasets.scienceqa_datasets import build_prompt
from lavis_ademvl.tasks.scienceqa import TABLE_COLUMNS, first_capital_letter, scienceqa_metrics


def build(root, **overrides):
    builder_cls = registry.get_builder_class("scienceqa_mc")
    config = OmegaConf.load(builder_cls.default_config_path()).datasets.scienceqa_mc
    config.build_info.data_root = str(root)
    config = OmegaConf.merge(config, OmegaConf.create(overrides))
    return builder_cls(config).build_datasets()


def test_builder_reads_official_layout(sqa_root):
    datasets = build(sqa_root)
    assert {split: len(d) for split, d in datasets.items()} == {"train": 16, "val": 8, "test": 8}
    problems = json.loads((sqa_root / "problems.json").read_text())
    test = datasets["test"]
    flags = [test[i]["has_image"] for i in range(len(test))]
    assert 0 < sum(flags) < len(flags)
    for index in range(len(test)):
        item = test[index]
        problem = problems[item["question_id"]]
        assert item["has_image"] == int(problem["image"] is not None)
        assert item["image"].shape == (3, 224, 224)
        assert item["answer"] == "ABCDE"[problem["answer"]]
        assert item["text_output"] == f" {item['answer']}."
        assert item["answer_cue"] == "Answer: The answer is"
    pid = test.pids[1]  # the fixture's second question of a split has a hint and no image
    hint = problems[pid]["hint"]
    choices = problems[pid]["choices"]
    options = " ".join(f"({letter}) {choice}" for letter, choice in zip("ABC", choices))
    assert test[1]["text_input"] == f"Question: What colour is the square?\nContext: {hint}\nOptions: {options}\n"
    assert build_prompt(problems[pid], "CQM-A").startswith(f"Context: {hint}\nQuestion: What colour")
    assert build_prompt(problems[test.pids[0]], "QCM-A").count("Context: N/A") == 1


def test_metrics_against_hand_computed_table():
    def record(subject, context, image, grade, correct):
        return {"subject": subject, "has_context": context, "has_image": image, "grade": grade,
                "answer": "A", "prediction": "A" if correct else ""}

    records = [
        record("natural science", 1, 0, "grade3", True),
        record("social science", 0, 1, "grade8", False),
        record("language science", 0, 0, "grade12", True),
        record("natural science", 1, 1, "grade6", False),
        record("social science", 1, 0, "grade2", True),
    ]
    metrics = scienceqa_metrics(records)
    expected = {"NAT": 50.0, "SOC": 50.0, "LAN": 100.0, "TXT": 200 / 3, "IMG": 0.0, "NO": 100.0,
                "G1-6": 200 / 3, "G7-12": 50.0, "Avg": 60.0}
    for column in TABLE_COLUMNS:
        assert metrics[column] == pytest.approx(expected[column]), column
    assert metrics["agg_metrics"] == pytest.approx(60.0)
    assert metrics["counts"] == {"NAT": 2, "SOC": 2, "LAN": 1, "TXT": 3, "IMG": 2, "NO": 1, "G1-6": 3, "G7-12": 2, "Avg": 5}
    assert scienceqa_metrics(records[:1])["SOC"] is None


@pytest.mark.parametrize("text, letter", [(" B", "B"), ("the answer: C.", "C"), ("none", ""), ("", "")])
def test_first_capital_letter(text, letter):
    assert first_capital_letter(text) == letter


# `lavis.train`/`lavis.evaluate` are the names the installed discovery hook adds to LAVIS (test_discovery.py).
@pytest.mark.parametrize("method, package", [("generate", "lavis_ademvl"), ("rank", "lavis")])
def test_train_two_iterations_then_evaluate(sqa_root, tmp_path, method, package):
    run_module(
        f"{package}.train",
        TINY_SQA,
        [
            f"datasets.scienceqa_mc.build_info.data_root={sqa_root}",
            f"run.output_dir={tmp_path / 'out'}",
            "run.max_epoch=1",
            "run.batch_size_train=8",  # 16 questions: 2 iterations
            f"run.inference_method={method}",
        ],
        cwd=tmp_path,
    )
    (job,) = job_dirs(tmp_path / "out")
    train_log = [entry for entry in read_jsonl(job / "log.txt") if "train_loss" in entry]
    assert len(train_log) == 1 and float(train_log[0]["train_loss"]) > 0
    records = read_evaluations(job / "evaluate.txt")
    assert [split for split, _ in records] == ["val", "test"]
    evaluations = [metrics for _, metrics in records]
    for evaluation in evaluations:
        assert set(TABLE_COLUMNS) <= set(evaluation) and "agg_metrics" in evaluation and evaluation["epoch"] in (0, "best")
    predictions = json.loads((job / "result" / "test_epochbest.json").read_text())
    assert len(predictions) == 8 and len({p["question_id"] for p in predictions}) == 8
    accuracy = 100 * sum(p["prediction"] == p["answer"] for p in predictions) / 8
    assert evaluations[-1]["Avg"] == pytest.approx(accuracy)
    if method == "rank":
        assert all(p["prediction"] in "ABC" and p["prediction"] for p in predictions)
    assert (job / "checkpoint_best.pth").is_file() and (job / "checkpoint_latest.pth").is_file()
    saved = torch.load(job / "checkpoint_latest.pth", weights_only=True)
    assert not any(key.startswith(("llm.", "vision_tower.")) for key in saved["model"])

    # The evaluation entry point reproduces the test figures from the saved checkpoint.
    run_module(
        f"{package}.evaluate",
        TINY_SQA,
        [
            f"datasets.scienceqa_mc.build_info.data_root={sqa_root}",
            f"run.output_dir={tmp_path / 'eval'}",
            "run.evaluate=true",
            f"run.inference_method={method}",
            "model.load_finetuned=true",
            f"model.finetuned={job / 'checkpoint_best.pth'}",
        ],
        cwd=tmp_path,
    )
    (eval_job,) = job_dirs(tmp_path / "eval")
    ((split, evaluation),) = read_evaluations(eval_job / "evaluate.txt")
    assert split == "test"
    assert {c: evaluation[c] for c in TABLE_COLUMNS} == {c: evaluations[-1][c] for c in TABLE_COLUMNS}


def test_missing_data_root_is_named(tmp_path):
    with pytest.raises(ValueError, match="build_info.data_root is not set"):
        build(tmp_path, build_info={"data_root": None})
    with pytest.raises(FileNotFoundError, match="not a folder: .*nowhere"):
        build(tmp_path / "nowhere")


def test_missing_problems_file_is_named(tmp_path):
    (tmp_path / "pid_splits.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"problems file not found: {tmp_path / 'problems.json'}"):
        build(tmp_path)


def test_empty_split_is_named(tmp_path):
    root = make_scienceqa(tmp_path / "sqa", {"train": 4, "val": 0, "test": 4})
    with pytest.raises(ValueError, match="split 'val' .* is empty"):
        build(root)


@pytest.mark.parametrize("listed", [{"17": 1, "18": 1}, "17,18", 17])
def test_a_split_that_is_not_a_list_of_pids_is_named(sqa_root, tmp_path, listed):
    """A dict was read as its keys and a string as its characters, each taken as a pid; a number was not iterable."""
    root = tmp_path / "sqa"
    shutil.copytree(sqa_root, root)
    splits = json.loads((root / "pid_splits.json").read_text())
    (root / "pid_splits.json").write_text(json.dumps({**splits, "val": listed}))
    with pytest.raises(ValueError, match=rf"split 'val' \(for val\) in {root / 'pid_splits.json'} holds a "
                                         rf"{type(listed).__name__} .*; a split is a list of pids"):
        build(root)


def test_unknown_split_and_key_are_named(sqa_root):
    with pytest.raises(KeyError, match="split 'minival'"):
        build(sqa_root, build_info={"splits": {"val": "minival"}})
    with pytest.raises(KeyError, match=r"unknown datasets.scienceqa_mc.build_info config key\(s\) \['image_root'\]"):
        build(sqa_root, build_info={"image_root": "x"})
    with pytest.raises(ValueError, match="prompt_format='QA'"):
        build(sqa_root, prompt_format="QA")


def test_missing_and_corrupt_images_are_named(tmp_path):
    root = make_scienceqa(tmp_path / "sqa", {"train": 4, "val": 4, "test": 4})
    image = next((root / "images" / "test").glob("*/image.png"))
    image.write_bytes(b"not a png at all")
    test = build(root)["test"]
    index = test.pids.index(image.parent.name)
    with pytest.raises(ValueError, match=f"cannot read image {image} of ScienceQA question {image.parent.name}"):
        test[index]
    shutil.rmtree(image.parent)
    with pytest.raises(FileNotFoundError, match=f"images are missing, e.g. .*{image.parent.name}/image.png"):
        build(root)


def test_unknown_run_key_is_named(sqa_root, tmp_path):
    result = run_module(
        "lavis_ademvl.train",
        TINY_SQA,
        [f"datasets.scienceqa_mc.build_info.data_root={sqa_root}", f"run.output_dir={tmp_path}", "run.max_epochs=3"],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: unknown run config key(s) ['max_epochs']; known keys: [")


@pytest.mark.parametrize("tool", [train, evaluate])
def test_bad_config_path_and_option_end_with_an_error_line(tool, sqa_root, tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert tool.main(["--cfg-path", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: config file not found: {missing}\n"
    options = [f"datasets.scienceqa_mc.build_info.data_root={sqa_root}", f"run.output_dir={tmp_path}",
               "run.allow_untrained=true"]  # evaluate: past its check for a checkpoint, to the model's
    assert tool.main(["--cfg-path", str(TINY_SQA), "--options", *options, "model.fusion=late"]) == 2
    assert capsys.readouterr().err.endswith("error: fusion='late' is not supported; choose one of ['adem', 'prefix', 'none']\n")
    assert tool.main(["--cfg-path", str(TINY_SQA), "--options", *options, "run.max_epoch"]) == 2
    assert capsys.readouterr().err.endswith("error: --options 'run.max_epoch': give key=value pairs, e.g. run.max_epoch=5\n")


def test_captions_file_is_read_only_for_the_roles_that_use_it(sqa_root):
    datasets = build(sqa_root, build_info={"use_caption": {"train": False, "eval": False}})
    assert set(datasets) == {"train", "val", "test"}
    with pytest.raises(FileNotFoundError, match=f"captions file not found: {sqa_root / 'captions.json'}"):
        build(sqa_root, build_info={"use_caption": {"train": False, "eval": True}})


@pytest.mark.parametrize("model_options, label", [
    ([], "ADEM-VL"),
    (["model.fusion=none"], "text only (fusion: none)"),
    (["model.fusion=prefix"], "prefix (LLaVA-style)"),
])
def test_logged_table_names_the_run_fusion(model_options, label, tmp_path, monkeypatch, caplog):
    """The table a run logs after each evaluation is labelled by the model it evaluated (a text-only run's log
    used to say ADEM-VL)."""
    from argparse import Namespace

    import lavis.tasks as tasks
    from lavis.common.config import Config

    cfg = Config(Namespace(cfg_path=str(TINY_SQA), options=model_options))
    task = tasks.setup_task(cfg)
    monkeypatch.setitem(registry.mapping["paths"], "result_dir", str(tmp_path))
    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))
    record = {"question_id": 1, "output": "A", "prediction": "A", "answer": "A", "subject": "natural science",
              "grade": "grade3", "has_context": 0, "has_image": 1}
    with caplog.at_level("INFO"):
        metrics = task.after_evaluation([record], "test", 0)
    assert metrics["IMG"] == 100.0
    rows = [line for line in caplog.text.splitlines() if line.startswith("| ") and "NAT" not in line]
    assert rows == [f"| {label} | 100.00 | - | - | - | 100.00 | - | 100.00 | - | 100.00 |"]
