"""ADEM-VL: a frozen LLaMA-family LLM and a frozen CLIP vision tower joined by parameter-free cross-attention.

The frozen modules are Hugging Face models used as they are: small trainable modules attach to them through
forward hooks (vision adapters beside each used CLIP MLP; the fused visual feature added in every decoder layer).
The fusion math itself lives in `fusion.py`.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from lavis.models.base_model import BaseModel
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lavis_ademvl.common.checkpoints import load_checkpoint_file
from lavis_ademvl.common.registration import register
from lavis_ademvl.models.authors_checkpoint import convert_authors_state_dict, describe_authors_run, is_authors_checkpoint
from lavis_ademvl.models.fusion import (
    ACTIVATIONS,
    POOLINGS,
    activate,
    check_choice,
    check_drop_ratio,
    check_scales,
    fused_attend,
    multiscale_pool,
)
from lavis_ademvl.models.tokenization import load_tokenizer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models" / "ademvl"

FUSIONS = ("adem", "prefix", "none")
# Where, inside a decoder layer, the query is read and the fused feature is added (paper Table VII).
QUERY_POINTS = ("attn_in", "mlp_in")
ADD_POINTS = ("attn_out", "mlp_out")
QUANTIZATIONS = (None, "8bit", "4bit")
LLM_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CPU_DTYPES = ("float32", "bfloat16", "auto")  # float16 matmuls are slow or missing on CPUs
# Sequences longer than max_len: `middle` (ours) cuts the prompt in its middle and keeps the image slot, answer cue
# and answer; `end` (the authors') tokenizes prompt and answer as one string and cuts the whole sequence at its end.
TRUNCATIONS = ("middle", "end")
# The fused feature can only be added at or after the point its query is read.
_POINT_ORDER = {"attn_in": 0, "attn_out": 1, "mlp_in": 2, "mlp_out": 3}
_POINT_MODULE = {"attn_in": "self_attn", "attn_out": "self_attn", "mlp_in": "mlp", "mlp_out": "mlp"}

MODEL_CONFIG_KEYS = frozenset(
    {
        "arch", "model_type", "load_finetuned", "load_pretrained", "finetuned", "pretrained",
        "llm_model", "llm_config", "llm_dtype", "tokenizer", "vision_model", "vision_config",
        "fusion", "activation", "query_from", "add_to", "down_sample_num", "pooling", "with_cls",
        "num_visual_input_tokens", "alpha", "beta", "drop_ratio", "hidden_proj", "adapter_dim",
        "adapter_scale", "adapter_dropout", "max_len", "image_prompt", "no_image_prompt", "prompt",
        "llm_gradient_checkpointing", "vision_gradient_checkpointing", "llm_quantization", "llm_device_map",
        "cpu_dtype", "truncation",
    }
)


class LowRankProjection(nn.Sequential):
    """W': width -> hidden -> d_llm with SiLU between; xavier weights and zero biases."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__(nn.Linear(in_features, hidden_features), nn.SiLU(), nn.Linear(hidden_features, out_features))
        for linear in (self[0], self[2]):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)


class VisionAdapter(nn.Module):
    """Bottleneck beside a frozen CLIP MLP: mlp_out + scale * fc2(dropout(gelu(fc1(x)))), fc2 starting at zero."""

    def __init__(self, width: int, rank: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, rank, bias=False)
        self.fc2 = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.fc2.weight)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, mlp_input: torch.Tensor) -> torch.Tensor:
        return self.scale * self.fc2(self.dropout(F.gelu(self.fc1(mlp_input))))


@dataclass
class EncodedBatch:
    """Token ids of a batch, left-padded, with the image slot positions and answer labels (-100 elsewhere)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    slot_mask: torch.Tensor  # [B, L] True where visual slot embeddings go
    labels: torch.Tensor  # [B, L]

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)


@register("model", "ademvl")
class AdemVL(BaseModel):
    """ADEM-VL on a Hugging Face causal LM and CLIP vision tower.

    Samples: `image` [B,3,H,W], `has_image` [B] (0/1), `text_input` (prompt), optional `answer_cue` (e.g. "Answer: The
    answer is") and, for training, `text_output`; see `truncation` for what is cut from an over-long sequence.
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "llama7b": str(CONFIG_DIR / "llama7b.yaml"),
        "llama13b": str(CONFIG_DIR / "llama13b.yaml"),
        "llama2_7b": str(CONFIG_DIR / "llama2_7b.yaml"),
        "smollm2_135m": str(CONFIG_DIR / "smollm2_135m.yaml"),
        "tiny": str(CONFIG_DIR / "tiny.yaml"),
    }

    def __init__(
        self,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        vision_tower: CLIPVisionModel | None,
        *,
        fusion: str = "adem",
        activation: str = "silu",
        query_from: str = "mlp_in",
        add_to: str = "mlp_out",
        down_sample_num: Sequence[int] = (256, 64),
        pooling: str = "avg",
        with_cls: bool = True,
        num_visual_input_tokens: int = 0,
        alpha: float = 0.1,
        beta: float = 0.01,
        drop_ratio: float = 0.1,
        hidden_proj: int = 128,
        adapter_dim: int = 12,
        adapter_scale: float = 0.1,
        adapter_dropout: float = 0.1,
        max_len: int = 512,
        truncation: str = "middle",
        image_prompt: str = "Image: ",
        no_image_prompt: str = "Image: N/A",
        prompt: str = "",
        llm_gradient_checkpointing: bool = False,
        vision_gradient_checkpointing: bool = False,
        llm_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_choice("fusion", fusion, FUSIONS)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("query_from", query_from, QUERY_POINTS)
        check_choice("add_to", add_to, ADD_POINTS)
        check_choice("pooling", pooling, POOLINGS)
        check_drop_ratio(drop_ratio)
        check_choice("truncation", truncation, TRUNCATIONS)
        if _POINT_ORDER[add_to] < _POINT_ORDER[query_from]:
            raise ValueError(f"add_to={add_to!r} comes before query_from={query_from!r} inside a decoder layer")
        if fusion != "none" and vision_tower is None:
            raise ValueError(f"fusion={fusion!r} needs a vision tower (vision_model or vision_config)")
        if max_len <= 0:
            raise ValueError(f"max_len={max_len} must be positive")

        self.fusion = fusion
        self.activation = activation
        self.query_from, self.add_to = query_from, add_to
        self.down_sample_num = [int(s) for s in down_sample_num]
        self.pooling = pooling
        self.with_cls = bool(with_cls)
        self.num_visual_input_tokens = int(num_visual_input_tokens)
        self.alpha, self.beta, self.drop_ratio = float(alpha), float(beta), float(drop_ratio)
        self.max_len = int(max_len)
        self.truncation = truncation
        self.image_prompt, self.no_image_prompt = image_prompt, no_image_prompt
        self.prompt = prompt
        self.llm_dtype = llm_dtype
        self.tokenizer = tokenizer

        if fusion == "none":
            vision_tower = None  # text only: the tower would be dead weight
        self.llm = llm
        self.llm.requires_grad_(False)
        self._llm_keeps_logits = "logits_to_keep" in inspect.signature(llm.forward).parameters
        self.llm_gradient_checkpointing = bool(llm_gradient_checkpointing)
        if self.llm_gradient_checkpointing:
            # Non-reentrant: the recomputed layers run our hooks again and reach the visual memory of the step.
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        d_llm = llm.get_input_embeddings().embedding_dim
        self.vision_tower = vision_tower
        if vision_tower is not None:
            vision_tower.requires_grad_(False)
            if vision_gradient_checkpointing:
                # The tower's activations are read only at the very end of backward, after the LLM's are freed:
                # recomputing them there keeps them out of the peak. Non-reentrant, so adapters behind a frozen
                # input still get gradients, and the adapters' dropout is replayed with the same random state.
                vision_tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # The fused features are the input of the last CLIP block, so that block never runs (and an
            # adapter on it would never receive a gradient, which breaks DDP).
            encoder = vision_tower.vision_model.encoder
            encoder.layers = encoder.layers[:-1]
            width = vision_tower.config.hidden_size
            num_patches = (vision_tower.config.image_size // vision_tower.config.patch_size) ** 2
            self.vision_adapters = nn.ModuleList(
                VisionAdapter(width, adapter_dim, adapter_scale, adapter_dropout) for _ in encoder.layers
            )
            for layer, adapter in zip(encoder.layers, self.vision_adapters):
                layer.mlp.register_forward_hook(_adapter_hook(adapter))
            self.visual_proj = LowRankProjection(width, hidden_proj, d_llm)

        if fusion == "prefix":
            self.slot_length = num_patches + 1  # LLaVA-style: every CLIP token, projected
        elif fusion == "adem":
            check_scales(self.down_sample_num, num_patches)
            if self.num_visual_input_tokens:
                check_scales([self.num_visual_input_tokens], num_patches)
            self.slot_length = int(self.with_cls) + self.num_visual_input_tokens
            if self.with_cls:
                self.cls_proj = LowRankProjection(width, hidden_proj, d_llm)
        else:
            self.slot_length = 0
        if fusion in ("adem", "none"):
            num_visual = sum(self.down_sample_num)
            # E1 (key offset) and E2 (value offset). Text-only `none` keeps them, so it is ADEM-VL with the same
            # learned memory and recipe but no visual input: the baseline that shows what vision adds.
            self.visual_key_offset = nn.Parameter(torch.randn(1, num_visual, d_llm) * 0.02)
            self.visual_value_offset = nn.Parameter(torch.zeros(1, num_visual, d_llm))
            self._memory: tuple[torch.Tensor, torch.Tensor] | None = None
            self._memory_copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
            self._pending_queries: dict[int, torch.Tensor] = {}
            self._attach_fusion_hooks()
        self._truncation_warned = False
        counts = self.parameter_counts()
        logging.info("ADEM-VL (%s): %d trainable of %d parameters", fusion, counts["trainable"], counts["total"])

    # ------------------------------------------------------------------ construction from config

    @classmethod
    def default_config_path(cls, model_type: str) -> str:
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise KeyError(f"unknown ademvl model_type {model_type!r}; choose one of {sorted(cls.PRETRAINED_MODEL_CONFIG_DICT)}")
        return cls.PRETRAINED_MODEL_CONFIG_DICT[model_type]

    @classmethod
    def from_config(cls, cfg: DictConfig | dict) -> "AdemVL":
        cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
        options = model_options(cfg)  # validates every key first
        fusion = options["fusion"]
        check_choice("fusion", fusion, FUSIONS)
        dtype_name = cfg.get("llm_dtype", "bfloat16")
        check_choice("llm_dtype", dtype_name, tuple(LLM_DTYPES))
        cpu_dtype_name = cfg.get("cpu_dtype", "float32")
        check_choice("cpu_dtype", cpu_dtype_name, CPU_DTYPES)
        if cpu_dtype_name == "auto":
            # bfloat16 only where the CPU computes it natively: about 1.5x faster there, slower elsewhere.
            cpu_dtype_name = "bfloat16" if cpu_has_native_bfloat16() else "float32"
        dtype = LLM_DTYPES[dtype_name if torch.cuda.is_available() else cpu_dtype_name]

        quantization = cfg.get("llm_quantization")
        check_choice("llm_quantization", quantization, QUANTIZATIONS)
        device_map = cfg.get("llm_device_map")
        if isinstance(device_map, DictConfig):
            device_map = OmegaConf.to_container(device_map)
        llm = _load_llm(cfg.get("llm_model"), cfg.get("llm_config"), dtype, quantization, device_map)
        tokenizer_name = cfg.get("tokenizer") or cfg.get("llm_model")
        if tokenizer_name is None:
            raise KeyError("model config needs `tokenizer` when the LLM comes from `llm_config`")
        tokenizer = load_tokenizer(str(tokenizer_name))
        vision_tower = None
        if fusion != "none":
            vision_tower = _load_vision_tower(cfg.get("vision_model"), cfg.get("vision_config"), dtype)

        model = cls(llm, tokenizer, vision_tower, **options, llm_dtype=dtype)
        if cfg.get("load_finetuned", False):
            finetuned = cfg.get("finetuned")
            if not finetuned:
                raise KeyError("load_finetuned is true but `finetuned` names no checkpoint")
            model.load_checkpoint(finetuned)
        return model

    # ------------------------------------------------------------------ placement

    @property
    def llm_dispatched(self) -> bool:
        """True when the frozen LLM was placed by `llm_device_map` (or quantized) and must not be moved."""
        return getattr(self.llm, "hf_device_map", None) is not None

    def place(self, device: torch.device | str) -> "AdemVL":
        """Move the model to `device`; a dispatched LLM stays where it was placed, only our modules move."""
        if not self.llm_dispatched:
            return self.to(device)
        for name, module in self.named_children():
            if name != "llm":
                module.to(device)
        for parameter in self.parameters(recurse=False):
            parameter.data = parameter.data.to(device)
        return self

    # ------------------------------------------------------------------ parameters and checkpoints

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameter counts, and the trainable count of each group."""
        groups: dict[str, int] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                group = name.split(".")[0]
                groups[group] = groups.get(group, 0) + p.numel()
        return {
            "trainable": sum(groups.values()),
            "total": sum(p.numel() for p in self.parameters()),
            **{f"trainable/{group}": count for group, count in groups.items()},
        }

    def load_checkpoint(self, url_or_filename: str) -> None:
        """Load trainable weights written by this project or released by the authors (mapped, see
        `authors_checkpoint`); any missing or unknown key is an error."""
        checkpoint = load_checkpoint_file(url_or_filename)
        state = checkpoint.get("model", checkpoint)
        if is_authors_checkpoint(state):
            num_used = len(self.vision_adapters) if self.vision_tower is not None else 0
            state = convert_authors_state_dict(state, num_used)
            describe_authors_run(checkpoint, url_or_filename)
        self.load_trainable_state(state, source=url_or_filename)
        logging.info("loaded ADEM-VL checkpoint %s", url_or_filename)

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        expected = set(self.trainable_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(
                f"checkpoint {source} does not match this model (fusion={self.fusion}): "
                f"missing trainable keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
        params = dict(self.named_parameters())
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"checkpoint {source}: {name} has shape {tuple(value.shape)}, model expects {tuple(params[name].shape)}"
                )
        self.load_state_dict(state, strict=False)

    # ------------------------------------------------------------------ fusion hooks

    def _decoder_layers(self) -> nn.ModuleList:
        layers = getattr(self.llm.get_decoder(), "layers", None)
        if layers is None or not all(hasattr(l, "self_attn") and hasattr(l, "mlp") for l in layers):
            raise TypeError(
                f"{type(self.llm).__name__} is not a LLaMA-family decoder (layers with self_attn and mlp)"
            )
        return layers

    def _attach_fusion_hooks(self) -> None:
        query_module, add_module = _POINT_MODULE[self.query_from], _POINT_MODULE[self.add_to]
        for index, layer in enumerate(self._decoder_layers()):
            if self.query_from.endswith("_in") and query_module == add_module:
                # Query and addition on the same module: one hook sees both its input and its output.
                getattr(layer, add_module).register_forward_hook(self._fuse_hook(index, own_input=True), with_kwargs=True)
                continue
            getattr(layer, query_module).register_forward_pre_hook(self._capture_hook(index), with_kwargs=True)
            getattr(layer, add_module).register_forward_hook(self._fuse_hook(index, own_input=False), with_kwargs=True)

    def _capture_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._memory is not None:
                self._pending_queries[index] = _module_input(args, kwargs)

        return hook

    def _fuse_hook(self, index: int, own_input: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if self._memory is None:
                return output
            query = _module_input(args, kwargs) if own_input else self._pending_queries.pop(index)
            keys, values = self._memory_on(query.device)
            if query.shape[0] != keys.shape[0]:
                raise RuntimeError(f"visual memory holds {keys.shape[0]} rows but the decoder runs {query.shape[0]}")
            fused = fused_attend(query, keys, values, self.drop_ratio, self.activation)
            return _add_to_output(output, self.alpha * fused)

        return hook

    def _memory_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The visual memory on `device`: layers of a dispatched LLM live on several GPUs; one copy per device."""
        keys, values = self._memory
        if keys.device == device:
            return keys, values
        if device not in self._memory_copies:
            self._memory_copies[device] = (keys.to(device), values.to(device))
        return self._memory_copies[device]

    @contextlib.contextmanager
    def _fusion_memory(self, keys: torch.Tensor | None, values: torch.Tensor | None, expand: int = 1) -> Iterator[None]:
        """Make the activated keys and values of this batch visible to every decoder layer's hook.

        Generation runs `expand` rows per sample (beams or sampled sequences), repeated in place as Hugging Face
        does; beam reordering only permutes rows of one sample, which share their visual memory.
        """
        if keys is None:
            yield
            return
        if expand > 1:
            keys, values = keys.repeat_interleave(expand, dim=0), values.repeat_interleave(expand, dim=0)
        self._memory = (keys, values)
        self._memory_copies = {}
        try:
            yield
        finally:
            # With gradient checkpointing, backward recomputes the layers (and runs the hooks) after this
            # context has closed, so the memory stays until the next forward replaces it.
            if not (self.llm_gradient_checkpointing and self.training):
                self._memory, self._memory_copies = None, {}
            self._pending_queries.clear()

    # ------------------------------------------------------------------ visual side

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.llm_dtype != torch.float32 and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=self.llm_dtype)
        return contextlib.nullcontext()

    def _vision_features(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, C]: the input of the last CLIP block after the tower's final layer norm; token 0 is [cls]."""
        tower = self.vision_tower
        hidden = tower(pixel_values=image.to(tower.dtype)).last_hidden_state
        return tower.vision_model.post_layernorm(hidden)

    def _visual_inputs(
        self, image: torch.Tensor | None, has_image: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Per forward, once: (activated keys [B,Nv,d], values [B,Nv,d], slot embeddings [B,S,d] or None)."""
        batch = has_image.shape[0]
        if self.fusion == "none":
            # Cast before expanding: casting an expanded tensor would materialise one copy per sample.
            keys = activate(self.visual_key_offset, self.activation).to(self.llm_dtype).expand(batch, -1, -1)
            return keys, self.visual_value_offset.to(self.llm_dtype).expand(batch, -1, -1), None
        if image is None:
            raise KeyError("samples need an `image` tensor (placeholder images for text-only samples)")
        features = self._vision_features(image)
        if self.fusion == "prefix":
            return None, None, self.visual_proj(features)
        slots = []
        if self.with_cls:
            slots.append(self.cls_proj(features[:, :1]))
        if self.num_visual_input_tokens:
            pooled = multiscale_pool(features[:, 1:], [self.num_visual_input_tokens], self.pooling)
            slots.append(self.visual_proj(pooled))
        pooled = multiscale_pool(features[:, 1:], self.down_sample_num, self.pooling)
        visual = self.beta * self.visual_proj(pooled) * has_image.to(features.dtype).view(-1, 1, 1)
        keys = activate(visual + self.visual_key_offset, self.activation)
        values = visual + self.visual_value_offset
        # In the LLM's dtype once here, not once per decoder layer.
        return keys.to(self.llm_dtype), values.to(self.llm_dtype), torch.cat(slots, dim=1) if slots else None

    # ------------------------------------------------------------------ text side

    def _encode_sample(
        self, prompt: str, cue: str, answer: str | None, with_slot: bool, reserve: int = 0
    ) -> tuple[list[int], int, list[int]]:
        """Token ids, the index of the first image-slot token (-1 if none), and labels (-100 = no loss).

        Layout: <bos>? image-prefix [slot] prompt cue answer <eos>. `reserve`: tokens that generation will add.
        """
        tok = self.tokenizer
        prefix: list[int] = [tok.bos_token_id] if tok.bos_token_id is not None else []
        slot_start = -1
        if self.slot_length:
            prefix += tok(self.image_prompt if with_slot else self.no_image_prompt, add_special_tokens=False).input_ids
            if with_slot:
                slot_start = len(prefix)
                prefix += [tok.pad_token_id] * self.slot_length
        if self.truncation == "end":
            input_ids, labels = self._encode_whole(prefix, prompt + cue, answer, reserve)
        else:
            input_ids, labels = self._encode_protected(prefix, prompt, cue, answer)
        return input_ids, slot_start, labels

    def _warn_truncation(self, where: str) -> None:
        if not self._truncation_warned:
            logging.warning("sequences longer than max_len=%d are cut %s", self.max_len, where)
            self._truncation_warned = True

    def _encode_whole(self, prefix: list[int], context: str, answer: str | None, reserve: int) -> tuple[list[int], list[int]]:
        """truncation `end`, the authors' sequences: context and answer tokenized as ONE string, labels from as many
        tokens as the context has alone; the whole sequence cut at max_len from its end (answer and eos may be lost).
        Generation keeps the start: the prompt is cut so that `reserve` new tokens fit in max_len."""
        tok = self.tokenizer
        if answer is None:
            # Trailing spaces are the answer's first token (a caption prompt "a picture of " is generated from
            # "a picture of", as the authors do).
            ids = prefix + tok(context.rstrip(), add_special_tokens=False).input_ids
            limit = self.max_len - reserve
            if limit <= len(prefix):
                raise ValueError(
                    f"max_len={self.max_len} leaves no room for the prompt when generating {reserve} tokens "
                    f"(truncation='end'); raise model.max_len"
                )
            if len(ids) > limit:
                self._warn_truncation("at their end (truncation='end')")
            return ids[:limit], [-100] * min(len(ids), limit)
        if self.max_len < len(prefix) + 1:
            raise ValueError(f"max_len={self.max_len} cuts into the image prefix ({len(prefix)} tokens)")
        num_context = len(tok(context, add_special_tokens=False).input_ids)
        text_ids = tok(context + answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = prefix + text_ids
        labels = [-100] * len(prefix) + [-100 if index < num_context else token for index, token in enumerate(text_ids)]
        if len(ids) > self.max_len:
            self._warn_truncation("at their end (truncation='end'): the answer may be lost")
        return ids[: self.max_len], labels[: self.max_len]

    def _encode_protected(self, prefix: list[int], prompt: str, cue: str, answer: str | None) -> tuple[list[int], list[int]]:
        """truncation `middle` (ours): only the prompt may be cut, in its middle; the cue and answer never are."""
        tok = self.tokenizer
        # Trailing spaces belong to the answer's first token ("of" + " a", not "of " + "a"), so training and
        # generation see the same token boundary.
        context = (prompt + cue).rstrip()
        if answer is not None:
            answer = (prompt + cue)[len(context) :] + answer
        prompt, cue = prompt[: len(context)], context[len(prompt) :] if len(context) > len(prompt) else ""
        text = context + (answer or "")
        encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded.input_ids, encoded.offset_mapping
        prompt_end, answer_start = len(prompt), len(prompt) + len(cue)
        num_prompt = sum(1 for _, end in offsets if end <= prompt_end)
        num_answer = sum(1 for start, end in offsets if start >= answer_start and end > start) if answer else 0
        prompt_ids, protected = ids[:num_prompt], ids[num_prompt:]
        answer_ids = protected[len(protected) - num_answer :] if num_answer else []
        if answer is not None:
            answer_ids = answer_ids + [tok.eos_token_id]
            protected = protected + [tok.eos_token_id]
        budget = self.max_len - len(prefix) - len(protected)
        if budget < 0:
            raise ValueError(
                f"the image prefix, answer cue and answer take {len(prefix) + len(protected)} tokens, more than "
                f"max_len={self.max_len}: {(cue + (answer or ''))[:80]!r}"
            )
        if len(prompt_ids) > budget:
            self._warn_truncation("in their prompt's middle (truncation='middle')")
            head = budget // 2
            prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - (budget - head) :]
        input_ids = prefix + prompt_ids + protected
        labels = [-100] * (len(input_ids) - len(answer_ids)) + answer_ids
        return input_ids, labels

    def sample_texts(
        self, samples: dict, with_answer: bool, prompt: str | None = None
    ) -> tuple[list[str], list[str], list[str | None]]:
        """(prompts, answer cues, answers) of a batch in any of the sample formats LAVIS's datasets produce:

        - `text_input` + `text_output` (+ `answer_cue`): prompt and target given (ScienceQA, our VQA);
        - `text_input` + `answer`/`weight`/`n_answers` (LAVIS VQA training): question in `prompt`, best answer;
        - `text_input` alone while training (LAVIS captioning): the caption follows `prompt`;
        - otherwise (inference): `text_input` as a question in `prompt`, or `prompt` alone (captioning).
        """
        template = self.prompt if prompt is None else prompt
        count = _batch_size(samples)
        cues = _per_sample(samples.get("answer_cue", ""), count)
        if "text_output" in samples:
            return list(samples["text_input"]), cues, list(samples["text_output"]) if with_answer else [None] * count
        questions = samples.get("text_input")
        if "n_answers" in samples:
            prompts = [_fill_prompt(template, q) for q in questions]
            if not with_answer:
                return prompts, cues, [None] * count
            return prompts, cues, [_answer_after(p + c, a) for p, c, a in zip(prompts, cues, _best_answers(samples))]
        if with_answer:
            if questions is None:
                raise KeyError("training samples need `text_input` (and `text_output` unless it is a caption)")
            return [template] * count, cues, [_answer_after(template + c, caption) for c, caption in zip(cues, questions)]
        prompts = [_fill_prompt(template, q) for q in questions] if questions is not None else [template] * count
        return prompts, cues, [None] * count

    def encode_batch(self, samples: dict, with_answer: bool, prompt: str | None = None, reserve: int = 0) -> EncodedBatch:
        """Tokenize, truncate and left-pad a batch (left padding keeps every sequence's last token aligned);
        `reserve`: the number of tokens generation will add."""
        prompts, cues, answers = self.sample_texts(samples, with_answer, prompt)
        has_image = _has_image(samples, len(prompts))
        encoded = [
            self._encode_sample(p, c, a, bool(h) and self.fusion != "none", reserve)
            for p, c, a, h in zip(prompts, cues, answers, has_image.tolist())
        ]
        length = max(len(ids) for ids, _, _ in encoded)
        batch = len(encoded)
        input_ids = torch.full((batch, length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        slot_mask = torch.zeros((batch, length), dtype=torch.bool)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        for row, (ids, slot_start, row_labels) in enumerate(encoded):
            offset = length - len(ids)
            input_ids[row, offset:] = torch.tensor(ids)
            attention_mask[row, offset:] = 1
            labels[row, offset:] = torch.tensor(row_labels)
            if slot_start >= 0:
                slot_mask[row, offset + slot_start : offset + slot_start + self.slot_length] = True
        device = self.device
        return EncodedBatch(input_ids.to(device), attention_mask.to(device), slot_mask.to(device), labels.to(device))

    def _input_embeddings(self, encoded: EncodedBatch, slots: torch.Tensor | None) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(encoded.input_ids)
        if slots is None:
            return embeds
        # Every sample's slot embeddings stay in the graph (zero weight when it has no image), so all trainable
        # parameters receive a gradient in every step, as DDP requires.
        slot_index = (encoded.slot_mask.cumsum(-1) - 1).clamp(min=0, max=self.slot_length - 1)
        placed = torch.gather(slots.to(embeds.dtype), 1, slot_index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        return torch.where(encoded.slot_mask.unsqueeze(-1), placed, embeds)

    # ------------------------------------------------------------------ forward and inference

    def _run_llm(
        self,
        samples: dict,
        with_answer: bool,
        prompt: str | None = None,
        expand: int = 1,
        visual: tuple[torch.Tensor | None, ...] | None = None,
        **generate_kwargs: Any,
    ) -> tuple[torch.Tensor, EncodedBatch]:
        """One LLM pass, or Hugging Face generation (given generate_kwargs) with `expand` rows per sample.

        Returns the logits [B, L, vocab] of the last L positions, the only ones any caller reads: with an answer,
        L = (columns holding a label) + 1, so logits[:, :-1] predict labels[:, 1 - L:]; without, L = 1 (the next
        token). Generation returns the new token ids instead. `visual` passes (keys, values, slots) already
        computed for these rows, e.g. shared by several candidates.
        """
        encoded = self.encode_batch(samples, with_answer, prompt, reserve=generate_kwargs.get("max_new_tokens", 0))
        with self._autocast():
            if visual is None:
                has_image = _has_image(samples, encoded.input_ids.shape[0]).to(self.device)
                visual = self._visual_inputs(samples.get("image"), has_image)
            keys, values, slots = visual
            embeds = self._input_embeddings(encoded, slots)
            with self._fusion_memory(keys, values, expand):
                if generate_kwargs:
                    output = self.llm.generate(
                        inputs_embeds=embeds,
                        attention_mask=encoded.attention_mask,
                        pad_token_id=self.tokenizer.pad_token_id,
                        eos_token_id=self.tokenizer.eos_token_id,
                        **generate_kwargs,
                    )
                    return output, encoded
                # Left padding puts every label in the last columns, and only those positions need the vocabulary
                # projection: at SmolLM2's 49k vocabulary, logits for every position cost a fifth of a step.
                keep = labelled_columns(encoded.labels) + 1 if with_answer else 1
                output = self.llm(
                    inputs_embeds=embeds,
                    attention_mask=encoded.attention_mask,
                    position_ids=encoded.position_ids,
                    use_cache=False,
                    **({"logits_to_keep": last_columns(embeds, keep)} if self._llm_keeps_logits else {}),
                )
        return output.logits[:, -keep:], encoded

    def forward(self, samples: dict) -> dict[str, torch.Tensor]:
        """Language-modelling loss on the answer tokens (and the closing eos) only."""
        logits, encoded = self._run_llm(samples, with_answer=True)
        return {"loss": answer_loss(logits, encoded.labels)}

    @torch.no_grad()
    def next_token_logprobs(self, samples: dict) -> torch.Tensor:
        """[B, vocab] log-probabilities of the token that follows prompt + answer cue."""
        logits, _ = self._run_llm(samples, with_answer=False)
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    @torch.no_grad()
    def generate(
        self,
        samples: dict,
        use_nucleus_sampling: bool = False,
        num_beams: int = 5,
        max_length: int = 30,
        min_length: int = 1,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        temperature: float = 1.0,
        prompt: str | None = None,
    ) -> list[str]:
        """Text after each sample's prompt (captions: after `prompt`), with Hugging Face `generate` and its KV cache.

        Returns num_captions strings per sample, sample-major. max_length/min_length count new tokens.
        """
        options: dict[str, Any] = {
            "max_new_tokens": max_length,
            "min_new_tokens": min_length,
            "repetition_penalty": repetition_penalty,
            "num_return_sequences": num_captions,
        }
        if use_nucleus_sampling:
            options.update(do_sample=True, top_p=top_p, temperature=temperature, num_beams=1)
            expand = num_captions
        else:
            if num_captions > num_beams:
                raise ValueError(f"num_captions={num_captions} needs num_beams >= num_captions (got {num_beams})")
            options.update(do_sample=False, num_beams=num_beams)
            if num_beams > 1:
                options["length_penalty"] = length_penalty
            expand = num_beams
        new_tokens, _ = self._run_llm(samples, with_answer=False, prompt=prompt, expand=expand, **options)
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    @torch.no_grad()
    def score_candidates(
        self,
        samples: dict,
        answer_list: Sequence[Sequence[str]],
        prompt: str | None = None,
        rows_per_pass: int = 64,
    ) -> list[list[float]]:
        """Sum of log-probabilities of each candidate's tokens (and the closing eos) after the sample's prompt.

        The (sample, candidate) pairs go through the LLM `rows_per_pass` at a time.
        """
        pairs = [(row, candidate) for row, candidates in enumerate(answer_list) for candidate in candidates]
        if not pairs:
            raise ValueError("answer_list holds no candidate")
        prompts, cues, _ = self.sample_texts(samples, with_answer=False, prompt=prompt)
        has_image = _has_image(samples, len(prompts))
        with self._autocast():  # the vision tower runs once per sample, not once per candidate
            visual = self._visual_inputs(samples.get("image"), has_image.to(self.device))
        flat_scores: list[float] = []
        for start in range(0, len(pairs), rows_per_pass):
            chunk = pairs[start : start + rows_per_pass]
            rows = torch.tensor([row for row, _ in chunk])
            expanded = {
                "has_image": has_image[rows],
                "text_input": [prompts[row] for row, _ in chunk],
                "answer_cue": [cues[row] for row, _ in chunk],
                "text_output": [candidate for _, candidate in chunk],
            }
            device_rows = rows.to(self.device)
            chunk_visual = tuple(None if t is None else t[device_rows] for t in visual)
            logits, encoded = self._run_llm(expanded, with_answer=True, visual=chunk_visual)
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            targets = encoded.labels[:, encoded.labels.shape[1] + 1 - logits.shape[1] :]
            token_logprobs = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            flat_scores += (token_logprobs * (targets != -100)).sum(-1).tolist()
        scores, start = [], 0
        for candidates in answer_list:
            scores.append(flat_scores[start : start + len(candidates)])
            start += len(candidates)
        return scores

    def _preselect(self, samples: dict, answers: Sequence[str], count: int, prompt: str | None) -> list[list[str]]:
        """The `count` answers per sample whose first token is most likely after the prompt (one LLM pass)."""
        first_tokens = [
            ids[0] if ids else self.tokenizer.eos_token_id
            for ids in self.tokenizer([" " + a.strip() for a in answers], add_special_tokens=False).input_ids
        ]
        logits, _ = self._run_llm(samples, with_answer=False, prompt=prompt)
        logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)[:, first_tokens]
        top = logprobs.topk(min(count, len(answers)), dim=-1).indices.tolist()
        return [[answers[i] for i in row] for row in top]

    @torch.no_grad()
    def predict_answers(
        self,
        samples: dict,
        num_beams: int = 5,
        inference_method: str = "generate",
        max_len: int = 10,
        min_len: int = 1,
        num_ans_candidates: int = 128,
        answer_list: Sequence[str] | Sequence[Sequence[str]] | None = None,
        prompt: str | None = None,
        length_penalty: float = 0.0,
        **kwargs: Any,
    ) -> list[str]:
        """Answer each sample, as LAVIS's VQA tasks call it.

        `generate` decodes up to max_len tokens (beam search, greedy for num_beams=1). `rank` returns the most
        likely candidate, so it always gives a valid answer: `answer_list` is either one list for all samples
        (VQA: the num_ans_candidates answers with the likeliest first token are scored in full; a space is put
        before each) or one list per sample, scored in full as given. An empty `prompt` means the model's own.
        """
        check_choice("inference_method", inference_method, ("generate", "rank"))
        prompt = prompt or None
        if inference_method == "generate":
            return self.generate(
                samples, num_beams=num_beams, max_length=max_len, min_length=min_len,
                length_penalty=length_penalty, prompt=prompt,
            )
        if not answer_list:
            raise ValueError("inference_method='rank' needs answer_list (candidate answers)")
        if all(isinstance(answer, str) for answer in answer_list):
            shortlists = self._preselect(samples, answer_list, num_ans_candidates, prompt)
            prompts, cues, _ = self.sample_texts(samples, with_answer=False, prompt=prompt)
            candidates = [[_answer_after(p + c, a) for a in row] for p, c, row in zip(prompts, cues, shortlists)]
            scores = self.score_candidates(samples, candidates, prompt)
        else:
            shortlists = [list(candidates) for candidates in answer_list]
            scores = self.score_candidates(samples, shortlists, prompt)
        return [candidates[max(range(len(row)), key=row.__getitem__)] for candidates, row in zip(shortlists, scores)]


# ---------------------------------------------------------------------- helpers


def model_options(cfg: DictConfig) -> dict[str, Any]:
    """The fusion options of a model config (every key read explicitly, defaults of the paper); unknown keys
    are an error. Module-loading keys (llm_model, vision_model, ...) are read by `AdemVL.from_config`."""
    unknown = sorted(set(cfg.keys()) - MODEL_CONFIG_KEYS)
    if unknown:
        raise KeyError(f"unknown ademvl model config key(s) {unknown}; known keys: {sorted(MODEL_CONFIG_KEYS)}")
    return {
        "fusion": cfg.get("fusion", "adem"),
        "activation": cfg.get("activation", "silu"),
        "query_from": cfg.get("query_from", "mlp_in"),
        "add_to": cfg.get("add_to", "mlp_out"),
        "down_sample_num": list(cfg.get("down_sample_num", [256, 64])),
        "pooling": cfg.get("pooling", "avg"),
        "with_cls": cfg.get("with_cls", True),
        "num_visual_input_tokens": cfg.get("num_visual_input_tokens", 0),
        "alpha": cfg.get("alpha", 0.1),
        "beta": cfg.get("beta", 0.01),
        "drop_ratio": cfg.get("drop_ratio", 0.1),
        "hidden_proj": cfg.get("hidden_proj", 128),
        "adapter_dim": cfg.get("adapter_dim", 12),
        "adapter_scale": cfg.get("adapter_scale", 0.1),
        "adapter_dropout": cfg.get("adapter_dropout", 0.1),
        "max_len": cfg.get("max_len", 512),
        "truncation": cfg.get("truncation", "middle"),
        "image_prompt": cfg.get("image_prompt", "Image: "),
        "no_image_prompt": cfg.get("no_image_prompt", "Image: N/A"),
        "prompt": cfg.get("prompt", ""),
        "llm_gradient_checkpointing": cfg.get("llm_gradient_checkpointing", False),
        "vision_gradient_checkpointing": cfg.get("vision_gradient_checkpointing", False),
    }


def _adapter_hook(adapter: VisionAdapter):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + adapter(args[0]).to(output.dtype)

    return hook


def _module_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _add_to_output(output: Any, delta: torch.Tensor) -> Any:
    if isinstance(output, tuple):  # attention modules return (hidden_states, weights, ...)
        return (output[0] + delta.to(output[0].dtype),) + output[1:]
    return output + delta.to(output.dtype)


def _batch_size(samples: dict) -> int:
    for key in ("image", "text_input", "has_image"):
        if samples.get(key) is not None:
            return len(samples[key])
    raise KeyError("samples hold neither `image` nor `text_input`")


def _fill_prompt(template: str, question: str) -> str:
    """A VQA prompt: `template` with `{}` replaced by the question, or the question appended."""
    return template.format(question) if "{}" in template else template + question


def _answer_after(context: str, answer: str) -> str:
    """`answer` separated from `context` by exactly one space (none added when the context ends with one)."""
    answer = answer.strip()
    return answer if context[-1:].isspace() else " " + answer


def _best_answers(samples: dict) -> list[str]:
    """The highest-weighted answer of each question in LAVIS's flattened VQA batch (answer/weight/n_answers)."""
    answers, weights = samples["answer"], torch.as_tensor(samples["weight"]).tolist()
    best, start = [], 0
    for count in torch.as_tensor(samples["n_answers"]).tolist():
        span = range(start, start + count)
        best.append(answers[max(span, key=lambda i: weights[i])])
        start += count
    return best


def _per_sample(value: str | Sequence[str], count: int) -> list[str]:
    return [value] * count if isinstance(value, str) else list(value)


def labelled_columns(labels: torch.Tensor) -> int:
    """How many of the last columns of a left-padded [B, L] label batch hold a label (not -100) in some row; 0 when
    none does (truncation 'end' may cut every answer of a batch away)."""
    columns = (labels != -100).any(dim=0).nonzero()
    return labels.shape[1] - int(columns[0]) if columns.numel() else 0


def last_columns(hidden: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the last `count` positions of [B, L, ...], for Hugging Face's `logits_to_keep`. An index tensor,
    not an int: an int slices a non-contiguous view, and the vocabulary projection of that view copies the
    [vocab, d] weight once per sample."""
    length = hidden.shape[1]
    return torch.arange(length - count, length, device=hidden.device)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of labels [B, L] (-100 = none) under logits [B, K, vocab] of the last K positions.

    A batch without any label left (truncation 'end') gives zero, still connected to every trainable parameter
    (DDP needs each one to receive a gradient)."""
    if logits.shape[1] == 1:
        return logits.sum() * 0.0
    targets = labels[:, labels.shape[1] + 1 - logits.shape[1] :]
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def _has_image(samples: dict, count: int) -> torch.Tensor:
    has_image = samples.get("has_image")
    if has_image is None:
        return torch.ones(count, dtype=torch.long) if samples.get("image") is not None else torch.zeros(count, dtype=torch.long)
    return torch.as_tensor(has_image).long().cpu()


def cpu_has_native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU flags list AVX512-BF16 or AMX-BF16 (Linux); False when they cannot be read."""
    try:
        flags = cpuinfo.read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _quantization_config(quantization: str, dtype: torch.dtype) -> Any:
    """bitsandbytes 8-bit or 4-bit (NF4) loading of the frozen LLM; CUDA only."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"llm_quantization={quantization!r} needs a CUDA GPU (bitsandbytes); on CPU leave it null")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(f"llm_quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes") from error
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _load_llm(
    name_or_path: str | None,
    config: DictConfig | dict | None,
    dtype: torch.dtype,
    quantization: str | None = None,
    device_map: str | dict | None = None,
) -> PreTrainedModel:
    if (name_or_path is None) == (config is None):
        raise KeyError("give exactly one of `llm_model` (hub name or local folder) and `llm_config` (random init)")
    if device_map is not None and quantization is None:
        if config is not None:
            raise ValueError("llm_device_map needs pretrained weights (llm_model), not a random llm_config")
        # Hugging Face/accelerate place the decoder layers over the listed devices ("auto": all visible GPUs).
        return AutoModelForCausalLM.from_pretrained(os.path.expanduser(name_or_path), torch_dtype=dtype, device_map=device_map)
    if quantization is not None:
        if config is not None:
            raise ValueError("llm_quantization needs pretrained weights (llm_model), not a random llm_config")
        quantization_config = _quantization_config(quantization, dtype)
        return AutoModelForCausalLM.from_pretrained(
            os.path.expanduser(name_or_path), torch_dtype=dtype, quantization_config=quantization_config,
            device_map={"": torch.cuda.current_device()},
        )
    if config is not None:
        config = OmegaConf.to_container(config) if isinstance(config, DictConfig) else dict(config)
        return LlamaForCausalLM(LlamaConfig(**config)).to(dtype)
    name_or_path = os.path.expanduser(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, torch_dtype=dtype)
    except OSError as error:
        raise OSError(f"model.llm_model={name_or_path!r} could not be loaded (a local folder, or a hub name): {error}") from error


def _load_vision_tower(name_or_path: str | None, config: DictConfig | dict | None, dtype: torch.dtype) -> CLIPVisionModel:
    if (name_or_path is None) == (config is None):
        raise KeyError("give exactly one of `vision_model` (hub name or local folder) and `vision_config` (random init)")
    if config is not None:
        config = OmegaConf.to_container(config) if isinstance(config, DictConfig) else dict(config)
        return CLIPVisionModel(CLIPVisionConfig(**config)).to(dtype)
    name_or_path = os.path.expanduser(name_or_path)
    try:
        return CLIPVisionModel.from_pretrained(name_or_path, torch_dtype=dtype)
    except OSError as error:
        raise OSError(f"model.vision_model={name_or_path!r} could not be loaded (a local folder, or a hub name): {error}") from error
