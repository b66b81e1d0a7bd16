"""COCO caption, VQAv2 and GQA through LAVIS's builders and (fixed) tasks, with the network blocked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli import REPO, job_dirs, read_jsonl
from lavis_fixtures import make_coco_caption, make_gqa, make_vqav2
from omegaconf import OmegaConf

from lavis_ademvl.common import caption_metrics
from lavis_ademvl.common.caption_metrics import score_captions, simple_ptb_tokenize
from lavis_ademvl.common.data_files import check_dataset_files
from lavis_ademvl.common.launch import prepare
from lavis_ademvl.common.results import read_evaluations
from lavis_ademvl.tasks.captioning import OfflineCaptionTask
from lavis_ademvl.tasks.vqa import vqa_accuracy

DEBUG = REPO / "projects" / "ademvl" / "debug"
# Any connection that leaves the machine fails at once: the runs below must not need one.
BLOCK_NETWORK = textwrap.dedent(
    """
    import socket
    _connect = socket.socket.connect
    def _local_only(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
            raise OSError(f"network access attempted: {address}")
        return _connect(self, address)
    socket.socket.connect = _local_only
    """
)


def run_offline(module, cfg, options, tmp_path):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK_NETWORK)
    python_path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", PYTHONPATH=python_path)
    command = [sys.executable, "-m", module, "--cfg-path", str(cfg), "--options", *options]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    return result


CASES = {
    "caption": ("coco_caption_tiny.yaml", "coco_caption", make_coco_caption, ["run.caption_metrics=[bleu,rouge,cider]"]),
    "vqa_generate": ("vqav2_tiny.yaml", "coco_vqa", make_vqav2, []),
    "vqa_rank": ("vqav2_tiny.yaml", "coco_vqa", make_vqav2, ["run.inference_method=rank"]),
    "gqa": ("gqa_tiny.yaml", "gqa", make_gqa, []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_two_iterations_and_evaluate(case, tmp_path):
    config, dataset, make, extra = CASES[case]
    root = make(tmp_path / "data")
    options = [f"datasets.{dataset}.build_info.data_root={root}", f"run.output_dir={tmp_path / 'out'}", *extra]
    run_offline("lavis_ademvl.train", DEBUG / config, options, tmp_path)  # 8 training samples, batch 4
    (job,) = job_dirs(tmp_path / "out")
    train_log = [e for e in read_jsonl(job / "log.txt") if "train_loss" in e]
    assert len(train_log) == 1 and float(train_log[0]["train_loss"]) > 0
    evaluations = read_jsonl(job / "evaluate.txt")
    if case == "caption":
        assert [list(e) for e in evaluations] == [["val"], ["test"]]
        for evaluation in evaluations:
            scores = next(iter(evaluation.values()))
            assert {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr", "agg_metrics"} <= set(scores) and scores["num_images"] == 4
        captions = json.loads((job / "result" / "test_epochbest.json").read_text())
        assert len(captions) == 4 and all(isinstance(c["caption"], str) for c in captions)
    elif case.startswith("vqa"):
        (evaluation,) = evaluations  # the test split has no public answers: predictions only
        assert set(evaluation["val"]) == {"agg_metrics", "other", "checkpoint"}
        assert evaluation["val"]["checkpoint"] == str(job / "checkpoint_latest.pth")  # the epoch just trained
        predictions = json.loads((job / "result" / "test_vqa_result.json").read_text())
        assert len(predictions) == 6
        if case == "vqa_rank":
            answers = json.loads((root / "annotations" / "answer_list.json").read_text())
            assert all(p["answer"] in answers for p in predictions)
    else:
        assert len(evaluations) == 2 and all(set(e) == {"agg_metrics", "acc"} for e in evaluations)


def test_evaluate_entry_point_with_a_finetuned_checkpoint(tmp_path):
    root = make_coco_caption(tmp_path / "data")
    common = [f"datasets.coco_caption.build_info.data_root={root}", "run.caption_metrics=[bleu,cider]"]
    train_options = [*common, f"run.output_dir={tmp_path / 'train'}"]
    run_offline("lavis_ademvl.train", DEBUG / "coco_caption_tiny.yaml", train_options, tmp_path)
    (job,) = job_dirs(tmp_path / "train")
    run_offline(
        "lavis_ademvl.evaluate", DEBUG / "coco_caption_tiny.yaml",
        [*common, f"run.output_dir={tmp_path / 'eval'}", "run.evaluate=true", "model.load_finetuned=true",
         f"model.finetuned={job / 'checkpoint_best.pth'}"],
        tmp_path,
    )
    (eval_job,) = job_dirs(tmp_path / "eval")
    (evaluation,) = read_jsonl(eval_job / "evaluate.txt")
    (trained,) = [e for e in read_jsonl(job / "evaluate.txt") if "test" in e]
    assert evaluation["test"]["CIDEr"] == pytest.approx(trained["test"]["CIDEr"])


GROUND_TRUTH = {
    1: ["A man riding a horse on a beach.", "a person rides a brown horse", "Someone on horseback near the sea."],
    2: ["Two dogs play with a red ball.", "dogs playing in the grass", "two puppies and a ball"],
    3: ["A plate of food with broccoli.", "broccoli and rice on a white plate", "a healthy meal on a plate"],
}
PREDICTIONS = {1: "a man riding a horse on the beach", 2: "two dogs playing with a ball", 3: "a plate of broccoli"}


def reference_scores(tokenized_gts, tokenized_res):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(tokenized_gts, tokenized_res)
    return {
        **{f"Bleu_{n + 1}": b for n, b in enumerate(bleu)},
        "ROUGE_L": Rouge().compute_score(tokenized_gts, tokenized_res)[0],
        "CIDEr": Cider().compute_score(tokenized_gts, tokenized_res)[0],
    }


@pytest.mark.slow  # pycocoevalcap starts Java for the PTB tokenizer and METEOR
@pytest.mark.skipif(not caption_metrics.java_available(), reason="the PTB tokenizer and METEOR need Java")
def test_caption_metrics_match_pycocoevalcap_with_java():
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in GROUND_TRUTH.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in PREDICTIONS.items()})
    ours = score_captions(GROUND_TRUTH, PREDICTIONS)
    want = reference_scores(gts, res)
    want["METEOR"] = Meteor().compute_score(gts, res)[0]
    assert ours["tokenizer"] == "ptb"
    for key, value in want.items():
        assert ours[key] == pytest.approx(value), key
    # The Python tokenizer agrees with PTB on plain captions.
    for key, captions in GROUND_TRUTH.items():
        assert [simple_ptb_tokenize(c) for c in captions] == gts[key]


def test_caption_metrics_without_java(monkeypatch):
    monkeypatch.setattr(caption_metrics, "java_available", lambda: False)
    ours = score_captions(GROUND_TRUTH, PREDICTIONS, ["bleu", "rouge", "cider", "meteor"])
    gts = {k: [simple_ptb_tokenize(c) for c in v] for k, v in GROUND_TRUTH.items()}
    res = {k: [simple_ptb_tokenize(v)] for k, v in PREDICTIONS.items()}
    want = reference_scores(gts, res)
    assert ours["tokenizer"] == "python" and "METEOR" not in ours
    for key, value in want.items():
        assert ours[key] == pytest.approx(value), key
    assert ours["Bleu_1"] > 0.5  # a sanity anchor: most predicted words are in the references
    # A subset of images can be scored; an unknown image id is named.
    assert score_captions(GROUND_TRUTH, {1: PREDICTIONS[1]}, ["bleu"])["Bleu_1"] > 0
    with pytest.raises(KeyError, match="no ground-truth caption, e.g. \\[9\\]"):
        score_captions(GROUND_TRUTH, {9: "x"}, ["bleu"])
    with pytest.raises(ValueError, match="caption_metrics entry='bertscore'"):
        score_captions(GROUND_TRUTH, PREDICTIONS, ["bertscore"])


def write_vqa_files(tmp_path, answers_per_question, predictions):
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {}}
    annotations, questions = [], []
    for qid, answers in answers_per_question.items():
        questions.append({"image_id": qid, "question": "q?", "question_id": qid})
        annotations.append({"question_id": qid, "image_id": qid, "question_type": "what", "answer_type": "other",
                            "multiple_choice_answer": answers[0],
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                        for i, a in enumerate(answers)]})
    (tmp_path / "a.json").write_text(json.dumps({**header, "annotations": annotations}))
    (tmp_path / "q.json").write_text(json.dumps({**header, "questions": questions}))
    (tmp_path / "r.json").write_text(json.dumps([{"question_id": q, "answer": a} for q, a in predictions.items()]))
    return str(tmp_path / "a.json"), str(tmp_path / "q.json"), str(tmp_path / "r.json")


@pytest.mark.parametrize(
    "humans_agreeing, accuracy",
    # Official VQAv2 accuracy: min(1, matches / 3) averaged over the 10 leave-one-out subsets of the 10 answers,
    # so 1 of 10 gives 9/10 x 1/3 = 0.3, 3 of 10 gives (3 x 2/3 + 7 x 1) / 10 = 0.9, 4 or more give 1.0.
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_official_vqa_accuracy(tmp_path, humans_agreeing, accuracy):
    others = ["dog", "bird", "fish", "cow", "pig", "ant", "bee", "owl", "elk", "yak"]
    answers = ["cat"] * humans_agreeing + others[: 10 - humans_agreeing]
    files = write_vqa_files(tmp_path, {1: answers}, {1: "cat"})
    assert vqa_accuracy(*files)["agg_metrics"] == pytest.approx(100 * accuracy)


def test_vqa_accuracy_on_a_subset_of_questions(tmp_path):
    # 3 official questions, predictions for 2 of them: LAVIS's own loader asserts a full set; ours scores the 2.
    answers = {1: ["red"] * 10, 2: ["blue"] * 10, 3: ["green"] * 10}
    files = write_vqa_files(tmp_path, answers, {1: "red", 3: "blue"})
    assert vqa_accuracy(*files)["agg_metrics"] == pytest.approx(50.0)
    files = write_vqa_files(tmp_path, answers, {7: "red"})
    with pytest.raises(KeyError, match="not in .*a.json, e.g. \\[7\\]"):
        vqa_accuracy(*files)


def test_caption_images_of_any_format_are_evaluated_and_a_name_without_id_is_named(tmp_path):
    """LAVIS read the id of `COCO_val2014_000000000101.png` as '000000000101.pn' and stopped at the first evaluation,
    after training."""
    root = make_coco_caption(tmp_path / "data", suffix=".png")
    options = [f"datasets.coco_caption.build_info.data_root={root}", f"run.output_dir={tmp_path / 'out'}",
               "run.caption_metrics=[bleu]", "run.allow_untrained=true"]
    runner = prepare(DEBUG / "coco_caption_tiny.yaml", options, evaluating=True).build_runner()
    runner.evaluate(cur_epoch="untrained", skip_reload=True)
    ((split, scores),) = read_evaluations(runner.output_dir / "evaluate.txt")
    assert split == "test" and scores["num_images"] == 4  # every id found in the COCO-format ground truth
    runner.release_job_folder()

    annotation = root / "annotations" / "coco_karpathy_val.json"
    entries = json.loads(annotation.read_text())
    entries[1]["image"] = "val2014/red_square.png"
    annotation.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=rf"{annotation}, entry 1: image 'val2014/red_square.png': no image id in its "
                                         "file name"):
        prepare(DEBUG / "coco_caption_tiny.yaml", options, evaluating=True)


def test_a_vqa_questions_file_without_its_header_is_scored_and_one_without_questions_is_named(tmp_path):
    """LAVIS's loadRes copies the questions file's header: one without `info` ended the run with `error: info`, after
    training."""
    files = write_vqa_files(tmp_path, {1: ["red"] * 10, 2: ["blue"] * 10}, {1: "red", 2: "red"})
    questions = json.loads(Path(files[1]).read_text())
    Path(files[1]).write_text(json.dumps({"questions": questions["questions"]}))
    assert vqa_accuracy(*files)["agg_metrics"] == pytest.approx(50.0)

    root = make_vqav2(tmp_path / "data")
    question_file = root / "annotations" / "v2_OpenEnded_mscoco_val2014_questions.json"
    question_file.write_text(json.dumps({"info": {}, "task_type": "Open-Ended"}))
    options = [f"datasets.coco_vqa.build_info.data_root={root}", f"run.output_dir={tmp_path / 'out'}"]
    with pytest.raises(ValueError, match=f"official VQA file {question_file} holds no `questions` list"):
        prepare(DEBUG / "vqav2_tiny.yaml", options)  # when the datasets are built, before training


def test_missing_local_files_are_named(tmp_path):
    missing = f"run.caption_gt_files.test: caption ground-truth file not found: {tmp_path}/gt.json"
    with pytest.raises(FileNotFoundError, match=missing):
        OfflineCaptionTask(num_beams=1, max_len=5, min_len=1, evaluate=False,
                           ground_truth_files={"test": str(tmp_path / "gt.json")})
    config = OmegaConf.create({"coco_caption": {"data_type": "images", "build_info": {
        "annotations": {"train": {"url": str(tmp_path / "train.json"), "storage": str(tmp_path / "train.json")}},
        "images": {"storage": str(tmp_path)}}}})
    with pytest.raises(FileNotFoundError, match="datasets.coco_caption.build_info.annotations.train: annotation file not found"):
        check_dataset_files(config)
    (tmp_path / "train.json").write_text("[]")
    config.coco_caption.build_info.images.storage = str(tmp_path / "no_images")
    with pytest.raises(FileNotFoundError, match="images.storage: image folder not found: .*no_images"):
        check_dataset_files(config)


def test_config_includes_merge_and_drop_null_splits(tmp_path):
    from lavis_ademvl.common.config_files import drop_null_splits, load_experiment, load_with_includes, written_config

    eval_vqav2 = REPO / "projects" / "ademvl" / "eval" / "vqav2.yaml"
    merged = load_with_includes(eval_vqav2)
    assert merged.run.evaluate is True and merged.run.task == "ademvl_vqa"
    assert merged.datasets.coco_vqa.build_info.annotations.train is None
    drop_null_splits(merged.datasets)
    assert set(merged.datasets.coco_vqa.build_info.annotations) == {"val", "test"}
    # The loader of training, evaluation and the tools: defaults under the experiment, the options over both.
    config = load_experiment(eval_vqav2, ["datasets.coco_vqa.build_info.data_root=/data", "model.alpha=0.5"]).config
    assert set(config.datasets.coco_vqa.build_info.annotations) == {"val", "test"}  # null splits dropped
    assert config.model.load_finetuned is True and config.model.alpha == 0.5
    assert config.model.drop_ratio == 0.1 and config.preprocess.vis_processor.eval.name == "ademvl_image_eval"
    with written_config(merged) as path:
        assert OmegaConf.load(path).run.task == "ademvl_vqa"
    assert not path.exists()  # the merged copy is removed after use
    (tmp_path / "a.yaml").write_text("includes: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("includes: [a.yaml]\n")
    with pytest.raises(ValueError, match="cycle"):
        load_with_includes(tmp_path / "a.yaml")
