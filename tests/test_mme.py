"""MME: the `ademvl_mme` builder on both folder layouts, calculation.py's scoring, and evaluation end to end."""
from __future__ import annotations

import os
from collections import defaultdict

import pytest
from cli import REPO, job_dirs, read_jsonl, run_module
from instruct_fixtures import MME_SEPARATE, MME_SIDE_BY_SIDE, make_mme
from lavis.common.registry import registry

from lavis_ademvl.cli import evaluate, predict
from lavis_ademvl.common.config_files import load_experiment
from lavis_ademvl.inference import Question, load_for_inference, question_batch
from lavis_ademvl.tasks.mme import instruction_outputs, mme_metrics, read_yes_no, write_result_files

PROJECTS = REPO / "projects" / "ademvl"
MME_TINY = PROJECTS / "debug" / "mme_tiny.yaml"


def build(root, *options):
    config = load_experiment(MME_TINY, [f"datasets.ademvl_mme.build_info.data_root={root}", *options]).config
    return registry.get_builder_class("ademvl_mme")(config.datasets.ademvl_mme).build_datasets()


def test_both_folder_layouts_build(tmp_path):
    root = make_mme(tmp_path)
    test = build(root)["test"]
    items = [test[i] for i in range(len(test))]
    assert len(items) == 4 * (len(MME_SIDE_BY_SIDE) + len(MME_SEPARATE))
    assert {item["subtask"] for item in items} == set(MME_SIDE_BY_SIDE) | set(MME_SEPARATE)
    first = items[0]  # existence, 0000.jpg, its first line
    assert (first["subtask"], first["image_name"], first["answer"]) == ("existence", "0000.jpg", "Yes")
    assert first["text_input"] == "Instruction: Is the square red? Please answer yes or no.\nResponse:"  # eval_mme.py's
    assert tuple(first["image"].shape) == (3, 32, 32)
    assert {item["image_name"] for item in items if item["subtask"] == "numerical_calculation"} == {"0000.png", "0001.png"}
    only = build(root, "datasets.ademvl_mme.build_info.subtasks=[artwork]")["test"]
    assert {only[i]["subtask"] for i in range(len(only))} == {"artwork"}


def test_bad_mme_copies_are_named(tmp_path):
    root = make_mme(tmp_path)
    (root / "existence" / "0001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"no image for .*existence/0001.txt"):
        build(root)
    with pytest.raises(ValueError, match=r"subtasks='colour' is not supported"):
        build(root, "datasets.ademvl_mme.build_info.subtasks=[colour]")
    (root / "artwork" / "questions_answers_YN" / "0000.txt").write_text("Is it red?\tMaybe\nIs it blue?\tNo\n")
    with pytest.raises(ValueError, match=r"0000.txt line 1 is not 'question<TAB>Yes\|No'"):
        build(root, "datasets.ademvl_mme.build_info.subtasks=[artwork]")


@pytest.mark.parametrize(
    "subtask, image, questions",
    [("existence", "existence/0001.jpg", "existence/0001.txt"),
     ("artwork", "artwork/images/0001.jpg", "artwork/questions_answers_YN/0001.txt")],
)
def test_an_mme_image_without_its_question_file_is_named(tmp_path, subtask, image, questions):
    """Such an image was skipped, and its subtask scored on fewer images than MME's."""
    root = make_mme(tmp_path)
    (root / questions).unlink()
    with pytest.raises(FileNotFoundError, match=rf"MME subtask {subtask}: image .*/{image} has no question file .*/{questions}"):
        build(root, f"datasets.ademvl_mme.build_info.subtasks=[{subtask}]")


def test_an_mme_question_file_that_is_not_utf8_is_named(tmp_path):
    """A question saved in Latin-1: the error said "a dataset file is not UTF-8 JSON", naming no file."""
    root = make_mme(tmp_path)
    questions = root / "artwork" / "questions_answers_YN" / "0001.txt"
    questions.write_bytes("Is this painting by Dal\u00ed?\tNo\nIs the square green?\tYes\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"MME question file {questions} is not UTF-8 text: line 1 holds .*Dal\\xed"):
        build(root)


def record(subtask, image, index, answer, output):
    return {"question_id": f"{subtask}/{image}/{index}", "subtask": subtask, "image_name": image,
            "question": f"q{index} of {image}?", "answer": answer, "output": output}


# existence: image a both right ("Yes.", "no,"); image b: "Maybe" (neither) wrong, "No" right -> acc 3/4, acc+ 1/2.
# count: "not sure" reads as no (calculation.py looks for "no" in the first four characters), " yes" as yes: 2/2, 1/1.
# numerical_calculation: "The answer is yes" is neither (wrong), "NO" right -> acc 1/2, acc+ 0.
HAND_MADE = [
    record("existence", "a.jpg", 0, "Yes", "Yes."), record("existence", "a.jpg", 1, "No", "no,"),
    record("existence", "b.jpg", 0, "Yes", "Maybe"), record("existence", "b.jpg", 1, "No", "No"),
    record("count", "c.jpg", 0, "No", "not sure"), record("count", "c.jpg", 1, "Yes", " yes"),
    record("numerical_calculation", "d.png", 0, "Yes", "The answer is yes"),
    record("numerical_calculation", "d.png", 1, "No", "NO"),
]


def test_scores_equal_a_hand_computation():
    assert [read_yes_no(r["output"]) for r in HAND_MADE] == ["yes", "no", "other", "no", "no", "yes", "other", "no"]
    metrics = mme_metrics(HAND_MADE)
    assert metrics["existence"] == pytest.approx(100 * (3 / 4 + 1 / 2))
    assert metrics["count"] == pytest.approx(200.0)
    assert metrics["numerical_calculation"] == pytest.approx(100 * (1 / 2 + 0))
    assert metrics["perception"] == pytest.approx(325.0) and metrics["cognition"] == pytest.approx(50.0)
    assert metrics["agg_metrics"] == pytest.approx(375.0)
    details = metrics["subtask_metrics"]["existence"]
    counts = (details["acc"], details["acc_plus"], details["other"], details["questions"], details["images"])
    assert counts == (0.75, 0.5, 1, 4, 2)
    assert "scene" in metrics["missing_subtasks"] and "existence" not in metrics["missing_subtasks"]


def their_scores(results_dir) -> dict[str, float]:
    """MME eval_tool/calculation.py, restated: each present subtask file read line by line, consecutive lines paired as
    one image, the prediction read from its field as read (trailing newline included), score = 100 (acc + acc+)."""
    scores = {}
    for name in sorted(os.listdir(results_dir)):
        lines = open(os.path.join(results_dir, name)).readlines()
        chunks = [lines[i:i + 2] for i in range(0, len(lines), 2)]
        right = both = 0
        for chunk in chunks:
            assert len(chunk) == 2
            image_right = 0
            for line in chunk:
                _, _, gt, pred = line.split("\t")
                gt, pred = gt.lower(), pred.lower()
                if pred not in ["yes", "no"]:
                    pred = "yes" if "yes" in pred[:4] else "no" if "no" in pred[:4] else "other"
                image_right += gt == pred
            right += image_right
            both += image_right == 2
        scores[name[: -len(".txt")]] = 100 * (right / (2 * len(chunks)) + both / len(chunks))
    return scores


def test_result_files_rescore_as_calculation_py(tmp_path):
    shuffled = HAND_MADE[::-1] + [record("existence", "e.jpg", 0, "No", "yes\tand more")]
    shuffled.append(record("existence", "e.jpg", 1, "Yes", "yes"))
    write_result_files(shuffled, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["count.txt", "existence.txt", "numerical_calculation.txt"]
    lines = (tmp_path / "existence.txt").read_text().splitlines()
    assert lines[:2] == ["a.jpg\tq0 of a.jpg?\tYes\tYes.", "a.jpg\tq1 of a.jpg?\tNo\tno,"]
    assert lines[-2:] == ["e.jpg\tq0 of e.jpg?\tNo\tyes and more", "e.jpg\tq1 of e.jpg?\tYes\tyes"]
    ours = mme_metrics(shuffled)
    assert their_scores(tmp_path) == pytest.approx({name: ours[name] for name in ("count", "existence", "numerical_calculation")})


def test_mme_evaluates_through_the_cli(tmp_path, instruct_checkpoint):
    root = make_mme(tmp_path / "data")
    options = [f"datasets.ademvl_mme.build_info.data_root={root}", f"model.finetuned={instruct_checkpoint}",
               f"run.output_dir={tmp_path / 'out'}"]
    run_module("lavis_ademvl.evaluate", MME_TINY, options, tmp_path)
    (job,) = job_dirs(tmp_path / "out")
    (evaluation,) = read_jsonl(job / "evaluate.txt")
    metrics = evaluation["test"]
    present = set(MME_SIDE_BY_SIDE) | set(MME_SEPARATE)
    assert present | {"perception", "cognition", "agg_metrics"} <= set(metrics)
    assert metrics["perception"] == pytest.approx(sum(metrics[name] for name in ("existence", "artwork", "celebrity")))
    assert metrics["cognition"] == pytest.approx(metrics["numerical_calculation"])
    assert set(metrics["missing_subtasks"]) == {"count", "position", "color", "posters", "scene", "landmark", "OCR",
                                                "commonsense_reasoning", "text_translation", "code_reasoning"}
    folder = job / "result" / "mme"
    assert their_scores(folder) == pytest.approx({name: metrics[name] for name in present})
    lines = defaultdict(list)
    for name in present:
        for line in (folder / f"{name}.txt").read_text().splitlines():
            lines[name].append(line.split("\t"))
    assert all(len(fields) == 4 for rows in lines.values() for fields in rows)
    assert [row[:3] for row in lines["existence"]] == [
        ["0000.jpg", "Is the square red? Please answer yes or no.", "Yes"],
        ["0000.jpg", "Is the square blue? Please answer yes or no.", "No"],
        ["0001.jpg", "Is the square green? Please answer yes or no.", "Yes"],
        ["0001.jpg", "Is the square red? Please answer yes or no.", "No"],
    ]


def test_predict_follows_an_instruction_as_mme_answers_it(tmp_path, instruct_checkpoint, capsys):
    """predict --instruction on an MME image and question prints what the MME evaluation answered; without --image it
    answers a text-only instruction, behind the "no image" prefix."""
    root = make_mme(tmp_path / "data")
    options = [f"datasets.ademvl_mme.build_info.data_root={root}", "datasets.ademvl_mme.build_info.subtasks=[existence]",
               f"model.finetuned={instruct_checkpoint}", f"run.output_dir={tmp_path / 'out'}", "run.batch_size_eval=1"]
    assert evaluate.main(["--cfg-path", str(MME_TINY), "--options", *options]) == 0
    (job,) = job_dirs(tmp_path / "out")
    with open(job / "result" / "mme" / "existence.txt", newline="") as handle:
        rows = [line.split("\t") for line in handle.read().split("\n") if line]
    capsys.readouterr()
    for image, question, _, output in rows[:2]:
        assert predict_main(instruct_checkpoint, "--image", str(root / "existence" / image), "--instruction", question) == 0
        assert capsys.readouterr().out == output + "\n"
    assert predict_main(instruct_checkpoint, "--instruction", "Name a primary colour.") == 0
    text_only = capsys.readouterr().out
    model, processor, config = load_for_inference(MME_TINY, str(instruct_checkpoint), device="cpu")
    batch = question_batch(config, processor, Question(None, instruction="Name a primary colour."))
    encoded = model.encode_batch(batch, with_answer=False)
    assert not encoded.slot_mask.any()
    assert model.tokenizer.decode(encoded.input_ids[0]) == "<s>Image: N/AInstruction: Name a primary colour.\nResponse:"
    assert text_only == instruction_outputs(model, batch, config.run.max_len)[0] + "\n"
    assert predict_main(instruct_checkpoint, "--instruction", "x", "--question", "y") == 2
    assert "--instruction is asked alone" in capsys.readouterr().err


def predict_main(checkpoint, *arguments) -> int:
    return predict.main(["--cfg-path", str(MME_TINY), "--checkpoint", str(checkpoint), "--device", "cpu", *arguments])
