"""Issue #36: never a silently wrong model, round 4. A checkpoint knows the frozen parts it was trained on, no option or
section is ignored, and every bad input ends with one `error:` line naming the file, key or value."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from cli import TINY_SQA
from helpers import tiny_config, tiny_model
from mmbench_fixture import COLUMNS, make_official_mmbench, official_rows
from PIL import Image
from safetensors.torch import load_file, save_file
from test_mmbench import build as build_mmbench
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
from lavis_ademvl.common.results import save_result

LLM, VISION = tiny_config()["llm_config"], tiny_config()["vision_config"]


def sqa_options(root, output_dir, *extra):
    return [f"datasets.scienceqa_mc.build_info.data_root={root}", f"run.output_dir={output_dir}", *extra]


@pytest.fixture
def experiment(sqa_root, tmp_path):
    """The tiny ScienceQA experiment, one epoch, no validation."""
    return prepare(TINY_SQA, sqa_options(sqa_root, tmp_path / "out", "run.max_epoch=1", "run.valid_splits=[]"))


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


# ------------------------------------------------------------------ every bad input is one line


def one_error_line(stderr: str) -> str:
    """The one `error:` line of a refused command (no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    return line


@pytest.fixture(scope="module")
def tower_folders(tmp_path_factory):
    """Broken LLM folders, each as a user met it."""
    root = tmp_path_factory.mktemp("broken")
    llama = saved_folder(root / "llama", lambda: LlamaForCausalLM(LlamaConfig(**LLM)), seed=0)
    shape = shutil.copytree(llama, root / "shape")
    edit_weights(shape, lambda weights: weights.update({"model.norm.weight": torch.ones(LLM["hidden_size"] + 1)}))
    (root / "no_weights").mkdir()
    shutil.copy(root / "llama" / "config.json", root / "no_weights")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "config.json").write_text('{"model_type": "llama", ')
    saved_folder(root / "clip", lambda: CLIPVisionModel(CLIPVisionConfig(**VISION)), seed=0)
    # a LLaMA config.json of other widths over Qwen2's weights
    saved_folder(root / "other_type", lambda: Qwen2ForCausalLM(Qwen2Config(**LLM)), seed=0)
    (root / "other_type" / "config.json").write_text(LlamaConfig(**{**LLM, "intermediate_size": 96}).to_json_string())
    return root


def edit_weights(folder, edit) -> None:
    (path,) = folder.glob("*.safetensors")
    weights = load_file(path)
    edit(weights)
    save_file(weights, path, metadata={"format": "pt"})


@pytest.mark.parametrize("folder, tokenizer, named", [
    ("shape", "byte_level", r"model.llm_model='.*shape' does not load completely into .*; weights of another shape: "
                            r"\['model.norm.weight'\]"),  # was torch's `size mismatch`, naming no folder
    ("other_type", "byte_level", r"model.llm_model='.*other_type' does not load completely into .*unexpected: "
                                 r"\['model.layers.0.self_attn.k_proj.bias'.*of another shape: \['model.layers.0.mlp"),
    ("missing", "byte_level", r"model.llm_model='.*missing' could not be loaded"),  # these three: good, as tracebacks
    ("no_weights", "byte_level", r"model.llm_model='.*no_weights' could not be loaded.*no file named"),
    ("corrupt", "byte_level", r"model.llm_model='.*corrupt' could not be loaded.*config.json' is not a valid JSON"),
    ("clip", "byte_level", r"model.llm_model='.*clip' holds a 'clip_vision_model' model, which AutoModelForCausalLM "
                           "does not load"),  # was transformers' list of 100 model types, naming no key
    ("llama", None, r"tokenizer folder .*llama \(model.tokenizer, else model.llm_model\) holds none of the tokenizer "
                    "files"),  # was "requires the protobuf library"
])
def test_a_broken_llm_folder_is_one_error_line(tower_folders, sqa_root, tmp_path, capsys, folder, tokenizer, named):
    options = sqa_options(sqa_root, tmp_path / "out", f"model.llm_model={tower_folders / folder}", "model.llm_config=null",
                          f"model.tokenizer={tokenizer if tokenizer else 'null'}")
    assert train.main(["--cfg-path", str(TINY_SQA), "--options", *options]) == 2
    assert re.search(named, one_error_line(capsys.readouterr().err))


@pytest.mark.parametrize("option, named", [
    ("model.alpha=[1,", r"^error: --options .*model.alpha=\[1,: while parsing"),  # was yaml's ParserError traceback
    ("datasets.scienceqa_mc.answer_cue=Answer:", r"got \['Answer'\]; YAML reads an unquoted 'Answer:' as a mapping: "
                                                 r"for the text, quote it"),
    ("datasets.scienceqa_mc.vis_processor.eval.name=ademvl_image", r"vis_processor.eval.name: unknown processor "
                                                                   r"'ademvl_image'"),  # was 'NoneType' ... from_config
    pytest.param("run.device=cuda", r"^error: run.device=cuda but no CUDA device is visible",  # was a traceback
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_a_bad_command_line_value_is_one_error_line(sqa_root, tmp_path, capsys, option, named):
    assert train.main(["--cfg-path", str(TINY_SQA), "--options", *sqa_options(sqa_root, tmp_path / "out", option)]) == 2
    assert re.search(named, one_error_line(capsys.readouterr().err))
    assert not list((tmp_path / "out").glob("*/checkpoint_*"))


def test_a_job_file_that_is_a_folder_is_refused_before_anything_is_built(sqa_root, tmp_path, capsys):
    """It ended with IsADirectoryError after the model was built."""
    argv = ["--cfg-path", str(TINY_SQA), "--job-file", str(tmp_path), "--options", *sqa_options(sqa_root, tmp_path / "out")]
    assert train.main(argv) == 2
    assert f"error: --job-file {tmp_path} is a folder" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_an_mmbench_tsv_with_a_utf8_bom_is_read(tmp_path):
    """pandas and VLMEvalKit read it; it was "missing column index"."""
    tsv = tmp_path / "dev.tsv"
    pd.DataFrame(official_rows(), columns=COLUMNS).to_csv(tsv, sep="\t", index=False, encoding="utf-8-sig")
    assert tsv.read_bytes().startswith(b"\xef\xbb\xbf")
    assert len(build_mmbench(tsv)) == len(build_mmbench(make_official_mmbench(tmp_path / "plain.tsv")))


# ------------------------------------------------------------------ resume, evaluation results


def test_a_resume_with_other_data_or_run_settings_is_said(experiment, sqa_root, tmp_path, caplog):
    """A resume with another data_root or prompt_style was accepted silently, and its job's evaluate.txt mixed both."""
    runner = experiment.build_runner()
    runner.save_checkpoint(0, name="latest")
    runner.release_job_folder()
    path = runner.output_dir / "checkpoint_latest.pth"
    options = sqa_options(sqa_root, tmp_path / "out", "run.max_epoch=2", "run.valid_splits=[]",
                          f"run.resume_ckpt_path={path}", "datasets.scienceqa_mc.prompt_style=authors", "run.init_lr=0.5")
    resumed = prepare(TINY_SQA, options).build_runner()
    try:
        with caplog.at_level("WARNING"):
            resumed._load_checkpoint(str(path))
    finally:
        resumed.release_job_folder()
    assert (f"run.resume_ckpt_path={path} was trained with other settings: "
            "datasets.scienceqa_mc.prompt_style='ours' there, 'authors' here; run.init_lr=") in caplog.text
    assert "max_epoch" not in caplog.text  # what a resume is for


def test_a_failed_write_of_evaluation_results_names_the_file_and_leaves_no_partial_one(tmp_path):
    """A real failed write (a file-size limit, as a full disk): LAVIS's save_result ended in an OSError traceback
    naming no file, and left a truncated result JSON."""
    script = f"""
import resource, signal
from lavis_ademvl.common.results import save_result
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
save_result([{{"question_id": n, "answer": "x" * 64}} for n in range(200)], {str(tmp_path)!r}, "test_epoch0", "question_id")
"""
    (tmp_path / "test_epoch0.json").write_text("[]")  # an earlier evaluation's file stays as it was
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"OSError: cannot write evaluation result {tmp_path / 'test_epoch0_rank0.json'}: File too large" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["test_epoch0.json"]
    assert (tmp_path / "test_epoch0.json").read_text() == "[]"
    save_result([{"question_id": 1}, {"question_id": 1}, {"question_id": 2}], str(tmp_path), "test_epoch0", "question_id")
    assert json.loads((tmp_path / "test_epoch0.json").read_text()) == [{"question_id": 1}, {"question_id": 2}]


def test_the_backbone_fingerprint_samples_inside_a_tensor_of_any_size():
    """SmolLM2's embedding has 49,152 x 576 = 28,311,552 elements: float32 positions rounded past its end."""
    from lavis_ademvl.models.backbones import VALUES_PER_TENSOR, value_sample

    tensor = torch.arange(49_152 * 576) % 1000  # element i holds i % 1000: exact in float32
    assert VALUES_PER_TENSOR == 4
    assert value_sample(tensor) == [0.0, 183.0, 367.0, 551.0]  # elements 0, 9,437,183, 18,874,367, 28,311,551
    assert value_sample(torch.tensor([7.0])) == [7.0]
