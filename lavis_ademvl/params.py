"""Parameter report of an ADEM-VL config, without downloading or allocating any weight.

  python -m lavis_ademvl.params --cfg-path projects/ademvl/sqa.yaml [--options model.fusion=prefix ...]

The model is built on PyTorch's meta device from configurations only: a local folder's config.json, a
`llm_config`/`vision_config` dict, or the built-in shapes of the checkpoints the paper uses.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, PretrainedConfig

import lavis_ademvl  # noqa: F401
from lavis_ademvl.common.inference import load_config
from lavis_ademvl.models.ademvl import AdemVL, model_options

# Shapes of the hub checkpoints named by our configs (their config.json values).
_LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "vocab_size": 32000}
KNOWN_LLM_SHAPES = {
    "huggyllama/llama-7b": _LLAMA_7B,
    "meta-llama/Llama-2-7b-hf": {**_LLAMA_7B, "max_position_embeddings": 4096},
    "huggyllama/llama-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                             "num_attention_heads": 40, "vocab_size": 32000},
}
KNOWN_VISION_SHAPES = {
    "openai/clip-vit-large-patch14": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
}
GROUPS = {
    "visual_key_offset": "E1 (key offset)",
    "visual_value_offset": "E2 (value offset)",
    "visual_proj": "low-rank projection W'",
    "cls_proj": "[cls] projection",
    "vision_adapters": "vision adapters",
}


def _shape_config(name: str | None, config: Any, known: dict, config_cls: type, key: str) -> PretrainedConfig:
    if config is not None:
        return config_cls(**(OmegaConf.to_container(config) if isinstance(config, DictConfig) else dict(config)))
    if name is None:
        raise KeyError(f"model.{key} is not set")
    folder = Path(os.path.expanduser(name))
    if (folder / "config.json").is_file():
        loaded = AutoConfig.from_pretrained(folder)
        return getattr(loaded, "vision_config", loaded) if config_cls is CLIPVisionConfig else loaded
    if name in known:
        return config_cls(**known[name])
    raise KeyError(
        f"model.{key}={name!r}: no local config.json and no built-in shape (known: {sorted(known)}); "
        f"point model.{key} at a folder holding the checkpoint's config.json"
    )


def meta_model(model_cfg: DictConfig) -> AdemVL:
    """ADEM-VL with every tensor on the meta device (shapes only)."""
    llm_config = _shape_config(model_cfg.get("llm_model"), model_cfg.get("llm_config"), KNOWN_LLM_SHAPES, LlamaConfig, "llm_model")
    vision_config = None
    if model_cfg.get("fusion", "adem") != "none":
        vision_config = _shape_config(model_cfg.get("vision_model"), model_cfg.get("vision_config"),
                                      KNOWN_VISION_SHAPES, CLIPVisionConfig, "vision_model")
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llm_config)
        vision = CLIPVisionModel(vision_config) if vision_config is not None else None
        return AdemVL(llm, None, vision, **model_options(model_cfg))


def report(model: AdemVL) -> str:
    counts = model.parameter_counts()
    lines = ["trainable parameters:"]
    for group, label in GROUPS.items():
        if f"trainable/{group}" in counts:
            lines.append(f"  {label:<28} {counts[f'trainable/{group}']:>15,}")
    lines.append(f"  {'total trainable':<28} {counts['trainable']:>15,}")
    llm = sum(p.numel() for p in model.llm.parameters())
    lines.append("frozen parameters:")
    lines.append(f"  {'LLM':<28} {llm:>15,}")
    if model.vision_tower is not None:
        vision = sum(p.numel() for p in model.vision_tower.parameters())
        lines.append(f"  {'vision tower (blocks used)':<28} {vision:>15,}")
    lines.append(f"{'total':<30} {counts['total']:>15,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lavis_ademvl.params", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", required=True)
    parser.add_argument("--options", nargs="+", default=[])
    args = parser.parse_args(argv)
    try:
        config = load_config(args.cfg_path, args.options)
        print(report(meta_model(config.model)))
    except (KeyError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
