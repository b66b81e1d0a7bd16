"""Shared test helpers: the tiny random model (real Hugging Face LLaMA + CLIP classes) and a batch for it."""
from __future__ import annotations

import copy

import torch
from omegaconf import OmegaConf

from lavis_ademvl.models.ademvl import AdemVL

TINY_CONFIG = OmegaConf.to_container(OmegaConf.load(AdemVL.default_config_path("tiny")).model)


def tiny_config(**overrides) -> dict:
    config = copy.deepcopy(TINY_CONFIG)
    config.update(overrides)
    return config


def tiny_model(**overrides) -> AdemVL:
    return AdemVL.from_config(tiny_config(**overrides))


def make_batch(batch: int = 4, has_image=None, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """Multiple-choice style samples for the tiny model: half with an image unless `has_image` says otherwise. The
    values are drawn on the CPU whatever `device` is, so every device sees the same batch."""
    generator = torch.Generator().manual_seed(seed)
    has_image = torch.tensor(has_image if has_image is not None else [1, 0] * (batch // 2))
    return to_device({
        "image": torch.randn(batch, 3, 32, 32, generator=generator),
        "has_image": has_image,
        "text_input": [f"Question: what is shown in picture {i}?\nOptions: (A) x (B) y\n" for i in range(batch)],
        "answer_cue": "Answer: The answer is",
        "text_output": [" A." if i % 2 else " B." for i in range(batch)],
    }, device)


def to_device(batch: dict, device: str | torch.device) -> dict:
    """The batch with its tensors on `device`, as LAVIS's runner moves every batch before the model sees it."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def assert_a_step_reaches_exactly_the_trainable_parameters(model: AdemVL, batch: dict, label: str) -> None:
    """One training step's loss is finite and its backward gives every trainable parameter a non-zero gradient and
    every frozen one none. The adapters' fc2 (zero at the start, so fc1 would get no gradient) is moved for the step
    and the model left as it was."""
    model.train()
    try:
        with torch.no_grad():
            for adapter in model.vision_adapters:
                adapter.fc2.weight.normal_(0, 0.1)
        loss = model(batch)["loss"]
        assert torch.isfinite(loss), label
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, (label, name)
            else:
                assert p.grad is None, (label, name)
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for adapter in model.vision_adapters:
                adapter.fc2.weight.zero_()
        model.eval()
