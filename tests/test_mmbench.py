"""MMBench: the official TSV (circular copies at index + k * 1e6), a file without copies rotated here, every row
checked before anything is asked, circular scoring, and evaluation end to end against a re-statement of the official
(VLMEvalKit) scoring."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from cli import REPO, job_dirs, read_jsonl, run_module
from instruct_fixtures import make_mmbench
from lavis.common.registry import registry
from mmbench_fixture import COLUMNS, make_official_mmbench, official_rows, write_tsv

from lavis_ademvl.common.config_files import load_experiment
from lavis_ademvl.common.results import result_records
from lavis_ademvl.tasks.mmbench import RECORD_KEYS, circular_metrics

MMBENCH_TINY = REPO / "projects" / "ademvl" / "debug" / "mmbench_tiny.yaml"


def build(tsv, *options):
    config = load_experiment(MMBENCH_TINY, [f"datasets.ademvl_mmbench.build_info.tsv={tsv}", *options]).config
    return registry.get_builder_class("ademvl_mmbench")(config.datasets.ademvl_mmbench).build_datasets()["test"]


def test_the_official_file_is_asked_row_by_row(tmp_path):
    rows = official_rows()
    # Copy 2 of question 2 in an order of the file's own (not our rotation): it is asked as written.
    (copy,) = [row for row in rows if row["index"] == 2_000_002]
    copy.update({"A": "white", "B": "green", "C": "blue", "D": "red", "answer": "C"})
    test = build(write_tsv(tmp_path / "dev.tsv", rows))
    items = {test[i]["question_id"]: test[i] for i in range(len(test))}
    assert list(items) == ["0", "1000000", "1", "1000001", "2000001", "2", "1000002", "2000002", "3000002",
                           "3", "1000003"]  # one prompt per row: 11 rows, 4 questions
    assert items["2"]["options"] == ["green", "red", "white", "blue"] and items["2"]["answer"] == "D"
    assert items["1000002"]["options"] == ["red", "white", "blue", "green"] and items["1000002"]["answer"] == "C"
    assert items["2000002"]["options"] == ["white", "green", "blue", "red"] and items["2000002"]["answer"] == "C"
    # Hints: empty (pandas' NaN) and "nan" are no hint; a quoted one is read back unquoted.
    assert "Context: N/A" in items["0"]["text_input"] and "Context: N/A" in items["2"]["text_input"]
    assert 'Context: A "square" is drawn.' in items["2000001"]["text_input"]
    # Images by index: the copies name their main row; question 3 (and its copy) name row 0.
    assert items["3000002"]["image"].equal(items["2"]["image"])
    assert items["1000003"]["image"].equal(items["0"]["image"]) and items["3"]["image"].equal(items["0"]["image"])
    assert {item["rotations"] for item in items.values()} == {"tsv_copies"}
    assert items["1000003"]["category"] == "color_reasoning" and items["1000003"]["l2_category"] == "attribute_reasoning"
    mains = build(tmp_path / "dev.tsv", "datasets.ademvl_mmbench.build_info.circular=false")
    assert [mains[i]["question_id"] for i in range(len(mains))] == ["0", "1", "2", "3"]
    assert mains[0]["rotations"] == "none"


def test_a_file_without_copies_is_rotated_here(tmp_path):
    test = build(make_mmbench(tmp_path / "dev.tsv"))
    items = {test[i]["question_id"]: test[i] for i in range(len(test))}
    # The rows the official file would hold: copy k at index + k * 1e6, option (i + k) mod N at letter i.
    assert list(items) == ["0", "1000000", "1", "1000001", "2000001", "2", "1000002", "2000002", "3000002",
                           "3", "1000003"]
    assert {item["rotations"] for item in items.values()} == {"rotated_here"}
    # Question 2: options green red white blue, answer D (blue). Copy 1: red white blue green, answer C.
    assert items["2"]["options"] == ["green", "red", "white", "blue"] and items["2"]["answer"] == "D"
    assert items["1000002"]["options"] == ["red", "white", "blue", "green"] and items["1000002"]["answer"] == "C"
    assert items["3000002"]["options"] == ["blue", "green", "red", "white"] and items["3000002"]["answer"] == "A"
    # The authors' multiple-choice text, the hint as context ("N/A" when empty).
    assert items["1"]["text_input"] == ('Question: Which colour is it?\nContext: A "square" is drawn.\n'
                                        "Options: (A) blue (B) green (C) red\nResponse:")
    assert items["1"]["answer_cue"] == "The answer is"
    assert "Context: N/A" in items["0"]["text_input"]
    # Question 3's image is row 0's (its image field names that row): the same red square.
    assert items["1000003"]["image"].equal(items["0"]["image"])
    assert items["3"]["category"] == "color_reasoning" and items["3"]["l2_category"] == "attribute_reasoning"


def edit(row_index, **values):
    """A change to the official rows: set columns of the row with this index."""
    def change(rows):
        (row,) = [row for row in rows if row["index"] == row_index]
        row.update(values)
        return rows
    return change


def drop(index):
    return lambda rows: [row for row in rows if row["index"] != index]


def add(**row):
    return lambda rows: [*rows, {**rows[0], **row}]


@pytest.mark.parametrize("change, message", [
    (edit(2, answer=math.nan), r"dev.tsv, index 2: column `answer` is empty"),
    (edit(1, answer="AB"), r"dev.tsv, index 1: column `answer` is 'AB'; one option letter \(A, B, C, D\) expected"),
    (edit(2, answer="E"), r"dev.tsv, index 2: column `answer` is 'E'; one option letter"),
    (edit(0, answer="C"), r"dev.tsv, index 0: column `answer` is 'C' but column `C` is empty \(its options: \['A', 'B'\]\)"),
    (edit(2, C=math.nan), r"dev.tsv, index 2: column `C` is empty but column `D` is not; options must fill A, B"),
    (edit(1, B=math.nan, C=math.nan), r"dev.tsv, index 1: column `B` is empty; a question needs at least 2 options"),
    (add(index=1, question="Another question?"), r"dev.tsv, index 1: two rows \(lines 3 and 13\) have this `index`"),
    (edit(3, index="three"), r"dev.tsv, line 5: column `index` is 'three', not a non-negative integer"),
    # issue #36: a digit that is not ASCII passed str.isdigit() and ended in int()'s bare message
    (edit(3, index="\u00b3"), r"dev.tsv, line 5: column `index` is '\u00b3', not a non-negative integer"),
    (edit(3, image="\u00b9"), r"dev.tsv, index 3: column `image` is '\u00b9', neither base64 nor the index"),
    (edit(3, image="99"), r"dev.tsv, index 3: column `image` is '99', neither base64 nor the index of a row holding"),
    (drop(2_000_002), r"dev.tsv, index 2: its circular copies are incomplete: 4 options but no row with index "
                      r"\[2000002\]"),
    (drop(3), r"dev.tsv, index 1000003: a circular copy of question 3 \(index % 1,000,000\), which has no row with "
              r"index 3"),
    (add(index=2_000_000, answer="A"), r"dev.tsv, index 2000000: copy 2 of question 0, which has 2 options"),
    (edit(1_000_001, D="white"), r"dev.tsv, index 1000001: 4 options, but its question's main row 1 has 3"),
])
def test_every_row_is_checked_before_anything_is_asked(tmp_path, change, message):
    tsv = write_tsv(tmp_path / "dev.tsv", change(official_rows()))
    with pytest.raises(ValueError, match=message):
        build(tsv)


def test_a_file_without_answers_copies_or_its_shape_is_refused(tmp_path):
    rows = [{key: value for key, value in row.items() if key != "answer"} for row in official_rows()]
    pd.DataFrame(rows).to_csv(tmp_path / "test.tsv", sep="\t", index=False)
    with pytest.raises(KeyError, match=r"test.tsv lacks column\(s\) \['answer'\].*test split has no answers"):
        build(tmp_path / "test.tsv")
    # One question without any copy in a file that has copies: its rotations would be ours, the others the file's.
    write_tsv(tmp_path / "dev.tsv", drop(1_000_003)(official_rows()))
    with pytest.raises(ValueError, match=r"index 3: its circular copies are incomplete: 2 options but no row with "
                                         r"index \[1000003\]"):
        build(tmp_path / "dev.tsv")
    lines = make_official_mmbench(tmp_path / "dev.tsv").read_text().splitlines()
    (tmp_path / "dev.tsv").write_text("\n".join([*lines[:2], lines[2] + "\tstray", *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match=r"dev.tsv, line 3: the row's fields do not match the header's 14 columns"):
        build(tmp_path / "dev.tsv")
    with pytest.raises(FileNotFoundError, match="MMBench TSV not found"):
        build(tmp_path / "missing.tsv")


def test_a_tsv_that_is_not_utf8_or_is_cut_short_is_named(tmp_path):
    """A TSV re-saved in Latin-1: the error said "a dataset file is not UTF-8 JSON", naming no file. A download cut
    before a row's image column: its fields are counted (checked here against the real cut file)."""
    rows = edit(1, hint="Un carr\u00e9 est dessin\u00e9.")(official_rows())
    tsv = tmp_path / "dev.tsv"
    pd.DataFrame(rows, columns=COLUMNS).to_csv(tsv, sep="\t", index=False, encoding="latin-1")
    with pytest.raises(ValueError, match=rf"MMBench TSV {tsv} is not UTF-8 text: line 3 holds .*carr\\xe9"):
        build(tsv)
    text = make_official_mmbench(tsv).read_bytes()
    third = text.index(b"\n", text.index(b"\n", text.index(b"\n") + 1) + 1) + 1  # the start of line 4
    tsv.write_bytes(text[: text.index(b"color_reasoning", third)])  # cut at line 4's category, before its image
    with pytest.raises(ValueError, match=rf"MMBench TSV {tsv}, line 4: the row's fields do not match the header's 14 "
                                         "columns"):
        build(tsv)


def record(index, answer, prediction, category="c1", l2="l2a", rotations="tsv_copies"):
    return {"question_id": str(index), "index": index, "answer": answer, "prediction": prediction,
            "category": category, "l2_category": l2, "output": prediction, "rotations": rotations}


def test_a_question_counts_once_and_only_if_every_row_is_right():
    records = [
        # q0 (2 options): both rows right.
        record(0, "A", "A"), record(1_000_000, "B", "B"),
        # q1 (4 options): main row right, one copy wrong -> wrong.
        record(1, "B", "B"), record(1_000_001, "A", "A"), record(2_000_001, "D", "D"), record(3_000_001, "C", "A"),
        # q2 (2 options, another category): both right.
        record(2, "A", "A", "c2", "l2b"), record(1_000_002, "B", "B", "c2", "l2b"),
        # q3 (2 options, c2): main row wrong (no letter), copy right -> wrong.
        record(3, "B", "", "c2", "l2b"), record(1_000_003, "A", "A", "c2", "l2b"),
    ]
    metrics = circular_metrics(records)
    assert metrics["agg_metrics"] == pytest.approx(50.0) and metrics["questions"] == 4 and metrics["prompts"] == 10
    assert metrics["vanilla"] == pytest.approx(75.0) and metrics["rotations"] == "tsv_copies"
    # Per question: c1 holds q0 and q1 (4 + 2 rows), one right.
    assert metrics["category"] == pytest.approx({"c1": 50.0, "c2": 50.0})
    assert metrics["l2_category"] == pytest.approx({"l2a": 50.0, "l2b": 50.0})
    with pytest.raises(ValueError, match=r"question 1 has rows \[1000001, 2000001, 3000001\] but no record of its main"):
        circular_metrics([r for r in records if r["index"] != 1])
    with pytest.raises(ValueError, match="different rotation sources"):
        circular_metrics([*records[:-1], record(1_000_003, "A", "A", rotations="rotated_here")])


def official_scores(tsv, records):
    """VLMEvalKit's MMBench scoring (mcq_circular_eval, report_acc), re-stated over the official TSV and each row's
    prediction: rows grouped by int(index % 1e6), a group right only if every row's prediction is its answer, one line
    per question (the main rows, index == group), accuracies over those lines; vanilla: the main rows' own hits."""
    data = pd.read_csv(tsv, sep="\t")
    predictions = {int(r["index"]): r["prediction"] for r in records}
    assert sorted(predictions) == sorted(data["index"])  # one prompt per row, no more
    data["prediction"] = [predictions[index] for index in data["index"]]
    data["g_index"] = [int(index % 1e6) for index in data["index"]]
    hits = {g: bool((group["prediction"] == group["answer"]).all()) for g, group in data.groupby("g_index")}
    main = data[data["index"] == data["g_index"]].copy()
    main["hit"] = [hits[index] for index in main["index"]]
    return {
        "agg_metrics": 100 * main["hit"].mean(), "questions": len(main), "prompts": len(data),
        "vanilla": 100 * (main["prediction"] == main["answer"]).mean(),
        "category": {name: 100 * group["hit"].mean() for name, group in main.groupby("category")},
        "l2_category": {name: 100 * group["hit"].mean() for name, group in main.groupby("l2-category")},
    }


def flat(metrics):
    """The scores as one flat dict (pytest.approx compares flat dicts only)."""
    scores = {key: metrics[key] for key in ("agg_metrics", "vanilla", "questions", "prompts")}
    for key in ("category", "l2_category"):
        scores |= {f"{key}/{name}": score for name, score in metrics[key].items()}
    return scores


PREDICTIONS = {
    "right but two copies": lambda item: "" if item["question_id"] in ("3000002", "1000003") else item["answer"],
    "always A": lambda item: "A",
    "always B": lambda item: "B",
}


@pytest.mark.parametrize("copies", [True, False])
@pytest.mark.parametrize("predict", list(PREDICTIONS))
def test_circular_metrics_equal_the_official_scoring(tmp_path, copies, predict):
    official = make_official_mmbench(tmp_path / "dev.tsv")
    test = build(official if copies else write_tsv(tmp_path / "mains.tsv", official_rows()[:4]))
    items = [test[i] for i in range(len(test))]
    records = [{key: item[key] for key in RECORD_KEYS} | {"prediction": PREDICTIONS[predict](item)} for item in items]
    metrics = circular_metrics(records)
    assert flat(metrics) == pytest.approx(flat(official_scores(official, records)))
    if predict == "right but two copies":  # q0 and q1 right; q2 and q3 each miss one copy; every main row right
        assert metrics["agg_metrics"] == 50.0 and metrics["vanilla"] == 100.0
        assert metrics["category"] == {"attribute_recognition": 100.0, "color_reasoning": 0.0}


@pytest.mark.parametrize("inference_method, copies", [("rank", True), ("generate", False)])
def test_mmbench_scores_as_the_official_evaluator(tmp_path, instruct_checkpoint, inference_method, copies):
    official = make_official_mmbench(tmp_path / "data" / "dev.tsv")
    # Without copies (main rows only), our rotations must give the official file's rows: same indices and answers.
    tsv = official if copies else write_tsv(tmp_path / "data" / "mains.tsv", official_rows()[:4])
    options = [f"datasets.ademvl_mmbench.build_info.tsv={tsv}", f"model.finetuned={instruct_checkpoint}",
               f"run.output_dir={tmp_path / 'out'}", f"run.inference_method={inference_method}"]
    run = run_module("lavis_ademvl.evaluate", MMBENCH_TINY, options, tmp_path)
    (job,) = job_dirs(tmp_path / "out")
    (evaluation,) = read_jsonl(job / "evaluate.txt")
    metrics = evaluation["test"]
    rotations = "tsv_copies" if copies else "rotated_here"
    assert metrics["rotations"] == rotations and f"rotations: {rotations}" in run.stdout + run.stderr
    records = result_records(job, metrics)
    assert len(records) == metrics["prompts"] == 11  # the official file's 11 rows, each asked once
    assert flat(metrics) == pytest.approx(flat(official_scores(official, records)))
    assert set(metrics["category"]) == {"attribute_recognition", "color_reasoning"}
