"""The authors' released checkpoints load: their key layout maps onto our model, and a file written exactly as their
util/misc.py `save_model` writes it (model, optimizer, epoch, scaler, args) passes the weights_only loader."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from cli import TINY_SQA
from helpers import make_batch, tiny_config, tiny_model
from timm.optim import param_groups_weight_decay

from lavis_ademvl.cli import predict
from lavis_ademvl.common.checkpoints import load_checkpoint_file
from lavis_ademvl.common.launch import prepare
from lavis_ademvl.models.ademvl import AdemVL

PACKAGE = Path(__file__).resolve().parent.parent / "lavis_ademvl"


def authors_layout(model, prefix=""):
    """Our trained weights written the way the authors' code saves them (OpenAI-CLIP block numbering)."""
    state = {
        "adapter_emb1": model.visual_key_offset, "adapter_emb2": model.visual_value_offset,
        "adapter_proj.fc1.weight": model.visual_proj.fc1.weight, "adapter_proj.fc1.bias": model.visual_proj.fc1.bias,
        "adapter_proj.fc2.weight": model.visual_proj.fc2.weight, "adapter_proj.fc2.bias": model.visual_proj.fc2.bias,
        "adapter_proj_cls.fc1.weight": model.cls_proj.fc1.weight, "adapter_proj_cls.fc1.bias": model.cls_proj.fc1.bias,
        "adapter_proj_cls.fc2.weight": model.cls_proj.fc2.weight, "adapter_proj_cls.fc2.bias": model.cls_proj.fc2.bias,
    }
    for block, adapter in enumerate(model.vision_adapters):
        for linear in ("fc1", "fc2"):
            state[f"backbone.visual.transformer.resblocks.{block}.adapter_mlp.{linear}.weight"] = getattr(adapter, linear).weight
    # Their last CLIP block carries an adapter too, saved although its output is never read.
    last = len(model.vision_adapters)
    state[f"backbone.visual.transformer.resblocks.{last}.adapter_mlp.fc1.weight"] = torch.randn(4, 32)
    state[f"backbone.visual.transformer.resblocks.{last}.adapter_mlp.fc2.weight"] = torch.randn(32, 4)
    return {prefix + key: value.detach().clone() for key, value in state.items()}


@pytest.fixture
def trained():
    torch.manual_seed(1)
    model = tiny_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("prefix", ["", "module."])
def test_round_trip_gives_identical_outputs(trained, tmp_path, prefix):
    path = tmp_path / "checkpoint_7B_sqa.pth"
    torch.save({"model": authors_layout(trained, prefix), "epoch": 19}, path)
    torch.manual_seed(1)  # the same random frozen LLM and tower as `trained`
    loaded = tiny_model().eval()
    loaded.load_checkpoint(str(path))
    for name, value in trained.trainable_state_dict().items():
        torch.testing.assert_close(loaded.trainable_state_dict()[name], value, rtol=0, atol=0, msg=name)
    batch = make_batch()
    torch.testing.assert_close(loaded.next_token_logprobs(batch), trained.next_token_logprobs(batch), rtol=0, atol=0)


def test_unmapped_and_missing_keys_are_errors(trained, tmp_path):
    state = authors_layout(trained)
    state["backbone.visual.proj"] = torch.zeros(2)
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(KeyError, match="map to nothing in this model: \\['backbone.visual.proj'\\]"):
        tiny_model().load_checkpoint(str(tmp_path / "extra.pth"))
    state = {k: v for k, v in authors_layout(trained).items() if not k.startswith("adapter_proj_cls")}
    torch.save({"model": state}, tmp_path / "missing.pth")
    with pytest.raises(KeyError, match="missing trainable keys \\['cls_proj.fc1.bias'"):
        tiny_model().load_checkpoint(str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------- a file written like their save_model


class AuthorsModel(nn.Module):
    """The authors' module tree at the names their save_model keeps (every parameter whose name contains
    "adapter"), holding `source`'s values, plus a frozen LLaMA weight that is not saved."""

    def __init__(self, source: AdemVL) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(8, 4).requires_grad_(False)
        self.adapter_emb1 = nn.Parameter(source.visual_key_offset.detach().clone())
        self.adapter_emb2 = nn.Parameter(source.visual_value_offset.detach().clone())
        self.adapter_proj = self._projector(source.visual_proj)
        self.adapter_proj_cls = self._projector(source.cls_proj)
        width, rank = source.vision_adapters[0].fc1.in_features, source.vision_adapters[0].fc1.out_features
        resblocks = nn.ModuleList()
        for index in range(len(source.vision_adapters) + 1):  # the last block's adapter exists, unused
            block = nn.Module()
            block.adapter_mlp = nn.Module()
            block.adapter_mlp.fc1 = nn.Linear(width, rank, bias=False)
            block.adapter_mlp.fc2 = nn.Linear(rank, width, bias=False)
            if index < len(source.vision_adapters):
                block.adapter_mlp.load_state_dict(source.vision_adapters[index].state_dict())
            resblocks.append(block)
        self.backbone = nn.Module()
        self.backbone.visual = nn.Module()
        self.backbone.visual.transformer = nn.Module()
        self.backbone.visual.transformer.resblocks = resblocks

    @staticmethod
    def _projector(ours: nn.Module) -> nn.Module:
        projector = nn.Module()
        projector.fc1 = nn.Linear(ours.fc1.in_features, ours.fc1.out_features)
        projector.fc2 = nn.Linear(ours.fc2.in_features, ours.fc2.out_features)
        projector.fc1.load_state_dict(ours.fc1.state_dict())
        projector.fc2.load_state_dict(ours.fc2.state_dict())
        return projector


def their_train_args() -> argparse.Namespace:
    """The Namespace their train.py builds for the README's ScienceQA command on 8 GPUs (our restatement)."""
    return argparse.Namespace(
        dataset="sqa", data_root="/path/to/data/", clip="ViT-L/14", clip_root="/path/to/data/weights/clip/",
        llm_model="7B", output_dir="./output_dir", log_dir="./output_dir", prompt_format="CQM-A",
        options=["A", "B", "C", "D", "E"], caption_file="/path/to/data/captions.json", use_caption=False,
        num_workers=10, pin_mem=True, adapter_dim=12, hidden_proj=128, max_seq_len=512, seed=42, resume="",
        down_sample_num=[256, 64], alpha=0.1, beta=0.01, drop_ratio=0.1, no_cls=False, epochs=20, start_epoch=0,
        batch_size=2, accum_iter=2, lr=1.125e-3, blr=9e-3, min_lr=0.0, warmup_epochs=2.0, weight_decay=0.02,
        clip_grad=None, device="cuda", cpu_load=False, gradient_checkpointing=False, world_size=8, local_rank=-1,
        dist_on_itp=False, dist_url="env://", rank=0, gpu=0, distributed=True, dist_backend="nccl", is_train=True,
    )


def save_like_authors(source: AdemVL, path: Path, store: Path, args: object) -> dict[str, torch.Tensor]:
    """Train one step as their train.py does (DDP, AdamW over timm's two weight-decay groups, a loss scaler) and
    save as their save_model does; returns the saved "model" dict."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(AuthorsModel(source))
        optimizer = torch.optim.AdamW(param_groups_weight_decay(model.module, 0.02), lr=1.125e-3, betas=(0.9, 0.95))
        scaler = torch.amp.GradScaler("cpu")
        loss = sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        trainable = {name: p.data for name, p in model.named_parameters() if "adapter" in name}
        torch.save(
            {"model": trainable, "optimizer": optimizer.state_dict(), "epoch": 19, "scaler": scaler.state_dict(), "args": args},
            path,
        )
    finally:
        dist.destroy_process_group()
    return trainable


def expected_ours(saved: dict[str, torch.Tensor], source: AdemVL) -> dict[str, torch.Tensor]:
    """Our parameter names for the saved values (the unused last-block adapter has none)."""
    names = {
        "adapter_emb1": "visual_key_offset", "adapter_emb2": "visual_value_offset",
        **{f"adapter_proj.fc{i}.{kind}": f"visual_proj.fc{i}.{kind}" for i in (1, 2) for kind in ("weight", "bias")},
        **{f"adapter_proj_cls.fc{i}.{kind}": f"cls_proj.fc{i}.{kind}" for i in (1, 2) for kind in ("weight", "bias")},
        **{f"backbone.visual.transformer.resblocks.{b}.adapter_mlp.fc{i}.weight": f"vision_adapters.{b}.fc{i}.weight"
           for b in range(len(source.vision_adapters)) for i in (1, 2)},
    }
    return {names[key.removeprefix("module.")]: value for key, value in saved.items() if key.removeprefix("module.") in names}


@pytest.fixture
def their_file(trained, tmp_path):
    path = tmp_path / "checkpoint-19.pth"
    saved = save_like_authors(trained, path, tmp_path / "store", their_train_args())
    return path, saved


def test_their_save_model_file_loads_through_finetuned_and_load_checkpoint(trained, their_file, caplog):
    path, saved = their_file
    raw = load_checkpoint_file(path)
    assert set(raw) == {"model", "optimizer", "epoch", "scaler", "args"}
    assert isinstance(raw["args"], argparse.Namespace) and raw["args"].prompt_format == "CQM-A"
    assert [group["weight_decay"] for group in raw["optimizer"]["param_groups"]] == [0.0, 0.02]
    assert raw["optimizer"]["state"] and raw["scaler"]["scale"] == 65536.0
    assert all(key.startswith("module.") for key in raw["model"]) and "module.tok_embeddings.weight" not in raw["model"]
    last = len(trained.vision_adapters)
    assert f"module.backbone.visual.transformer.resblocks.{last}.adapter_mlp.fc1.weight" in raw["model"]

    expected = expected_ours(saved, trained)
    # The optimizer step moved every weight away from `trained`'s, so a match means these values were loaded.
    assert not torch.equal(expected["visual_value_offset"], trained.visual_value_offset)
    with caplog.at_level("INFO"):
        finetuned = AdemVL.from_config(tiny_config(load_finetuned=True, finetuned=str(path)))
    assert "epoch 19" in caplog.text and "'prompt_format': 'CQM-A'" in caplog.text
    loaded = tiny_model()
    loaded.load_checkpoint(str(path))
    for model in (finetuned, loaded):
        state = model.trainable_state_dict()
        assert set(state) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


@dataclass
class TrainingArgs:
    """A class of the saving script: unpickling it would import and run that script's code."""

    prompt_format: str = "CQM-A"


def test_any_other_class_in_the_file_is_refused_by_every_loader(trained, tmp_path, capsys):
    path = tmp_path / "checkpoint-19.pth"
    save_like_authors(trained, path, tmp_path / "store", TrainingArgs())
    refused = f"refused: it holds \\['{re.escape(TrainingArgs.__module__)}.TrainingArgs'\\]"
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} was {refused}"):
        tiny_model().load_checkpoint(str(path))
    with pytest.raises(ValueError, match=refused):
        AdemVL.from_config(tiny_config(load_finetuned=True, finetuned=str(path)))
    argv = ["--cfg-path", str(TINY_SQA), "--checkpoint", str(path), "--question", "q?", "--choices", "a", "b"]
    assert predict.main(argv) == 2
    assert f"{path} was refused" in capsys.readouterr().err

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth is not a readable torch checkpoint"):
        load_checkpoint_file(tmp_path / "junk.pth")


def test_every_checkpoint_load_goes_through_the_shared_loader():
    """torch.load appears once in the package: in common/checkpoints.py (model.finetuned, model.load_checkpoint,
    run.resume_ckpt_path, predict, visualize and compare all reach it)."""
    calls = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if "torch.load(" in path.read_text()}
    assert calls == {"common/checkpoints.py"}


def test_resuming_their_file_says_it_cannot_be_resumed_and_how_to_start_from_it(trained, their_file, sqa_root, tmp_path):
    """Their optimizer state is their model's: a resume failed with "does not match this model: missing trainable
    keys", which says neither."""
    path, saved = their_file
    options = [f"datasets.scienceqa_mc.build_info.data_root={sqa_root}", f"run.output_dir={tmp_path / 'out'}",
               "run.valid_splits=[]"]
    runner = prepare(TINY_SQA, [*options, f"run.resume_ckpt_path={path}"]).build_runner()
    suggestion = f"model.finetuned={path} model.load_finetuned=true"
    with pytest.raises(ValueError, match=rf"run.resume_ckpt_path={path} is a checkpoint of the ADEM-VL authors' code, "
                                         rf"which cannot be resumed: .*--options {suggestion}$"):
        runner.train()
    runner.release_job_folder()
    started = prepare(TINY_SQA, [*options, *suggestion.split()])  # what the message suggests: their weights load
    for name, value in expected_ours(saved, trained).items():
        torch.testing.assert_close(started.model.trainable_state_dict()[name], value, rtol=0, atol=0, msg=name)
