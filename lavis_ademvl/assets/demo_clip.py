"""A small CLIP pretrained offline on the demo's training images: the demo's stand-in for a real CLIP.

No pretrained CLIP ships in a package registry, and a random tower keeps an image's colour but hardly its shape.
So this asset trains a small Hugging Face `CLIPModel` (vision and text towers, CLIP's own contrastive loss) from
scratch on easy-VQA's images of our train split only (val and test images are never seen), each captioned from its
labels ("a red circle", "a photo of a blue rectangle"). Every batch holds one image of each of the 24 colour-shape
pairs, so no two captions in a batch describe the same picture (the loss would push such a matching pair apart).

The folder is saved as `openai/clip-vit-large-patch14` is: the whole `CLIPModel` with its tokenizer, so the configs
load its vision tower with `CLIPVisionModel.from_pretrained(folder)` exactly as they load a real CLIP, and the text
tower stays available for retrieval. Real use names `openai/clip-vit-large-patch14`.

Seeded and deterministic (fixed image order, caption choice, initialisation; deterministic kernels on a fixed
number of threads): a rebuild with the same seed and recipe on the same kind of CPU writes the same bytes. The
initial weights are drawn here (`initialise_clip`), parameter by parameter in name order from our own generator, so
they are the same under transformers 4.x and 5.x (which initialise a new `CLIPModel` in different orders). The cache
key holds the recipe and the thread count, so a change to either rebuilds.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lavis_ademvl.assets._atomic import TRANSFORMERS_MAJOR, build_atomically
from lavis_ademvl.assets.easyvqa_sqa import COLOURS, SHAPES, labelled_images
from lavis_ademvl.common.hf_folders import make_portable

# Bump when the training code changes what a given recipe produces (2: our own name-ordered initialisation).
RECIPE_VERSION = 2
# Sized for easy-VQA's 64 x 64 images and a few CPU minutes: 8 x 8 = 64 patch tokens.
VISION_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
}
TEXT_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
}
PROJECTION_DIM = 128
RECIPE = {"steps": 1000, "lr": 1e-3, "weight_decay": 0.1, "warmup_fraction": 0.1}

CAPTION_TEMPLATES = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a drawing of a {colour} {shape}",
    "a {shape} in {colour}",
)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>", "<eos>")  # <eos> is not id 2: CLIP then pools at the first <eos>
PIXEL_BATCH = 256
# Kernels split their work by the thread count, not the core count: a fixed count gives the same bytes on any
# machine of the same CPU kind. Two threads take 0.6x the time of one on 2 cores.
THREADS = 2


def caption(colour: str, shape: str, template: str = CAPTION_TEMPLATES[0]) -> str:
    return template.format(colour=colour, shape=shape)


def build_caption_tokenizer() -> Any:
    """A word-level tokenizer over the captions' words: `<bos> words <eos>`, padded with `<pad>`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for template in CAPTION_TEMPLATES for word in template.split() if "{" not in word})
    vocabulary = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words, *COLOURS, *SHAPES])}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocabulary["<bos>"]), ("<eos>", vocabulary["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=TEXT_CONFIG["max_position_embeddings"], model_input_names=["input_ids", "attention_mask"],
    )


def clip_config(tokenizer: Any) -> Any:
    from transformers import CLIPConfig

    text = {
        **TEXT_CONFIG,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return CLIPConfig(text_config=text, vision_config=dict(VISION_CONFIG), projection_dim=PROJECTION_DIM)


def pixel_values(paths: Sequence[str]) -> torch.Tensor:
    """[N, 3, 64, 64]: the images as the demo's evaluation processor feeds them to the tower."""
    from lavis_ademvl.common.images import load_image
    from lavis_ademvl.processors.ademvl_processors import AdemImageEvalProcessor

    processor = AdemImageEvalProcessor.from_config({"image_size": VISION_CONFIG["image_size"]})
    return torch.stack([processor(load_image(path)) for path in paths])


def initial_std(name: str, config: Any) -> float:
    """The standard deviation CLIP's `_init_weights` gives the weight matrix or embedding `name` of a `CLIPModel`
    (initializer_factor 1), restated so that `initialise_clip` draws it itself; an unknown name is a KeyError."""
    tower = config.text_config if name.startswith("text_model.") else config.vision_config
    width, layers = tower.hidden_size, tower.num_hidden_layers
    deep = width**-0.5 * (2 * layers) ** -0.5
    stds = {
        "embeddings.class_embedding": width**-0.5,
        "embeddings.patch_embedding.weight": tower.initializer_range,
        "embeddings.position_embedding.weight": 0.02,
        "embeddings.token_embedding.weight": 0.02,
        "q_proj.weight": deep, "k_proj.weight": deep, "v_proj.weight": deep, "out_proj.weight": width**-0.5,
        "mlp.fc1.weight": (2 * width) ** -0.5, "mlp.fc2.weight": deep,
        "text_projection.weight": config.text_config.hidden_size**-0.5,
        "visual_projection.weight": config.vision_config.hidden_size**-0.5,
    }
    for suffix, std in stds.items():
        if name.endswith(suffix):
            return std
    raise KeyError(f"no initialisation rule for CLIP parameter {name!r}")


@torch.no_grad()
def initialise_clip(model: Any, seed: int) -> None:
    """Draw every parameter of a `CLIPModel` as CLIP's `_init_weights` does (normal weights, zero biases, unit layer
    norms, logit scale log(1/0.07)), in name order from a generator seeded with `seed`: the same weights under any
    transformers version, whatever order its constructor initialised them in."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in sorted(model.named_parameters()):
        if name == "logit_scale":
            parameter.fill_(model.config.logit_scale_init_value)
        elif name.endswith(".bias"):
            parameter.zero_()
        elif "norm" in name:  # layer_norm1/2, final_layer_norm, pre_layrnorm, post_layernorm
            parameter.fill_(1.0)
        else:
            std = initial_std(name, model.config)
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std)


@contextlib.contextmanager
def reproducible_kernels() -> Iterator[None]:
    """Deterministic kernels on THREADS threads inside the block (the caller's settings are restored after it)."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def pretrain_clip(
    images: Sequence[tuple[str, str, str]], steps: int, seed: int = 0, progress: bool = True
) -> tuple[Any, Any, list[float]]:
    """Train a `CLIPModel` from scratch on (path, colour, shape) images; returns (model, tokenizer, losses).

    Each step draws one image per colour-shape pair and a random caption template for it. The global random
    state is left as it was.
    """
    from tqdm import tqdm
    from transformers import CLIPModel

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    by_pair: dict[tuple[str, str], list[int]] = {}
    for index, (_, colour, shape) in enumerate(images):
        by_pair.setdefault((colour, shape), []).append(index)
    missing = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES if (colour, shape) not in by_pair]
    if missing:
        raise ValueError(f"CLIP pretraining needs images of every colour-shape pair; none of: {missing}")
    pairs = sorted(by_pair)
    tokenizer = build_caption_tokenizer()
    pixels = pixel_values([path for path, _, _ in images])
    rng = random.Random(f"demo-clip:{seed}")
    warmup = max(1, round(RECIPE["warmup_fraction"] * steps))
    losses: list[float] = []
    with torch.random.fork_rng(), reproducible_kernels():
        torch.manual_seed(seed)  # dropout, if a recipe ever uses it; the weights come from initialise_clip
        model = CLIPModel(clip_config(tokenizer)).train()
        initialise_clip(model, seed)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"], betas=(0.9, 0.98), eps=1e-6
        )
        bar = tqdm(range(steps), desc="CLIP pretraining", unit="step", disable=not progress, leave=False)
        for step in bar:
            # Linear warmup, then half a cosine down to zero.
            scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = RECIPE["lr"] * scale
            rows = [rng.choice(by_pair[pair]) for pair in pairs]
            texts = [caption(colour, shape, rng.choice(CAPTION_TEMPLATES)) for colour, shape in pairs]
            tokens = tokenizer(texts, padding=True, return_tensors="pt")
            loss = model(**tokens, pixel_values=pixels[rows], return_loss=True).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), tokenizer, losses


def projected(features: Any) -> torch.Tensor:
    """CLIP's projected embeddings from `get_{image,text}_features`: the tensor itself in transformers 4.x, the
    output's `pooler_output` in 5.x."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


@torch.no_grad()
def caption_retrieval_accuracy(model: Any, tokenizer: Any, images: Sequence[tuple[str, str, str]]) -> float:
    """Fraction of images whose most similar caption, among "a {colour} {shape}" for all 24 pairs, is their own."""
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    tokens = tokenizer([caption(*pair) for pair in pairs], padding=True, return_tensors="pt")
    text = F.normalize(projected(model.get_text_features(**tokens)), dim=-1)
    pixels = pixel_values([path for path, _, _ in images])
    image = torch.cat([projected(model.get_image_features(pixel_values=chunk)) for chunk in pixels.split(PIXEL_BATCH)])
    best = (F.normalize(image, dim=-1) @ text.T).argmax(dim=-1)
    truth = torch.tensor([pairs.index((colour, shape)) for _, colour, shape in images])
    return (best == truth).float().mean().item()


def build_demo_clip(out_dir: Path, seed: int = 0, steps: int | None = None, progress: bool = True) -> Path:
    """Pretrain the demo's CLIP (see the module docstring) into `out_dir`; returns at once if it holds this build.

    `steps` defaults to RECIPE["steps"]; fewer make a quicker, weaker tower (the tests use that).
    Besides the model and tokenizer, `pretraining.json` records the loss curve (every 10th step) and the caption
    retrieval accuracy on easy-VQA's test images.
    """
    steps = RECIPE["steps"] if steps is None else steps
    params = {
        "asset": "clip_easyvqa",
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "recipe": {**RECIPE, "steps": steps},
        "threads": THREADS,
        "vision_config": VISION_CONFIG,
        "text_config": TEXT_CONFIG,
        "projection_dim": PROJECTION_DIM,
        "captions": list(CAPTION_TEMPLATES),
        "transformers_major": TRANSFORMERS_MAJOR,  # a build under one major version is never reused under the other
    }

    def build(tmp: Path) -> None:
        model, tokenizer, losses = pretrain_clip(labelled_images("train"), steps, seed, progress)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        make_portable(tmp)
        report = {
            "train_loss_every_10_steps": [round(loss, 4) for loss in losses[::10]],
            "final_train_loss": round(losses[-1], 4),
            # Held-out: easy-VQA's test images, never seen in pretraining (chance 1/24).
            "test_caption_retrieval": round(caption_retrieval_accuracy(model, tokenizer, labelled_images("test")), 4),
        }
        (tmp / "pretraining.json").write_text(json.dumps(report, indent=1) + "\n")

    return build_atomically(Path(out_dir), params, build)
