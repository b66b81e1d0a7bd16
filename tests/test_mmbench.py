"""MMBench: the official TSV, rotated options, circular scoring, and evaluation end to end."""
from __future__ import annotations

import pytest
from cli import REPO, job_dirs, read_jsonl, run_module
from instruct_fixtures import make_mmbench
from lavis.common.registry import registry

from lavis_ademvl.common.config_files import load_experiment
from lavis_ademvl.tasks.mmbench import circular_metrics

MMBENCH_TINY = REPO / "projects" / "ademvl" / "debug" / "mmbench_tiny.yaml"


def build(tsv, *options):
    config = load_experiment(MMBENCH_TINY, [f"datasets.ademvl_mmbench.build_info.tsv={tsv}", *options]).config
    return registry.get_builder_class("ademvl_mmbench")(config.datasets.ademvl_mmbench).build_datasets()["test"]


def test_every_rotation_of_every_question(tmp_path):
    test = build(make_mmbench(tmp_path / "dev.tsv"))
    items = [test[i] for i in range(len(test))]
    assert [item["question_id"] for item in items] == ["0/0", "0/1", "1/0", "1/1", "1/2", "2/0", "2/1", "2/2", "2/3",
                                                      "3/0", "3/1"]
    by_id = {item["question_id"]: item for item in items}
    # Question 2: options green red white blue, answer D (blue). Rotation 1: red white blue green, answer C.
    assert by_id["2/0"]["options"] == ["green", "red", "white", "blue"] and by_id["2/0"]["answer"] == "D"
    assert by_id["2/1"]["options"] == ["red", "white", "blue", "green"] and by_id["2/1"]["answer"] == "C"
    assert by_id["2/3"]["options"] == ["blue", "green", "red", "white"] and by_id["2/3"]["answer"] == "A"
    # The authors' multiple-choice text, the hint as context ("N/A" when empty).
    assert by_id["1/0"]["text_input"] == ('Question: Which colour is it?\nContext: A "square" is drawn.\n'
                                          "Options: (A) blue (B) green (C) red\nResponse:")
    assert by_id["1/0"]["answer_cue"] == "The answer is"
    assert "Context: N/A" in by_id["0/0"]["text_input"]
    # Question 3's image is row 0's (its image field names that row): the same red square.
    assert by_id["3/0"]["image"].equal(by_id["0/0"]["image"])
    assert by_id["3/0"]["category"] == "color_reasoning" and by_id["3/0"]["l2_category"] == "attribute_reasoning"
    assert len(build(make_mmbench(tmp_path / "dev.tsv"), "datasets.ademvl_mmbench.build_info.circular=false")) == 4


def test_bad_rows_are_named(tmp_path):
    tsv = make_mmbench(tmp_path / "dev.tsv")
    tsv.write_text(tsv.read_text().replace("\tD\tcolor_reasoning\t", "\tE\tcolor_reasoning\t"))
    with pytest.raises(ValueError, match=r"dev.tsv, index 2: answer 'E' is not one of its options \['A', 'B', 'C', 'D'\]"):
        build(tsv)
    with pytest.raises(FileNotFoundError, match="MMBench TSV not found"):
        build(tmp_path / "missing.tsv")


def record(index, rotation, answer, prediction, category="c1", l2="l2a"):
    return {"question_id": f"{index}/{rotation}", "index": index, "rotation": rotation, "answer": answer,
            "prediction": prediction, "category": category, "l2_category": l2, "output": prediction}


def test_a_question_counts_only_if_every_rotation_is_right():
    records = [
        # q0 (2 options): both rotations right.
        record("0", 0, "A", "A"), record("0", 1, "B", "B"),
        # q1 (3 options): right unrotated, one rotation wrong -> wrong.
        record("1", 0, "B", "B"), record("1", 1, "A", "A"), record("1", 2, "C", "A"),
        # q2 (2 options, another category): both right.
        record("2", 0, "A", "A", "c2", "l2b"), record("2", 1, "B", "B", "c2", "l2b"),
        # q3 (2 options, c2): unrotated wrong (no letter), rotation right -> wrong.
        record("3", 0, "B", "", "c2", "l2b"), record("3", 1, "A", "A", "c2", "l2b"),
    ]
    metrics = circular_metrics(records)
    assert metrics["agg_metrics"] == pytest.approx(50.0) and metrics["questions"] == 4
    assert metrics["vanilla"] == pytest.approx(75.0)
    assert metrics["category"] == pytest.approx({"c1": 50.0, "c2": 50.0})
    assert metrics["l2_category"] == pytest.approx({"l2a": 50.0, "l2b": 50.0})


@pytest.mark.parametrize("inference_method", ["generate", "rank"])
def test_mmbench_evaluates_through_the_cli(tmp_path, instruct_checkpoint, inference_method):
    tsv = make_mmbench(tmp_path / "data" / "dev.tsv")
    options = [f"datasets.ademvl_mmbench.build_info.tsv={tsv}", f"model.finetuned={instruct_checkpoint}",
               f"run.output_dir={tmp_path / 'out'}", f"run.inference_method={inference_method}"]
    run_module("lavis_ademvl.evaluate", MMBENCH_TINY, options, tmp_path)
    (job,) = job_dirs(tmp_path / "out")
    (evaluation,) = read_jsonl(job / "evaluate.txt")
    metrics = evaluation["test"]
    assert {"agg_metrics", "vanilla", "category", "l2_category", "questions"} <= set(metrics)
    assert metrics["questions"] == 4
    assert set(metrics["category"]) == {"attribute_recognition", "color_reasoning"}
    assert 0.0 <= metrics["agg_metrics"] <= metrics["vanilla"] <= 100.0
