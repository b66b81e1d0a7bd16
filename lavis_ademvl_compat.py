"""What LAVIS 1.0.2 needs from transformers that transformers 5 moved or removed, put back before LAVIS is imported.

LAVIS 1.0.2 is frozen upstream and was written against transformers 4.x. `apply()` restores, only where the installed
transformers lacks them (on 4.x every step finds the name present and does nothing):

- `modeling_utils.apply_chunking_to_forward`, `modeling_utils.prune_linear_layer`: moved to `pytorch_utils` long
  ago and re-exported by 4.x; the same objects are aliased back, so behaviour is transformers' own.
- `find_pruneable_heads_and_indices` (in `modeling_utils` and `pytorch_utils`): removed with head pruning. LAVIS imports
  it and calls it only from `prune_heads`, which nothing in LAVIS or this plugin calls; restated below.
- the module `transformers.utils.model_parallel_utils` (`assert_device_map`, `get_device_map`): removed with the old
  `parallelize()` API. LAVIS's copy of T5 imports them for its own `parallelize()`, never called by LAVIS's models;
  restated below.
- `ModuleUtilsMixin.invert_attention_mask`, `ModuleUtilsMixin.get_head_mask`: removed; LAVIS's BERT / Q-Former /
  XBert forward calls them on every cross-attention and every call. Restated with 4.x's semantics: an additive mask
  of 0 (attend) and the dtype's minimum (ignore); a head mask of None per layer unless one is given.
- `PreTrainedModel.init_weights` called from `__init__` where 5.x expects `post_init()` (LAVIS's BERT / Q-Former /
  XBert): 5.x's init_weights reads what post_init computes (`all_tied_weights_keys`) and fails. For a model on which
  post_init has not run, init_weights runs post_init instead, which in 5.x initialises and ties the weights the same
  way and then calls init_weights itself; any other call is transformers' own.

Applied by the discovery hook (lavis_ademvl_discovery) before `lavis/__init__.py` runs, and by `import lavis_ademvl`.
"""
from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterable

import torch

RESTORED: list[str] = []  # what apply() put back in this process, "module.name" each (empty on transformers 4.x)


def find_pruneable_heads_and_indices(
    heads: Iterable[int], n_heads: int, head_size: int, already_pruned_heads: set[int]
) -> tuple[set[int], torch.LongTensor]:
    """(the heads still to prune, the indices of the projection rows to keep) for pruning `heads` of a layer with
    `n_heads` heads of `head_size` that has already lost `already_pruned_heads` (head numbers are the original ones)."""
    heads = set(heads) - already_pruned_heads
    keep = torch.ones(n_heads, head_size, dtype=torch.bool)
    for head in heads:
        # rows of heads pruned earlier are gone: a head's row block moved up by one per earlier pruned head
        keep[head - sum(1 for pruned in already_pruned_heads if pruned < head)] = False
    return heads, torch.arange(n_heads * head_size)[keep.view(-1)].long()


def get_device_map(n_layers: int, devices: list) -> dict:
    """Layers 0..n_layers-1 split into consecutive, equal blocks (the last may be shorter), one per device."""
    per_device = -(-n_layers // len(devices))
    layers = list(range(n_layers))
    return {device: layers[i * per_device:(i + 1) * per_device] for i, device in enumerate(devices)}


def assert_device_map(device_map: dict, num_blocks: int) -> None:
    """A ValueError unless `device_map` places each of the blocks 0..num_blocks-1 exactly once."""
    placed = [block for blocks in device_map.values() for block in blocks]
    duplicated = sorted({block for block in placed if placed.count(block) > 1})
    missing = sorted(set(range(num_blocks)) - set(placed))
    extra = sorted(set(placed) - set(range(num_blocks)))
    for problem, blocks in (("more than once", duplicated), ("nowhere", missing), ("but do not exist", extra)):
        if blocks:
            raise ValueError(f"device_map places blocks {blocks} {problem} (the model has {num_blocks} blocks)")


def invert_attention_mask(self: torch.nn.Module, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] or [B, S_q, S] mask of 1 (attend) / 0 (ignore) -> an additive mask [B, 1, 1 or S_q, S] in the model's
    dtype: 0 where attended, the dtype's minimum where ignored."""
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    else:
        extended = encoder_attention_mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def get_head_mask(
    self: torch.nn.Module, head_mask: torch.Tensor | None, num_hidden_layers: int, is_attention_chunked: bool = False
) -> torch.Tensor | list[None]:
    """One multiplicative head mask per layer, [layers, B, heads, S, S]-broadcastable, or [None] * layers when none is
    given. `head_mask`: [heads] (the same for every layer) or [layers, heads]."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    head_mask = head_mask.to(dtype=self.dtype)
    return head_mask.unsqueeze(-1) if is_attention_chunked else head_mask


def _restore(owner: object, name: str, value: object, where: str) -> None:
    if not hasattr(owner, name):
        setattr(owner, name, value)
        RESTORED.append(f"{where}.{name}")


def _init_weights_or_post_init(original: Callable[[torch.nn.Module], None]) -> Callable[[torch.nn.Module], None]:
    def init_weights(self: torch.nn.Module) -> None:
        if not hasattr(self, "all_tied_weights_keys"):  # post_init has not run: 4.x code calling init_weights itself
            self.post_init()
            return
        original(self)

    init_weights.__wrapped__ = original
    init_weights.__doc__ = original.__doc__
    return init_weights


def apply() -> list[str]:
    """Restore what is missing (idempotent); returns RESTORED."""
    from transformers import modeling_utils, pytorch_utils
    from transformers.modeling_utils import ModuleUtilsMixin, PreTrainedModel

    _restore(modeling_utils, "apply_chunking_to_forward", pytorch_utils.apply_chunking_to_forward,
             "transformers.modeling_utils")
    _restore(modeling_utils, "prune_linear_layer", pytorch_utils.prune_linear_layer, "transformers.modeling_utils")
    for module in (pytorch_utils, modeling_utils):
        _restore(module, "find_pruneable_heads_and_indices", find_pruneable_heads_and_indices, module.__name__)
    if "transformers.utils.model_parallel_utils" not in sys.modules:
        try:
            import transformers.utils.model_parallel_utils  # noqa: F401  (4.x: transformers' own)
        except ModuleNotFoundError:
            shim = types.ModuleType("transformers.utils.model_parallel_utils",
                                    "restored by lavis_ademvl_compat for LAVIS 1.0.2's T5")
            shim.assert_device_map, shim.get_device_map = assert_device_map, get_device_map
            sys.modules[shim.__name__] = shim
            import transformers.utils

            transformers.utils.model_parallel_utils = shim
            RESTORED.append(shim.__name__)
    _restore(ModuleUtilsMixin, "invert_attention_mask", invert_attention_mask, "ModuleUtilsMixin")
    _restore(ModuleUtilsMixin, "get_head_mask", get_head_mask, "ModuleUtilsMixin")
    init_weights = PreTrainedModel.init_weights
    if hasattr(PreTrainedModel, "get_expanded_tied_weights_keys") and not hasattr(init_weights, "__wrapped__"):
        PreTrainedModel.init_weights = _init_weights_or_post_init(init_weights)
        RESTORED.append("PreTrainedModel.init_weights (post_init first where it has not run)")
    return RESTORED
