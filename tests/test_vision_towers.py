"""ADEM-VL on every supported vision tower family (issue #25): tiny random towers of the real Hugging Face classes
(CLIP, SigLIP with and without its pooling head, DINOv2 with and without registers), the features it reads checked
against a direct re-statement on an intact copy of each tower, the adapters' place in each block, non-dividing patch
grids, and the folders it refuses."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from cli import TINY_SQA
from helpers import assert_a_step_reaches_exactly_the_trainable_parameters, make_batch, tiny_config
from PIL import Image
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
)

from lavis_ademvl.cli import params, predict
from lavis_ademvl.inference import Question, load_for_inference, question_batch
from lavis_ademvl.models.ademvl import AdemVL
from lavis_ademvl.models.fusion import multiscale_pool
from lavis_ademvl.models.vision_towers import VISION_FAMILIES, random_vision_tower, tower_blocks
from lavis_ademvl.tasks.scienceqa import answer_questions

_SHAPE = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
# name -> vision_config. DINOv2's layer scale is set away from 1, so an adapter on the wrong side of it shows.
TOWERS = {
    "clip": {"model_type": "clip_vision_model", "intermediate_size": 64, **_SHAPE},
    "siglip": {"model_type": "siglip_vision_model", "intermediate_size": 64, **_SHAPE},
    "siglip_headless": {"model_type": "siglip_vision_model", "intermediate_size": 64, "vision_use_head": False, **_SHAPE},
    "dinov2": {"model_type": "dinov2", "mlp_ratio": 2, "layerscale_value": 0.5, **_SHAPE},
    "dinov2_with_registers": {"model_type": "dinov2_with_registers", "mlp_ratio": 2, "layerscale_value": 0.5,
                              "num_register_tokens": 4, **_SHAPE},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tower_model(name: str, **overrides) -> AdemVL:
    return AdemVL.from_config(tiny_config(vision_config=TOWERS[name], **overrides)).eval()


def intact_copy(model: AdemVL, name: str) -> torch.nn.Module:
    """The tower as Hugging Face runs it, all blocks, with the model's frozen weights (its last block: from the seed)."""
    intact = random_vision_tower(TOWERS[name]).eval()
    missing, unexpected = intact.load_state_dict(model.vision_tower.state_dict(), strict=False)
    assert not unexpected and all(".2." in key for key in missing), (missing, unexpected)  # only the dropped block
    return intact


def expected_features(intact: torch.nn.Module, name: str, image: torch.Tensor) -> torch.Tensor:
    """[cls] and patches re-stated from an intact tower: its hidden state entering the last block, the final norm, and
    per family the class token (skipping DINOv2's registers), SigLIP's head, or the patches' mean."""
    entering_last = intact(pixel_values=image, output_hidden_states=True).hidden_states[-2]
    core = VISION_FAMILIES[TOWERS[name]["model_type"]].core_of(intact)  # transformers 4.x: its vision_model
    if name == "clip":
        normed = core.post_layernorm(entering_last)
        return normed
    if name.startswith("siglip"):
        normed = core.post_layernorm(entering_last)
        cls = core.head(normed) if name == "siglip" else normed.mean(1)
        return torch.cat([cls[:, None], normed], dim=1)
    normed = intact.layernorm(entering_last)
    registers = TOWERS[name].get("num_register_tokens", 0)
    return torch.cat([normed[:, :1], normed[:, 1 + registers:]], dim=1)


def test_every_family_is_tested():
    assert {TOWERS[name]["model_type"] for name in TOWERS} == set(VISION_FAMILIES)


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_features_are_the_last_blocks_input_after_the_final_norm(name, device):
    model = tower_model(name).to(device)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        features = model.get_image_features(image)
        expected = expected_features(intact_copy(model, name).to(device), name, image)
    assert features.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_adapter_output_enters_the_residual_stream_beside_the_mlp(name):
    """block(h) with the adapter minus block(h) without it is adapter(u), u the MLP's input: not passed through
    DINOv2's layer scale (0.5 here) or anything else."""
    model = tower_model(name)
    block, adapter = tower_blocks(model.vision_tower)[0], model.vision_adapters[0]
    inputs = []
    handle = block.mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    hidden = torch.randn(2, 17 + TOWERS[name].get("num_register_tokens", 0), 32)
    extra = {"attention_mask": None} if "dinov2" not in name else {}
    extra.update({"causal_attention_mask": None} if name == "clip" else {})
    def hidden_out(output):  # a tuple in transformers 4.x, the hidden state itself in 5.x
        return output[0] if isinstance(output, tuple) else output

    with torch.no_grad():
        plain = hidden_out(block(hidden, **extra))
        adapter.fc2.weight.normal_(0, 1)
        adapted = hidden_out(block(hidden, **extra))
        handle.remove()
        torch.testing.assert_close(adapted - plain, adapter(inputs[1]), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=sorted(TOWERS))
def trained_model(request, device):
    model = tower_model(request.param, alpha=0.5)
    with torch.no_grad():
        model.visual_value_offset.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    return request.param, model.to(device)


def test_training_step_reaches_exactly_the_trainable_parameters(trained_model):
    name, model = trained_model
    assert_a_step_reaches_exactly_the_trainable_parameters(model, make_batch(device=model.device), name)


def test_generation_and_rank_scoring(trained_model):
    name, model = trained_model
    batch = make_batch(device=model.device)
    new_tokens = model.generate_token_ids(batch, max_new_tokens=3, do_sample=False, num_beams=1)
    assert torch.equal(new_tokens[:, 0], model.next_token_logprobs(batch).argmax(-1)), name
    candidates = [[" A.", " B."]] * 4
    scores = model.score_candidates(batch, candidates)
    ranked = model.predict_answers(batch, inference_method="rank", answer_list=candidates)
    assert ranked == [row[max(range(2), key=scores[index].__getitem__)] for index, row in enumerate(candidates)]


def test_checkpoint_round_trip_gives_the_same_logits(trained_model):
    name, model = trained_model
    loaded = tower_model(name, alpha=0.5).to(model.device)
    loaded.load_trainable_state(model.trainable_state_dict())
    batch = make_batch(device=model.device)
    with torch.no_grad():
        torch.testing.assert_close(loaded.answer_logits(batch, True)[0], model.answer_logits(batch, True)[0],
                                   rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_predict_loads_each_tower_folder_and_answers_as_the_model_ranks(name, tmp_path, capsys):
    """The user's path: a saved tower folder named by `model.vision_model`, a checkpoint, `predict` with rank
    inference; its answer is the option the same model scores highest."""
    folder = tmp_path / name
    saved = random_vision_tower(TOWERS[name])
    saved.save_pretrained(folder)
    options = [f"model.vision_model={folder}", "model.vision_config=null", "run.inference_method=rank"]
    model, _, _ = load_for_inference(TINY_SQA, None, options)
    with torch.no_grad():
        model.visual_value_offset.normal_(0, 1, generator=torch.Generator().manual_seed(3))
        model.cls_proj.fc2.weight.normal_(0, 1, generator=torch.Generator().manual_seed(4))
    checkpoint = tmp_path / "checkpoint_0.pth"
    torch.save({"model": model.trainable_state_dict(), "epoch": 0}, checkpoint)
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    choices = ["red", "green", "blue"]
    argv = ["--cfg-path", str(TINY_SQA), "--checkpoint", str(checkpoint), "--image", str(image),
            "--question", "What colour is it?", "--choices", *choices, "--options", *options]
    assert predict.main(argv) == 0
    printed = capsys.readouterr().out.strip()
    loaded, processor, config = load_for_inference(TINY_SQA, str(checkpoint), options)
    assert type(loaded.vision_tower) is type(saved)
    for key, value in loaded.vision_tower.state_dict().items():
        torch.testing.assert_close(value, saved.state_dict()[key], rtol=0, atol=0, msg=key)
    batch = question_batch(config, processor, Question(Image.open(image), "What colour is it?", choices))
    _, (letter,) = answer_questions(loaded, batch, "rank")  # the ScienceQA task's own evaluation
    assert printed == f"({letter}) {choices['ABC'.index(letter)]}", name


def test_a_non_dividing_grid_pools_adaptively_to_the_configured_scales():
    """SigLIP so400m at 384 px has 27 x 27 patches; here 9 x 9 (image 36, patch 4) pooled to 4 x 4 and 2 x 2."""
    tower = {**TOWERS["siglip"], "image_size": 36, "patch_size": 4}
    model = AdemVL.from_config(tiny_config(vision_config=tower, down_sample_num=[16, 4])).eval()
    assert model.num_patches == 81 and model.uneven_scales() == [16, 4]
    patches = torch.randn(2, 81, 8)
    grid = patches.reshape(2, 9, 9, 8).permute(0, 3, 1, 2)
    expected = torch.cat([F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2) for side in (4, 2)], dim=1)
    torch.testing.assert_close(multiscale_pool(patches, [16, 4]), expected, rtol=0, atol=0)
    batch = make_batch()
    batch["image"] = torch.randn(4, 3, 36, 36)
    assert torch.isfinite(model(batch)["loss"])


def test_image_size_overrides_the_tower_configs_and_other_sizes_are_named():
    """DINOv2's config says 518 pixels where its image processor makes 224: `model.image_size` says what the model
    reads; images of another size are an error naming both sizes."""
    model = tower_model("dinov2", image_size=48)  # the config's 32 -> 6 x 6 patches
    assert model.image_size == 48 and model.num_patches == 36
    batch = make_batch()
    batch["image"] = torch.randn(4, 3, 48, 48)
    assert torch.isfinite(model(batch)["loss"])
    with pytest.raises(ValueError, match=r"the images are \(32, 32\) pixels, but the model reads 48x48 images"):
        model(make_batch())
    clip = AdemVL.from_config(tiny_config(image_size=48)).eval()  # CLIP interpolates its position embeddings
    assert torch.isfinite(clip(batch)["loss"])


def test_a_whole_siglip_checkpoint_loads_its_vision_tower(tmp_path):
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 99}
    vision = {key: value for key, value in TOWERS["siglip"].items() if key != "model_type"}
    whole = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    whole.save_pretrained(tmp_path / "whole")
    model = AdemVL.from_config(tiny_config(vision_model=str(tmp_path / "whole"), vision_config=None))
    assert isinstance(model.vision_tower, SiglipVisionModel)
    core_of = VISION_FAMILIES["siglip_vision_model"].core_of  # the same parameter names on transformers 4.x and 5.x
    saved = core_of(whole.vision_model).state_dict()
    for key, value in core_of(model.vision_tower).state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)


def test_folders_of_other_models_are_refused_by_name(tmp_path):
    llm = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(**tiny_config()["llm_config"])).save_pretrained(llm)
    with pytest.raises(ValueError, match=rf"model.vision_model='{llm}' is a 'llama' model, not a vision tower"):
        AdemVL.from_config(tiny_config(vision_model=str(llm), vision_config=None))
    naflex = tmp_path / "siglip2"
    naflex.mkdir()
    (naflex / "config.json").write_text(json.dumps({"model_type": "siglip2", "vision_config": {}, "text_config": {}}))
    with pytest.raises(ValueError, match="NaFlex .*siglip2-so400m-patch14-384"):
        AdemVL.from_config(tiny_config(vision_model=str(naflex), vision_config=None))
    with pytest.raises(ValueError, match=re.escape("model.vision_config (model_type='vit')")):
        AdemVL.from_config(tiny_config(vision_config={"model_type": "vit"}))


def test_readme_backbone_table_is_what_params_prints(capsys):
    """Each row of README's backbone table: trainable, frozen (LLM + tower blocks) and fused layers as
    `ademvl params --model-type <type>` prints them."""
    readme = (TINY_SQA.parents[3] / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([\d,]+) \| ([\d,]+) \| (\d+) \|$", readme, re.MULTILINE)
    assert {row[0] for row in rows} >= {"llama7b", "llama3_8b_siglip", "qwen2_5_7b_siglip"}
    for model_type, trainable, frozen, layers in rows:
        assert params.main(["--model-type", model_type]) == 0
        out = capsys.readouterr().out
        figures = {label: int(value.replace(",", "")) for label, value in
                   re.findall(r"^ *(total trainable|LLM|vision tower \(blocks used\)|fused decoder layers) +([\d,]+)$",
                              out, re.MULTILINE)}
        assert figures["total trainable"] == int(trainable.replace(",", "")), model_type
        assert figures["LLM"] + figures["vision tower (blocks used)"] == int(frozen.replace(",", "")), model_type
        assert figures["fused decoder layers"] == int(layers), model_type


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_gradient_checkpointing_of_the_tower_gives_the_same_gradients(name):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same trainable weights in both models
        model = tower_model(name, vision_gradient_checkpointing=checkpointing, adapter_dropout=0.0).train()
        assert model.vision_tower.is_gradient_checkpointing == checkpointing
        with torch.no_grad():
            for adapter in model.vision_adapters:
                adapter.fc2.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
        model(make_batch())["loss"].backward()
        grads.append({key: p.grad for key, p in model.named_parameters() if p.requires_grad})
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, rtol=1e-5, atol=1e-6, msg=key)
