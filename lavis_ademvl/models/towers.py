"""The frozen towers: loading (dtype, quantization, device map), freezing, and their shapes on the meta device.

`load_towers` reads a model config and returns the LLM, its tokenizer, the vision tower (None for text-only
`fusion: none`; its families: `vision_towers.py`) and the dtype they compute in. `meta_towers` builds the same towers
with no weight at all, from configurations only (a local config.json, a `llm_config`/`vision_config` dict, or the
built-in shapes of the checkpoints our model types name): the parameter report of `ademvl params`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lavis_ademvl.common.hf_folders import check_rope_read
from lavis_ademvl.models.config import AdemVLConfig
from lavis_ademvl.models.cpu_arithmetic import describe_cpu_dtype
from lavis_ademvl.models.tokenization import load_tokenizer
from lavis_ademvl.models.vision_towers import (
    drop_last_block,
    random_vision_tower,
    vision_config,
    vision_family,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Shapes of the hub checkpoints named by our configs (their config.json values; `model_type` picks the class, default
# llama, as in `llm_config`).
_LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "vocab_size": 32000}
KNOWN_LLM_SHAPES = {
    "huggyllama/llama-7b": _LLAMA_7B,
    "meta-llama/Llama-2-7b-hf": {**_LLAMA_7B, "max_position_embeddings": 4096},
    "huggyllama/llama-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                             "num_attention_heads": 40, "vocab_size": 32000},
    "meta-llama/Meta-Llama-3-8B": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                   "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 8192},
    "meta-llama/Meta-Llama-3-70B": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
                                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                                    "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 8192},
    "Qwen/Qwen2.5-72B": {"model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                         "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
                         "rope_theta": 1000000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                         "tie_word_embeddings": False},
    "Qwen/Qwen2.5-7B": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                        "rope_theta": 1000000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
                        "tie_word_embeddings": False},
}
_SIGLIP_SO400M = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                  "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14}
KNOWN_VISION_SHAPES = {
    "openai/clip-vit-large-patch14": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
    "google/siglip-so400m-patch14-384": _SIGLIP_SO400M,
    "google/siglip2-so400m-patch14-384": _SIGLIP_SO400M,
    "facebook/dinov2-large": {"model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24,
                              "num_attention_heads": 16, "image_size": 518, "patch_size": 14},
}


def describe_compute_dtype(config: AdemVLConfig, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype the frozen towers compute in on `device`, and a line saying why: `llm_dtype` on CUDA (bfloat16 falls
    back to float16, with a loss scaler, on GPUs without bfloat16 such as V100/T4); on CPU `cpu_dtype`, where `auto` is
    bfloat16 only if the CPU computes it natively and it is measured faster there (`cpu_arithmetic`)."""
    if device.type == "cuda":
        dtype = DTYPES[config.llm_dtype]
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.float16, (f"float16 on CUDA: model.llm_dtype=bfloat16, but {torch.cuda.get_device_name(device)} "
                                   "has no bfloat16 (float16 with loss scaling)")
        return dtype, f"{config.llm_dtype} on CUDA (model.llm_dtype)"
    return describe_cpu_dtype(config.cpu_dtype)


def compute_dtype(config: AdemVLConfig, device: torch.device) -> torch.dtype:
    """`describe_compute_dtype`'s dtype, logged with its reason (a warning where CUDA falls back to float16)."""
    dtype, reason = describe_compute_dtype(config, device)
    fallback = device.type == "cuda" and dtype != DTYPES[config.llm_dtype]
    logging.log(logging.WARNING if fallback else logging.INFO, "frozen towers compute in %s", reason)
    return dtype


def model_device(config: AdemVLConfig) -> torch.device:
    """Where the towers are loaded and compute: `device` (the launcher sets the run's), else CUDA when available;
    `cuda` is this process's current GPU."""
    name = config.device or "auto"
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"model.device={name!r} but no CUDA device is visible; use cpu or auto")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def load_towers(
    config: AdemVLConfig, device: torch.device, llm_on_meta: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, PreTrainedModel | None, torch.dtype]:
    """(LLM, tokenizer, vision tower or None, compute dtype) of a model config, loaded in that order straight onto
    `device` (a 7B LLM never passes through host memory as a whole on a GPU run). `llm_on_meta`: a pretrained LLM's
    parameters are left on the meta device, for `sharding.shard_frozen_towers` to read each rank's shard into."""
    dtype = compute_dtype(config, device)
    if llm_on_meta and config.llm_model is not None:
        llm = meta_llm(config.llm_model, dtype)
    else:
        llm = load_llm(config.llm_model, config.llm_config, dtype, device, config.llm_quantization,
                       config.llm_device_map)
    tokenizer_name = config.tokenizer or config.llm_model
    if tokenizer_name is None:
        raise KeyError("model config needs `tokenizer` when the LLM comes from `llm_config`")
    tokenizer = load_tokenizer(str(tokenizer_name))
    vision_tower = None
    if config.fusion != "none":
        vision_tower = load_vision_tower(config.vision_model, config.vision_config, dtype, device)
    return llm, tokenizer, vision_tower, dtype


def _quantization_config(quantization: str, dtype: torch.dtype) -> Any:
    """bitsandbytes 8-bit or 4-bit (NF4) loading of the frozen LLM; CUDA only."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(f"llm_quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes") from error
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_llm(
    name_or_path: str | None,
    config: dict | None,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str | None = None,
    device_map: str | dict | None = None,
) -> PreTrainedModel:
    if (name_or_path is None) == (config is None):
        raise KeyError("give exactly one of `llm_model` (hub name or local folder) and `llm_config` (random init)")
    if device_map is not None and quantization is None:
        if config is not None:
            raise ValueError("llm_device_map needs pretrained weights (llm_model), not a random llm_config")
        # Hugging Face/accelerate place the decoder layers over the listed devices ("auto": all visible GPUs).
        return load_complete(AutoModelForCausalLM, "llm_model", name_or_path, torch_dtype=dtype, device_map=device_map)
    if quantization is not None:
        if config is not None:
            raise ValueError("llm_quantization needs pretrained weights (llm_model), not a random llm_config")
        if device.type != "cuda":
            raise RuntimeError(f"llm_quantization={quantization!r} needs a CUDA GPU (bitsandbytes); on CPU leave it null")
        quantization_config = _quantization_config(quantization, dtype)
        # On this process's GPU: under torchrun every rank holds its own quantized copy.
        return load_complete(AutoModelForCausalLM, "llm_model", name_or_path, torch_dtype=dtype,
                             quantization_config=quantization_config, device_map={"": device.index})
    if config is not None:
        return random_tower(lambda: AutoModelForCausalLM.from_config(llm_config(**config)), dtype, device)
    return _pretrained(AutoModelForCausalLM, "llm_model", name_or_path, dtype, device)


def meta_llm(name_or_path: str, dtype: torch.dtype) -> PreTrainedModel:
    """The LLM of a folder or hub name built from its config.json as `from_pretrained` builds it, with its parameters
    on the meta device and its buffers computed: the ones no checkpoint holds (LLaMA's rotary `inv_freq`) would
    otherwise be left as uninitialised memory, and the model would compute a slightly wrong loss without an error."""
    source = os.path.expanduser(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as error:
        raise OSError(f"model.llm_model={name_or_path!r} could not be loaded (a local folder, or a hub name): {error}") from error
    options = {"attn_implementation": "eager"} if config.model_type in EAGER_ATTENTION else {}
    with init_empty_weights(include_buffers=False):
        llm = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, **options)
    llm.tie_weights()  # which transformers 5 skips for parameters created on the meta device
    check_rope_read(PretrainedConfig.get_config_dict(source)[0], llm.config, f"model.llm_model={name_or_path!r}")
    return llm


def llm_config(model_type: str = "llama", **values: Any) -> PretrainedConfig:
    """The configuration of a random LLM (`llm_config`) or a built-in shape: `AutoConfig.for_model(model_type, ...)`,
    any decoder type Hugging Face knows (LLaMA by default, so the configs written before the key build what they did)."""
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as error:
        raise ValueError(f"llm_config.model_type={model_type!r} is no Hugging Face model type: {error}") from error


def load_vision_tower(
    name_or_path: str | None, config: dict | None, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    """A CLIP, SigLIP or DINOv2 tower (`vision_towers.VISION_FAMILIES`) through its own class, chosen by the
    folder's config (or `config`'s `model_type`)."""
    if (name_or_path is None) == (config is None):
        raise KeyError("give exactly one of `vision_model` (hub name or local folder) and `vision_config` (random init)")
    if config is not None:
        return random_tower(lambda: random_vision_tower(config), dtype, device)
    return _pretrained(None, "vision_model", name_or_path, dtype, device)


# Random towers start from this seed (the projects' default run seed) whatever the run's seed and rank: every DDP rank
# builds the same frozen weights (DDP does not broadcast them), and a run's seed changes only what it trains.
RANDOM_TOWER_SEED = 42


def random_tower(build: Callable[[], PreTrainedModel], dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """A randomly initialised tower (tests, debugging) from RANDOM_TOWER_SEED, leaving the global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_TOWER_SEED)
        return build().to(device=device, dtype=dtype)


def _pretrained(model_cls: type | None, key: str, name_or_path: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    # On a GPU the weights load straight onto it; on the CPU a device map would only mark the model as dispatched.
    placement = {"device_map": {"": device.index}} if device.type == "cuda" else {}
    return load_complete(model_cls, key, name_or_path, torch_dtype=dtype, **placement)


# Families that only the eager attention computes in full: SDPA and flash attention skip Gemma-2's logit softcapping.
EAGER_ATTENTION = ("gemma2",)


def load_complete(model_cls: type | None, key: str, name_or_path: str, **options: Any) -> PreTrainedModel:
    """`model_cls.from_pretrained(name_or_path, **options)` (model_cls None: the vision tower class of the folder's
    config), refusing a checkpoint that does not load completely: a config of a model type the class does not load, or
    weights missing (they would start random), unexpected or of another shape; the error names the folder and keys."""
    name_or_path = os.path.expanduser(name_or_path)
    others: tuple[str, ...] = ()
    try:
        model_type = AutoConfig.from_pretrained(name_or_path).model_type
        if model_cls is None:
            # A DINOv2 or SigLIP folder loaded by CLIP's class would start from random weights, with a log line only.
            family = vision_family(model_type, f"model.{key}={name_or_path!r}")
            model_cls, others = family.model_class, family.other_weights
        if model_type in EAGER_ATTENTION:
            options.setdefault("attn_implementation", "eager")
        # Weights of another shape are reported in `info` (below, naming the folder) rather than raised by torch.
        try:
            model, info = model_cls.from_pretrained(name_or_path, output_loading_info=True,
                                                    ignore_mismatched_sizes=True, **options)
        except ValueError as error:  # e.g. a vision tower as the LLM: transformers lists every type, naming no key
            raise ValueError(f"model.{key}={name_or_path!r} holds a {model_type!r} model, which {model_cls.__name__} "
                             f"does not load: {str(error).splitlines()[0]}") from error
    except OSError as error:
        raise OSError(f"model.{key}={name_or_path!r} could not be loaded (a local folder, or a hub name): {error}") from error
    # Lists in transformers 4.x, sets in 5.x: sorted, so the message is the same on both.
    problems = {
        "missing (they would start random)": sorted(info["missing_keys"]),
        "unexpected": sorted(name for name in info["unexpected_keys"] if not name.startswith(others)),
        # (name, shape there, shape here) in some transformers releases, the name alone in others (4.55)
        "of another shape": sorted(entry if isinstance(entry, str) else entry[0] for entry in info["mismatched_keys"]),
    }
    found = [f"{kind}: {keys[:8]}{' ...' if len(keys) > 8 else ''} ({len(keys)})" for kind, keys in problems.items() if keys]
    if found:
        raise ValueError(f"model.{key}={name_or_path!r} does not load completely into {model_cls.__name__}; weights "
                         + "; ".join(found))
    check_rope_read(PretrainedConfig.get_config_dict(name_or_path)[0], model.config, f"model.{key}={name_or_path!r}")
    return model


def freeze_llm(llm: PreTrainedModel, gradient_checkpointing: bool) -> PreTrainedModel:
    llm.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant: the recomputed layers run our hooks again and reach the visual memory of the step.
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return llm


def freeze_vision_tower(tower: PreTrainedModel, gradient_checkpointing: bool) -> nn.ModuleList:
    """Freeze the tower and drop its last block; returns the blocks that run.

    The fused features are the input of the last block, so that block never runs (and an adapter on it would never
    receive a gradient, which breaks DDP)."""
    tower.requires_grad_(False)
    if gradient_checkpointing:
        # The tower's activations are read only at the very end of backward, after the LLM's are freed: recomputing
        # them there keeps them out of the peak. Non-reentrant, so adapters behind a frozen input still get
        # gradients, and the adapters' dropout is replayed with the same random state.
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return drop_last_block(tower)


# ---------------------------------------------------------------------- shapes only


def _shape_config(name: str | None, config: dict | None, known: dict, build: Callable[..., PretrainedConfig],
                  key: str) -> PretrainedConfig:
    if config is not None:
        return build(**config)
    if name is None:
        raise KeyError(f"model.{key} is not set")
    folder = Path(os.path.expanduser(name))
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    if name in known:
        return build(**known[name])
    raise KeyError(
        f"model.{key}={name!r}: no local config.json and no built-in shape (known: {sorted(known)}); "
        f"point model.{key} at a folder holding the checkpoint's config.json"
    )


def meta_towers(config: AdemVLConfig) -> tuple[PreTrainedModel, PreTrainedModel | None]:
    """The LLM and vision tower of a model config with every tensor on the meta device (shapes only)."""
    llm_shape = _shape_config(config.llm_model, config.llm_config, KNOWN_LLM_SHAPES, llm_config, "llm_model")
    tower_shape = None
    if config.fusion != "none":
        tower_shape = _shape_config(config.vision_model, config.vision_config, KNOWN_VISION_SHAPES,
                                    lambda **values: vision_config(values), "vision_model")
        tower_shape = getattr(tower_shape, "vision_config", tower_shape)  # a whole CLIP's or SigLIP's folder
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llm_shape)
        tower = None
        if tower_shape is not None:
            tower = vision_family(tower_shape.model_type, f"model.vision_model={config.vision_model!r}").model_class(
                tower_shape)
    return llm, tower
