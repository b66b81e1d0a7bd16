"""A frozen CLIP-architecture vision tower with random weights, saved once with a fixed seed.

No pretrained CLIP ships in any package registry, so the offline demo uses this tower; its vision adapters still
train. Real use names `openai/clip-vit-large-patch14` (or a local copy) as `vision_model`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from lavis_ademvl.assets._atomic import build_atomically

# Small enough for a laptop CPU, sized for easy-VQA's 64 x 64 images: 8 x 8 = 64 patch tokens.
DEMO_CLIP_CONFIG = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
}


def build_random_clip(out_dir: Path, seed: int = 0, config: dict | None = None) -> Path:
    """Save a randomly initialised `CLIPVisionModel` (seeded) to out_dir, loadable with `from_pretrained`."""
    config = dict(config or DEMO_CLIP_CONFIG)

    def build(tmp: Path) -> None:
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            CLIPVisionModel(CLIPVisionConfig(**config)).save_pretrained(tmp)
        finally:
            torch.random.set_rng_state(generator_state)

    return build_atomically(Path(out_dir), {"seed": seed, **config}, build)
