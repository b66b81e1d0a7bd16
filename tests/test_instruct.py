"""Instruction tuning: the `ademvl_instruct` builder on both layouts, multi-turn label masks, training end to end."""
from __future__ import annotations

import json

import pytest
import torch
from cli import REPO, job_dirs, read_jsonl, run_module
from helpers import tiny_model
from instruct_fixtures import LLAVA_ENTRIES, make_all_data, make_llava
from lavis.common.registry import registry

from lavis_ademvl.common.config_files import load_experiment
from lavis_ademvl.datasets.datasets.instruct_datasets import conversation_prompt
from lavis_ademvl.datasets.datasets.scienceqa_datasets import collate
from lavis_ademvl.models.processing import Turn

DEBUG_CONFIG = REPO / "projects" / "ademvl" / "debug" / "instruct_tiny.yaml"
IMAGE = torch.zeros(3, 32, 32)  # the tiny tower's image size
LLAVA_OPTIONS = ("datasets.ademvl_instruct.build_info.format=llava", "datasets.ademvl_instruct.build_info.image_dir=train2014")


def build(root, *options):
    config = load_experiment(DEBUG_CONFIG, [f"datasets.ademvl_instruct.build_info.data_root={root}", *options]).config
    return registry.get_builder_class("ademvl_instruct")(config.datasets.ademvl_instruct).build_datasets()


def test_all_data_entries_keep_the_authors_text(tmp_path):
    root = make_all_data(tmp_path)
    entries = json.loads((root / "all_data.json").read_text())["all"]
    train = build(root)["train"]
    assert len(train) == len(entries)
    for index, entry in enumerate(entries):
        item = train[index]
        assert item["question_id"] == entry["qid"]
        assert item["conversation"] == [[entry["instruction"], entry["answer"]]]  # prompt = instruction, target = answer
        assert item["has_image"] == int(entry["image"] is not None)
        assert tuple(item["image"].shape) == (3, 32, 32)


def test_llava_conversations_become_turns(tmp_path):
    root = make_llava(tmp_path)
    train = build(root, *LLAVA_OPTIONS)["train"]
    assert [train[i]["question_id"] for i in range(len(train))] == [entry["id"] for entry in LLAVA_ENTRIES]
    assert train[0]["conversation"] == [
        ["Instruction: What colour is the square?\nResponse:", "It is green."],
        ["Instruction: Is it large?\nResponse:", "No, it is small."],
        ["Instruction: What is around it?\nResponse:", "White space."],
    ]
    assert train[1]["conversation"] == [["Instruction: Describe the picture.\nResponse:", "A blue square."]]
    assert all(train[i]["has_image"] == 1 for i in range(len(train)))


def test_image_marker_is_removed_wherever_it_stands():
    for text in ("<image>\nWhat is it?", "What is it?\n<image>", "What <image>is it?"):
        assert conversation_prompt(text) == "Instruction: What is it?\nResponse:"


@pytest.mark.parametrize("truncation", ["end", "middle"])
def test_label_mask_covers_exactly_the_assistant_turns(truncation):
    """Token by token on a 3-turn conversation: the byte-level tokenizer has one token per byte, so each piece of text
    tokenizes alone as it does inside the sequence."""
    model = tiny_model(truncation=truncation)
    tok = model.tokenizer
    turns = [[conversation_prompt(t["value"]), a["value"]] for t, a in zip(LLAVA_ENTRIES[0]["conversations"][::2],
                                                                            LLAVA_ENTRIES[0]["conversations"][1::2])]
    samples = collate([{"image": IMAGE, "has_image": 1, "conversation": turns}])
    encoded = model.processor.encode(samples, with_answer=True)
    ids, labels, slots = encoded.input_ids[0].tolist(), encoded.labels[0].tolist(), encoded.slot_mask[0].tolist()

    def pieces(text):
        return tok(text, add_special_tokens=False).input_ids

    expected_ids = [tok.bos_token_id, *pieces("Image: "), tok.pad_token_id]
    expected_labels = [-100] * len(expected_ids)
    for prompt, answer in turns:
        expected_ids += pieces(prompt)
        expected_labels += [-100] * len(pieces(prompt))
        expected_ids += [*pieces(answer), tok.eos_token_id]
        expected_labels += [*pieces(answer), tok.eos_token_id]
    assert ids == expected_ids
    assert labels == expected_labels
    assert slots == [index == len(pieces("Image: ")) + 1 for index in range(len(ids))]
    # What the labels select, decoded: the three answers, each closed by eos.
    labelled = [token for token in labels if token != -100]
    assert tok.decode(labelled) == "It is green.</s>No, it is small.</s>White space.</s>"


@pytest.mark.parametrize("truncation", ["end", "middle"])
def test_long_conversations_drop_whole_trailing_turns(truncation):
    turns = [Turn("Instruction: first?\nResponse:", "", "one"), Turn("Instruction: second?\nResponse:", "", "two"),
             Turn("Instruction: third?\nResponse:", "", "three")]
    full_model = tiny_model(truncation=truncation)
    full_ids, slot, full_labels = full_model.processor.encode_turns(turns, with_slot=True)
    two_turns_ids, _, two_turns_labels = full_model.processor.encode_turns(turns[:2], with_slot=True)
    for max_len in (len(two_turns_ids), len(full_ids) - 1):  # room for two turns, not for the third
        ids, cut_slot, labels = tiny_model(truncation=truncation, max_len=max_len).processor.encode_turns(turns, with_slot=True)
        assert (ids, cut_slot, labels) == (two_turns_ids, slot, two_turns_labels)
    assert slot > 0 and full_ids[slot] == full_model.tokenizer.pad_token_id


def test_conversations_train_the_tiny_model():
    model = tiny_model(truncation="end")
    samples = collate([
        {"image": IMAGE, "has_image": 1,
         "conversation": [["Instruction: a?\nResponse:", "b"], ["Instruction: c?\nResponse:", "d"]]},
        {"image": IMAGE, "has_image": 0, "conversation": [["Instruction: e?\nResponse:", "fgh"]]},
    ])
    loss = model(samples)["loss"]
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="conversation"):
        model.processor.encode(samples, with_answer=False)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda entries: entries[1].pop("conversations"), r"llava_instruct_150k.json: entry '000000000025': no `conversations`"),
        (lambda entries: entries[0]["conversations"][2].update({"from": "user"}),
         r"entry '000000000009': turn 2 is from 'user'; allowed: \['human', 'gpt'\]"),
        (lambda entries: entries[2].update({"image": "missing.jpg"}), r"entry '000000000030': image not found: .*missing.jpg"),
        (lambda entries: entries[3]["conversations"].pop(), r"entry '000000000034': the last human turn has no gpt answer"),
    ],
)
def test_malformed_llava_entries_fail_when_built(tmp_path, change, message):
    entries = json.loads(json.dumps(LLAVA_ENTRIES))
    change(entries)
    root = make_llava(tmp_path, entries)
    with pytest.raises(ValueError, match=message):
        build(root, *LLAVA_OPTIONS)


def test_malformed_all_data_entries_fail_when_built(tmp_path):
    root = make_all_data(tmp_path)
    (root / "cocoimages" / "train" / "COCO_train2014_000000000025.jpg").unlink()
    with pytest.raises(ValueError, match=r"all_data.json: entry 'gpt4_2_0_0': image not found: .*COCO_train2014_000000000025"):
        build(root)
    data = json.loads((root / "all_data.json").read_text())
    del data["all"][0]["answer"]
    (root / "all_data.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"entry 'alpaca_0': missing key\(s\) \['answer'\]"):
        build(root)
    with pytest.raises(KeyError, match=r"no split 'train' \(build_info.split\); the file holds \['all'\]"):
        build(root, "datasets.ademvl_instruct.build_info.split=train")
    with pytest.raises(ValueError, match=r"format='sharegpt' is not supported; choose one of \['all_data', 'llava'\]"):
        build(root, "datasets.ademvl_instruct.build_info.format=sharegpt")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("answer", None, r"all_data.json: entry 'alpaca_0': answer is None; it must be a non-empty string"),
        ("instruction", None, r"entry 'alpaca_0': instruction is None; it must be a non-empty string"),
        ("answer", ["The", "square"], r"entry 'alpaca_0': answer is \['The', 'square'\]; it must be a non-empty string"),
        ("answer", "", r"entry 'alpaca_0': answer is ''; it must be a non-empty string"),
        ("image", 9, r"entry 'alpaca_0': image is 9; it must be a non-empty string"),
        ("qid", None, r"entry None: qid is None; it must be a non-empty string"),
        # issue #36: a JSON "\ud800" escape failed in the tokenizer after the first iteration, naming no entry
        ("answer", "The \ud800 square", r"entry 'alpaca_0': answer holds '\\ud800' at character 4, a lone surrogate"),
    ],
)
def test_all_data_entries_of_the_wrong_type_are_named(tmp_path, field, value, message):
    """A null or list was read with str() and trained on as the text "None" or "['The', 'square']"."""
    root = make_all_data(tmp_path)
    data = json.loads((root / "all_data.json").read_text())
    data["all"][0][field] = value
    (root / "all_data.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        build(root)


@pytest.mark.parametrize(
    "turn, value, message",
    [
        (1, None, r"llava_instruct_150k.json: entry '000000000009': turn 1's `value` is None; it must be a non-empty string"),
        (1, ["It", "is", "green."], r"entry '000000000009': turn 1's `value` is \['It', 'is', 'green.'\]"),
        (0, "  ", r"entry '000000000009': turn 0's `value` is '  '; it must be a non-empty string"),
    ],
)
def test_llava_turns_of_the_wrong_type_are_named(tmp_path, turn, value, message):
    entries = json.loads(json.dumps(LLAVA_ENTRIES))
    entries[0]["conversations"][turn]["value"] = value
    with pytest.raises(ValueError, match=message):
        build(make_llava(tmp_path, entries), *LLAVA_OPTIONS)
    entries = json.loads(json.dumps(LLAVA_ENTRIES))
    entries[1]["image"] = ["000000000025.jpg"]
    with pytest.raises(ValueError, match=r"entry '000000000025': image is \['000000000025.jpg'\]"):
        build(make_llava(tmp_path, entries), *LLAVA_OPTIONS)


@pytest.mark.parametrize("layout", ["all_data", "llava"])
def test_an_instruction_file_that_is_not_utf8_is_named(tmp_path, layout):
    """Latin-1 text (an accented answer): the error said "a dataset file is not UTF-8 JSON", naming no file."""
    if layout == "all_data":
        root, extra = make_all_data(tmp_path), ()
        path, text = root / "all_data.json", "Red."
    else:
        root, extra = make_llava(tmp_path), LLAVA_OPTIONS
        path, text = root / "llava_instruct_150k.json", "It is green."
    path.write_bytes(path.read_bytes().replace(text.encode(), "Rouge, pr\u00e9cis\u00e9ment.".encode("latin-1")))
    with pytest.raises(ValueError, match=rf"instruction file {path} is not UTF-8 text: line 1 holds .*pr\\xe9cis"):
        build(root, *extra)


def test_an_all_data_split_that_is_not_a_list_is_named(tmp_path):
    """A split written as an object keyed by qid was read entry by entry as its keys."""
    root = make_all_data(tmp_path)
    data = json.loads((root / "all_data.json").read_text())
    data["all"] = {entry["qid"]: entry for entry in data["all"]}
    (root / "all_data.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"all_data.json: split 'all' \(build_info.split\) holds a dict; a split is a "
                                         r"list of entries"):
        build(root)


@pytest.mark.parametrize("layout", ["all_data", "llava"])
def test_instruction_tuning_trains_two_iterations(tmp_path, layout):
    if layout == "all_data":
        root, extra = make_all_data(tmp_path / "data"), []
    else:
        root = make_llava(tmp_path / "data")
        extra = LLAVA_OPTIONS
    options = [f"datasets.ademvl_instruct.build_info.data_root={root}", f"run.output_dir={tmp_path / 'out'}", *extra]
    run_module("lavis_ademvl.train", DEBUG_CONFIG, options, tmp_path)  # 4 conversations, batch 2: 2 iterations
    (job,) = job_dirs(tmp_path / "out")
    (train_log,) = [entry for entry in read_jsonl(job / "log.txt") if "train_loss" in entry]
    assert float(train_log["train_loss"]) > 0
    assert (job / "checkpoint_0.pth").is_file()
