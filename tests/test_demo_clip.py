"""The demo's CLIP, pretrained offline on easy-VQA's training images: a real CLIP folder, deterministic, and its
features tell colours and shapes apart on held-out (easy-VQA test) images.

The session builds it with the shortened recipe TEST_CLIP_STEPS (conftest.py); the thresholds below were measured
for that recipe (seed 0) on this project's 2-core machine, with a margin.
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_CLIP_STEPS
from transformers import AutoTokenizer, CLIPModel, CLIPVisionModel

from lavis_ademvl.assets import build_demo_clip, read_marker
from lavis_ademvl.assets.demo_clip import (
    CAPTION_TEMPLATES,
    RECIPE,
    RECIPE_VERSION,
    THREADS,
    VISION_CONFIG,
    caption_retrieval_accuracy,
    pixel_values,
    pretrain_clip,
)
from lavis_ademvl.assets.easyvqa_sqa import COLOURS, SHAPES, labelled_images
from lavis_ademvl.models.vision_towers import VISION_FAMILIES

PROBE_TRAIN_IMAGES = 600
# Measured with TEST_CLIP_STEPS = 150 (seed 0, 2 threads): colour 0.990, shape 0.507, caption retrieval 0.375; chance
# is 1/8, 1/3 and 1/24. (The shipped recipe, 1000 steps, reaches 0.998, 0.959 and 0.972: shapes are learned late.)
COLOUR_PROBE_MIN = 0.95
SHAPE_PROBE_MIN = 0.42
RETRIEVAL_MIN = 0.30


CLIP = VISION_FAMILIES["clip_vision_model"]


def cls_features(tower: CLIPVisionModel, images: list[tuple[str, str, str]]) -> torch.Tensor:
    """The [cls] feature ADEM-VL reads: the input of the tower's last block, after its final layer norm."""
    with torch.no_grad():
        hidden = tower(pixel_values=pixel_values([path for path, _, _ in images]), output_hidden_states=True)
        return CLIP.core_of(tower).post_layernorm(hidden.hidden_states[-2])[:, 0]


def linear_probe_accuracy(train: torch.Tensor, train_labels: list[str], test: torch.Tensor, test_labels: list[str]) -> float:
    """Ridge-regression classifier on standardised features (closed form), accuracy on the test features."""
    classes = sorted(set(train_labels))
    targets = F.one_hot(torch.tensor([classes.index(label) for label in train_labels]), len(classes)).double()
    mean, std = train.mean(0), train.std(0) + 1e-6

    def design(features: torch.Tensor) -> torch.Tensor:
        standard = ((features - mean) / std).double()
        return torch.cat([standard, torch.ones(len(features), 1, dtype=torch.double)], dim=1)

    x = design(train)
    weights = torch.linalg.solve(x.T @ x + torch.eye(x.shape[1], dtype=torch.double), x.T @ targets)
    predicted = (design(test) @ weights).argmax(dim=1)
    truth = torch.tensor([classes.index(label) for label in test_labels])
    return (predicted == truth).double().mean().item()


def test_folder_is_a_clip_checkpoint_loaded_like_a_real_one(demo_clip_dir):
    tower = CLIPVisionModel.from_pretrained(demo_clip_dir)  # as AdemVL loads model.vision_model
    assert (tower.config.image_size, tower.config.patch_size) == (64, 8)
    assert tower.config.hidden_size == VISION_CONFIG["hidden_size"]
    full = CLIPModel.from_pretrained(demo_clip_dir)
    whole = CLIP.core_of(full.vision_model).state_dict()  # the same names on transformers 4.x and 5.x
    for name, value in CLIP.core_of(tower).state_dict().items():
        assert torch.equal(value, whole[name]), name
    tokenizer = AutoTokenizer.from_pretrained(demo_clip_dir)
    ids = tokenizer("a red circle").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id == full.config.text_config.eos_token_id
    assert tokenizer.unk_token_id not in ids and len(ids) == 5
    marker = read_marker(demo_clip_dir)
    assert marker["asset"] == "clip_easyvqa" and marker["seed"] == 0
    assert marker["recipe"] == {**RECIPE, "steps": TEST_CLIP_STEPS}


def test_cls_features_separate_colours_and_shapes_on_heldout_images(demo_clip_dir):
    tower = CLIPVisionModel.from_pretrained(demo_clip_dir).eval()
    train = labelled_images("train")[:PROBE_TRAIN_IMAGES]
    test = labelled_images("test")  # easy-VQA's test images: never seen in pretraining
    assert len(test) > 800 and not {path for path, _, _ in test} & {path for path, _, _ in labelled_images("train")}
    train_features, test_features = cls_features(tower, train), cls_features(tower, test)
    colour = linear_probe_accuracy(train_features, [c for _, c, _ in train], test_features, [c for _, c, _ in test])
    shape = linear_probe_accuracy(train_features, [s for _, _, s in train], test_features, [s for _, _, s in test])
    assert colour >= COLOUR_PROBE_MIN, colour  # chance 1/8
    assert shape >= SHAPE_PROBE_MIN, shape  # chance 1/3


def test_retrieval_of_the_right_caption_beats_chance(demo_clip_dir):
    model = CLIPModel.from_pretrained(demo_clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_clip_dir)
    accuracy = caption_retrieval_accuracy(model, tokenizer, labelled_images("test"))
    assert accuracy >= RETRIEVAL_MIN, accuracy  # chance 1/24 = 0.042
    report = json.loads((demo_clip_dir / "pretraining.json").read_text())
    assert report["final_train_loss"] < report["train_loss_every_10_steps"][0] - 1.0


def test_pretraining_is_seeded_and_leaves_the_callers_state_alone():
    one_per_pair = list({(colour, shape): (path, colour, shape) for path, colour, shape in labelled_images("train")}.values())
    rng_state, deterministic, threads = (torch.random.get_rng_state(), torch.are_deterministic_algorithms_enabled(),
                                         torch.get_num_threads())
    states = [pretrain_clip(one_per_pair, steps=2, seed=seed, progress=False)[0].state_dict() for seed in (0, 0, 1)]
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()) == (deterministic, threads)
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
    assert not torch.equal(states[0]["visual_projection.weight"], states[2]["visual_projection.weight"])


def test_initial_weights_are_ours_whatever_the_constructor_drew():
    """transformers 4.55 and 5.x initialise a new CLIPModel in different orders under the same seed; initialise_clip
    redraws every parameter in name order from its own generator, so the starting point is the same on both stacks
    (this checksum was printed by both) and does not depend on the global random state."""
    from transformers import CLIPModel

    from lavis_ademvl.assets.demo_clip import build_caption_tokenizer, clip_config, initialise_clip

    states = []
    for global_seed in (0, 123):
        torch.manual_seed(global_seed)
        model = CLIPModel(clip_config(build_caption_tokenizer()))
        initialise_clip(model, seed=0)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
    digest = hashlib.sha256(b"".join(states[0][name].numpy().tobytes() for name in sorted(states[0]))).hexdigest()
    assert digest[:16] == "3ef6999d98899ab0"
    # CLIP's own scheme: e.g. a vision query projection's std is width^-0.5 * (2 * layers)^-0.5.
    std = states[0]["vision_model.encoder.layers.0.self_attn.q_proj.weight"].std().item()
    assert std == pytest.approx(VISION_CONFIG["hidden_size"] ** -0.5 * (2 * VISION_CONFIG["num_hidden_layers"]) ** -0.5,
                                rel=0.02)
    assert states[0]["logit_scale"].item() == pytest.approx(2.6592, abs=1e-4)


def test_rebuild_is_bit_identical_and_cached_by_recipe(tmp_path):
    first = build_demo_clip(tmp_path / "first", seed=0, steps=2, progress=False)
    second = build_demo_clip(tmp_path / "second", seed=0, steps=2, progress=False)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "pretraining.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    marker = (first / ".complete").stat().st_mtime_ns
    assert build_demo_clip(first, seed=0, steps=2, progress=False) == first
    assert (first / ".complete").stat().st_mtime_ns == marker  # cached: not rebuilt
    key = read_marker(first)  # a change to any of these makes a new build
    assert key["seed"] == 0 and key["recipe"] == {**RECIPE, "steps": 2} and key["recipe_version"] == RECIPE_VERSION
    assert key["vision_config"] == VISION_CONFIG and key["captions"] == list(CAPTION_TEMPLATES)
    assert key["threads"] == THREADS  # kernels split their work by it: another count, other bytes


def test_every_colour_shape_pair_is_needed():
    images = [image for image in labelled_images("train") if image[1:] != (COLOURS[0], SHAPES[0])]
    with pytest.raises(ValueError, match=f"{COLOURS[0]} {SHAPES[0]}"):
        pretrain_clip(images, steps=1)
