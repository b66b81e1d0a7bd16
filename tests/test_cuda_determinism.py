"""`run.deterministic: true` on CUDA: no op of a training step raises under `torch.use_deterministic_algorithms(True)`.

Checked on CPU by recording the aten ops of a tiny model's forward and backward (tests/determinism.py), for every
fusion and pooling option the shipped configs use; and `multiscale_pool` (reshape + mean/amax, not adaptive pooling,
whose CUDA backward raises) against adaptive pooling for every shipped scale set.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from determinism import CUDA_NONDETERMINISTIC_OPS, cuda_nondeterministic, record_ops
from helpers import make_batch, tiny_model
from omegaconf import OmegaConf

from lavis_ademvl.assets import FOLDERS
from lavis_ademvl.assets.demo_clip import VISION_CONFIG as DEMO_CLIP_CONFIG
from lavis_ademvl.common.config_files import load_with_includes
from lavis_ademvl.models.ademvl import AdemVL
from lavis_ademvl.models.config import AdemVLConfig
from lavis_ademvl.models.fusion import POOLINGS, multiscale_pool
from lavis_ademvl.models.towers import KNOWN_VISION_SHAPES

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIRS = (REPO / "projects" / "ademvl", REPO / "lavis_ademvl" / "configs")
DEFAULTS = {
    f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
    for f in dataclasses.fields(AdemVLConfig)
}


def shipped_model_sections() -> list[dict]:
    """The effective model section (defaults < model_type yaml < the yaml's own keys) of every shipped ADEM-VL model:
    each yaml's `model`, and each `compare.models` entry's."""
    sections = []
    for path in sorted(p for folder in CONFIG_DIRS for p in folder.rglob("*.yaml")):
        config = load_with_includes(path)
        compared = (config.get("compare") or {}).get("models", [])
        entries = [config.get("model")] + [entry.get("model") for entry in compared]
        for entry in entries:
            # Only the model sections are resolved: other sections may interpolate values given on the command line.
            section = OmegaConf.to_container(entry, resolve=True) if entry else None
            if not section or section.get("arch", "ademvl") != "ademvl":
                continue
            merged = dict(DEFAULTS)
            if section.get("model_type"):
                model_type_yaml = OmegaConf.load(AdemVL.default_config_path(section["model_type"]))
                merged.update(OmegaConf.to_container(model_type_yaml.model))
            merged.update(section)
            sections.append(merged)
    return sections


def tower_patches(section: dict) -> int:
    """Patch tokens of a section's vision tower: its `vision_config`, a hub tower of known shape, or the demo's CLIP."""
    name = section["vision_model"]
    vision = section["vision_config"] or KNOWN_VISION_SHAPES.get(name)
    if vision is None and Path(name).name == FOLDERS["clip"]:
        vision = DEMO_CLIP_CONFIG
    if vision is None:
        raise AssertionError(f"vision_model {name!r}: give this test its image_size and patch_size")
    return (vision["image_size"] // vision["patch_size"]) ** 2


def shipped_scale_sets() -> list[tuple[int, tuple[int, ...]]]:
    """(patch count, scales) of every shipped `down_sample_num`, and of every `num_visual_input_tokens` > 0."""
    cases = set()
    for section in shipped_model_sections():
        if section["fusion"] != "adem":
            continue
        patches = tower_patches(section)
        cases.add((patches, tuple(section["down_sample_num"])))
        if section["num_visual_input_tokens"]:
            cases.add((patches, (section["num_visual_input_tokens"],)))
    return sorted(cases)


def shipped_fusion_options() -> list[dict]:
    """The option combinations of the shipped configs that change which ops a training step runs, as tiny-model
    overrides (a shipped num_visual_input_tokens > 0 becomes 4, a pooled 2 x 2 of the tiny 4 x 4 grid)."""
    combos = set()
    for section in shipped_model_sections():
        keys = ("fusion", "llm_gradient_checkpointing", "vision_gradient_checkpointing")
        options = {key: section[key] for key in keys}
        if section["fusion"] == "adem":  # prefix and none pool nothing
            options.update(pooling=section["pooling"],
                           num_visual_input_tokens=4 if section["num_visual_input_tokens"] else 0)
        combos.add(tuple(sorted(options.items())))
    return [dict(combo) for combo in sorted(combos)]


SCALE_SETS = shipped_scale_sets()
FUSION_OPTIONS = shipped_fusion_options()


def test_the_shipped_configs_are_read():
    # The paper's settings (CLIP ViT-L/14: 16 x 16 patches), the demo's (8 x 8) and the tiny configs' (4 x 4).
    assert {(256, (256, 64)), (256, (256, 64, 16)), (256, (64,)), (64, (64, 16)), (16, (16, 4))} <= set(SCALE_SETS)
    fusions = {(o["fusion"], o.get("pooling"), o.get("num_visual_input_tokens")) for o in FUSION_OPTIONS}
    want = {("adem", "avg", 0), ("adem", "max", 0), ("adem", "avg", 4), ("prefix", None, None), ("none", None, None)}
    assert want <= fusions


def adaptive_reference(patches: torch.Tensor, scales: tuple[int, ...], pooling: str) -> torch.Tensor:
    """multiscale_pool as first written: adaptive pooling of the [B, C, g, g] grid, flattened row-major, then
    concatenated."""
    batch, num_patches, width = patches.shape
    grid = math.isqrt(num_patches)
    image = patches.transpose(1, 2).reshape(batch, width, grid, grid)
    pool = F.adaptive_avg_pool2d if pooling == "avg" else F.adaptive_max_pool2d
    return torch.cat([pool(image, math.isqrt(size)).flatten(2).transpose(1, 2) for size in scales], dim=1)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize(("num_patches", "scales"), SCALE_SETS, ids=lambda case: str(case))
def test_multiscale_pool_equals_adaptive_pooling(num_patches, scales, pooling):
    generator = torch.Generator().manual_seed(num_patches + len(scales))
    patches = torch.randn(2, num_patches, 64, generator=generator)  # random: no ties in a max window
    upstream = torch.randn(2, sum(scales), 64, generator=generator)
    ours, reference = patches.clone().requires_grad_(), patches.clone().requires_grad_()
    got, want = multiscale_pool(ours, scales, pooling), adaptive_reference(reference, scales, pooling)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    # Exact, not close: the sums run in adaptive pooling's CPU order, so a run (the demo's figures) keeps its values.
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(ours.grad, reference.grad, rtol=0, atol=0)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_uneven_scales_keep_adaptive_pooling(pooling):
    patches = torch.randn(2, 256, 8)
    torch.testing.assert_close(multiscale_pool(patches, [36], pooling), adaptive_reference(patches, (36,), pooling),
                               rtol=0, atol=0)  # 6 does not divide 16: overlapping windows, adaptive pooling itself


def test_max_pool_ties_split_the_gradient():
    # A 2 x 2 window of equal values: adaptive_max_pool2d's backward gives the whole gradient to one argmax, amax's
    # splits it equally; the forward values are the same.
    patches = torch.ones(1, 4, 1, requires_grad=True)
    pooled = multiscale_pool(patches, [1], "max")
    pooled.sum().backward()
    assert pooled.item() == 1.0
    torch.testing.assert_close(patches.grad, torch.full((1, 4, 1), 0.25))


def test_the_recorder_sees_backward_ops():
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    ops = record_ops(lambda: F.adaptive_avg_pool2d(x, 2).sum().backward())
    assert "_adaptive_avg_pool2d_backward" in cuda_nondeterministic(ops)


def test_every_listed_op_exists():
    for name in CUDA_NONDETERMINISTIC_OPS:
        packet, _, overload = name.partition(".")
        assert hasattr(torch.ops.aten, packet), name
        assert not overload or overload in getattr(torch.ops.aten, packet).overloads(), name


def options_id(options: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in options.items() if value is not False)


@pytest.mark.parametrize("overrides", FUSION_OPTIONS, ids=options_id)
def test_training_step_runs_no_op_that_raises_on_cuda(overrides):
    torch.manual_seed(0)
    model = tiny_model(**overrides)
    model.train()
    batch = make_batch()
    found = cuda_nondeterministic(record_ops(lambda: model(batch)["loss"].backward()))
    assert not found, f"{found} raise on CUDA under run.deterministic: true (torch.use_deterministic_algorithms(True))"
