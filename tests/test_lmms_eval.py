"""The lmms-eval plugin (`lmms-eval --model ademvl`, docs/lmms_eval.md) on the real lmms-eval package, offline.

Local datasets in the hub schemas of lmms-eval's scienceqa_img, mme and mmbench_en_dev (MMBench through its stock
`mmbench_en_dev_static` yaml: the letter-answer path that never calls an API judge), saved with `save_to_disk` from
generated images, run through lmms-eval's evaluator by the stock task yamls `include:`d under new task names. Each
score must equal a computation of ours from the logged answers, and on the same questions the plugin's answers
(prompt=ademvl) must equal `ademvl predict`'s (lavis_ademvl.inference). The tiny random model and a checkpoint saved
from it: no download.

Every test that needs lmms-eval is in the slow lane (`evaluated` is a slow call for tests/conftest.py), so the fast
lane of a stack without lmms-eval (the transformers 4.55 venv) never imports it; where lmms-eval is missing, these
tests fail: `make install-lmms-eval` installs it (CI does, before `make test`).
"""
from __future__ import annotations

import ast
import configparser
import contextlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from cli import REPO, TINY_SQA
from PIL import Image

from lavis_ademvl.inference import Question, answer, load_for_inference, question_batch
from lavis_ademvl.integrations.lmms_eval_data import SCIENCEQA_STOCK_YAML, scienceqa_features, write_task

# The tests that import lmms-eval (this module itself imports none of it): the slow lane.
needs_lmms_eval = pytest.mark.slow

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}


def picture(colour: str, size: int = 48) -> Image.Image:
    pixels = np.full((size, size, 3), 255, dtype=np.uint8)
    pixels[8:40, 8:40] = COLOURS[colour]
    return Image.fromarray(pixels)


def scienceqa_rows() -> list[dict]:
    """lmms-lab ScienceQA, config ScienceQA-IMG, split test: image, question, choices, answer (an index), hint, ..."""
    rows = []
    for n, colour in enumerate(["red", "green", "blue", "yellow", "green", "red"]):
        choices = ["red", "green", "blue"] if n % 2 == 0 else ["blue", "yellow", "red", "green"]
        rows.append({
            "image": picture(colour) if n != 5 else None,  # one question without image: the model's no-image input
            "question": "What colour is the square?",
            "choices": choices,
            "answer": choices.index(colour),
            "hint": "The square is painted." if n % 3 == 0 else "",
            "task": "closed choice", "grade": f"grade{n + 2}", "subject": "natural science", "topic": "colours",
            "category": "Colours", "skill": "Identify colours", "lecture": "", "solution": "",
        })
    return rows


def mme_rows() -> list[dict]:
    """lmms-lab MME, split test: two rows (a yes and a no question) per image, sharing its question_id."""
    rows = []
    for n, (colour, other) in enumerate([("red", "blue"), ("green", "red"), ("blue", "yellow")]):
        category = "color" if n < 2 else "commonsense_reasoning"  # a perception and a cognition category
        for asked, truth in ((colour, "Yes"), (other, "No")):
            rows.append({"question_id": f"{category}/{n}.png", "image": picture(colour),
                         "question": f"Is the square {asked}? Please answer yes or no.", "answer": truth,
                         "category": category})
    return rows


def mmbench_rows() -> list[dict]:
    """lmms-lab MMBench, config en, split dev: index, question, hint, A-D, answer (a letter), category, ..."""
    rows = []
    for n, colour in enumerate(["blue", "red", "yellow", "green"]):
        options = ["red", "green", "blue", "yellow"] if n < 2 else ["yellow", "green", "red"]
        rows.append({
            "index": n, "question": "Which colour is the square?", "hint": "A painted square." if n == 1 else None,
            **{letter: (options[i] if i < len(options) else None) for i, letter in enumerate("ABCD")},
            "answer": "ABCD"[options.index(colour)], "category": "color_recognition",
            "image": picture(colour), "source": "generated", "L2-category": "fine-grained perception", "split": "dev",
            "comment": None,
        })
    return rows


LOCAL_TASKS = {  # our task name: (stock yaml, rows, dataset config name of the hub, split)
    "sqa_img_local": (SCIENCEQA_STOCK_YAML, scienceqa_rows, "test"),
    "mme_local": (("mme", "mme.yaml"), mme_rows, "test"),
    "mmbench_en_dev_local": (("mmbench", "mmbench_en_dev_static.yaml"), mmbench_rows, "dev"),
}


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    """Each task's DatasetDict saved with save_to_disk, and a yaml that includes the stock one under a new name
    (lavis_ademvl.integrations.lmms_eval_data.write_task, as the documented ScienceQA converter writes them)."""
    folder = tmp_path_factory.mktemp("lmms_tasks")
    for name, (stock, rows, split) in LOCAL_TASKS.items():
        write_task(folder, name, stock, rows, split, scienceqa_features() if name == "sqa_img_local" else None)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the tiny model in the trainer's format, with moved weights so loading it matters."""
    model, _, _ = load_for_inference(TINY_SQA, None, ["run.allow_untrained=true"])
    with torch.no_grad():
        model.visual_value_offset.normal_()
        model.cls_proj.fc2.weight.normal_()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_0.pth"
    torch.save({"model": model.trainable_state_dict(), "epoch": 0}, path)
    return path


def answering(model):
    """The random tiny model made to start every free answer with "Y" (its output row for that byte made large), so
    that MME reads a yes for every question: half right, a score of 50 per category, not 0."""
    weight = model.llm.get_output_embeddings().weight
    (token,) = model.tokenizer("Y", add_special_tokens=False).input_ids
    with torch.no_grad():
        weight[token] = 30 * weight.abs().mean() * torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(7))
        hidden = model.llm.get_input_embeddings().weight.shape[1]
        assert weight.shape[1] == hidden
    return model


def plugin(checkpoint: Path, **model_args):
    from lavis_ademvl.integrations.lmms_eval import AdemVLLmms

    model = AdemVLLmms(cfg_path=str(TINY_SQA), checkpoint=str(checkpoint), device="cpu", **model_args)
    answering(model.model)
    return model


def evaluated(model, task_folder: Path, tasks: list[str]) -> dict:
    """lmms-eval's simple_evaluate on our local tasks, every sample logged."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_folder), include_defaults=False, model_name="ademvl")
    with contextlib.chdir(task_folder):  # MMBench's aggregation writes a submissions/ folder into the working folder
        results = simple_evaluate(model=model, tasks=tasks, task_manager=manager, log_samples=True,
                                  batch_size=model.batch_size)
    assert results is not None
    return results


def responses(results: dict, task: str) -> dict[int, str]:
    return {sample["doc_id"]: sample["filtered_resps"][0] for sample in results["samples"][task]}


def sqa_correct(prediction: str, letter: str) -> bool:
    """lmms-eval's ScienceQA reading, restated: the letter alone, or 'B. ...'."""
    prediction = prediction.strip()
    if prediction.lower() == letter.lower():
        return True
    return len(prediction) >= 2 and prediction[0].isupper() and prediction[1] == "." and prediction[0] == letter


def mme_scores(rows: list[dict], answers: dict[int, str]) -> dict[str, float]:
    """MME's score restated: per category, the mean over images of acc + acc+ (both questions right), summed over the
    perception and the cognition categories."""
    def read(output: str) -> str:
        text = output.lower().strip().replace(".", "")
        if text in ("yes", "no"):
            return text
        if len(text) == 1:
            return {"y": "yes", "n": "no"}.get(text, "other")
        return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"

    per_image: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for doc_id, row in enumerate(rows):
        per_image[row["category"]][row["question_id"]].append(float(read(answers[doc_id]) == row["answer"].lower()))
    totals = {"mme_perception_score": 0.0, "mme_cognition_score": 0.0}
    for category, images in per_image.items():
        score = sum(100.0 * sum(s) / 2 + 100.0 * (sum(s) == 2) for s in images.values()) / len(images)
        totals["mme_cognition_score" if category == "commonsense_reasoning" else "mme_perception_score"] += score
    return totals


def predict_answers(rows: list[dict], kind: str) -> list[str]:
    """What `ademvl predict` answers to each row (the same checkpoint and config), one question at a time."""
    answers = []
    for row in rows:
        image = row["image"].convert("RGB") if row["image"] is not None else None
        if kind == "mme":
            question = Question(image, instruction=row["question"])
        elif kind == "sqa":
            question = Question(image, row["question"], list(row["choices"]), context=row["hint"] or "")
        else:
            options = [row[letter] for letter in "ABCD" if row[letter] is not None]
            question = Question(image, row["question"], options, context=row["hint"] or "")
        reply = answer(PREDICT["model"], question_batch(PREDICT["config"], PREDICT["processor"], question),
                       PREDICT["config"], question)
        answers.append(reply.choice or reply.output)
    return answers


PREDICT: dict = {}


@pytest.fixture(scope="module")
def predict_model(checkpoint):
    """The model as `ademvl predict --cfg-path TINY_SQA --checkpoint ...` loads it."""
    PREDICT["model"], PREDICT["processor"], PREDICT["config"] = load_for_inference(TINY_SQA, str(checkpoint), [], "cpu",
                                                                                   trained=True)
    answering(PREDICT["model"])
    return PREDICT


def test_the_entry_point_is_declared_and_imports_nothing():
    """setup.cfg declares `ademvl` in group lmms_eval.models, pointing at a module whose only top-level import is
    __future__ (lmms-eval loads every entry point of the group whenever it builds its registry)."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert setup["options.entry_points"]["lmms_eval.models"].strip() == "ademvl = lavis_ademvl_lmms_eval:manifest"
    tree = ast.parse((REPO / "lavis_ademvl_lmms_eval.py").read_text())
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert [getattr(node, "module", None) for node in imports] == ["__future__"]


@needs_lmms_eval
def test_scienceqa_layout_is_written_as_the_scienceqa_img_schema(tmp_path):
    """The documented converter (python -m lavis_ademvl.integrations.lmms_eval_data): ScienceQA's official layout
    (problems.json, pid_splits.json, images/<split>/<pid>/image.png) -> lmms-lab/ScienceQA's features, split test,
    the questions with an image only (ScienceQA-IMG) unless --all-questions; a yaml including the stock task."""
    import datasets

    from lavis_ademvl.integrations.lmms_eval_data import main, stock_yaml

    rows, root = scienceqa_rows(), tmp_path / "sqa"
    problems = {}
    for n, row in enumerate(rows):
        pid = str(100 + n)
        problems[pid] = {**{k: v for k, v in row.items() if k != "image"}, "split": "test",
                         "image": "image.png" if row["image"] is not None else None}
        if row["image"] is not None:
            (root / "images" / "test" / pid).mkdir(parents=True)
            row["image"].save(root / "images" / "test" / pid / "image.png")
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": [], "test": list(problems)}))

    for extra, kept in (([], [row for row in rows if row["image"] is not None]), (["--all-questions"], rows)):
        out = tmp_path / f"tasks{len(extra)}"
        assert main(["--scienceqa-root", str(root), "--output", str(out), "--task", "sqa_x", *extra]) == 0
        assert (out / "sqa_x.yaml").read_text() == (
            f"include: {stock_yaml('scienceqa', 'scienceqa_img.yaml')}\ntask: sqa_x\n"
            f"dataset_path: {out.resolve() / 'data' / 'sqa_x'}\ndataset_kwargs:\n  load_from_disk: true\n")
        data = datasets.load_from_disk(str(out / "data" / "sqa_x"))
        assert list(data) == ["test"] and data["test"].features == scienceqa_features()
        assert len(data["test"]) == len(kept)
        for got, want in zip(data["test"], kept):
            assert {k: v for k, v in got.items() if k != "image"} == {k: v for k, v in want.items() if k != "image"}
            if want["image"] is None:
                assert got["image"] is None
            else:
                assert np.array_equal(np.asarray(got["image"].convert("RGB")), np.asarray(want["image"]))


@needs_lmms_eval
def test_lmms_eval_finds_the_model_through_the_entry_point():
    from lmms_eval.models import get_model, get_model_manifest

    from lavis_ademvl.integrations.lmms_eval import AdemVLLmms

    manifest = get_model_manifest("ademvl")
    assert type(manifest).__name__ == "ModelManifest" and manifest.model_id == "ademvl"
    assert get_model("ademvl") is AdemVLLmms


@needs_lmms_eval
def test_an_untrained_model_is_refused_unless_asked(tmp_path):
    from lavis_ademvl.integrations.lmms_eval import AdemVLLmms

    with pytest.raises(ValueError, match="untrained"):
        AdemVLLmms(cfg_path=str(TINY_SQA), device="cpu")
    assert AdemVLLmms(cfg_path=str(TINY_SQA), device="cpu", allow_untrained="true").model is not None
    with pytest.raises(ValueError, match="unknown --model_args for ademvl: chekpoint"):
        AdemVLLmms(cfg_path=str(TINY_SQA), chekpoint="x.pth")
    with pytest.raises(ValueError, match="prompt must be one of"):
        AdemVLLmms(cfg_path=str(TINY_SQA), prompt="llava")


@needs_lmms_eval
@pytest.mark.parametrize("method", ["rank", "generate"])
def test_ademvl_prompt_scores_equal_ours_and_answers_equal_predict(task_folder, checkpoint, predict_model, method):
    """prompt=ademvl, batches of 4 sorted by length: every task's score equals our computation from the logged
    answers, and every answer equals `ademvl predict`'s to the same question (QCM-A for ScienceQA and MMBench, the
    instruction layout for MME: one token here, run.max_len=1)."""
    options = f"run.inference_method={method} run.max_len=1"
    model = plugin(checkpoint, prompt="ademvl", batch_size=4, options=options)
    PREDICT["config"].run.inference_method, PREDICT["config"].run.max_len = method, 1
    results = evaluated(model, task_folder, list(LOCAL_TASKS))
    sqa, mme, mmbench = scienceqa_rows(), mme_rows(), mmbench_rows()

    answers = sqa_answers = responses(results, "sqa_img_local")
    assert [answers[i] for i in range(len(sqa))] == predict_answers(sqa, "sqa")
    letters = ["ABCD"[row["answer"]] for row in sqa]
    expected = 100.0 * np.mean([sqa_correct(answers[i], letters[i]) for i in range(len(sqa))])
    assert 100.0 * results["results"]["sqa_img_local"]["exact_match,none"] == pytest.approx(expected)

    answers = responses(results, "mme_local")
    assert [answers[i] for i in range(len(mme))] == predict_answers(mme, "mme")
    scores = mme_scores(mme, answers)
    assert scores == {"mme_perception_score": 50.0, "mme_cognition_score": 50.0}  # every answer a yes
    for metric, value in scores.items():
        assert results["results"]["mme_local"][f"{metric},none"] == pytest.approx(value)

    answers = responses(results, "mmbench_en_dev_local")
    assert [answers[i] for i in range(len(mmbench))] == predict_answers(mmbench, "mmbench")
    hits = [answers[i].strip() == row["answer"] for i, row in enumerate(mmbench)]
    if method == "rank":  # every answer an option's letter, which MMBench's reading takes as it is
        assert all(answers[i] in "ABCD"[: sum(row[c] is not None for c in "ABCD")] for i, row in enumerate(mmbench))
        assert all(sqa_answers[i] in "ABCD"[: len(row["choices"])] for i, row in enumerate(sqa))
    else:  # one greedy token: its letter if it is a capital, else the model's output (counted wrong)
        assert all(len(text) == 1 for text in [*answers.values(), *sqa_answers.values()])
    assert results["results"]["mmbench_en_dev_local"]["gpt_eval_score,none"] == pytest.approx(100.0 * np.mean(hits))


@needs_lmms_eval
def test_lmms_prompt_generates_the_tasks_own_text(task_folder, checkpoint):
    """prompt=lmms: the task's text and generation_kwargs (greedy, max_new_tokens 16), in batches; the logged answers
    are what the model generates after that text, one question at a time, and the scores are ours from them."""
    model = plugin(checkpoint, batch_size=3)
    results = evaluated(model, task_folder, ["sqa_img_local", "mme_local"])
    from lavis_ademvl.integrations.lmms_eval import PLACEHOLDER_SIZE, truncate_at

    sqa, mme = scienceqa_rows(), mme_rows()
    model = plugin(checkpoint)  # lmms-eval's evaluation ends with lm.clean(), which drops the instance's torch modules
    for task, rows in (("sqa_img_local", sqa), ("mme_local", mme)):
        for sample in results["samples"][task]:
            row = rows[sample["doc_id"]]
            context, gen_kwargs = sample["arguments"][:2]  # as lmms-eval logs a request's arguments
            assert gen_kwargs["max_new_tokens"] == 16 and not gen_kwargs["do_sample"]
            image = row["image"] if row["image"] is not None else Image.new("RGB", (PLACEHOLDER_SIZE,) * 2)
            alone = model.model.generate(
                {"image": model.image_processor(image.convert("RGB")).unsqueeze(0),
                 "has_image": torch.tensor([int(row["image"] is not None)]), "text_input": [context]},
                num_beams=1, max_length=gen_kwargs["max_new_tokens"], prompt="{}")[0]
            assert sample["filtered_resps"][0] == truncate_at(alone, gen_kwargs["until"]).strip()
    answers = responses(results, "sqa_img_local")
    expected = np.mean([sqa_correct(answers[i], "ABCD"[row["answer"]]) for i, row in enumerate(sqa)])
    assert results["results"]["sqa_img_local"]["exact_match,none"] == pytest.approx(expected)
    for metric, value in mme_scores(mme, responses(results, "mme_local")).items():
        assert results["results"]["mme_local"][f"{metric},none"] == pytest.approx(value)


@needs_lmms_eval
def test_loglikelihood_is_the_rank_score_with_the_greedy_flag(task_folder, checkpoint):
    """loglikelihood of lmms-eval requests: the summed log-probability of the continuation and the closing eos after
    the context, as one full forward pass computes it; greedy is true for the model's own greedy continuation."""
    import datasets
    from lmms_eval.api.instance import Instance

    model = plugin(checkpoint, batch_size=2)
    data = datasets.load_from_disk(str(task_folder / "data" / "mme_local"))
    model.task_dict = {"t": {"test": data["test"]}}

    def visual(doc):
        return [doc["image"].convert("RGB")]

    context = "Is the square red? Answer:"
    greedy_ids = model.model.generate_token_ids(
        {**model._visual_batch([data["test"][0]["image"].convert("RGB")]), "text_input": [context]},
        prompt="{}", max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=1)[0].tolist()
    greedy_text = model.model.tokenizer.decode(greedy_ids, skip_special_tokens=True)
    continuations = [(0, greedy_text), (0, " zq"), (1, " Yes"), (2, " No")]
    requests = [Instance("loglikelihood", (context, cont, visual, doc_id, "t", "test"), idx=n,
                         metadata={"task": "t", "doc_id": doc_id, "repeats": 1})
                for n, (doc_id, cont) in enumerate(continuations)]
    scores = model.loglikelihood(requests)
    for (doc_id, cont), (score, _) in zip(continuations, scores):
        samples = {**model._visual_batch([data["test"][doc_id]["image"].convert("RGB")]),
                   "text_input": [context], "text_output": [cont]}
        logits, encoded = model.model.answer_logits(samples, with_answer=True)
        labels = encoded.labels[:, 1 - logits.shape[1]:]
        logprobs = torch.log_softmax(logits[:, :-1].float(), -1)
        full = (logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)).sum()
        assert score == pytest.approx(full.item(), abs=1e-4)
    if model.model.tokenizer(greedy_text, add_special_tokens=False).input_ids == greedy_ids:  # its own tokens again
        assert scores[0][1] is True
    assert scores[1][1] is False


@needs_lmms_eval
def test_multi_round_generation_is_refused(checkpoint):
    with pytest.raises(NotImplementedError, match="multi-round"):
        plugin(checkpoint).generate_until_multi_round([])
