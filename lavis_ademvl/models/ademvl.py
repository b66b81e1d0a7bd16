"""ADEM-VL: a frozen decoder LLM and a frozen vision tower (CLIP, SigLIP, DINOv2) joined by parameter-free cross-attention.

The model composes its parts, each in its own module:
- `config.py`: every option, its default and allowed values (`AdemVLConfig`);
- `towers.py`: loading and freezing the Hugging Face towers (dtype, quantization, device map, meta-device shapes);
- `vision_towers.py`: the vision tower families, and the features ADEM-VL reads from them;
- `modules.py`: the trainable modules (low-rank projections W' and [cls], vision adapters);
- `checkpoint_keys.py`: the key layouts of the checkpoints it reads (ours, earlier ones, the authors');
- `backbones.py`: the frozen parts a checkpoint records being trained on, and the check that it loads onto them;
- `memory.py`: the visual memory and the decoder-layer hooks that add the fused feature (`VisualMemory`);
- `processing.py`: texts -> token ids, image slots and labels (`PromptEncoder`);
- `scoring.py`: rank inference (candidate answers scored by log-likelihood), a mixin of the model;
- `fusion.py`: the fusion math, pure functions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from lavis.models.base_model import BaseModel
from omegaconf import DictConfig
from torch.distributed.device_mesh import DeviceMesh
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lavis_ademvl.common.checkpoints import load_checkpoint_file, non_finite_keys
from lavis_ademvl.common.registration import register
from lavis_ademvl.common.validation import check_choice
from lavis_ademvl.models.backbones import backbone_identity, check_same_backbones
from lavis_ademvl.models.checkpoint_keys import checkpoint_state, is_authors_checkpoint, rename_legacy_keys
from lavis_ademvl.models.config import AdemVLConfig
from lavis_ademvl.models.fusion import activate, check_scales, multiscale_pool
from lavis_ademvl.models.memory import VisualMemory, decoder_layers
from lavis_ademvl.models.modules import LowRankProjection, VisionAdapters
from lavis_ademvl.models.processing import EncodedBatch, PromptEncoder, VisualInputs, image_flags, last_columns
from lavis_ademvl.models.scoring import RankScoringMixin
from lavis_ademvl.models.sharding import frozen_mesh, is_sharded, shard_frozen_towers
from lavis_ademvl.models.towers import (
    freeze_llm,
    freeze_vision_tower,
    load_towers,
    meta_towers,
    model_device,
)
from lavis_ademvl.models.vision_towers import adapter_points, family_of, patch_grid, vision_features

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models" / "ademvl"


@register("model", "ademvl")
class AdemVL(RankScoringMixin, BaseModel):
    """ADEM-VL on a Hugging Face causal LM and vision tower.

    Samples: `image` [B,3,H,W], `has_image` [B] (0/1), `text_input` (prompt), optional `answer_cue` (e.g. "Answer: The
    answer is") and, for training, `text_output`; see `AdemVLConfig.truncation` for what is cut from a long sequence.
    """

    # Sample fields read on the host (the image flags decide the token layout; VQA answer weights pick the target): a
    # runner leaves them there, as reading them back from a GPU would wait for it every step.
    host_inputs = frozenset({"has_image", "n_answers", "weight"})

    PRETRAINED_MODEL_CONFIG_DICT = {
        "llama7b": str(CONFIG_DIR / "llama7b.yaml"),
        "llama13b": str(CONFIG_DIR / "llama13b.yaml"),
        "llama2_7b": str(CONFIG_DIR / "llama2_7b.yaml"),
        "llama3_8b": str(CONFIG_DIR / "llama3_8b.yaml"),
        "llama3_8b_siglip": str(CONFIG_DIR / "llama3_8b_siglip.yaml"),
        "qwen2_5_7b": str(CONFIG_DIR / "qwen2_5_7b.yaml"),
        "qwen2_5_7b_siglip": str(CONFIG_DIR / "qwen2_5_7b_siglip.yaml"),
        "llama3_70b": str(CONFIG_DIR / "llama3_70b.yaml"),
        "qwen2_5_72b": str(CONFIG_DIR / "qwen2_5_72b.yaml"),
        "smollm2_135m": str(CONFIG_DIR / "smollm2_135m.yaml"),
        "tiny": str(CONFIG_DIR / "tiny.yaml"),
    }

    def __init__(
        self,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        vision_tower: PreTrainedModel | None,
        config: AdemVLConfig | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        config = config or AdemVLConfig()
        if config.fusion != "none" and vision_tower is None:
            raise ValueError(f"fusion={config.fusion!r} needs a vision tower (vision_model or vision_config)")
        self.config = config
        self.checkpoint_task: str | None = None  # set by load_checkpoint from what our runner recorded
        self._backbones: dict | None = None  # backbone_identity(), computed once: the frozen parts never change
        self.compute_dtype = compute_dtype
        self.tokenizer = tokenizer
        self.llm = freeze_llm(llm, config.llm_gradient_checkpointing)
        self._llm_keeps_logits = "logits_to_keep" in inspect.signature(llm.forward).parameters
        d_llm = llm.get_input_embeddings().embedding_dim
        self.vision_tower = vision_tower if config.fusion != "none" else None  # text only: the tower is dead weight
        if self.vision_tower is not None:
            self._add_vision_modules(d_llm)
        self.slot_length = self._add_slot_modules(d_llm)
        self.fusion_memory = self._add_visual_memory(d_llm) if config.fusion in ("adem", "none") else None
        self.processor = PromptEncoder(tokenizer, config, self.slot_length) if tokenizer is not None else None
        counts = self.parameter_counts()
        logging.info("ADEM-VL (%s): %d trainable of %d parameters", config.fusion, counts["trainable"], counts["total"])

    # ------------------------------------------------------------------ construction

    def _add_vision_modules(self, d_llm: int) -> None:
        """Vision adapters beside each tower block that runs, and the projection W' of the visual features."""
        config, tower = self.config, self.vision_tower
        blocks = freeze_vision_tower(tower, config.vision_gradient_checkpointing)
        width = tower.config.hidden_size
        self.vision_adapters = VisionAdapters(width, len(blocks), config.adapter_dim, config.adapter_scale,
                                              config.adapter_dropout)
        self.vision_adapters.attach(blocks, *adapter_points(tower))
        self.visual_proj = LowRankProjection(width, config.hidden_proj, d_llm)

    def _add_slot_modules(self, d_llm: int) -> int:
        """The number of visual slot tokens in the LLM input (and the [cls] projection that fills one)."""
        config = self.config
        if config.fusion == "prefix":
            return self.num_patches + 1  # LLaVA-style: every patch token and [cls], projected
        if config.fusion == "none":
            return 0
        patches = self.num_patches
        check_scales(config.down_sample_num, patches)
        if config.num_visual_input_tokens:
            check_scales([config.num_visual_input_tokens], patches)
        if config.with_cls:
            self.cls_proj = LowRankProjection(self.vision_tower.config.hidden_size, config.hidden_proj, d_llm)
        return int(config.with_cls) + config.num_visual_input_tokens

    def _add_visual_memory(self, d_llm: int) -> VisualMemory:
        """E1 (key offset), E2 (value offset) and the decoder hooks that read the memory. Text-only `none` keeps them,
        so it is ADEM-VL with the same learned memory and recipe but no visual input: the baseline that shows what
        vision adds."""
        config = self.config
        num_visual = sum(config.down_sample_num)
        self.visual_key_offset = nn.Parameter(torch.randn(1, num_visual, d_llm) * 0.02)
        self.visual_value_offset = nn.Parameter(torch.zeros(1, num_visual, d_llm))
        memory = VisualMemory(config.query_from, config.add_to, config.alpha, config.drop_ratio, config.activation)
        memory.attach(self.decoder_layers())
        return memory

    @classmethod
    def default_config_path(cls, model_type: str) -> str:
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise KeyError(f"unknown ademvl model_type {model_type!r}; choose one of {sorted(cls.PRETRAINED_MODEL_CONFIG_DICT)}")
        return cls.PRETRAINED_MODEL_CONFIG_DICT[model_type]

    @classmethod
    def from_config(cls, cfg: DictConfig | dict) -> AdemVL:
        config = AdemVLConfig.from_dict(cfg)  # validates every key first
        device = model_device(config)
        mesh = frozen_mesh(device.type, config.fsdp_shard_size) if config.frozen_sharding == "fsdp" else None
        llm, tokenizer, vision_tower, dtype = load_towers(config, device, llm_on_meta=mesh is not None)
        model = cls(llm, tokenizer, vision_tower, config, compute_dtype=dtype)
        if mesh is not None:
            shard_frozen_towers(model, mesh, llm_source=config.llm_model)
        if config.load_finetuned:
            if not config.finetuned:
                raise KeyError("load_finetuned is true but `finetuned` names no checkpoint")
            model.load_checkpoint(config.finetuned)
        return model

    @classmethod
    def on_meta_device(cls, cfg: DictConfig | dict) -> AdemVL:
        """The model of a config with every tensor on the meta device: shapes and parameter counts, no weights."""
        config = AdemVLConfig.from_dict(cfg)
        with torch.device("meta"):
            llm, vision_tower = meta_towers(config)
            return cls(llm, None, vision_tower, config)

    # ------------------------------------------------------------------ placement

    @property
    def fusion(self) -> str:
        return self.config.fusion

    @property
    def llm_dispatched(self) -> bool:
        """True when the frozen LLM was placed at load, over several devices (`llm_device_map`) or quantized
        (bitsandbytes weights cannot move): moving the model leaves it where it is."""
        return self.config.llm_device_map is not None or self.config.llm_quantization is not None

    @property
    def llm_sharded(self) -> bool:
        """True when the frozen LLM is sharded over the ranks (`frozen_sharding: fsdp`): every rank must then make the
        same LLM passes (`sharding.keep_in_step`, `idle_llm_pass`)."""
        return is_sharded(self.llm)

    @property
    def llm_spans_devices(self) -> bool:
        """True when `llm_device_map` spreads the LLM over devices: its layers, and its logits, live on several."""
        return self.config.llm_device_map is not None

    def shard_frozen(self, mesh: DeviceMesh) -> None:
        """Shard the frozen LLM and vision tower over `mesh` with FSDP2, in place (`sharding.shard_frozen_towers`); the
        trainable modules stay whole. A model built with `frozen_sharding: fsdp` is sharded already."""
        shard_frozen_towers(self, mesh)

    def to(self, *args: Any, **kwargs: Any) -> AdemVL:
        """`nn.Module.to`, except that a dispatched LLM (`llm_dispatched`) stays where it was placed: accelerate's hooks
        route each layer's inputs to the device the layer was placed on, and `nn.Module.to` would move every layer to
        one device under them. Our own modules move."""
        if not self.llm_dispatched:
            return super().to(*args, **kwargs)
        children = self._modules
        self._modules = {name: module for name, module in children.items() if name != "llm"}
        try:
            super().to(*args, **kwargs)
        finally:
            self._modules = children
        return self

    @property
    def image_size(self) -> int:
        """The side of the square images the vision tower reads: `image_size`, else the tower config's."""
        return self.config.image_size or self.vision_tower.config.image_size

    @property
    def num_patches(self) -> int:
        """The patch tokens of an image: a square grid of image_size / patch_size on each side."""
        return patch_grid(self.vision_tower, self.image_size) ** 2

    def get_image_features(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, C]: the frozen tower's [cls] feature and N patch features (row-major) of images [B, 3, H, W], read
        at the input of its last block after its final norm (`vision_towers.vision_features`)."""
        return vision_features(self.vision_tower, image, self.image_size)

    def uneven_scales(self) -> list[int]:
        """The pooled token counts (`down_sample_num`, `num_visual_input_tokens`) whose side does not divide the patch
        grid's: pooled adaptively, whose backward has no deterministic CUDA kernel."""
        if self.vision_tower is None or self.config.fusion != "adem":
            return []
        grid = patch_grid(self.vision_tower, self.image_size)
        scales = list(self.config.down_sample_num)
        if self.config.num_visual_input_tokens:
            scales.append(self.config.num_visual_input_tokens)
        return [size for size in scales if grid % math.isqrt(size)]

    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers, each hooked by the visual memory."""
        return decoder_layers(self.llm)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the towers' dtype on this model's device (nothing in float32)."""
        if self.compute_dtype != torch.float32 and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

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

    def backbone_identity(self) -> dict:
        """The frozen LLM, vision tower and tokenizer this model runs on, as a checkpoint records them
        (`backbones.backbone_identity`)."""
        if self._backbones is None:
            config = self.config
            sources = {"llm": config.llm_model, "vision": config.vision_model,
                       "tokenizer": config.tokenizer or config.llm_model}
            # The tower's core: its tensor names are the same on transformers 4.x (there under `vision_model.`) and 5.x,
            # so a checkpoint trained on one stack loads on the other.
            vision = None if self.vision_tower is None else family_of(self.vision_tower).core_of(self.vision_tower)
            self._backbones = backbone_identity(self.llm, vision, self.tokenizer, sources)
        return self._backbones

    def check_trained_like_this(self, checkpoint: dict, source: str) -> None:
        """A checkpoint our runner wrote loads only into a model of the options (`AdemVLConfig.check_compatible`) and
        on the frozen parts (`backbones.check_same_backbones`) it was trained with; others record neither."""
        saved = checkpoint.get("config")
        if isinstance(saved, dict) and saved.get("model"):
            AdemVLConfig.check_compatible(saved["model"], dataclasses.asdict(self.config), source)
        if checkpoint.get("backbones") is not None:  # the authors' checkpoints, and ours before the record, have none
            check_same_backbones(checkpoint["backbones"], self.backbone_identity(), source,
                                 self.config.allow_backbone_mismatch)

    def load_checkpoint(self, url_or_filename: str) -> None:
        """Load trainable weights written by this project or released by the authors (mapped, see
        `checkpoint_keys`); any missing or unknown key is an error."""
        num_used_vision_layers = len(self.vision_adapters) if self.vision_tower is not None else 0
        checkpoint = load_checkpoint_file(url_or_filename)
        self.check_trained_like_this(checkpoint, url_or_filename)
        saved = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
        # The task it was trained for (None: not recorded), for the caller to compare with its own.
        self.checkpoint_task = (saved.get("run") or {}).get("task")
        state = checkpoint_state(checkpoint, num_used_vision_layers, url_or_filename)
        self.load_trainable_state(state, source=url_or_filename)
        logging.info("loaded ADEM-VL checkpoint %s", url_or_filename)

    def check_resumable(self, checkpoint: dict, path: str) -> None:
        """A training run resumes only from a checkpoint our runner wrote with this model's options: the authors' files
        hold their optimizer's state, not ours (their weights start a run through `model.finetuned` instead)."""
        if "args" in checkpoint or is_authors_checkpoint(checkpoint.get("model") or {}):
            raise ValueError(
                f"run.resume_ckpt_path={path} is a checkpoint of the ADEM-VL authors' code, which cannot be resumed: its "
                "optimizer state is that of their model, not of this run's. Start from its weights instead: --options "
                f"model.finetuned={path} model.load_finetuned=true"
            )
        self.check_trained_like_this(checkpoint, path)

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Trainable weights by name (those of earlier key layouts too, `checkpoint_keys.rename_legacy_keys`)."""
        if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
            raise ValueError(f"checkpoint {source} holds no weights (a dict of tensors, under 'model')")
        non_finite = non_finite_keys(state)
        if non_finite:
            raise ValueError(f"checkpoint {source}: the weights {non_finite[:8]} hold NaN or inf")
        state = rename_legacy_keys(state)
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

    # ------------------------------------------------------------------ inputs

    def sample_texts(
        self, samples: dict, with_answer: bool, prompt: str | None = None
    ) -> tuple[list[str], list[str], list[str | None]]:
        """(prompts, answer cues, answers) of a batch; see `PromptEncoder.texts`."""
        return self.processor.texts(samples, with_answer, prompt)

    def encode_batch(self, samples: dict, with_answer: bool, prompt: str | None = None, reserve: int = 0) -> EncodedBatch:
        """Tokenize, truncate and left-pad a batch (left padding keeps every sequence's last token aligned), on this
        model's device; `reserve`: the number of tokens generation will add."""
        return self.processor.encode(samples, with_answer, prompt, reserve).to(self.device)

    def visual_inputs(self, image: torch.Tensor | None, has_image: torch.Tensor) -> VisualInputs:
        """Per forward, once: the activated keys and values of the visual memory, and the slot embeddings."""
        config = self.config
        batch = has_image.shape[0]
        if config.fusion == "none":
            # Cast before expanding: casting an expanded tensor would materialise one copy per sample.
            keys = activate(self.visual_key_offset, config.activation).to(self.compute_dtype).expand(batch, -1, -1)
            return keys, self.visual_value_offset.to(self.compute_dtype).expand(batch, -1, -1), None
        if image is None:
            raise KeyError("samples need an `image` tensor (placeholder images for text-only samples)")
        features = self.get_image_features(image)
        if config.fusion == "prefix":
            return None, None, self.visual_proj(features)
        slots = []
        if config.with_cls:
            slots.append(self.cls_proj(features[:, :1]))
        if config.num_visual_input_tokens:
            pooled = multiscale_pool(features[:, 1:], [config.num_visual_input_tokens], config.pooling)
            slots.append(self.visual_proj(pooled))
        pooled = multiscale_pool(features[:, 1:], config.down_sample_num, config.pooling)
        visual = config.beta * self.visual_proj(pooled) * has_image.to(features.dtype).view(-1, 1, 1)
        keys = activate(visual + self.visual_key_offset, config.activation)
        values = visual + self.visual_value_offset
        # In the LLM's dtype once here, not once per decoder layer.
        return keys.to(self.compute_dtype), values.to(self.compute_dtype), torch.cat(slots, dim=1) if slots else None

    def _input_embeddings(self, encoded: EncodedBatch, slots: torch.Tensor | None) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(encoded.input_ids)
        if slots is None:
            return embeds
        # Every sample's slot embeddings stay in the graph (zero weight when it has no image), so all trainable
        # parameters receive a gradient in every step, as DDP requires.
        slot_index = (encoded.slot_mask.cumsum(-1) - 1).clamp(min=0, max=self.slot_length - 1)
        placed = torch.gather(slots.to(embeds.dtype), 1, slot_index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        return torch.where(encoded.slot_mask.unsqueeze(-1), placed, embeds)

    def sample_visual_inputs(self, samples: dict, batch_size: int) -> VisualInputs:
        """`visual_inputs` of a batch of `batch_size` samples (their `image` and `has_image`), under autocast."""
        has_image = image_flags(samples, batch_size)
        with self.autocast():
            return self.visual_inputs(samples.get("image"), has_image.to(self.device, non_blocking=True))

    @contextlib.contextmanager
    def llm_inputs(self, encoded: EncodedBatch, visual: VisualInputs, expand: int = 1) -> Iterator[torch.Tensor]:
        """Under autocast, the input embeddings [B, L, d] of `encoded`, with the visual memory of `visual` (rows
        matching encoded's) held for the decoder hooks; `expand`: rows per sample during generation."""
        with self.autocast():
            keys, values, slots = visual
            embeds = self._input_embeddings(encoded, slots)
            if self.fusion_memory is None:
                yield embeds
                return
            # With gradient checkpointing, backward recomputes the layers (and runs the hooks) after this block has
            # closed, so the memory stays until the next forward replaces it.
            keep = self.config.llm_gradient_checkpointing and self.training
            real = encoded.attention_mask.bool() if encoded.padded else None  # padding contributes nothing
            with self.fusion_memory.holding(keys, values, expand, keep=keep, real_tokens=real):
                yield embeds

    # ------------------------------------------------------------------ forward and inference

    def answer_logits(
        self, samples: dict, with_answer: bool, prompt: str | None = None, visual: VisualInputs | None = None
    ) -> tuple[torch.Tensor, EncodedBatch]:
        """One LLM pass: the logits [B, L, vocab] of the last L positions, the only ones any caller reads. With an
        answer, L = (columns holding a label) + 1, so logits[:, :-1] predict labels[:, 1 - L:]; without, L = 1 (the
        next token)."""
        encoded = self.encode_batch(samples, with_answer, prompt)
        # Left padding puts every label in the last columns, and only those positions need the vocabulary projection:
        # at SmolLM2's 49k vocabulary, logits for every position cost a fifth of a step.
        keep = encoded.labelled_columns + 1 if with_answer else 1
        if visual is None:
            visual = self.sample_visual_inputs(samples, encoded.input_ids.shape[0])
        with self.llm_inputs(encoded, visual) as embeds:
            output = self.llm(
                inputs_embeds=embeds,
                attention_mask=encoded.attention_mask,
                position_ids=encoded.position_ids,
                use_cache=False,
                **self.logits_to_keep(embeds, keep),
            )
        return output.logits[:, -keep:], encoded

    def logits_to_keep(self, embeds: torch.Tensor, count: int) -> dict[str, torch.Tensor]:
        """The LLM's keyword asking for the logits of the last `count` positions only (none where the LLM has no
        such option: it then returns every position's). The index lives on the device of the hidden states it indexes:
        the LLM's own, or the CPU when the LLM spans devices (a CPU index indexes a tensor on any device)."""
        if not self._llm_keeps_logits:
            return {}
        device = None if self.llm_spans_devices else embeds.device
        return {"logits_to_keep": last_columns(embeds.shape[1], count, device)}

    def generate_token_ids(self, samples: dict, prompt: str | None = None, expand: int = 1, **options: Any) -> torch.Tensor:
        """Hugging Face generation after each sample's prompt, `expand` rows per sample: the new token ids."""
        encoded = self.encode_batch(samples, with_answer=False, prompt=prompt, reserve=options.get("max_new_tokens", 0))
        visual = self.sample_visual_inputs(samples, encoded.input_ids.shape[0])
        with self.llm_inputs(encoded, visual, expand) as embeds:
            return self.llm.generate(
                inputs_embeds=embeds,
                attention_mask=encoded.attention_mask,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                # A sharded LLM: ranks whose answers have ended keep stepping until every rank's have.
                synced_gpus=self.llm_sharded,
                **options,
            )

    @torch.no_grad()
    def idle_llm_pass(self) -> None:
        """One LLM pass over a single padding token, its output unused: the gathers of a real pass, for a rank whose
        data needs fewer passes than another's while the LLM is sharded (`sharding.keep_in_step`)."""
        token = torch.full((1, 1), self.tokenizer.pad_token_id, device=self.device)
        with self.autocast():
            self.llm(inputs_embeds=self.llm.get_input_embeddings()(token), use_cache=False)

    def forward(self, samples: dict) -> dict[str, torch.Tensor]:
        """Language-modelling loss on the answer tokens (and the closing eos) only."""
        logits, encoded = self.answer_logits(samples, with_answer=True)
        return {"loss": answer_loss(logits, encoded.labels)}

    @torch.no_grad()
    def next_token_logprobs(self, samples: dict) -> torch.Tensor:
        """[B, vocab] log-probabilities of the token that follows prompt + answer cue."""
        logits, _ = self.answer_logits(samples, with_answer=False)
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
        new_tokens = self.generate_token_ids(samples, prompt=prompt, expand=expand, **options)
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

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
        likely candidate of `answer_list`, so it always gives a valid answer (`rank_answers`). An empty `prompt`
        means the model's own.
        """
        check_choice("inference_method", inference_method, ("generate", "rank"))
        prompt = prompt or None
        if inference_method == "rank":
            return self.rank_answers(samples, answer_list, num_ans_candidates, prompt)
        return self.generate(
            samples, num_beams=num_beams, max_length=max_len, min_length=min_len, length_penalty=length_penalty, prompt=prompt
        )


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of labels [B, L] (-100 = none) under logits [B, K, vocab] of the last K positions.

    A batch without any label left (truncation 'end') gives zero, still connected to every trainable parameter
    (DDP needs each one to receive a gradient)."""
    if logits.shape[1] == 1:
        return logits.sum() * 0.0
    # The logits live on the LLM head's device, which a device map may put elsewhere than the labels.
    targets = labels[:, labels.shape[1] + 1 - logits.shape[1] :].to(logits.device, non_blocking=True)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)
