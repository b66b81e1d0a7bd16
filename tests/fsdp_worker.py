"""Under torchrun (gloo): the tiny ADEM-VL on a saved LLaMA folder, built whole and built with `frozen_sharding: fsdp`
(the LLM on the meta device, each rank reading its rows of the files), fed the same batches. Each rank feeds its own
batches, of other sizes and candidate counts than the other's, and writes what it measured to OUT/rank<R>.json.

Usage: torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT LLM_FOLDER ...
(each folder sharded over both ranks; the first also with fsdp_shard_size 1, HSDP, reported as "hsdp", and with
gradient checkpointing of the LLM and the tower, reported as "checkpointed")
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor

import lavis_ademvl  # noqa: F401
from lavis_ademvl.models.ademvl import AdemVL

out_dir, llm_folders = Path(sys.argv[1]), sys.argv[2:]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)

section = OmegaConf.load(Path(lavis_ademvl.__file__).parent / "configs" / "models" / "ademvl" / "tiny.yaml").model
config = {**OmegaConf.to_container(section), "llm_config": None, "device": "cpu", "adapter_dropout": 0.0}


def build(**changes) -> AdemVL:
    torch.manual_seed(0)  # the same trainable initialisation in both models
    return AdemVL.from_config({**config, **changes}).eval()


def measure(llm_folder: str, **changes) -> dict:
    whole = build(llm_model=llm_folder, **changes)
    sharded = build(llm_model=llm_folder, frozen_sharding="fsdp", **changes)
    report: dict = {"sharded_llm": sharded.llm_sharded, "sharded_tensors": 0}

    # The weights and buffers: the sharded model's gathered tensors are the whole model's, bit for bit.
    worst = 0.0
    whole_parameters = dict(whole.named_parameters())
    for name, parameter in sharded.named_parameters():
        if isinstance(parameter, DTensor):
            report["sharded_tensors"] += 1
            local_rows = parameter.to_local().shape[0]
            report.setdefault("local_rows", {})[name] = local_rows
            parameter = parameter.full_tensor()
        worst = max(worst, (parameter.detach() - whole_parameters[name].detach()).abs().max().item())
    report["parameters"] = worst
    whole_buffers = dict(whole.named_buffers())
    report["buffers"] = {name: (buffer.dtype == whole_buffers[name].dtype
                                and torch.equal(buffer, whole_buffers[name])) for name, buffer in sharded.named_buffers()}
    report["backbones_equal"] = sharded.backbone_identity() == whole.backbone_identity()

    # Each rank's own batch: rank 0 three samples, rank 1 two.
    generator = torch.Generator().manual_seed(100 + rank)
    size = 3 - rank
    samples = {
        "image": torch.rand(size, 3, 32, 32, generator=generator),
        "has_image": torch.tensor([1, 0, 1][:size]),
        "text_input": [f"Question {rank}-{i}: which colour is the square?" for i in range(size)],
        "text_output": ["red", "a dark blue", "green"][:size],
    }
    for model in (whole, sharded):  # a training step (gradient checkpointing acts in training mode only)
        model.train().zero_grad(set_to_none=True)
        model(samples)["loss"].backward()
        model.eval()
    with torch.no_grad():
        report["loss"] = abs(whole(samples)["loss"].item() - sharded(samples)["loss"].item())
    sharded_grads = {name: p.grad for name, p in sharded.named_parameters() if p.requires_grad}
    report["gradients"] = max((p.grad - sharded_grads[name]).abs().max().item()
                              for name, p in whole.named_parameters() if p.requires_grad)
    report["logprobs"] = (whole.next_token_logprobs(samples) - sharded.next_token_logprobs(samples)).abs().max().item()

    # Rank scoring, two pairs per LLM pass: rank 0 has 3 x 3 candidates (5 passes of pairs), rank 1 2 x 1 (1 pass).
    candidates = [["red", "blue", "green"]] * size if rank == 0 else [["red"], ["blue"]]
    whole_scores = whole.score_candidates(samples, candidates, rows_per_pass=2)
    sharded_scores = sharded.score_candidates(samples, candidates, rows_per_pass=2)
    report["pair_passes"] = -(-sum(map(len, candidates)) // 2)
    report["scores"] = max(abs(a - b) for row, other in zip(whole_scores, sharded_scores) for a, b in zip(row, other))

    # Generation: new tokens until eos or the limit, greedy and beam search; the ranks end at other steps.
    for beams in (1, 2):
        report[f"generated_beams{beams}"] = [whole.generate(samples, num_beams=beams, max_length=4 + 6 * rank),
                                             sharded.generate(samples, num_beams=beams, max_length=4 + 6 * rank)]

    return report


reports = {folder: measure(folder) for folder in llm_folders}
reports["hsdp"] = measure(llm_folders[0], fsdp_shard_size=1)  # a 2-D mesh: 2 replicas of 1 shard
reports["checkpointed"] = measure(llm_folders[0], llm_gradient_checkpointing=True, vision_gradient_checkpointing=True)
(out_dir / f"rank{rank}.json").write_text(json.dumps(reports))
dist.barrier()
dist.destroy_process_group()
