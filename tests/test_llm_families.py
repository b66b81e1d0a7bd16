"""ADEM-VL on every supported LLM family: tiny random models of the real Hugging Face classes (2 decoder layers), each
with a tokenizer of its family's conventions (BOS or none, pad token or none), and the fused feature's place in each
family's decoder layer checked against a direct re-statement (docs/backbones.md)."""
from __future__ import annotations

import re

import pytest
import torch
from cli import TINY_SQA
from helpers import assert_a_step_reaches_exactly_the_trainable_parameters, make_batch, tiny_config
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration, PreTrainedTokenizerFast

from lavis_ademvl.cli import params, predict
from lavis_ademvl.inference import Question, load_for_inference, question_batch
from lavis_ademvl.models.ademvl import AdemVL
from lavis_ademvl.models.fusion import adaptive_cross_attention, multiscale_pool
from lavis_ademvl.models.memory import DECODER_FAMILIES, decoder_layers
from lavis_ademvl.models.towers import llm_config
from lavis_ademvl.tasks.scienceqa import answer_questions

VOCAB = 320  # the byte-level tokenizer's 256 bytes and specials, and unused rows (as Qwen's embedding has)
_SHAPE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
_GEMMA = {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh"}
# model_type -> (llm_config beyond the shape, tokenizer: (bos or None, eos, pad or None)). Sliding windows are shorter
# than the sequences (about 90 tokens), so the windowed attention masks and caches are exercised; Mistral's two windowed
# layers still reach from the [cls] slot to the answer (2 x 48), or [cls] would get no gradient at all.
FAMILIES = {
    # LLaMA-3: no pad token, untied embeddings, rope theta 500000.
    "llama": ({"rope_theta": 500000.0, "tie_word_embeddings": False}, ("<|begin_of_text|>", "<|end_of_text|>", None)),
    "mistral": ({"sliding_window": 48}, ("<s>", "</s>", None)),
    # Qwen2.5: attention biases, no BOS token.
    "qwen2": ({"tie_word_embeddings": True}, (None, "<|im_end|>", "<|endoftext|>")),
    # Qwen3: q/k norms, no BOS token.
    "qwen3": ({"head_dim": 16, "tie_word_embeddings": True}, (None, "<|im_end|>", "<|endoftext|>")),
    "gemma": (_GEMMA, ("<bos>", "<eos>", "<pad>")),
    # Gemma-2/3: sandwich norms, embeddings scaled by sqrt(d), attention and final logit softcapping (Gemma-2's
    # attention softcapping needs eager attention: sdpa skips it).
    "gemma2": ({**_GEMMA, "query_pre_attn_scalar": 16, "sliding_window": 16, "attn_implementation": "eager"},
               ("<bos>", "<eos>", "<pad>")),
    "gemma3_text": ({**_GEMMA, "query_pre_attn_scalar": 16, "sliding_window": 16, "final_logit_softcapping": 30.0,
                     "layer_types": ["sliding_attention", "full_attention"]}, ("<bos>", "<eos>", "<pad>")),
    # Phi-3: fused qkv and gate_up projections, residual dropouts.
    "phi3": ({}, ("<s>", "<|endoftext|>", "<|endoftext|>")),
}
# Re-statement of each family's decoder layer: the norm whose output is the MLP's input (the default query u), the
# residual stream just after the attention branch (the input of that norm), and the attention block's input norm.
PRE_MLP_NORM = {"llama": "post_attention_layernorm", "mistral": "post_attention_layernorm",
                "qwen2": "post_attention_layernorm", "qwen3": "post_attention_layernorm", "gemma": "post_attention_layernorm",
                "gemma2": "pre_feedforward_layernorm", "gemma3_text": "pre_feedforward_layernorm",
                "phi3": "post_attention_layernorm"}


def family_tokenizer(folder, bos: str | None, eos: str, pad: str | None) -> str:
    """A byte-level tokenizer with the family's special tokens, saved to `folder`; it adds its BOS itself (as LLaMA's,
    Mistral's, Gemma's and Phi-3's do), and has no pad token when `pad` is None."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for special in dict.fromkeys(token for token in (bos, eos, pad) if token is not None):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in specials.items() if v is not None}
                            ).save_pretrained(folder)
    return str(folder)


def family_config(model_type: str, folder, **overrides) -> dict:
    extra, (bos, eos, pad) = FAMILIES[model_type]
    tokenizer = family_tokenizer(folder, bos, eos, pad)
    ids = {token: 256 + index for index, token in enumerate(dict.fromkeys(t for t in (bos, eos, pad) if t is not None))}
    special_ids = {"bos_token_id": ids.get(bos), "eos_token_id": ids[eos], "pad_token_id": ids.get(pad)}
    llm_config = {"model_type": model_type, **_SHAPE, **special_ids, **extra}
    return tiny_config(llm_config=llm_config, tokenizer=tokenizer, **overrides)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on busy cores waiting for the pool costs more than the ops
    (about 15 ms per 64-wide matmul on 2 shared cores, 0.05 ms on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    return {model_type: tmp_path_factory.mktemp(model_type) for model_type in FAMILIES}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, device, tokenizer_folders):
    """(model_type, the family's model in eval mode, its config) with non-zero memory offsets, so that the fused
    feature is large enough to tell places apart."""
    config = family_config(request.param, tokenizer_folders[request.param], alpha=0.5)
    model = AdemVL.from_config(config).to(device).eval()
    with torch.no_grad():
        model.visual_key_offset.normal_(0, 1, generator=torch.Generator(device).manual_seed(1))
        model.visual_value_offset.normal_(0, 1, generator=torch.Generator(device).manual_seed(2))
    return request.param, model, config


def batch_for(device) -> dict:
    return make_batch(device=device)  # half with an image: rows of two lengths, so left padding is exercised


def test_family_table_covers_the_tested_families():
    assert set(DECODER_FAMILIES) == set(FAMILIES)


def test_training_step_reaches_exactly_the_trainable_parameters(family, device):
    model_type, model, _ = family
    assert_a_step_reaches_exactly_the_trainable_parameters(model, batch_for(device), model_type)


def test_greedy_generation_starts_with_the_next_token_argmax(family, device):
    """Generation runs the KV cache (sliding-window layers too) with the visual memory held."""
    _, model, _ = family
    batch = batch_for(device)
    generated = model.predict_answers(batch, inference_method="generate", num_beams=1, max_len=4)
    assert len(generated) == 4 and all(isinstance(text, str) for text in generated)
    new_tokens = model.generate_token_ids(batch, max_new_tokens=4, do_sample=False, num_beams=1)
    assert torch.equal(new_tokens[:, 0], model.next_token_logprobs(batch).argmax(-1))


def test_rank_scoring_picks_the_most_likely_candidate(family, device):
    """Rank scoring (a shared prefix through the KV cache, then each candidate) against each pair's own loss."""
    model_type, model, _ = family
    batch = make_batch(2, device=device)
    candidates = [[" A.", " B."], [" B.", " D."]]
    ranked = model.predict_answers(batch, inference_method="rank", answer_list=candidates)
    scored = model.score_candidates(batch, candidates)
    for row in range(2):
        scores = []
        for candidate in candidates[row]:
            single = {key: value if isinstance(value, str) else value[row : row + 1] for key, value in batch.items()}
            single["text_output"] = [candidate]
            tokens = int((model.encode_batch(single, with_answer=True).labels != -100).sum())
            scores.append(-model(single)["loss"].item() * tokens)
        assert scored[row] == pytest.approx(scores, rel=1e-4, abs=1e-4), model_type
        assert ranked[row] == candidates[row][max(range(len(scores)), key=scores.__getitem__)], (model_type, scores)


def test_checkpoint_round_trip_gives_the_same_logits(family, device):
    model_type, model, config = family
    loaded = AdemVL.from_config(config).to(device).eval()
    loaded.load_trainable_state(model.trainable_state_dict())
    batch = batch_for(device)
    with torch.no_grad():
        torch.testing.assert_close(loaded.answer_logits(batch, True)[0], model.answer_logits(batch, True)[0],
                                   rtol=0, atol=0, msg=model_type)


def test_alpha_zero_gives_the_bare_llm(family, device):
    """With alpha = 0 the hooks add nothing: the logits equal those with the hooks removed."""
    model_type, model, _ = family
    memory = model.fusion_memory
    batch = batch_for(device)
    alpha = memory.alpha
    try:
        memory.alpha = 0.0
        with torch.no_grad():
            hooked = model.answer_logits(batch, True)[0]
            memory.detach()
            bare = model.answer_logits(batch, True)[0]
    finally:
        memory.alpha = alpha
        if not memory.layers:
            memory.attach(model.decoder_layers())
    torch.testing.assert_close(hooked, bare, rtol=0, atol=0, msg=model_type)


def reference_memory(model: AdemVL, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys before the activation and values, from the model's trainable modules (design §2)."""
    config = model.config
    features = model.get_image_features(batch["image"])
    pooled = multiscale_pool(features[:, 1:], config.down_sample_num, config.pooling)
    has_image = batch["has_image"].to(features.dtype).view(-1, 1, 1)
    x_v = config.beta * model.visual_proj(pooled) * has_image
    return x_v + model.visual_key_offset, x_v + model.visual_value_offset


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("points", [("mlp_in", "mlp_out"), ("attn_in", "attn_out")])
def test_fused_feature_enters_the_residual_stream_as_the_paper_adds_it(family, device, points):
    """Each decoder layer, run again on the same input with the hooks idle, differs by exactly alpha * the fused
    feature of the query. mlp_in/mlp_out: the layer's output, h + mlp_branch(u) + alpha * F(u), u the MLP's input (the
    output of the family's pre-MLP norm); attn_in/attn_out: the residual stream after the attention branch (the pre-MLP
    norm's input), h + attn_branch(x) + alpha * F(x), x the attention block's input (input_layernorm's output)."""
    model_type, model, _ = family
    memory, layers = model.fusion_memory, model.decoder_layers()
    norm = PRE_MLP_NORM[model_type]
    on_mlp = points == ("mlp_in", "mlp_out")

    def watch(layer: torch.nn.Module, queries: list, residuals: list) -> list:
        """Hooks recording the query and the residual stream where the fused feature should have entered."""
        if on_mlp:
            return [getattr(layer, norm).register_forward_hook(lambda m, args, out: queries.append(out)),
                    layer.register_forward_hook(lambda m, args, out: residuals.append(_hidden(out)))]
        return [layer.input_layernorm.register_forward_hook(lambda m, args, out: queries.append(out)),
                getattr(layer, norm).register_forward_pre_hook(lambda m, args: residuals.append(args[0]))]

    calls, queries, residuals = [], [], []
    handles = [h for layer in layers for h in watch(layer, queries, residuals)]
    handles += [layer.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
                for layer in layers]
    memory.detach()
    memory.query_from, memory.add_to = points
    memory.attach(layers)
    batch = batch_for(device)
    try:
        with torch.no_grad():
            real = model.encode_batch(batch, with_answer=True).attention_mask.bool()  # padding reads nothing
            model.answer_logits(batch, True)
            for handle in handles:
                handle.remove()
            keys, values = reference_memory(model, batch)
            for index, layer in enumerate(layers):
                idle = []  # the layer on the same input, the memory holding nothing: its hooks idle
                handles = watch(layer, [], idle)
                layer(*calls[index][0], **calls[index][1])
                for handle in handles:
                    handle.remove()
                fused = adaptive_cross_attention(queries[index], keys, values, model.config.drop_ratio)
                assert fused[real].abs().amax() > 1e-2, model_type  # large enough to tell places apart
                torch.testing.assert_close((residuals[index] - idle[0])[real], model.config.alpha * fused[real],
                                           rtol=1e-4, atol=1e-5, msg=f"{model_type} layer {index}")
    finally:
        for handle in handles:
            handle.remove()
        memory.detach()
        memory.query_from, memory.add_to = "mlp_in", "mlp_out"
        memory.attach(layers)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_tokenizer_conventions(model_type, tokenizer_folders):
    """BOS only where the family's tokenizer adds one, eos ends the answer, eos pads where there is no pad token; no
    token is added to the vocabulary."""
    _, (bos, eos, pad) = FAMILIES[model_type]
    model = AdemVL.from_config(family_config(model_type, tokenizer_folders[model_type], fusion="none"))
    tokenizer = model.tokenizer
    assert len(tokenizer) <= VOCAB
    assert tokenizer.bos_token == bos and tokenizer.eos_token == eos
    assert tokenizer.pad_token == (pad or eos)
    encoded = model.encode_batch({"text_input": ["Q?", "A longer question?"], "text_output": [" yes", " no"]}, True)
    short = encoded.input_ids[0][encoded.attention_mask[0].bool()].tolist()
    assert encoded.attention_mask[0, 0] == 0  # left padding
    assert short[0] == (tokenizer.bos_token_id if bos else tokenizer("Q")["input_ids"][-1])
    assert short[-1] == tokenizer.eos_token_id and encoded.labels[0, -1] == tokenizer.eos_token_id


def test_a_named_bos_the_tokenizer_never_adds_is_not_prepended(tmp_path):
    """SmolLM2's and OLMo's tokenizers name a BOS that their own encoding never adds: neither does the model."""
    folder = family_tokenizer(tmp_path, None, "<|endoftext|>", None)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer.add_special_tokens({"bos_token": "<|endoftext|>"})  # an existing token: the vocabulary stays
    tokenizer.save_pretrained(tmp_path)
    model = AdemVL.from_config(tiny_config(tokenizer=str(tmp_path), fusion="none"))
    assert model.tokenizer.bos_token_id is None
    ids = model.encode_batch({"text_input": ["Q?"], "text_output": [" yes"]}, True).input_ids[0].tolist()
    assert ids[0] == model.tokenizer("Q")["input_ids"][0]


def test_unknown_llm_families_are_named(tmp_path):
    with pytest.raises(ValueError, match="model_type 'gpt2' .*not a supported decoder family"):
        AdemVL.from_config(tiny_config(llm_config={"model_type": "gpt2", "vocab_size": 259, "n_embd": 32, "n_layer": 1,
                                                   "n_head": 2}))
    with pytest.raises(ValueError, match="llm_config.model_type='lama'"):
        AdemVL.from_config(tiny_config(llm_config={"model_type": "lama"}))


def test_gemma3_multimodal_checkpoints_expose_their_text_decoder_layers():
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    with torch.device("meta"):
        llm = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    assert [type(layer).__name__ for layer in decoder_layers(llm)] == ["Gemma3DecoderLayer"] * 2


@pytest.mark.parametrize("model_type, trainable, llm, layers", [
    ("llama3_8b", "4,505,856", "8,030,261,248", "32"),
    ("qwen2_5_7b", "4,046,080", "7,615,616,512", "28"),
])
def test_parameter_report_of_the_model_types(model_type, trainable, llm, layers, capsys):
    """From the built-in shapes: nothing downloaded (HF_HUB_OFFLINE), nothing allocated."""
    assert params.main(["--model-type", model_type]) == 0
    out = capsys.readouterr().out
    for label, value in (("total trainable", trainable), ("LLM", llm), ("fused decoder layers", layers)):
        assert re.search(rf"^ *{label} +{value}$", out, re.MULTILINE), (label, out)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_predict_loads_each_family_folder_and_answers_as_the_task_does(model_type, tmp_path, capsys):
    """The user's path: an LLM folder (weights and the family's tokenizer) named by `model.llm_model`, a checkpoint,
    `predict`; its answer is the ScienceQA task's own evaluation of the same question."""
    config = family_config(model_type, tmp_path / "llm")
    saved = AutoModelForCausalLM.from_config(llm_config(**config["llm_config"]))
    saved.save_pretrained(tmp_path / "llm")
    options = [f"model.llm_model={tmp_path / 'llm'}", "model.llm_config=null", f"model.tokenizer={tmp_path / 'llm'}",
               "run.inference_method=rank"]
    model, processor, experiment = load_for_inference(TINY_SQA, None, options)
    for name, value in model.llm.state_dict().items():
        torch.testing.assert_close(value, saved.state_dict()[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():
        model.visual_value_offset.normal_(0, 1, generator=torch.Generator().manual_seed(3))
    checkpoint = tmp_path / "checkpoint_0.pth"
    torch.save({"model": model.trainable_state_dict(), "epoch": 0}, checkpoint)
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 40), (30, 30, 200)).save(image)
    choices = ["red", "green", "blue"]
    assert predict.main(["--cfg-path", str(TINY_SQA), "--checkpoint", str(checkpoint), "--image", str(image),
                         "--question", "What colour is it?", "--choices", *choices, "--options", *options]) == 0
    printed = capsys.readouterr().out.strip()
    model.load_checkpoint(str(checkpoint))
    batch = question_batch(experiment, processor, Question(Image.open(image), "What colour is it?", choices))
    _, (letter,) = answer_questions(model.eval(), batch, "rank")
    assert printed == f"({letter}) {choices['ABC'.index(letter)]}", model_type
