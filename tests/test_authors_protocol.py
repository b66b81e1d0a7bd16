"""The paper configs feed a model exactly the text, tokens and pixels the authors' code feeds theirs.

Each `their_*` function below is our literal re-statement of the authors' code (Hao840/ADEM-VL: util/base_prompt.py,
util/datasets.py, util/coco_karpathy_dataset.py, engine.py, adem/model.py, eval_sqa.py, eval_caption.py), written
from reading it; the project's code is checked against it on generated data, with a real sentencepiece model.
"""
from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import sentencepiece as spm
import torch
from cli import REPO
from helpers import TINY_CONFIG, tiny_model
from instruct_fixtures import make_all_data
from lavis.common.registry import registry
from lavis.processors import randaugment
from PIL import Image, ImageOps
from scienceqa_fixture import make_scienceqa
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from transformers import LlamaTokenizerFast

from lavis_ademvl.common.config_files import load_experiment
from lavis_ademvl.datasets.datasets.scienceqa_datasets import collate
from lavis_ademvl.models.tokenization import load_tokenizer
from lavis_ademvl.processors.ademvl_processors import autocontrast
from lavis_ademvl.tasks.captioning import compile_caption_pattern, extract_caption

PROJECTS = REPO / "projects" / "ademvl"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_*
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SLOT = "[cls]"  # where the [cls] embedding goes
IGNORED = None  # a position without loss
LONG_CAPTION = ("A man in a red jacket riding a brown horse along the beach near the water, while a small dog runs "
                "behind him and gulls fly over the waves at sunset.")

# ---------------------------------------------------------------------- the authors' code, restated

THEIR_OPTIONS = ["A", "B", "C", "D", "E"]


def their_example(problem: dict, prompt_format: str, use_caption: bool) -> tuple[str, str]:
    """util/base_prompt.py: build_prompt -> create_training_example, for the QCM-A and CQM-A formats."""
    question = problem["question"]
    context = " ".join([problem["hint"], problem["caption"] if use_caption else ""]).strip()
    if context == "":
        context = "N/A"
    choice = " ".join(f"({THEIR_OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"]))
    answer = THEIR_OPTIONS[problem["answer"]]
    if prompt_format.split("-")[0] == "CQM":
        text = f"Context: {context}\nQuestion: {question}\nOptions: {choice}\n"
    else:
        text = f"Question: {question}\nContext: {context}\nOptions: {choice}\n"
    text += "Response:"
    text = "\n" + text
    output = f"The answer is {answer}."
    return text.replace("  ", " ").strip(), output.replace("  ", " ").strip()


def their_eval_prompt(problem: dict) -> str:
    """eval_sqa.py: PromptArgs (QCM-A, use_caption True), build_prompt(...)[0] + 'The answer is'."""
    return their_example(problem, "QCM-A", True)[0] + "The answer is"


def their_encode(sp, text: str, bos: bool, eos: bool) -> list[int]:
    """adem/tokenizer.py Tokenizer.encode."""
    tokens = sp.encode(text)
    if bos:
        tokens = [sp.bos_id()] + tokens
    if eos:
        tokens = tokens + [sp.eos_id()]
    return tokens


def their_training_sequence(sp, prompt: str, answer: str, has_image: bool, max_words: int) -> tuple[list, list]:
    """util/datasets.py tokenize (example = prompt + answer, labels after the prompt's own tokens, cut at max_words),
    engine.py's image prefixes, adem/model.py insert_image_embeds and its cut to the padded length. Padding left out."""
    example = their_encode(sp, prompt + answer, bos=True, eos=True)
    prompt_tokens = their_encode(sp, prompt, bos=True, eos=False)
    example = example[:max_words]
    labels = list(example)
    labels[: len(prompt_tokens)] = [IGNORED] * min(len(prompt_tokens), len(labels))
    if has_image:
        prefix = their_encode(sp, "Image: ", bos=False, eos=False)
        tokens = example[:1] + prefix + [SLOT] + example[1:]
        labels = labels[:1] + [IGNORED] * (len(prefix) + 1) + labels[1:]
    else:
        prefix = their_encode(sp, "Image: N/A", bos=False, eos=False)
        tokens = example[:1] + prefix + example[1:]
        labels = labels[:1] + [IGNORED] * len(prefix) + labels[1:]
    return tokens[:max_words], labels[:max_words]


def their_generation_prompt(sp, prompt: str, has_image: bool, max_gen_len: int, max_seq_len: int = 512) -> list:
    """adem/model.py generate for one prompt: the tokens before the first new one (their code has max_seq_len 512)."""
    if has_image:
        tokens = their_encode(sp, "Image: ", bos=True, eos=False) + [SLOT] + their_encode(sp, prompt, bos=False, eos=False)
    else:
        tokens = their_encode(sp, "Image: N/A", bos=True, eos=False) + their_encode(sp, prompt, bos=False, eos=False)
    total_len = min(max_seq_len, max_gen_len + len(tokens))
    return tokens[: total_len - max_gen_len]


def their_pre_caption(caption: str, max_words: int = 50) -> str:
    """util/coco_karpathy_dataset.py pre_caption."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    caption_words = caption.split(" ")
    if len(caption_words) > max_words:
        caption = " ".join(caption_words[:max_words])
    return caption


def their_caption_training_sequence(sp, raw_caption: str) -> tuple[list, list]:
    """coco_karpathy_train(prompt='a picture of ', max_words=30).__getitem__: tokenize(prompt, prompt + caption)."""
    prompt = "a picture of "
    caption = prompt + their_pre_caption(raw_caption, 30)
    return their_training_sequence(sp, prompt, caption, has_image=True, max_words=30)


def their_caption(decoded: str) -> str:
    """eval_caption.py: the first 'picture of (.+)' group of the decoded new tokens, else all of them."""
    pred = re.compile(r"picture of (.+)").findall(decoded)
    return pred[0] if len(pred) >= 1 else decoded


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def quirky_sqa(tmp_path_factory):
    """The ScienceQA fixture with captions, and the spacing the authors' clean-up acts on: runs of 2 and 3 spaces,
    leading and trailing spaces, in questions, hints and options."""
    root = make_scienceqa(tmp_path_factory.mktemp("sqa_quirky"), {"train": 8, "val": 4, "test": 8}, seed=1, captions=True)
    problems = json.loads((root / "problems.json").read_text())
    for index, problem in enumerate(problems.values()):
        problem["question"] = ["What  colour is the square?", " What colour   is the square? ", "What colour is it?"][index % 3]
        if problem["hint"]:
            problem["hint"] = "  " + problem["hint"].replace(" is ", "   is ") + "  "
        problem["choices"][0] = problem["choices"][0] + "  "
    (root / "problems.json").write_text(json.dumps(problems))
    return root


def scienceqa_datasets(cfg_path, root, options=()):
    config = load_experiment(cfg_path, [f"datasets.scienceqa_mc.build_info.data_root={root}", *options]).config
    return registry.get_builder_class("scienceqa_mc")(config.datasets.scienceqa_mc).build_datasets()


def with_captions(root) -> dict[str, dict]:
    """problems.json as their datasets see it: each problem's 'caption' from captions.json, else ''."""
    problems = json.loads((root / "problems.json").read_text())
    captions = json.loads((root / "captions.json").read_text())["captions"]
    for qid in problems:
        problems[qid]["caption"] = captions[qid] if qid in captions else ""
    return problems


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """A small sentencepiece BPE model trained here as LLaMA's is configured (byte fallback, dummy prefix, spaces
    kept), and the transformers LlamaTokenizerFast of it, saved as a folder like huggyllama/llama-7b's."""
    lines = ["Question: What colour is the square?", "Context: The square is red. A photo of a square on black.",
             "Options: (A) red (B) green (C) blue", "Response:The answer is B.", "Image: N/A",
             "a picture of a man riding a horse on the beach", "What colour is it?"] * 10
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("llama_tokenizer")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # transformers' LlamaConverter pipeline, its vocabulary and merges read through sentencepiece (its own extractor
    # changed API in transformers 5 and needs protobuf).
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = sentencepiece_bpe_merges(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    # LLaMA's tokenizer.json prepends <s> (transformers 4.x's LlamaTokenizerFast sets this itself; 5.x keeps the file's)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    LlamaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                       legacy=True).save_pretrained(folder)
    saved = load_tokenizer(str(folder))  # as the model loads it, on transformers 4.x and 5.x
    for text in ("Image: ", "a picture of ", "Question:  x\nResponse:The answer is B.", " ümlaut  é "):
        assert saved(text).input_ids == [sp.bos_id(), *sp.encode(text)]
    return sp, folder


def sentencepiece_bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """A SentencePiece BPE model's merges: each piece split in two pieces of the vocabulary, in the order the merged
    pieces were learnt (their ids), ties by the ids of the two halves."""
    merges = []
    for piece, piece_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def llama_model(folder, **overrides):
    """The tiny random model on the sentencepiece tokenizer."""
    llm_config = {**TINY_CONFIG["llm_config"], "vocab_size": 400, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2}
    return tiny_model(tokenizer=str(folder), llm_config=llm_config, **overrides)


def our_sequence(encoded, row: int) -> tuple[list, list]:
    """(tokens with the image slot marked, labels with IGNORED) of one row of an EncodedBatch, padding removed."""
    keep = encoded.attention_mask[row].bool()
    ids, slots, labels = (tensor[row][keep].tolist() for tensor in (encoded.input_ids, encoded.slot_mask, encoded.labels))
    return [SLOT if slot else token for token, slot in zip(ids, slots)], [IGNORED if label == -100 else label for label in labels]


# ---------------------------------------------------------------------- ScienceQA text


def test_paper_configs_write_their_scienceqa_text(quirky_sqa):
    problems = with_captions(quirky_sqa)
    train = scienceqa_datasets(PROJECTS / "sqa.yaml", quirky_sqa)["train"]
    for index in range(len(train)):
        item = train[index]
        prompt, answer = their_example(problems[item["question_id"]], "CQM-A", use_caption=False)  # train.py defaults
        assert item["text_input"] + item["answer_cue"] == prompt  # the model's labels start after this text's tokens
        assert item["text_output"] == answer
    assert "   is" in problems[train.pids[1]]["hint"] and "  is" in train[1]["text_input"]  # one pass, as theirs

    for cfg in (PROJECTS / "sqa.yaml", PROJECTS / "eval" / "sqa.yaml"):
        test = scienceqa_datasets(cfg, quirky_sqa)["test"]
        for index in range(len(test)):
            item = test[index]
            problem = problems[item["question_id"]]
            assert item["text_input"] + item["answer_cue"] == their_eval_prompt(problem)
            letters = THEIR_OPTIONS[: len(problem["choices"])]
            assert [item["text_input"] + item["answer_cue"] + c for c in item["candidates"]] == [
                f"{their_eval_prompt(problem)} {letter}." for letter in letters
            ]
        captioned = [(i, problems[pid]["caption"]) for i, pid in enumerate(test.pids) if problems[pid]["caption"]]
        assert any(caption in test[i]["text_input"] for i, caption in captioned)


def test_token_ids_and_labels_equal_theirs(quirky_sqa, sentencepiece_tokenizer):
    sp, folder = sentencepiece_tokenizer
    problems = with_captions(quirky_sqa)
    datasets = scienceqa_datasets(PROJECTS / "sqa.yaml", quirky_sqa, ["datasets.scienceqa_mc.vis_processor.train.image_size=32",
                                                                       "datasets.scienceqa_mc.vis_processor.eval.image_size=32"])
    train = [datasets["train"][i] for i in range(len(datasets["train"]))]
    test = [datasets["test"][i] for i in range(len(datasets["test"]))]
    assert {item["has_image"] for item in train} == {0, 1}
    paper = load_experiment(PROJECTS / "sqa.yaml").config.model
    for max_len in (paper.max_len, 40, 20):  # the paper's 512, a limit that cuts some answers, one that cuts all
        model = llama_model(folder, truncation=paper.truncation, max_len=max_len)
        encoded = model.encode_batch(collate(train), with_answer=True)
        for row, item in enumerate(train):
            prompt, answer = their_example(problems[item["question_id"]], "CQM-A", use_caption=False)
            assert our_sequence(encoded, row) == their_training_sequence(sp, prompt, answer, bool(item["has_image"]), max_len)
        encoded = model.encode_batch(collate(test), with_answer=False, reserve=1)  # one new token, as eval_sqa.py
        for row, item in enumerate(test):
            prompt = their_eval_prompt(problems[item["question_id"]])
            expected = their_generation_prompt(sp, prompt, bool(item["has_image"]), 1, max_len)
            assert our_sequence(encoded, row) == (expected, [IGNORED] * len(expected))
    # With the 20-token limit every answer was cut away: the loss is zero, and still reaches every trainable weight.
    loss = model(collate(train))["loss"]
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_caption_tokens_equal_theirs(sentencepiece_tokenizer):
    sp, folder = sentencepiece_tokenizer
    config = load_experiment(PROJECTS / "coco_caption.yaml", ["datasets.coco_caption.build_info.data_root=/unused"]).config
    text_cfg = config.datasets.coco_caption.text_processor.train
    text_processor = registry.get_processor_class(text_cfg.name).from_config(text_cfg)
    model = llama_model(folder, prompt=config.model.prompt, truncation=config.model.truncation, max_len=config.model.max_len)
    raw = ["A dog.", LONG_CAPTION, "Two  cats (asleep) on a sofa!"]
    # LAVIS's caption datasets give text_input = the text processor's output; the model puts its prompt before it.
    batch = {"image": torch.zeros(3, 3, 32, 32), "text_input": [text_processor(c) for c in raw]}
    encoded = model.encode_batch(batch, with_answer=True)
    for row, caption in enumerate(raw):
        assert our_sequence(encoded, row) == their_caption_training_sequence(sp, caption)
    assert len(our_sequence(encoded, 1)[0]) == 30  # the long caption was cut, its eos too
    eval_model = llama_model(folder, prompt=config.model.prompt, truncation=config.model.truncation,
                             max_len=load_experiment(PROJECTS / "eval" / "coco_caption.yaml",
                                                 ["datasets.coco_caption.build_info.data_root=/unused"]).config.model.max_len)
    for generator in (model, eval_model):
        encoded = generator.encode_batch({"image": torch.zeros(1, 3, 32, 32)}, with_answer=False, reserve=config.run.max_len)
        expected = their_generation_prompt(sp, "a picture of", True, max_gen_len=20)
        assert our_sequence(encoded, 0) == (expected, [IGNORED] * len(expected))


def test_instruction_tokens_equal_theirs(tmp_path, sentencepiece_tokenizer):
    """util/datasets.py InstrcutDataSet: prompt = the entry's instruction, target = its answer, tokenized as their
    ScienceQA examples are (the same tokenize), on projects/ademvl/instruct.yaml's model text settings."""
    sp, folder = sentencepiece_tokenizer
    root = make_all_data(tmp_path)
    entries = json.loads((root / "all_data.json").read_text())["all"]
    entries[1]["answer"] = LONG_CAPTION * 2  # cut at max_len below
    (root / "all_data.json").write_text(json.dumps({"all": entries}))
    config = load_experiment(PROJECTS / "instruct.yaml", [f"datasets.ademvl_instruct.build_info.data_root={root}",
                                                          "datasets.ademvl_instruct.vis_processor.train.image_size=32"]).config
    train = registry.get_builder_class("ademvl_instruct")(config.datasets.ademvl_instruct).build_datasets()["train"]
    items = [train[i] for i in range(len(train))]
    for max_len in (config.model.max_len, 40):
        model = llama_model(folder, truncation=config.model.truncation, max_len=max_len)
        encoded = model.encode_batch(collate(items), with_answer=True)
        for row, entry in enumerate(entries):
            expected = their_training_sequence(sp, entry["instruction"], entry["answer"], entry["image"] is not None, max_len)
            assert our_sequence(encoded, row) == expected


def test_caption_decoding_follows_eval_caption():
    config = load_experiment(PROJECTS / "eval" / "coco_caption.yaml", ["datasets.coco_caption.build_info.data_root=/x"]).config
    assert (config.run.num_beams, config.run.max_len, config.run.min_len) == (1, 20, 0)  # greedy, 20 tokens
    pattern = compile_caption_pattern(config.run.caption_pattern)
    for text in ["a picture of a dog on a bench", "a dog", "picture of two cats\nand more", "a picture of", ""]:
        assert extract_caption(text, pattern) == their_caption(text)


# ---------------------------------------------------------------------- pixels


def processor(cfg_path, dataset: str, role: str):
    config = load_experiment(cfg_path, [f"datasets.{dataset}.build_info.data_root=/unused"]).config
    cfg = config.datasets[dataset].vis_processor[role]
    return registry.get_processor_class(cfg.name).from_config(cfg)


@pytest.fixture(scope="module")
def wide_image():
    pixels = np.random.default_rng(0).integers(0, 256, (150, 260, 3)).astype(np.uint8)
    pixels[40:110, 90:170] = (20, 200, 40)
    return Image.fromarray(pixels)


def test_scienceqa_pixels_are_theirs(wide_image):
    theirs = transforms.Compose([transforms.Resize((224, 224), interpolation=Image.BICUBIC), transforms.ToTensor(),
                                 transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # util/datasets.py, eval_sqa.py
    expected = theirs(wide_image)
    roles = ((PROJECTS / "sqa.yaml", "train"), (PROJECTS / "sqa.yaml", "eval"), (PROJECTS / "eval" / "sqa.yaml", "eval"))
    for cfg, role in roles:
        assert torch.equal(processor(cfg, "scienceqa_mc", role)(wide_image), expected), (cfg, role)


def test_caption_pixels_are_theirs(wide_image):
    theirs_eval = transforms.Compose([transforms.Resize((224, 224), interpolation=InterpolationMode.BICUBIC),
                                      transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])
    ours_eval = processor(PROJECTS / "eval" / "coco_caption.yaml", "coco_caption", "eval")
    assert torch.equal(ours_eval(wide_image), theirs_eval(wide_image))

    # Their training transform, with their RandomAugment: LAVIS's, except that their AutoContrast is PIL's.
    their_augment = randaugment.RandomAugment(2, 5, isPIL=True, augs=[
        "Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY", "TranslateX",
        "TranslateY", "Rotate"])
    theirs_train = transforms.Compose([
        transforms.RandomResizedCrop(224, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), their_augment, transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])
    ours = processor(PROJECTS / "coco_caption.yaml", "coco_caption", "train")
    dim = wide_image.point(lambda value: 60 + value // 2)  # no channel reaches 0: LAVIS's AutoContrast breaks there
    lavis_autocontrast = randaugment.func_dict["AutoContrast"]
    try:
        randaugment.func_dict["AutoContrast"] = lambda image: np.array(ImageOps.autocontrast(Image.fromarray(image)))
        for seed in range(12):
            np.random.seed(seed)
            torch.manual_seed(seed)
            expected = theirs_train(dim)
            np.random.seed(seed)
            torch.manual_seed(seed)
            assert torch.equal(ours(dim), expected), seed
    finally:
        randaugment.func_dict["AutoContrast"] = lavis_autocontrast
    array = np.array(dim)
    assert np.array_equal(autocontrast(array), np.array(ImageOps.autocontrast(dim)))
    with np.errstate(over="ignore"):
        assert not np.array_equal(lavis_autocontrast(array), autocontrast(array))  # why blip_image_train is not used


# ---------------------------------------------------------------------- choices are config keys with their values


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: tiny_model(truncation="start"), r"truncation='start' is not supported; choose one of \['middle', 'end'\]"),
        (lambda: registry.get_processor_class("ademvl_image_eval").from_config({"resize": "crop"}),
         r"ademvl_image_eval.resize='crop' is not supported; choose one of \['center_crop', 'squash'\]"),
        (lambda: registry.get_processor_class("ademvl_image_train").from_config({"augment": "autoaugment"}),
         r"ademvl_image_train.augment='autoaugment' is not supported; choose one of \['none', 'randaugment'\]"),
        (lambda: compile_caption_pattern("picture of .+"), "needs exactly one group"),
    ],
)
def test_choices_name_their_allowed_values(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "override, error, message",
    [
        ("datasets.scienceqa_mc.prompt_style=theirs", ValueError,
         r"datasets.scienceqa_mc.prompt_style='theirs' is not supported; choose one of \['authors', 'ours'\]"),
        ("datasets.scienceqa_mc.prompt_format={train: CQM-A, test: QCM-A}", KeyError,
         r"prompt_format per split needs exactly the keys \['train', 'eval'\]"),
        ("datasets.scienceqa_mc.build_info.use_caption=sometimes", ValueError, "use_caption='sometimes' must be true or false"),
        # sqa.yaml writes the authors' prompts, whose cue is theirs: a cue given there would be ignored.
        ("datasets.scienceqa_mc.answer_cue='Answer:'", ValueError,
         "datasets.scienceqa_mc.answer_cue='Answer:' applies to prompt_style ours"),
        (("datasets.scienceqa_mc.prompt_style=ours", "datasets.scienceqa_mc.answer_cue='Answer: '"), ValueError,
         "answer_cue must be non-empty text not ending in a space"),
    ],
)
def test_bad_scienceqa_settings_are_named(quirky_sqa, override, error, message):
    with pytest.raises(error, match=message):
        scienceqa_datasets(PROJECTS / "sqa.yaml", quirky_sqa, [override] if isinstance(override, str) else override)


def test_answer_cue_replaces_ours_in_training_and_evaluation(quirky_sqa):
    """`answer_cue` is the text between the options and the answer, in the training target's sequence and in the
    evaluation prompt alike; without it, ours stays "Answer: The answer is"."""
    style = ["datasets.scienceqa_mc.prompt_style=ours", "datasets.scienceqa_mc.answer_format=text"]
    default = scienceqa_datasets(PROJECTS / "sqa.yaml", quirky_sqa, style)
    short = scienceqa_datasets(PROJECTS / "sqa.yaml", quirky_sqa, [*style, "datasets.scienceqa_mc.answer_cue='Answer:'"])
    for split in ("train", "test"):
        before, after = default[split][0], short[split][0]
        assert before["answer_cue"] == "Answer: The answer is" and after["answer_cue"] == "Answer:"
        assert after["text_input"] == before["text_input"] and after["text_output"] == before["text_output"]
        assert after["text_output"] == f" {after['options'][quirky_sqa_answer(quirky_sqa, after['question_id'])]}."


def quirky_sqa_answer(root, pid: str) -> int:
    return json.loads((root / "problems.json").read_text())[pid]["answer"]


def shipped_experiment_configs() -> list:
    """Every experiment yaml under projects/ademvl (the ablation grids, lists of rows, are not experiments)."""
    from omegaconf import OmegaConf

    return sorted(path for path in PROJECTS.rglob("*.yaml") if "rows" not in OmegaConf.load(path))


@pytest.mark.parametrize("cfg_path", shipped_experiment_configs(), ids=lambda path: str(path.relative_to(PROJECTS)))
def test_every_shipped_experiment_config_is_valid(cfg_path):
    """Model keys, the ScienceQA settings of both roles and every processor are accepted (no weights needed)."""
    from lavis_ademvl.common.config_files import load_with_includes
    from lavis_ademvl.models.config import TRUNCATIONS, AdemVLConfig

    names = list(load_with_includes(cfg_path).get("datasets") or {})
    options = [f"datasets.{name}.build_info.data_root=/unused" for name in names]
    if "compare" in load_with_includes(cfg_path):  # `ademvl compare`'s: its first entry's experiment, as it builds it
        from lavis_ademvl.cli.compare import entry_config

        config = load_experiment(entry_config(cfg_path, 0, options)[1]).config
    else:
        config = load_experiment(cfg_path, options).config
    assert AdemVLConfig.from_dict(config.model).truncation in TRUNCATIONS
    for name in names:
        dataset = config.datasets[name]
        for kind in ("vis_processor", "text_processor"):
            for role, cfg in (dataset.get(kind) or {}).items():
                assert registry.get_processor_class(cfg.name).from_config(cfg) is not None, (name, kind, role)
        if name == "scienceqa_mc":
            builder = registry.get_builder_class(name)(dataset)
            builder.checked_build_info()
            for training in (True, False):
                builder.question_format(training)
                builder.uses_captions(training)
    assert config.run.task
