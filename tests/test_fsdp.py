"""`run.distributed_strategy: fsdp`: the frozen towers sharded over the ranks with FSDP2 (lavis_ademvl.models.sharding).

In one process (a one-rank gloo group): the meta-device load, its buffers and its refusals. Under torchrun with 2 gloo
ranks: the sharded model against the whole one (tests/fsdp_worker.py), and `lavis_ademvl.train` with fsdp against ddp,
resume, evaluation in one process and `ademvl predict`; the predicted GPU memory per rank.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from cli import REPO, TINY_SQA, job_dirs
from helpers import make_batch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, LlamaConfig

from lavis_ademvl.cli import evaluate, predict
from lavis_ademvl.cli.params import main as params_main
from lavis_ademvl.common.launch import prepare, set_model_sharding
from lavis_ademvl.common.results import read_evaluations
from lavis_ademvl.common.run_config import check_run_config
from lavis_ademvl.models import gpu_memory
from lavis_ademvl.models.ademvl import AdemVL
from lavis_ademvl.models.config import AdemVLConfig
from lavis_ademvl.models.gpu_memory import frozen_units, measured_activations, predict_training_memory
from lavis_ademvl.models.sharding import frozen_mesh, llm_units, shard_rows

TINY = OmegaConf.to_container(OmegaConf.load(REPO / "lavis_ademvl" / "configs" / "models" / "ademvl" / "tiny.yaml").model)


def save_llm(folder: Path, tie: bool = False) -> Path:
    """A tiny random LLaMA (the tiny config's shape) saved as Hugging Face saves it: config.json, model.safetensors."""
    torch.manual_seed(1)
    shape = {key: value for key, value in TINY["llm_config"].items()}
    AutoModelForCausalLM.from_config(LlamaConfig(**shape, tie_word_embeddings=tie)).save_pretrained(folder)
    return folder


def tiny_config(**changes) -> dict:
    return {**TINY, "llm_config": None, "device": "cpu", "adapter_dropout": 0.0, **changes}


def build(**changes) -> AdemVL:
    torch.manual_seed(0)
    return AdemVL.from_config(tiny_config(**changes)).eval()


# ------------------------------------------------------------------ one process


def test_shard_rows_split_as_torch_chunk_does():
    class Mesh:  # the two calls shard_rows makes of a device mesh's shard dimension
        def __init__(self, size: int, index: int) -> None:
            self.size_, self.index = size, index

        def __getitem__(self, name: str) -> Mesh:
            return self

        def size(self) -> int:
            return self.size_

        def get_local_rank(self) -> int:
            return self.index

    for rows in (1, 2, 7, 259, 4096):
        for size in (1, 2, 3, 8):
            chunks = torch.arange(rows).chunk(size)
            for index in range(size):
                expected = chunks[index] if index < len(chunks) else torch.arange(0)
                start, count = shard_rows(rows, Mesh(size, index))
                assert count == len(expected)
                if count:
                    assert start == expected[0].item()


@pytest.mark.parametrize("tie", [False, True])
def test_llm_units_cover_every_llm_weight_once(tmp_path, tie):
    llm = AutoModelForCausalLM.from_pretrained(save_llm(tmp_path / "llm", tie))
    units = llm_units(llm)
    groups = [unit if isinstance(unit, list) else [unit] for unit in units]
    held = [id(p) for group in groups for p in {id(p): p for m in group for p in m.parameters()}.values()]
    assert sorted(held) == sorted(id(p) for p in llm.parameters())  # every weight, none twice
    assert len(units) == llm.config.num_hidden_layers + (1 if tie else 2)
    if tie:  # the tied embeddings, with the final norm, in one unit
        assert groups[-1][0] is llm.get_input_embeddings() and llm.get_output_embeddings() in groups[-1]


def test_meta_load_equals_a_normal_load(tmp_path, single_process_group):
    """Built on the meta device and read from the files, the LLM computes what `from_pretrained`'s does: every weight,
    every buffer (LLaMA's rotary inv_freq is in no checkpoint; left to `to_empty` it would be uninitialised memory) and
    the loss."""
    folder = save_llm(tmp_path / "llm")
    whole, sharded = build(llm_model=str(folder)), build(llm_model=str(folder), frozen_sharding="fsdp")
    assert sharded.llm_sharded and not whole.llm_sharded
    assert isinstance(sharded.llm.model.layers[0].mlp.up_proj.weight, DTensor)
    sharded_parameters = dict(sharded.named_parameters())
    for name, parameter in whole.named_parameters():
        other = sharded_parameters[name]
        assert torch.equal(parameter, other.full_tensor() if isinstance(other, DTensor) else other), name
    buffers = dict(sharded.named_buffers())
    assert any(name.endswith("rotary_emb.inv_freq") for name in buffers)
    assert any(name.endswith("embeddings.position_ids") for name in buffers)
    for name, buffer in whole.named_buffers():
        assert buffers[name].dtype == buffer.dtype and torch.equal(buffers[name], buffer), name
    batch = make_batch()
    assert torch.equal(whole(batch)["loss"], sharded(batch)["loss"])
    assert sharded.backbone_identity() == whole.backbone_identity()


def test_a_missing_or_unexpected_weight_names_the_folder_and_keys(tmp_path, single_process_group):
    folder = save_llm(tmp_path / "llm")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.extra.weight"] = weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not load completely.*missing.*model\.layers\.1\.mlp\.up_proj\.weight.*"
                                         r"unexpected.*model\.layers\.0\.extra\.weight"):
        build(llm_model=str(folder), frozen_sharding="fsdp")


def test_a_folder_without_safetensors_is_refused(tmp_path, single_process_group):
    folder = save_llm(tmp_path / "llm")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="reads the LLM's weights shard by shard from safetensors files"):
        build(llm_model=str(folder), frozen_sharding="fsdp")


def test_sharding_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torchrun job; this process is in no process group"):
        build(llm_config=TINY["llm_config"], frozen_sharding="fsdp")


def test_a_shard_size_that_does_not_divide_the_ranks_is_refused(single_process_group):
    with pytest.raises(ValueError, match=r"run.fsdp_shard_size=3 must divide the number of ranks \(1\)"):
        frozen_mesh("cpu", 3)


def test_settings_that_contradict_sharding_are_refused():
    with pytest.raises(ValueError, match="cannot also be placed by llm_device_map or quantized"):
        AdemVLConfig(frozen_sharding="fsdp", llm_device_map="auto")
    with pytest.raises(ValueError, match="run.distributed_strategy='zero3': choose one of"):
        check_run_config(OmegaConf.create({"distributed_strategy": "zero3"}))
    with pytest.raises(ValueError, match="run.fsdp_shard_size=2 is read only with run.distributed_strategy=fsdp"):
        check_run_config(OmegaConf.create({"fsdp_shard_size": 2}))
    with pytest.raises(ValueError, match="model.frozen_sharding='fsdp' is set by run.distributed_strategy=fsdp"):
        set_model_sharding(OmegaConf.create({"arch": "ademvl", "frozen_sharding": "fsdp"}),
                           OmegaConf.create({"distributed": True}))


def test_fsdp_under_torchrun_builds_the_model_sharded_and_in_one_process_whole():
    model_cfg = OmegaConf.create({"arch": "ademvl"})
    set_model_sharding(model_cfg, OmegaConf.create({"distributed_strategy": "fsdp", "distributed": False}))
    assert model_cfg.get("frozen_sharding") is None
    set_model_sharding(model_cfg, OmegaConf.create({"distributed_strategy": "fsdp", "distributed": True,
                                                    "fsdp_shard_size": 2}))
    assert (model_cfg.frozen_sharding, model_cfg.fsdp_shard_size) == ("fsdp", 2)


def test_the_runner_shards_a_model_built_whole(sqa_root, tmp_path, single_process_group):
    """A model built whole (the Python API, or LAVIS's own scripts) is sharded by the runner's wrap; its trainable
    weights stay whole and DDP owns exactly them."""
    experiment = prepare(TINY_SQA, [f"datasets.scienceqa_mc.build_info.data_root={sqa_root}",
                                    f"run.output_dir={tmp_path / 'out'}", "run.distributed_strategy=fsdp"])
    model = experiment.model
    assert not model.llm_sharded  # prepare saw no torchrun job
    experiment.cfg.run_cfg.distributed = True
    wrapped = experiment.build_runner().model
    assert model.llm_sharded and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {name for name, _ in model.named_parameters()} - wrapped.parameters_to_ignore == trainable
    assert not any(isinstance(p, DTensor) for name, p in model.named_parameters() if name in trainable)
    wrapped(make_batch())["loss"].backward()
    assert model.visual_value_offset.grad is not None


# ------------------------------------------------------------------ two gloo ranks


def torchrun(script: list[str], cwd: Path, port: int) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *script]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]


def test_two_ranks_sharded_compute_what_the_whole_model_computes(tmp_path):
    """Each rank feeds its own batches (sizes, candidate counts and answer lengths differ between the ranks, so that a
    rank needing fewer LLM passes must keep in step) to the tiny model built whole and built sharded on an untied and a
    tied LLaMA folder, on a 2-D mesh (HSDP, run.fsdp_shard_size=1) and with gradient checkpointing: weights, buffers,
    loss, gradients, next-token log-probabilities, rank scores and generated text are equal."""
    folders = [str(save_llm(tmp_path / "untied")), str(save_llm(tmp_path / "tied", tie=True))]
    torchrun([str(REPO / "tests" / "fsdp_worker.py"), str(tmp_path), *folders], tmp_path, 29534)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for folder in [*folders, "hsdp", "checkpointed"]:
        rank0, rank1 = (report[folder] for report in reports)
        assert rank0["sharded_llm"] and rank0["sharded_tensors"] > 0
        if folder == "hsdp":  # fsdp_shard_size 1: each rank holds a whole replica
            assert rank0["local_rows"] == rank1["local_rows"] and rank0["local_rows"]["llm.model.embed_tokens.weight"] == 259
        else:  # every tensor is split between the ranks (the 259-row embeddings unevenly: 130 + 129)
            for name, rows in rank0["local_rows"].items():
                assert rows + rank1["local_rows"][name] >= 2 and rows >= rank1["local_rows"][name], name
            assert rank0["local_rows"]["llm.model.embed_tokens.weight"] == 130
        assert rank0["pair_passes"] != rank1["pair_passes"]  # rank 1 made idle passes to keep in step
        for report in (rank0, rank1):
            assert all(report["buffers"].values()) and len(report["buffers"]) >= 2, report["buffers"]
            assert report["backbones_equal"]
            for key in ("parameters", "loss", "gradients", "logprobs", "scores"):
                assert report[key] <= 1e-6, (folder, key, report[key])
            for beams in (1, 2):
                whole, sharded = report[f"generated_beams{beams}"]
                assert whole == sharded


def test_fsdp_training_equals_ddp_resumes_exactly_and_its_checkpoint_loads_in_one_process(sqa_root, tmp_path, capsys):
    """`lavis_ademvl.train` under torchrun with run.distributed_strategy=fsdp, one epoch then a resume to the second,
    gives the weights the uninterrupted run under ddp gives (same seed and batches, adapter dropout and random crop off);
    its test evaluation equals the one-process `lavis_ademvl.evaluate` of its checkpoint, and `ademvl predict` loads
    that checkpoint."""
    common = [f"datasets.scienceqa_mc.build_info.data_root={sqa_root}", "run.device=cpu", "model.adapter_dropout=0.0",
              "datasets.scienceqa_mc.vis_processor.train.resize=squash", "run.inference_method=rank",
              "run.max_epoch=2", "run.valid_splits=[]"]

    def train(output: str, *options: str) -> Path:
        torchrun(["-m", "lavis_ademvl.train", "--cfg-path", str(TINY_SQA), "--options", *common,
                  f"run.output_dir={tmp_path / output}", *options], tmp_path, 29535)
        return job_dirs(tmp_path / output)[0]

    def weights(job: Path) -> dict[str, torch.Tensor]:
        return torch.load(job / "checkpoint_latest.pth", weights_only=True)["model"]

    ddp = train("ddp", "run.test_splits=[]")
    fsdp = train("fsdp", "run.distributed_strategy=fsdp", "run.epochs_per_job=1", "run.test_splits=[]")
    first_epoch = weights(fsdp)
    # Evaluated in batches of 3: each rank's 4 test questions end with a batch of one.
    train("fsdp", "run.distributed_strategy=fsdp", f"run.resume_ckpt_path={fsdp / 'checkpoint_latest.pth'}",
          "run.batch_size_eval=3")
    trained = weights(fsdp)
    assert trained.keys() == first_epoch.keys() and not torch.equal(trained["visual_value_offset"],
                                                                    first_epoch["visual_value_offset"])
    for key, value in weights(ddp).items():
        torch.testing.assert_close(trained[key], value, rtol=0, atol=1e-6, msg=key)
    assert '"distributed_strategy": "fsdp"' in (fsdp / "log.txt").read_text()

    checkpoint = fsdp / "checkpoint_latest.pth"
    alone = tmp_path / "alone"
    assert evaluate.main(["--cfg-path", str(TINY_SQA), "--options", *common, f"run.output_dir={alone}",
                          "model.load_finetuned=true", f"model.finetuned={checkpoint}"]) == 0
    (evaluated,) = job_dirs(alone)
    sharded_answers = json.loads((fsdp / "result" / "test_epoch1.json").read_text())
    alone_answers = json.loads((evaluated / "result" / "test_epochfinetuned.json").read_text())
    assert len(sharded_answers) == 8  # the distributed sampler's padded duplicates removed
    assert sorted(sharded_answers, key=lambda a: a["question_id"]) == sorted(alone_answers, key=lambda a: a["question_id"])
    assert read_evaluations(fsdp / "evaluate.txt")[-1][1]["Avg"] == read_evaluations(evaluated / "evaluate.txt")[-1][1]["Avg"]

    capsys.readouterr()
    assert predict.main(["--cfg-path", str(TINY_SQA), "--options", *common[1:], "--checkpoint", str(checkpoint),
                         "--question", "Which colour is the square?", "--choices", "red", "blue"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] in ("(A) red", "(B) blue")


# ------------------------------------------------------------------ predicted memory per GPU


def test_measured_activations_on_the_meta_device_are_what_a_real_step_saves(monkeypatch):
    """The meta-device measurement against the same step on real CPU tensors (attention by the math kernel, which the
    meta device runs), counted directly: every saved tensor that needs a gradient once, by its storage's address."""
    meta = measured_activations(AdemVL.on_meta_device(tiny_config(llm_config=TINY["llm_config"])), 2, 40, torch.float32)

    def by_storage(step, weights) -> int:
        addresses = {weight.untyped_storage().data_ptr() for weight in weights}
        storages: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if tensor.requires_grad and tensor.is_floating_point() and storage.data_ptr() not in addresses:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            step()
        return sum(storages.values())

    monkeypatch.setattr(gpu_memory, "saved_tensor_bytes", by_storage)
    with sdpa_kernel(SDPBackend.MATH):
        real = measured_activations(build(llm_config=TINY["llm_config"]).train(), 2, 40, torch.float32, device="cpu")
    assert meta == real > 2 * 40 * 64 * 4 * TINY["llm_config"]["num_hidden_layers"]


def test_predicted_memory_splits_the_frozen_towers_and_keeps_the_rest():
    model = AdemVL.on_meta_device(tiny_config(llm_config=TINY["llm_config"]))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert sorted(id(p) for unit in frozen_units(model) for p in unit) == sorted(id(p) for p in frozen)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    predicted = predict_training_memory(model, 2, 40, gpus=3)
    ddp, fsdp = predicted["ddp"], predicted["fsdp"]
    assert ddp.frozen == 4 * sum(p.numel() for p in frozen)  # the tiny config's llm_dtype: float32
    # Under FSDP each tensor's rows are split as torch.chunk splits them: rank 0 holds the largest chunk.
    assert fsdp.frozen == 4 * sum(p[: len(torch.arange(p.shape[0]).chunk(3)[0])].numel() for p in frozen)
    assert fsdp.gathered == 2 * 4 * max(sum(p.numel() for p in unit) for unit in frozen_units(model)) > 0
    assert ddp.trainable == fsdp.trainable == 16 * trainable
    assert ddp.activations == fsdp.activations > 0 and ddp.gathered == 0


def test_params_prints_the_70b_rows_offline(capsys):
    assert params_main(["--model-type", "llama3_70b", "--gpus", "8", "--batch-size", "1", "--length", "256"]) == 0
    printed = capsys.readouterr().out
    assert "LLM                           70,553,706,496" in printed
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.startswith(("  ddp", "  fsdp"))}
    ddp_total, fsdp_total = float(rows["ddp"][-1]), float(rows["fsdp,"][-1])
    assert float(rows["ddp"][1]) > 130 and fsdp_total < ddp_total / 4  # 141 GB whole; an eighth per GPU, sharded
