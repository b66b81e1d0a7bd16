"""The ADEM-VL model on tiny random LLaMA + CLIP configs (real Hugging Face classes)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import make_batch, tiny_config, tiny_model
from omegaconf import OmegaConf

from lavis_ademvl.models.ademvl import AdemVL
from lavis_ademvl.models.config import AdemVLConfig, markdown_table
from lavis_ademvl.models.cpu_arithmetic import (
    BF16_MIN_SPEEDUP,
    auto_cpu_dtype,
    choose_cpu_dtype,
    cpu_has_native_bfloat16,
    describe_cpu_dtype,
)
from lavis_ademvl.models.fusion import adaptive_cross_attention, multiscale_pool

TRAINABLE_GROUPS = {"visual_key_offset", "visual_value_offset", "visual_proj", "cls_proj", "vision_adapters"}


def test_trainable_parameters_are_exactly_the_design_groups():
    model = tiny_model()
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == TRAINABLE_GROUPS
    counts = model.parameter_counts()
    d, width, hidden, rank = 64, 32, 16, 4
    expected = {
        "trainable/visual_key_offset": 20 * d,
        "trainable/visual_value_offset": 20 * d,
        "trainable/visual_proj": width * hidden + hidden + hidden * d + d,
        "trainable/cls_proj": width * hidden + hidden + hidden * d + d,
        "trainable/vision_adapters": 2 * (2 * width * rank),  # 3 CLIP blocks, the last never runs
    }
    for key, value in expected.items():
        assert counts[key] == value, key
    assert counts["trainable"] == sum(expected.values())
    assert counts["total"] > counts["trainable"]


def test_gradients_reach_trainable_parameters_only(device):
    model = tiny_model().to(device)
    model.train()
    # fc2 starts at zero, so fc1 only gets a gradient once fc2 moved: move it first.
    with torch.no_grad():
        for adapter in model.vision_adapters:
            adapter.fc2.weight.normal_(0, 0.1)
    model(make_batch(device=device))["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_loss_decreases_on_a_fixed_batch(device):
    torch.manual_seed(0)
    model = tiny_model().to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch(device=device)
    losses = []
    for _ in range(12):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_loss_and_scores_equal_those_of_full_logits(device):
    """Logits are computed for the labelled columns only; loss and candidate scores must not change."""
    model = tiny_model().to(device).eval()
    batch = dict(make_batch(device=device), text_output=[" A.", " a much longer answer.", " B", " yes, C."])
    full_logits = []
    handle = model.llm.register_forward_hook(lambda module, args, output: full_logits.append(output.logits))
    try:
        model._llm_keeps_logits = False  # the reference: Hugging Face's logits for every position
        reference_scores = model.score_candidates(batch, [[a] for a in batch["text_output"]])
        model(batch)
        labels = model.encode_batch(batch, with_answer=True).labels
        reference_loss = torch.nn.functional.cross_entropy(
            full_logits[-1][:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
        )
        assert full_logits[-1].shape[1] == labels.shape[1]
        model._llm_keeps_logits = True
        full_logits.clear()
        loss = model(batch)["loss"]
        scores = model.score_candidates(batch, [[a] for a in batch["text_output"]])
    finally:
        handle.remove()
    assert full_logits[0].shape[1] < labels.shape[1] // 2  # the LLM really projected fewer positions
    torch.testing.assert_close(loss, reference_loss)
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(reference_scores))


def full_sequence_scores(model, samples: dict, answer_list: list[list[str]]) -> list[list[float]]:
    """The slow restatement of rank scoring: each (sample, candidate) pair run alone, whole, through the LLM, and the
    log-probabilities of its labelled tokens summed."""
    scores = []
    for row, candidates in enumerate(answer_list):
        row_scores = []
        for candidate in candidates:
            pair = {
                "image": samples["image"][row : row + 1],
                "has_image": samples["has_image"][row : row + 1],
                "text_input": [samples["text_input"][row]],
                "answer_cue": samples["answer_cue"],
                "text_output": [candidate],
            }
            with torch.no_grad():
                logits, encoded = model.answer_logits(pair, with_answer=True)
            labels = encoded.labels[0]
            targets = labels[labels.shape[0] + 1 - logits.shape[1] :]
            logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            row_scores.append(sum((logprobs[t, int(token)].item() for t, token in enumerate(targets) if token != -100), 0.0))
        scores.append(row_scores)
    return scores


@pytest.mark.parametrize(
    "overrides",
    [{}, {"fusion": "none"}, {"fusion": "prefix"}, {"num_visual_input_tokens": 4}, {"max_len": 120},
     {"max_len": 100, "truncation": "end"}],
    ids=["adem", "none", "prefix", "visual-input-tokens", "prompt-cut-in-the-middle", "answers-cut-at-the-end"],
)
@pytest.mark.parametrize("rows_per_pass", [64, 3])
def test_candidate_scores_equal_each_pair_scored_alone(overrides, rows_per_pass, device):
    """Rank scoring runs each sample's shared prompt once (KV cache) and then its candidates; the scores must be those
    of every pair run whole and alone, for candidates of different lengths and counts, with and without an image,
    when truncation cuts the prompt differently for long answers, and when it cuts answers away."""
    model = tiny_model(**overrides).to(device).eval()
    batch = make_batch(batch=4, has_image=[1, 0, 1, 1], device=device)
    answer_list = [
        [" A.", " B, because the picture shows it clearly.", " yes"],
        [" C."],
        [" a much longer answer than the others, long enough to need the prompt cut", " D.", " E", " no."],
        [" A.", " A. Really."],
    ]
    scores = model.score_candidates(batch, answer_list, rows_per_pass=rows_per_pass)
    reference = full_sequence_scores(model, batch, answer_list)
    assert [len(row) for row in scores] == [len(row) for row in answer_list]
    torch.testing.assert_close(torch.tensor(sum(scores, [])), torch.tensor(sum(reference, [])), rtol=1e-4, atol=1e-4)
    assert len(set(sum(scores, []))) > 5  # the candidates really were told apart


def test_cpu_bfloat16_trains_close_to_float32():
    """cpu_dtype: bfloat16 runs the frozen towers in bfloat16 under CPU autocast; trainable weights stay float32."""
    batch = make_batch()
    losses = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = tiny_model(cpu_dtype=dtype).eval()
        assert model.llm.dtype == getattr(torch, dtype) and model.vision_tower.dtype == getattr(torch, dtype)
        loss = model(batch)["loss"]
        loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 and p.grad is not None for p in trainable)
        losses[dtype] = loss.item()
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)


def test_cpu_dtype_auto_is_float32_without_native_bfloat16_and_measured_with_it(tmp_path, monkeypatch):
    with_bf16, without = tmp_path / "bf16", tmp_path / "plain"
    with_bf16.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu_has_native_bfloat16(with_bf16) and not cpu_has_native_bfloat16(without)
    assert not cpu_has_native_bfloat16(tmp_path / "missing")
    # The decision, from given step times: bfloat16 only when native and at least BF16_MIN_SPEEDUP faster.
    assert choose_cpu_dtype(False, None)[0] == torch.float32
    assert choose_cpu_dtype(False, {"float32": 9.0, "bfloat16": 1.0})[0] == torch.float32
    assert choose_cpu_dtype(True, {"float32": 2.0, "bfloat16": 1.0}) == (
        torch.bfloat16, "the CPU has native bfloat16 and a frozen linear step measured 1000.0 ms in bfloat16 against "
        "2000.0 ms in float32 (2.00x)")
    assert choose_cpu_dtype(True, {"float32": BF16_MIN_SPEEDUP, "bfloat16": 1.0})[0] == torch.bfloat16
    assert choose_cpu_dtype(True, {"float32": 1.1, "bfloat16": 1.0})[0] == torch.float32  # not clearly faster
    assert choose_cpu_dtype(True, {"float32": 1.0, "bfloat16": 1.5})[0] == torch.float32  # the issue #37 Xeon's case
    # Without native bfloat16: float32, with nothing measured or cached.
    cache = tmp_path / "cache" / "cpu_dtype.json"
    assert auto_cpu_dtype(without, cache)[0] == torch.float32 and not cache.exists()
    # With it: measured once and cached under the CPU model; a later call decides from the cache.
    dtype, reason = auto_cpu_dtype(with_bf16, cache)
    (key, seconds), = json.loads(cache.read_text()).items()
    assert key.startswith("Some Xeon | ") and seconds["float32"] > 0 and seconds["bfloat16"] > 0
    assert (dtype, reason) == choose_cpu_dtype(True, seconds)
    cache.write_text(json.dumps({key: {"float32": 3.0, "bfloat16": 1.0}}))
    assert auto_cpu_dtype(with_bf16, cache)[0] == torch.bfloat16
    cache.write_text(json.dumps({key: {"float32": 1.0, "bfloat16": 3.0}}))
    assert auto_cpu_dtype(with_bf16, cache)[0] == torch.float32
    # The line the demo prints names the path, the CPU and the reason.
    assert describe_cpu_dtype("bfloat16", with_bf16) == (
        torch.bfloat16, "bfloat16, set by model.cpu_dtype (this CPU, Some Xeon, has native bfloat16)")
    assert describe_cpu_dtype("auto", with_bf16, cache) == (
        torch.float32, "float32, chosen by model.cpu_dtype=auto on this CPU (Some Xeon): the CPU has native bfloat16, "
        "but a frozen linear step measured 3000.0 ms in bfloat16 against 1000.0 ms in float32 (0.33x), under the 1.2x "
        "it takes")
    # The model computes in what auto resolves to on this machine.
    monkeypatch.setenv("LAVIS_ADEMVL_CACHE", str(tmp_path / "cache"))
    assert tiny_model(cpu_dtype="auto").llm.dtype == auto_cpu_dtype()[0]


def test_samples_without_images_ignore_their_placeholder(device):
    model = tiny_model().to(device).eval()
    batch = make_batch(has_image=[0, 0, 0, 0], device=device)
    loss = model(batch)["loss"]
    assert torch.isfinite(loss)
    other = dict(batch, image=torch.randn(4, 3, 32, 32, device=device))
    torch.testing.assert_close(model(other)["loss"], loss)
    # With an image the same question sees it.
    with_image = dict(batch, has_image=torch.ones(4, dtype=torch.long, device=device))
    assert not torch.allclose(model(with_image)["loss"], model(dict(with_image, image=other["image"]))["loss"])


def test_decoder_layer_adds_the_reference_fusion(device):
    model = tiny_model(alpha=0.7, drop_ratio=0.25).to(device).eval()
    batch = make_batch(2, has_image=[1, 0], device=device)
    captured = []
    layer = model.llm.model.layers[1]
    handle = layer.mlp.register_forward_hook(lambda m, args, out: captured.append((args[0], out)))
    try:
        model(batch)
    finally:
        handle.remove()
    mlp_in, fused_out = captured[0]
    with torch.no_grad():
        features = model.get_image_features(batch["image"])
        pooled = multiscale_pool(features[:, 1:], [16, 4])
        x_v = 0.01 * model.visual_proj(pooled) * torch.tensor([1.0, 0.0], device=device).view(2, 1, 1)
        reference = type(layer.mlp).forward(layer.mlp, mlp_in) + 0.7 * adaptive_cross_attention(
            mlp_in, x_v + model.visual_key_offset, x_v + model.visual_value_offset, 0.25, "silu"
        )
    torch.testing.assert_close(fused_out, reference, rtol=1e-5, atol=1e-6)


def test_truncation_keeps_slot_cue_and_answer():
    model = tiny_model(max_len=80)
    long_prompt = "Question: " + "very long context " * 50 + "END\n"
    batch = {
        "image": torch.randn(2, 3, 32, 32),
        "has_image": torch.tensor([1, 0]),
        "text_input": [long_prompt, long_prompt],
        "answer_cue": "Answer: The answer is",
        "text_output": [" C.", " C."],
    }
    encoded = model.encode_batch(batch, with_answer=True)
    assert encoded.input_ids.shape[1] == 80
    assert encoded.slot_mask[0].sum() == model.slot_length == 1 and encoded.slot_mask[1].sum() == 0
    tokenizer = model.tokenizer
    for row in range(2):
        text = tokenizer.decode(encoded.input_ids[row][encoded.attention_mask[row].bool()], skip_special_tokens=True)
        assert text.endswith("END\nAnswer: The answer is C.")
        assert text.startswith("Image: ") and "Question: very" in text
        labels = encoded.labels[row][encoded.labels[row] != -100].tolist()
        assert tokenizer.decode(labels) == " C.</s>"
    # The [cls] slot sits right after "Image: ".
    first = encoded.attention_mask[0].argmax()
    slot_position = int(encoded.slot_mask[0].nonzero()[0])
    assert tokenizer.decode(encoded.input_ids[0, first + 1 : slot_position]) == "Image: "
    assert torch.isfinite(model(batch)["loss"])


def test_answer_longer_than_max_len_is_an_error():
    model = tiny_model(max_len=20)
    batch = make_batch(2)
    batch["text_output"] = [" a very long answer that cannot fit"] * 2
    with pytest.raises(ValueError, match="more than max_len=20"):
        model(batch)


def test_truncation_end_keeps_room_for_the_new_tokens():
    model = tiny_model(truncation="end", max_len=40)
    batch = make_batch(2)
    encoded = model.encode_batch(batch, with_answer=False, reserve=10)
    assert encoded.input_ids.shape[1] == 30  # the prompt's start: 40 - 10 new tokens
    full = tiny_model(truncation="end").encode_batch(batch, with_answer=False)
    for row in range(2):
        assert torch.equal(encoded.input_ids[row], full.input_ids[row][full.attention_mask[row].bool()][:30])
    assert len(model.generate(batch, num_beams=1, max_length=10, min_length=10)) == 2
    # bos + "Image: " + [cls] take 9 byte-level tokens: 20 - 15 leaves none for the prompt.
    with pytest.raises(ValueError, match="max_len=20 leaves no room for the prompt when generating 15 tokens"):
        tiny_model(truncation="end", max_len=20).generate(batch, num_beams=1, max_length=15)


@pytest.mark.parametrize(
    "overrides",
    [
        {"query_from": "attn_in", "add_to": "attn_out"},
        {"query_from": "attn_in", "add_to": "mlp_out"},
        {"with_cls": False},
        {"num_visual_input_tokens": 4},
        {"pooling": "max", "down_sample_num": [4]},
        {"activation": "softmax", "drop_ratio": 0.0},
        {"fusion": "prefix"},
        {"fusion": "none"},
    ],
)
def test_options_train_end_to_end(overrides, device):
    model = tiny_model(**overrides).to(device)
    model.train()
    loss = model(make_batch(device=device))["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_slot_lengths_of_fusions():
    assert tiny_model(fusion="prefix").slot_length == 17  # [cls] + 16 patches
    assert tiny_model(num_visual_input_tokens=4).slot_length == 5
    assert tiny_model(fusion="none").vision_tower is None


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"fusion": "late"}, ValueError, r"fusion='late'.*\['adem', 'prefix', 'none'\]"),
        ({"activation": "tanh"}, ValueError, "activation='tanh'"),
        ({"query_from": "mlp_out"}, ValueError, "query_from='mlp_out'"),
        ({"query_from": "mlp_in", "add_to": "attn_out"}, ValueError, "comes before"),
        ({"pooling": "median"}, ValueError, "pooling='median'"),
        ({"down_sample_num": [8]}, ValueError, "down_sample_num entry 8"),
        ({"down_sample_num": [64]}, ValueError, "down_sample_num entry 64"),
        ({"drop_ratio": 1.5}, ValueError, "drop_ratio=1.5"),
        ({"llm_dtype": "int8"}, ValueError, "llm_dtype='int8'"),
        ({"cpu_dtype": "float16"}, ValueError, "cpu_dtype='float16'"),
        ({"adapter_rank": 4}, KeyError, "adapter_rank"),
    ],
)
def test_bad_config_is_named(overrides, error, message):
    with pytest.raises(error, match=message):
        tiny_model(**overrides)


def test_predict_answers_generate_and_rank(device):
    model = tiny_model().to(device).eval()
    batch = make_batch(device=device)
    generated = model.predict_answers(batch, inference_method="generate", max_len=3)
    assert len(generated) == 4 and all(isinstance(text, str) for text in generated)
    candidates = [[" A.", " B.", " C."], [" A.", " B."], [" B.", " C.", " D.", " E."], [" C.", " A."]]
    ranked = model.predict_answers(batch, inference_method="rank", answer_list=candidates)
    for row, answer in enumerate(ranked):
        # Independently: one sample and one candidate at a time, sum log-prob = -mean loss x answer tokens.
        scores = []
        for candidate in candidates[row]:
            single = {key: (value[row : row + 1] if not isinstance(value, str) else value) for key, value in batch.items()}
            single["text_output"] = [candidate]
            labels = model.encode_batch(single, with_answer=True).labels
            num_tokens = int((labels != -100).sum())
            scores.append(-model(single)["loss"].item() * num_tokens)
        assert answer == candidates[row][max(range(len(scores)), key=scores.__getitem__)]


def test_greedy_generation_first_token_matches_next_token_argmax(device):
    model = tiny_model().to(device).eval()
    batch = make_batch(device=device)
    first = model.predict_answers(batch, inference_method="generate", max_len=1)
    argmax = model.next_token_logprobs(batch).argmax(-1)
    assert first == [model.tokenizer.decode([int(t)], skip_special_tokens=True).strip() for t in argmax]


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.visual_value_offset.normal_()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.trainable_state_dict()}, path)
    other = tiny_model()
    other.load_checkpoint(str(path))
    torch.testing.assert_close(other.visual_value_offset, model.visual_value_offset)
    state = model.trainable_state_dict()
    del state["visual_key_offset"]
    torch.save({"model": state}, path)
    with pytest.raises(KeyError, match="missing trainable keys \\['visual_key_offset'\\]"):
        other.load_checkpoint(str(path))
    with pytest.raises(KeyError, match="unexpected keys"):
        tiny_model(fusion="prefix").load_trainable_state(model.trainable_state_dict())
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        other.load_checkpoint(str(tmp_path / "nowhere.pth"))


# The trainable keys of the tiny model's checkpoints written while W' and [cls] were nn.Sequential(Linear, SiLU, Linear).
SEQUENTIAL_LAYOUT = {
    "visual_key_offset": "visual_key_offset", "visual_value_offset": "visual_value_offset",
    **{f"{proj}.{old}.{kind}": f"{proj}.{new}.{kind}" for proj in ("visual_proj", "cls_proj")
       for old, new in (("0", "fc1"), ("2", "fc2")) for kind in ("weight", "bias")},
    **{f"vision_adapters.{i}.{fc}.weight": f"vision_adapters.{i}.{fc}.weight" for i in (0, 1) for fc in ("fc1", "fc2")},
}


def test_checkpoints_of_the_sequential_layout_load(tmp_path):
    """A checkpoint written before the projections had named sub-layers loads through model.finetuned,
    load_checkpoint and the resume path (load_trainable_state)."""
    model = tiny_model()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_()
    ours = model.trainable_state_dict()
    assert set(ours) == set(SEQUENTIAL_LAYOUT.values())
    legacy = {old: ours[new] for old, new in SEQUENTIAL_LAYOUT.items()}
    path = tmp_path / "checkpoint_19.pth"
    torch.save({"model": legacy, "epoch": 19}, path)
    loaded = [tiny_model(load_finetuned=True, finetuned=str(path)), tiny_model(), tiny_model()]
    loaded[1].load_checkpoint(str(path))
    loaded[2].load_trainable_state(legacy)
    for other in loaded:
        for name, value in ours.items():
            torch.testing.assert_close(other.trainable_state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("model_type", sorted(AdemVL.PRETRAINED_MODEL_CONFIG_DICT))
def test_every_model_type_yaml_holds_known_keys_and_values(model_type):
    section = OmegaConf.load(AdemVL.default_config_path(model_type)).model
    assert AdemVLConfig.from_dict(section).model_type == model_type


def test_the_documented_model_key_table_is_generated_from_the_config():
    readme = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    begin, end = "<!-- model keys: begin -->", "<!-- model keys: end -->"
    table = readme[readme.index(begin) + len(begin) : readme.index(end)].strip()
    assert table == markdown_table(), "docs/configuration.md is stale: paste `python -m lavis_ademvl.models.config`"
    assert table.count("\n") == len(dataclasses.fields(AdemVLConfig)) + 1  # header, rule, one row per key


def test_from_config_reads_the_yaml_model_type():
    assert AdemVL.default_config_path("tiny").endswith("tiny.yaml")
    with pytest.raises(KeyError, match="unknown ademvl model_type 'huge'"):
        AdemVL.default_config_path("huge")
    assert tiny_config()["tokenizer"] == "byte_level"
