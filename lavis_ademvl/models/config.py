"""Every option of the `ademvl` model (the `model:` section of a config): its default, allowed values and meaning.

`AdemVLConfig` is the one place they live. `from_dict` reads a model section, rejecting unknown keys with the list of
known ones, and `validate` checks every value; `markdown_table` writes the table of model keys in docs/configuration.md
(`python -m lavis_ademvl.models.config`; a test keeps the two equal). A new option is one field here, read where it is
used as `config.<name>`.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lavis_ademvl.common.validation import check_choice, check_fraction, check_known_keys, checked_number
from lavis_ademvl.models.fusion import ACTIVATIONS, POOLINGS

# Each fusion and the name of its row in a Table I (the ScienceQA task's log, the demo).
FUSION_NAMES = {"adem": "ADEM-VL", "prefix": "prefix (LLaVA-style)", "none": "text only (fusion: none)"}
FUSIONS = tuple(FUSION_NAMES)
# Where, inside a decoder layer, the query is read and the fused feature is added (paper Table VII).
QUERY_POINTS = ("attn_in", "mlp_in")
ADD_POINTS = ("attn_out", "mlp_out")
# The fused feature can only be added at or after the point its query is read.
POINT_ORDER = {"attn_in": 0, "attn_out": 1, "mlp_in": 2, "mlp_out": 3}
LLM_DTYPES = ("bfloat16", "float16", "float32")
CPU_DTYPES = ("float32", "bfloat16", "auto")  # float16 matmuls are slow or missing on CPUs
QUANTIZATIONS = (None, "8bit", "4bit")
SHARDINGS = (None, "fsdp")
# Sequences longer than max_len: `middle` (ours) cuts the prompt in its middle and keeps the image slot, answer cue
# and answer; `end` (the authors') tokenizes prompt and answer as one string and cuts the whole sequence at its end.
TRUNCATIONS = ("middle", "end")


def option(default: Any, meaning: str, choices: Sequence[Any] | None = None, minimum: float | None = None) -> Any:
    """A config field: its default, the values it accepts (None: any of its type, at least `minimum` if given) and
    what it means."""
    metadata = {"meaning": meaning, "choices": tuple(choices) if choices is not None else None, "minimum": minimum}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class AdemVLConfig:
    # What LAVIS reads to find the model and its weights.
    arch: str = option("ademvl", "LAVIS model name")
    model_type: str | None = option(None, "LAVIS model type: a yaml of `configs/models/ademvl/` (see What is registered)")
    load_finetuned: bool = option(False, "load the checkpoint `finetuned` (written by this project or the authors)")
    finetuned: str | None = option(None, "checkpoint file read when `load_finetuned` is true")
    allow_backbone_mismatch: bool = option(
        False,
        "load a checkpoint onto another frozen LLM, vision tower or tokenizer than the ones it records being trained "
        "with (a warning instead of an error; the same weights in another folder need no override)",
    )
    load_pretrained: bool = option(False, "LAVIS key, unused: the frozen towers come from `llm_model`/`vision_model`")
    pretrained: str | None = option(None, "LAVIS key, unused")
    # The frozen towers (models/towers.py).
    llm_model: str | None = option(
        None,
        "hub name or local folder of a decoder-only causal LM: LLaMA 1/2/3, Mistral, Qwen2/2.5/3, Gemma 1/2/3, Phi-3 "
        "(docs/backbones.md; exactly one of it and `llm_config`)",
    )
    llm_config: dict | None = option(
        None, "a randomly initialised LLM: `AutoConfig.for_model(model_type, **rest)`, `model_type` default `llama`"
    )
    tokenizer: str | None = option(
        None,
        "hub name, folder, or `byte_level` (file-free, for random models); null: the LLM's own. BOS only where the "
        "tokenizer adds one itself; without a pad token, eos pads (masked)",
    )
    vision_model: str | None = option(
        None,
        "vision tower: hub name or local folder of a CLIP, SigLIP (SigLIP2 fixed-resolution) or DINOv2 (with or "
        "without registers) checkpoint, a whole model's or its vision tower's (docs/backbones.md; exactly one of it "
        "and `vision_config`)",
    )
    vision_config: dict | None = option(
        None,
        "a randomly initialised tower: `AutoConfig.for_model(model_type, **rest)`, `model_type` one of "
        "`clip_vision_model` (default), `siglip_vision_model`, `dinov2`, `dinov2_with_registers`",
    )
    image_size: int | None = option(
        None,
        "side of the square images the tower reads (the vis_processors' `image_size`); null: the tower config's "
        "(DINOv2's config says 518, its image processor 224)",
        minimum=1,
    )
    llm_dtype: str = option("bfloat16", "dtype of the frozen towers on CUDA (with autocast)", LLM_DTYPES)
    cpu_dtype: str = option(
        "float32",
        "dtype of the frozen towers on CPU: `bfloat16` runs them under CPU autocast (trainable weights stay float32); "
        "`auto` is bfloat16 only when the CPU flags list AVX512-BF16 or AMX-BF16 and a training-shaped step measures "
        "it at least 1.2x faster than float32 (measured once per CPU, cached: models/cpu_arithmetic.py)",
        CPU_DTYPES,
    )
    llm_quantization: str | None = option(None, "`8bit`/`4bit` loading of the LLM (bitsandbytes, CUDA)", QUANTIZATIONS)
    llm_device_map: str | dict | None = option(
        None, "place the frozen LLM over several GPUs in one process (`auto` or a Hugging Face device map)"
    )
    device: str | None = option(
        None,
        "where the frozen towers are loaded and compute (`cpu`, `cuda`, `cuda:N`, `auto`); null: the run's `run.device` "
        "(set by `lavis.train`/`lavis.evaluate`), else `auto` (CUDA when available)",
    )
    frozen_sharding: str | None = option(
        None,
        "`fsdp`: the frozen LLM and vision tower sharded over the ranks of the torchrun job with FSDP2, the LLM built "
        "on the meta device and read shard by shard (docs/gpu.md); null: whole on every rank. `lavis.train` sets it "
        "from `run.distributed_strategy`",
        SHARDINGS,
    )
    fsdp_shard_size: int | None = option(
        None, "with `frozen_sharding: fsdp`, the ranks that share one copy of the frozen towers (HSDP; "
        "`run.fsdp_shard_size`); null: all ranks",
        minimum=1,
    )
    llm_gradient_checkpointing: bool = option(False, "activation checkpointing of the LLM (non-reentrant)")
    vision_gradient_checkpointing: bool = option(False, "activation checkpointing of the CLIP tower's blocks")
    # The fusion (design §2).
    fusion: str = option(
        "adem",
        "`adem`; `prefix` (LLaVA-style: every CLIP token projected and prepended, no cross-attention); `none` (text "
        "only: ADEM-VL's E1/E2 memory and recipe, no vision tower, no image)",
        FUSIONS,
    )
    activation: str = option("silu", "feature map of queries and keys (Table VIII)", ACTIVATIONS)
    query_from: str = option("mlp_in", "where a decoder layer's query is read (Table VII)", QUERY_POINTS)
    add_to: str = option("mlp_out", "where the fused feature is added, at or after `query_from` (Table VII)", ADD_POINTS)
    down_sample_num: list[int] = option(
        [256, 64], "multiscale visual features: square token counts, none above the tower's patches (Table IX)"
    )
    pooling: str = option("avg", "pooling of the multiscale features (Table IX)", POOLINGS)
    with_cls: bool = option(True, "the [cls] token in the LLM input (Table X)")
    num_visual_input_tokens: int = option(0, "extra pooled visual tokens in the LLM input, a square (Table X)", minimum=0)
    alpha: float = option(0.1, "scale of the fused feature added in each decoder layer")
    beta: float = option(0.01, "scale of the projected visual features X_v")
    drop_ratio: float = option(0.1, "dropped fraction gamma of each text token's visual features, in [0, 1)")
    hidden_proj: int = option(128, "hidden width of the low-rank projections W' and [cls]", minimum=1)
    adapter_dim: int = option(12, "rank of the vision adapters", minimum=1)
    adapter_scale: float = option(0.1, "scale of the vision adapters")
    adapter_dropout: float = option(0.1, "dropout inside the vision adapters, in [0, 1)")
    # The text (models/processing.py).
    max_len: int = option(
        512, "sequence limit; with generation: of the prompt (`middle`), or of prompt and new tokens (`end`)", minimum=1
    )
    truncation: str = option(
        "middle",
        "`middle` (ours): only the prompt is cut, in its middle, never the [cls] slot, answer cue or answer; `end` (the "
        "authors', the paper configs): prompt and answer tokenized as one string, labels after the prompt's own token "
        "count, the whole sequence cut at its end (answer and eos may be lost; a batch left without labels gives a "
        "zero loss); generation keeps the start",
        TRUNCATIONS,
    )
    image_prompt: str = option("Image: ", "text before the [cls] slot")
    no_image_prompt: str = option("Image: N/A", "text in its place for questions without image")
    prompt: str = option("", "caption prompt (e.g. `\"a picture of \"`) or VQA template with `{}` for the question")

    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | DictConfig) -> AdemVLConfig:
        """A model config section (yaml or dict): unknown keys are an error listing the known ones; every value is
        validated."""
        values = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
        check_known_keys("ademvl model", values, (f.name for f in dataclasses.fields(cls)))
        values = {key: _plain(value) for key, value in values.items()}
        return cls(**values)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for config_field in dataclasses.fields(self):
            value = getattr(self, config_field.name)
            choices = config_field.metadata["choices"]
            if choices is not None:
                check_choice(config_field.name, value, choices)
            elif config_field.type in _NUMBERS:  # "int | None" fields are not numbers that must be set
                kind, minimum = _NUMBERS[config_field.type], config_field.metadata["minimum"]
                setattr(self, config_field.name, checked_number(config_field.name, value, kind, minimum))
        if self.device is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"device={self.device!r}: use cpu, cuda, cuda:N or auto (or null: the run's device)")
        if self.image_size is not None:
            self.image_size = checked_number("image_size", self.image_size, int, minimum=1)
        if self.fsdp_shard_size is not None:
            self.fsdp_shard_size = checked_number("fsdp_shard_size", self.fsdp_shard_size, int, minimum=1)
        if self.frozen_sharding is not None and (self.llm_device_map is not None or self.llm_quantization is not None):
            raise ValueError(f"frozen_sharding={self.frozen_sharding!r} shards the LLM over the ranks itself: it "
                             "cannot also be placed by llm_device_map or quantized by llm_quantization")
        check_fraction("drop_ratio", self.drop_ratio)
        check_fraction("adapter_dropout", self.adapter_dropout)
        if POINT_ORDER[self.add_to] < POINT_ORDER[self.query_from]:
            raise ValueError(f"add_to={self.add_to!r} comes before query_from={self.query_from!r} inside a decoder layer")
        if not isinstance(self.down_sample_num, (list, tuple)) or not self.down_sample_num:
            raise ValueError(f"down_sample_num={self.down_sample_num!r} must be a non-empty list of token counts")
        self.down_sample_num = [checked_number(f"down_sample_num[{index}]", size, int, minimum=1)
                                for index, size in enumerate(self.down_sample_num)]

    @classmethod
    def check_compatible(cls, saved: Mapping[str, Any], current: Mapping[str, Any], source: str) -> None:
        """A ValueError naming each option that decides what trained weights compute (COMPATIBILITY_KEYS) and differs
        between a checkpoint's saved model section and the current one (absent keys: their defaults)."""
        defaults = cls()
        differences = [
            f"{key}={saved.get(key, getattr(defaults, key))!r} there, {current.get(key, getattr(defaults, key))!r} here"
            for key in COMPATIBILITY_KEYS
            if _plain(saved.get(key, getattr(defaults, key))) != _plain(current.get(key, getattr(defaults, key)))
        ]
        if differences:
            raise ValueError(f"checkpoint {source} was trained with other model options: {'; '.join(differences)}")

    def replace(self, **changes: Any) -> AdemVLConfig:
        return dataclasses.replace(self, **changes)


_NUMBERS = {"bool": bool, "int": int, "float": float}
# The options that decide what trained weights compute: a checkpoint loads only into a model with the same values
# (paths, dtypes, placement and text settings may differ).
COMPATIBILITY_KEYS = ("llm_config", "vision_config", "fusion", "activation", "query_from", "add_to", "down_sample_num",
                      "pooling", "with_cls", "num_visual_input_tokens", "alpha", "beta", "drop_ratio", "hidden_proj",
                      "adapter_dim", "adapter_scale")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _cell(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value.strip() != value or not value or " " in value else f"`{value}`"
    return f"`{value}`"


def markdown_table() -> str:
    """docs/configuration.md's table of model keys: key, default, accepted values, meaning."""
    lines = ["| key | default | values | meaning |", "| --- | --- | --- | --- |"]
    for config_field in dataclasses.fields(AdemVLConfig):
        default = config_field.default_factory() if config_field.default is dataclasses.MISSING else config_field.default
        choices = config_field.metadata["choices"]
        minimum = config_field.metadata["minimum"]
        values = ", ".join(_cell(choice) for choice in choices) if choices else f">= {minimum}" if minimum is not None else "-"
        lines.append(f"| `{config_field.name}` | {_cell(default)} | {values} | {config_field.metadata['meaning']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
