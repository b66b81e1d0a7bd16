"""The visual memory and the decoder-layer hooks that read it: ADEM-VL's parameter-free cross-attention, attached to
an unmodified Hugging Face decoder.

`attach(layers)` hooks every decoder layer and returns the handles (`detach()` removes them all). While the memory
holds a batch's activated keys and values (`holding`), each layer reads its query u at `query_from` and adds
alpha * fused_attend(u, keys, values) at `add_to`; outside `holding` the hooks do nothing. Which submodule of a layer
each point is depends on the LLM's family (`DECODER_FAMILIES`, docs/backbones.md).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from lavis_ademvl.models.fusion import attention_scores, fused_attend, kept_mask

# The submodule of a decoder layer whose input (`_in`) or output (`_out`) each point is. A point's meaning is the same in
# every family: `attn_in`/`mlp_in` the input of the attention block/MLP (after its pre-norm), `attn_out`/`mlp_out` the
# branch's last output before it joins the residual stream h, so that the fused feature enters h as the paper adds it.
# LLaMA, Mistral, Qwen2/3, Gemma-1: h += self_attn(input_layernorm(h)); h += mlp(post_attention_layernorm(h)).
PRE_NORM_POINTS = {"attn_in": "self_attn", "attn_out": "self_attn", "mlp_in": "mlp", "mlp_out": "mlp"}
# Gemma-2/3 normalise each branch's output as well: h += post_attention_layernorm(self_attn(input_layernorm(h)));
# h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))). Added to the MLP's output, the fused feature would
# pass through that norm (rescaled to the norm's weights, whatever alpha); it is added to the norm's output instead.
# (Gemma's `post_attention_layernorm` follows the attention block; LLaMA's of the same name is the MLP's pre-norm.)
SANDWICH_NORM_POINTS = {"attn_in": "self_attn", "attn_out": "post_attention_layernorm", "mlp_in": "mlp",
                        "mlp_out": "post_feedforward_layernorm"}
# Phi-3: h += resid_attn_dropout(self_attn(...)); h += resid_mlp_dropout(mlp(...)): added after the dropout, not in it.
PHI3_POINTS = {"attn_in": "self_attn", "attn_out": "resid_attn_dropout", "mlp_in": "mlp", "mlp_out": "resid_mlp_dropout"}
# model_type of the LLM's (text) config -> the class of its decoder layers and their points. A family joins with a row
# here once its decoder layer's forward has been read (docs/backbones.md: how to add one).
DECODER_FAMILIES: dict[str, tuple[str, dict[str, str]]] = {
    "llama": ("LlamaDecoderLayer", PRE_NORM_POINTS),
    "mistral": ("MistralDecoderLayer", PRE_NORM_POINTS),
    "qwen2": ("Qwen2DecoderLayer", PRE_NORM_POINTS),
    "qwen3": ("Qwen3DecoderLayer", PRE_NORM_POINTS),
    "gemma": ("GemmaDecoderLayer", PRE_NORM_POINTS),
    "gemma2": ("Gemma2DecoderLayer", SANDWICH_NORM_POINTS),
    "gemma3_text": ("Gemma3DecoderLayer", SANDWICH_NORM_POINTS),
    "phi3": ("Phi3DecoderLayer", PHI3_POINTS),
}
_POINTS_OF_LAYER_CLASS = {layer_class: points for layer_class, points in DECODER_FAMILIES.values()}
KeptObserver = Callable[[int, torch.Tensor], None]
# What the hooks read on one device: activated keys [B, Nv, d], values [B, Nv, d], and the real-token mask [B, L, 1].
Held = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM of a family in DECODER_FAMILIES (Gemma-3's multimodal model too: its text
    decoder's); any other LLM is a ValueError naming its model type."""
    model_type = llm.config.get_text_config().model_type
    if model_type not in DECODER_FAMILIES:
        raise ValueError(
            f"the LLM's model_type {model_type!r} ({type(llm).__name__}) is not a supported decoder family "
            f"{sorted(DECODER_FAMILIES)}: ADEM-VL needs to know where each decoder layer's attention block and MLP "
            f"read and join the residual stream (a row of DECODER_FAMILIES in lavis_ademvl/models/memory.py)"
        )
    layer_class = DECODER_FAMILIES[model_type][0]
    layers = getattr(llm.get_decoder(), "layers", None)
    found = sorted({layer_class_name(layer) for layer in layers}) if layers is not None else "no `layers`"
    if layers is None or found != [layer_class]:
        raise ValueError(f"the LLM's model_type {model_type!r} ({type(llm).__name__}) should have decoder layers of "
                         f"class {layer_class}; its decoder has {found}")
    return layers


def layer_class_name(layer: nn.Module) -> str:
    """The Hugging Face class of a decoder layer, also once FSDP has put its own subclass in front of it (`FSDPLlama
    DecoderLayer`)."""
    return next((cls.__name__ for cls in type(layer).__mro__ if cls.__name__ in _POINTS_OF_LAYER_CLASS),
                type(layer).__name__)


def layer_points(layer: nn.Module) -> dict[str, str]:
    """The point -> submodule table of a decoder layer's family; a layer of another class (built by hand, as tests do)
    is hooked at LLaMA's points (`decoder_layers` admits no LLM of another family)."""
    return _POINTS_OF_LAYER_CLASS.get(layer_class_name(layer), PRE_NORM_POINTS)


class VisualMemory:
    """Activated keys [B, Nv, d] and values [B, Nv, d] of the current batch, read by every hooked decoder layer."""

    def __init__(self, query_from: str, add_to: str, alpha: float, drop_ratio: float, activation: str) -> None:
        self.query_from, self.add_to = query_from, add_to
        self.alpha, self.drop_ratio, self.activation = alpha, drop_ratio, activation
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.real_tokens: torch.Tensor | None = None  # [B, L, 1] False at padding; None: no padding
        self.layers: Sequence[nn.Module] = ()
        self._copies: dict[torch.device, Held] = {}
        self._pending_queries: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    # ------------------------------------------------------------------ hooks

    def attach(self, layers: Sequence[nn.Module]) -> list[RemovableHandle]:
        """Hook each decoder layer (index = its position in `layers`); returns the new handles."""
        if self._handles:
            raise RuntimeError("this visual memory is attached already; detach() it first")
        for index, layer in enumerate(layers):
            points = layer_points(layer)
            query_module, add_module = points[self.query_from], points[self.add_to]
            if self.query_from.endswith("_in") and query_module == add_module:
                # Query and addition on the same module: one hook sees both its input and its output.
                hook = getattr(layer, add_module).register_forward_hook(self._fuse_hook(index, True), with_kwargs=True)
                self._handles.append(hook)
                continue
            capture = getattr(layer, query_module).register_forward_pre_hook(self._capture_hook(index), with_kwargs=True)
            fuse = getattr(layer, add_module).register_forward_hook(self._fuse_hook(index, False), with_kwargs=True)
            self._handles += [capture, fuse]
        self.layers = layers
        return list(self._handles)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.layers = [], ()

    def observe_kept(self, observer: KeptObserver) -> list[RemovableHandle]:
        """Call observer(layer index, kept [B, T, Nv] bool: the visual features each text token keeps after the
        adaptive drop) each time a hooked layer reads its query while the memory holds a batch (e.g. to draw drop
        maps); remove the returned handles when done."""

        def hook_for(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if self.keys is not None:
                    query = _module_input(args, kwargs)
                    scores = attention_scores(query, self.on_device(query.device)[0], self.activation)
                    observer(index, kept_mask(scores, self.drop_ratio))

            return hook

        query_modules = [getattr(layer, layer_points(layer)[self.query_from]) for layer in self.layers]
        return [module.register_forward_pre_hook(hook_for(index), with_kwargs=True)
                for index, module in enumerate(query_modules)]

    def _capture_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.keys is not None:
                self._pending_queries[index] = _module_input(args, kwargs)

        return hook

    def _fuse_hook(self, index: int, own_input: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if self.keys is None:
                return output
            query = _module_input(args, kwargs) if own_input else self._pending_queries.pop(index)
            keys, values, real_tokens = self.on_device(query.device)
            if query.shape[0] != keys.shape[0]:
                raise RuntimeError(f"visual memory holds {keys.shape[0]} rows but the decoder runs {query.shape[0]}")
            if real_tokens is not None and query.shape[1] < real_tokens.shape[1]:
                # A query shorter than the held sequence continues it through the KV cache (generation's new tokens,
                # rank scoring's answers): positions after a left-padded prompt, all real. No selection to run.
                real_tokens = None
            fused = fused_attend(query, keys, values, self.drop_ratio, self.activation, real_tokens)
            return _add_to_output(output, self.alpha * fused)

        return hook

    # ------------------------------------------------------------------ contents

    def on_device(self, device: torch.device) -> Held:
        """Keys, values and real-token mask on `device`: layers of a dispatched LLM live on several GPUs; one copy per
        device."""
        if self.keys.device == device:
            return self.keys, self.values, self.real_tokens
        if device not in self._copies:
            real_tokens = None if self.real_tokens is None else self.real_tokens.to(device, non_blocking=True)
            self._copies[device] = (self.keys.to(device, non_blocking=True), self.values.to(device, non_blocking=True),
                                    real_tokens)
        return self._copies[device]

    @contextlib.contextmanager
    def holding(
        self,
        keys: torch.Tensor | None,
        values: torch.Tensor | None,
        expand: int = 1,
        keep: bool = False,
        real_tokens: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Make a batch's activated keys and values visible to every hooked layer (nothing, when keys is None).

        Generation runs `expand` rows per sample (beams or sampled sequences), repeated in place as Hugging Face
        does; beam reordering only permutes rows of one sample, which share their visual memory. `keep`: the memory
        stays after the block until the next batch replaces it (gradient checkpointing recomputes the layers, and
        runs the hooks, during backward). `real_tokens`: [B, L] False at padding positions (None: no padding), whose
        queries then read nothing.
        """
        if keys is None:
            yield
            return
        if expand > 1:
            keys, values = keys.repeat_interleave(expand, dim=0), values.repeat_interleave(expand, dim=0)
            if real_tokens is not None:
                real_tokens = real_tokens.repeat_interleave(expand, dim=0)
        self.keys, self.values, self._copies = keys, values, {}
        self.real_tokens = None if real_tokens is None else real_tokens.unsqueeze(-1)
        try:
            yield
        finally:
            if not keep:
                self.keys, self.values, self.real_tokens, self._copies = None, None, None, {}
            self._pending_queries.clear()


def _module_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _add_to_output(output: Any, delta: torch.Tensor) -> Any:
    if isinstance(output, tuple):  # attention modules return (hidden_states, weights, ...)
        return (output[0] + delta.to(output[0].dtype),) + output[1:]
    return output + delta.to(output.dtype)
