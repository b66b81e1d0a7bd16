"""Issue #36: never a silently wrong model, round 4. A checkpoint knows the frozen parts it was trained on, no option or
section is ignored, and every bad input ends with one `error:` line naming the file, key or value."""
from __future__ import annotations

import re
import shutil

import pytest
import torch
from cli import TINY_SQA
from helpers import tiny_config, tiny_model
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from lavis_ademvl.cli import predict, train, visualize
from lavis_ademvl.common.config_files import load_experiment
from lavis_ademvl.common.launch import prepare

LLM, VISION = tiny_config()["llm_config"], tiny_config()["vision_config"]


def sqa_options(root, output_dir, *extra):
    return [f"datasets.scienceqa_mc.build_info.data_root={root}", f"run.output_dir={output_dir}", *extra]


# ------------------------------------------------------------------ a checkpoint knows its frozen parts


def saved_folder(folder, build, seed: int):
    """A Hugging Face folder of a tower built from `seed` (save_pretrained, as a hub checkpoint is laid out)."""
    torch.manual_seed(seed)
    build().save_pretrained(folder)
    return str(folder)


def checkpoint_of(model, path, **config):
    """A checkpoint as runner_ademvl writes one: the trainable weights, the run's model section and the backbones."""
    torch.save({"model": model.trainable_state_dict(), "config": {"model": tiny_config(**config)},
                "backbones": model.backbone_identity()}, path)
    return str(path)


@pytest.fixture(scope="module")
def llm_folders(tmp_path_factory):
    """A tiny LLaMA, a copy of it in another folder, another LLaMA and a Qwen2 of the same shapes."""
    root = tmp_path_factory.mktemp("llms")
    llama = saved_folder(root / "llama", lambda: LlamaForCausalLM(LlamaConfig(**LLM)), seed=0)
    shutil.copytree(llama, root / "llama_copy")
    other = saved_folder(root / "llama_other", lambda: LlamaForCausalLM(LlamaConfig(**LLM)), seed=1)
    qwen = saved_folder(root / "qwen2", lambda: Qwen2ForCausalLM(Qwen2Config(**LLM)), seed=0)
    return {"llama": llama, "copy": str(root / "llama_copy"), "other": other, "qwen2": qwen}


def llm_model(folder, **overrides):
    return tiny_model(llm_model=folder, llm_config=None, **overrides)


@pytest.mark.parametrize("other, why", [("qwen2", r"\(qwen2\) here \(another model type\)"),
                                        ("other", r"\(llama\) here \(other weights\)")])
def test_a_checkpoint_loads_only_onto_the_llm_it_was_trained_on(llm_folders, tmp_path, other, why):
    """Before: only llm_config was compared, so a checkpoint of one LLM loaded onto another of the same shapes (LLaMA-7B
    under LLaMA-3) and scored garbage, rc 0."""
    trained = llm_model(llm_folders["llama"])
    path = checkpoint_of(trained, tmp_path / "llama.pth", llm_model=llm_folders["llama"], llm_config=None)
    llm_model(llm_folders["copy"]).load_checkpoint(path)  # the same weights in another folder
    model = llm_model(llm_folders[other])
    message = rf"{path} was trained on other frozen parts: the LLM: '{llm_folders['llama']}' \(llama\) there, " \
              rf"'{llm_folders[other]}' {why}.*model.allow_backbone_mismatch=true"
    with pytest.raises(ValueError, match=message):
        model.load_checkpoint(path)
    with pytest.raises(ValueError, match=message):  # resuming it too
        model.check_resumable(torch.load(path, weights_only=True), path)
    llm_model(llm_folders[other], allow_backbone_mismatch=True).load_checkpoint(path)  # meant: a warning only
    unrecorded = {**torch.load(path, weights_only=True)}
    del unrecorded["backbones"]  # as the authors' checkpoints and ours before the record: loaded as before
    torch.save(unrecorded, tmp_path / "unrecorded.pth")
    model.load_checkpoint(str(tmp_path / "unrecorded.pth"))


def test_a_checkpoint_loads_only_onto_the_vision_tower_it_was_trained_on(tmp_path):
    """A SigLIP-trained checkpoint loaded onto a CLIP tower of the same width, without a word."""
    siglip = saved_folder(tmp_path / "siglip", lambda: SiglipVisionModel(SiglipVisionConfig(**VISION)), seed=0)
    clip = saved_folder(tmp_path / "clip", lambda: CLIPVisionModel(CLIPVisionConfig(**VISION)), seed=0)
    shutil.copytree(siglip, tmp_path / "siglip_copy")
    trained = tiny_model(vision_model=siglip, vision_config=None)
    path = checkpoint_of(trained, tmp_path / "siglip.pth", vision_model=siglip, vision_config=None)
    tiny_model(vision_model=str(tmp_path / "siglip_copy"), vision_config=None).load_checkpoint(path)
    with pytest.raises(ValueError, match=rf"the vision tower: '{siglip}' \(siglip_vision_model\) there, '{clip}' "
                                         r"\(clip_vision_model\) here \(another model type\)"):
        tiny_model(vision_model=clip, vision_config=None).load_checkpoint(path)


def tokenizer_folder(folder, extra_tokens=()):
    """The byte_level tokenizer's vocabulary (a BPE of the 256 bytes and <pad> <s> </s>) saved as a folder, with
    `extra_tokens` appended."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate([*alphabet, "<pad>", "<s>", "</s>", *extra_tokens])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
                            ).save_pretrained(folder)
    return str(folder)


def test_a_checkpoint_the_runner_saved_loads_only_with_its_tokenizer(sqa_root, tmp_path):
    """The runner records the backbones in every checkpoint; one trained with the byte_level tokenizer loaded under
    another vocabulary was accepted."""
    runner = prepare(TINY_SQA, sqa_options(sqa_root, tmp_path / "out", "run.max_epoch=1")).build_runner()
    runner.save_checkpoint(0, name="latest")
    runner.release_job_folder()
    path = str(runner.output_dir / "checkpoint_latest.pth")
    tiny_model(tokenizer=tokenizer_folder(tmp_path / "same")).load_checkpoint(path)  # the same vocabulary, as a folder
    other = tokenizer_folder(tmp_path / "other", extra_tokens=["<image>"])
    with pytest.raises(ValueError, match=rf"the tokenizer: 'byte_level' there, '{other}' here \(another vocabulary\)"):
        tiny_model(tokenizer=other).load_checkpoint(path)


# ------------------------------------------------------------------ no section or key ignored


@pytest.mark.parametrize("option, named", [("rnu.max_epoch=1", r"unknown top-level config key\(s\) \['rnu'\]"),
                                           ("run.max_epochs=1", r"unknown run config key\(s\) \['max_epochs'\]")])
def test_a_misspelt_section_or_run_key_is_refused_before_anything_is_built(sqa_root, tmp_path, capsys, option, named):
    """`--options rnu.max_epoch=1` trained the config's 2 epochs; `run.max_epochs` was refused only after the model
    and datasets were built."""
    assert train.main(["--cfg-path", str(TINY_SQA), "--options", *sqa_options(sqa_root, tmp_path / "out", option)]) == 2
    assert re.search(f"^error: {named}", capsys.readouterr().err, re.M)
    assert not (tmp_path / "out").exists()


def test_a_misspelt_section_of_a_config_file_is_refused(tmp_path):
    (tmp_path / "typo.yaml").write_text(f"includes: [{TINY_SQA}]\ndatsets:\n  scienceqa_mc: {{}}\n")
    with pytest.raises(KeyError, match=r"unknown top-level config key\(s\) \['datsets'\]"):
        load_experiment(tmp_path / "typo.yaml")


# ------------------------------------------------------------------ predict and visualize need a trained model


@pytest.mark.parametrize("tool, extra", [(predict, []), (visualize, ["--out", "maps.png"])])
def test_predict_and_visualize_refuse_an_untrained_model_as_evaluate_does(tmp_path, capsys, monkeypatch, tool, extra):
    """Both answered with the untrained model, rc 0, where evaluate refused it."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "square.png")
    argv = ["--cfg-path", str(TINY_SQA), "--image", "square.png", "--question", "What colour?", "--choices", "red",
            "blue", *extra]
    assert tool.main(argv) == 2
    error = capsys.readouterr().err
    assert "names no checkpoint, so it would score the untrained model: give --checkpoint PATH" in error
    assert "run.allow_untrained=true" in error and not (tmp_path / "maps.png").exists()
    assert tool.main([*argv, "--options", "run.allow_untrained=true"]) == 0  # meant
