"""Never a silently random tower (issue #25): a checkpoint folder whose weights do not all load into the class that
reads it, or that holds another model type, is an error naming the folder and the keys. Hugging Face itself only logs
"newly initialized" weights and trains on."""
from __future__ import annotations

import pytest
import torch
from helpers import make_batch, tiny_config, tiny_model
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

VISION = tiny_config()["vision_config"]


def edit_weights(folder, edit) -> None:
    """Rewrite the folder's safetensors file as Hugging Face writes it, after `edit(weights)`."""
    (path,) = folder.glob("*.safetensors")
    weights = load_file(path)
    edit(weights)
    save_file(weights, path, metadata={"format": "pt"})


def vision_folder(tmp_path, name="clip"):
    folder = tmp_path / name
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(folder)
    return folder


def key_prefix(folder) -> str:
    """What the folder's weight names start with: `vision_model.` as transformers 4.x saves a CLIP tower, none in 5.x
    (the same names as the class's own parameters, which its loading report uses)."""
    (path,) = folder.glob("*.safetensors")
    return "vision_model." if all(name.startswith("vision_model.") for name in load_file(path)) else ""


def test_a_complete_clip_folder_loads(tmp_path):
    model = tiny_model(vision_model=str(vision_folder(tmp_path)), vision_config=None)
    assert torch.isfinite(model(make_batch())["loss"])


def test_a_whole_clip_checkpoint_loads_its_vision_tower(tmp_path):
    """openai/clip-vit-large-patch14 holds the text tower too: those weights are not the vision tower's to load."""
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 99}
    CLIPModel(CLIPConfig(vision_config=VISION, text_config=text)).save_pretrained(tmp_path / "whole")
    saved = load_file(next((tmp_path / "whole").glob("*.safetensors")))
    model = tiny_model(vision_model=str(tmp_path / "whole"), vision_config=None)
    for name, value in model.vision_tower.state_dict().items():
        if name in saved:
            torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)


def test_a_clip_folder_missing_one_weight_is_refused(tmp_path):
    folder = vision_folder(tmp_path)
    name = f"{key_prefix(folder)}post_layernorm.weight"
    edit_weights(folder, lambda weights: weights.pop(name))
    expected = (rf"model.vision_model='{folder}' does not load completely into CLIPVisionModel; "
                rf"weights missing \(they would start random\): \['{name}'\]")
    with pytest.raises(ValueError, match=expected):
        tiny_model(vision_model=str(folder), vision_config=None)


def test_a_clip_folder_with_a_foreign_weight_is_refused(tmp_path):
    folder = vision_folder(tmp_path)
    name = f"{key_prefix(folder)}extra.weight"
    edit_weights(folder, lambda weights: weights.update({name: torch.zeros(2)}))
    with pytest.raises(ValueError, match=rf"weights unexpected: \['{name}'\]"):
        tiny_model(vision_model=str(folder), vision_config=None)


def test_a_dinov2_folder_loads_as_dinov2_never_as_a_random_clip(tmp_path):
    """Before the tower families, CLIP's class loaded it with random weights and a log line only."""
    folder = tmp_path / "dinov2"
    saved = Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=8))
    saved.save_pretrained(folder)
    model = tiny_model(vision_model=str(folder), vision_config=None)
    assert isinstance(model.vision_tower, Dinov2Model)
    for name, value in model.vision_tower.state_dict().items():
        torch.testing.assert_close(value, saved.state_dict()[name], rtol=0, atol=0, msg=name)


def test_a_folder_whose_weights_are_another_familys_is_refused(tmp_path):
    """A config naming CLIP over DINOv2's weights: every CLIP weight would start random."""
    folder = tmp_path / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
                ).save_pretrained(folder)
    (folder / "config.json").write_text(CLIPVisionConfig(**VISION).to_json_string())
    with pytest.raises(ValueError, match=r"does not load completely into CLIPVisionModel; weights missing"):
        tiny_model(vision_model=str(folder), vision_config=None)


def test_an_llm_folder_missing_one_weight_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llm"
    LlamaForCausalLM(LlamaConfig(**tiny_config()["llm_config"])).save_pretrained(folder)
    edit_weights(folder, lambda weights: weights.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"model.llm_model=.* does not load completely into AutoModelForCausalLM; weights "
                                         r"missing \(they would start random\): \['model.layers.1.mlp.down_proj.weight'\]"):
        tiny_model(llm_model=str(folder), llm_config=None)


def test_a_gemma2_folder_loads_with_the_attention_that_computes_its_softcapping(tmp_path):
    """SDPA, Hugging Face's default, skips Gemma-2's attention logit softcapping: a silently different model."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    folder = tmp_path / "gemma2"
    llm = tiny_config()["llm_config"]
    config = Gemma2Config(vocab_size=llm["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                          pad_token_id=256, bos_token_id=257, eos_token_id=258)
    Gemma2ForCausalLM(config).save_pretrained(folder)
    model = tiny_model(llm_model=str(folder), llm_config=None)
    assert model.llm.config._attn_implementation == "eager"
    assert torch.isfinite(model(make_batch())["loss"])
