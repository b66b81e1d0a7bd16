"""runner_ademvl: exact resume, 2-process gloo DDP, the per-iteration schedule, registration."""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
from cli import REPO, TINY_SQA, job_dirs, read_jsonl, run_module
from lavis.common.registry import registry

from lavis_ademvl.common.optims import LinearWarmupCosineIterLRScheduler
from lavis_ademvl.common.results import read_evaluations


def sqa_options(root, output_dir, *extra):
    return [f"datasets.scienceqa_mc.build_info.data_root={root}", f"run.output_dir={output_dir}", *extra]


def test_resume_equals_uninterrupted(sqa_root, tmp_path):
    # 16 training questions, batch 8: 2 iterations per epoch, 2 epochs = 4 iterations.
    common = ["run.batch_size_train=8", "run.valid_splits=[]", "run.test_splits=[]"]
    run_module("lavis_ademvl.train", TINY_SQA, sqa_options(sqa_root, tmp_path / "full", *common), cwd=tmp_path)
    run_module(
        "lavis_ademvl.train", TINY_SQA,
        sqa_options(sqa_root, tmp_path / "split", *common, "run.epochs_per_job=1"), cwd=tmp_path,
    )
    (first_job,) = job_dirs(tmp_path / "split")
    assert not (first_job / "checkpoint_1.pth").exists()
    run_module(
        "lavis_ademvl.train", TINY_SQA,
        sqa_options(sqa_root, tmp_path / "split", *common, f"run.resume_ckpt_path={first_job / 'checkpoint_latest.pth'}"),
        cwd=tmp_path,
    )
    (full_job,) = job_dirs(tmp_path / "full")
    assert job_dirs(tmp_path / "split") == [first_job]  # the resumed run continues in its own folder
    full = torch.load(full_job / "checkpoint_latest.pth", weights_only=True)
    resumed = torch.load(first_job / "checkpoint_latest.pth", weights_only=True)
    assert full["epoch"] == resumed["epoch"] == 1
    for key, value in full["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)

    def losses(job):
        return [e["train_loss"] for e in read_jsonl(job / "log.txt") if "train_loss" in e]

    assert losses(full_job) == losses(first_job) and len(losses(full_job)) == 2


def test_two_process_gloo_ddp_keeps_ranks_identical(sqa_root, tmp_path):
    # No adapter dropout and no random crop: each rank draws its own, which one process would draw otherwise.
    common = ["run.max_epoch=1", "run.device=cpu", "model.adapter_dropout=0.0",
              "datasets.scienceqa_mc.vis_processor.train.resize=squash"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        str(REPO / "tests" / "ddp_worker.py"), str(tmp_path), "--cfg-path", str(TINY_SQA), "--options",
        *sqa_options(sqa_root, tmp_path / "out", "run.batch_size_train=4", *common),
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    initial = torch.load(job_dirs(tmp_path / "out")[0] / "checkpoint_latest.pth", weights_only=True)["model"]
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(initial[key], rank0[key], rtol=0, atol=0, msg=key)
    # Training moved the weights: the zero-initialised value offset is no longer zero.
    assert rank0["visual_value_offset"].abs().sum() > 0
    # DDP owned the trainable parameters only; the frozen towers, which it no longer broadcasts, are equal on both ranks.
    ddp0, ddp1 = (torch.load(tmp_path / f"rank{rank}_ddp.pt", weights_only=True) for rank in (0, 1))
    assert ddp0["owned"] == ddp1["owned"] == sorted(rank0)
    assert ddp0["frozen"].keys() == ddp1["frozen"].keys() and len(ddp0["frozen"]) > 0
    for key, value in ddp0["frozen"].items():
        torch.testing.assert_close(ddp1["frozen"][key], value, rtol=0, atol=0, msg=key)
    # And it trains as one process does on the same batches: 2 ranks x 4 questions are the 8 of one process's batch
    # (the sampler deals them out in turn), every answer has as many tokens, so the mean of the ranks' mean losses is
    # the batch's mean loss; equal up to the order of float sums.
    single = tmp_path / "single"
    run_module("lavis_ademvl.train", TINY_SQA, sqa_options(sqa_root, single, "run.batch_size_train=8", *common,
                                                           "run.valid_splits=[]", "run.test_splits=[]"), cwd=tmp_path)
    alone = torch.load(job_dirs(single)[0] / "checkpoint_latest.pth", weights_only=True)["model"]
    for key, value in alone.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6, msg=key)  # seen: 1.8e-7 at most
    (job,) = job_dirs(tmp_path / "out")
    split, evaluation = read_evaluations(job / "evaluate.txt")[-1]
    assert split == "test" and evaluation["counts"]["Avg"] == 8  # padded duplicates of the distributed sampler are removed


def test_per_iteration_warmup_cosine():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=0.0)
    scheduler = LinearWarmupCosineIterLRScheduler(
        optimizer, max_epoch=4, init_lr=1.0, min_lr=0.1, warmup_epochs=1, iters_per_epoch=10
    )
    assert scheduler.step(0, 0) == 0.0
    assert scheduler.step(0, 5) == pytest.approx(0.5)
    assert scheduler.step(1, 0) == pytest.approx(1.0)
    assert scheduler.step(2, 5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1.5 / 3)))
    assert scheduler.step(3, 9) > 0.1 and optimizer.param_groups[0]["lr"] == scheduler.step(3, 9)
    assert registry.get_lr_scheduler_class("linear_warmup_cosine_iter_lr") is LinearWarmupCosineIterLRScheduler


def clipped(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """torch.nn.utils.clip_grad_norm_, restated: scaled by max_norm / (total 2-norm + 1e-6) when that is below 1."""
    total = math.sqrt(sum(float((grad.double() ** 2).sum()) for grad in grads))
    return [grad * min(1.0, max_norm / (total + 1e-6)) for grad in grads]


@pytest.mark.parametrize("loss_scale", [None, 1024.0])
def test_max_grad_norm_clips_the_true_gradients_of_the_trainable_parameters(loss_scale):
    """run.max_grad_norm: an SGD step (lr 1) moves each trainable parameter by minus its clipped gradient, clipped
    after unscaling when a loss scaler is used; frozen parameters and the unclipped step are untouched."""
    from lavis_ademvl.runners.runner_ademvl import optimizer_update

    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    x = torch.randn(8, 3)
    for max_norm in (0.5, 1e6, None):  # clipped, below the limit, no clipping
        start = [weight.detach().clone(), bias.detach().clone()]
        optimizer = torch.optim.SGD([weight, bias], lr=1.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale) if loss_scale else None
        loss = ((x + frozen) @ weight.T + bias).pow(2).sum()
        grads = torch.autograd.grad(loss, [weight, bias], retain_graph=True)
        (scaler.scale(loss) if scaler else loss).backward()
        optimizer_update(optimizer, scaler, max_norm)
        expected = grads if max_norm is None else clipped(list(grads), max_norm)
        for param, before, grad in zip([weight, bias], start, expected):
            torch.testing.assert_close(before - param.detach(), grad, rtol=1e-5, atol=1e-6)
            assert param.grad is None
        step_norm = math.sqrt(sum(float(((b - p.detach()) ** 2).sum()) for p, b in zip([weight, bias], start)))
        assert step_norm == pytest.approx(0.5, rel=1e-5) if max_norm == 0.5 else step_norm > 10
    assert frozen.grad is None


def test_registration_and_reimport():
    import lavis_ademvl.models.ademvl as ademvl_module

    names = {
        "model": ["ademvl"], "processor": ["ademvl_image_train", "ademvl_image_eval", "ademvl_text"],
        "task": ["scienceqa_mc"], "builder": ["scienceqa_mc"], "runner": ["runner_ademvl"],
        "lr_scheduler": ["linear_warmup_cosine_iter_lr"],
    }
    for kind, kind_names in names.items():
        for name in kind_names:
            assert name in registry.mapping[f"{kind}_name_mapping"], (kind, name)
            assert name != "scienceqa"  # LAVIS HEAD's own ScienceQA names
    importlib.reload(ademvl_module)  # importing our modules again must not raise
    assert registry.get_model_class("ademvl").__module__ == ademvl_module.__name__

    from lavis.models import BaseModel

    from lavis_ademvl.common.registration import register

    class Impostor(BaseModel):
        pass

    with pytest.raises(KeyError, match="'ademvl' already registered"):
        register("model", "ademvl")(Impostor)


def test_load_model_and_preprocess():
    from lavis.models import load_model_and_preprocess

    model, vis_processors, text_processors = load_model_and_preprocess("ademvl", "tiny", is_eval=True, device="cpu")
    assert not model.training and model.fusion == "adem"
    image = vis_processors["eval"](__import__("PIL.Image", fromlist=["Image"]).new("RGB", (50, 40)))
    assert image.shape == (3, 32, 32)
    assert text_processors["eval"]("  two   spaces\tand tab ") == "two spaces and tab"
    answers = model.predict_answers(
        {"image": image.unsqueeze(0), "has_image": torch.tensor([1]), "text_input": ["Question: hi?\n"],
         "answer_cue": "Answer:"},
        inference_method="rank",
        answer_list=[[" yes", " no"]],
    )
    assert answers[0] in (" yes", " no")


def test_a_task_with_its_own_train_epoch_is_refused_not_bypassed(sqa_root, tmp_path):
    """runner_ademvl runs its own epoch loop around the task's train_step: a task's own train_epoch would be skipped
    without a word."""
    from lavis_ademvl.common.launch import prepare

    experiment = prepare(TINY_SQA, sqa_options(sqa_root, tmp_path / "out"))

    class OwnEpochTask(type(experiment.task)):
        def train_epoch(self, *args, **kwargs):
            raise AssertionError("never reached")

    experiment.task.__class__ = OwnEpochTask
    with pytest.raises(TypeError, match="task OwnEpochTask has its own train_epoch, which runner_ademvl's epoch loop "
                                        "would skip"):
        experiment.build_runner()
