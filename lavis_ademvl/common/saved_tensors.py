"""How much memory autograd keeps for backward in a step, measured on tensors without memory (the meta device)."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def saved_tensor_bytes(step: Callable[[], Any], weights: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while `step()` runs a forward pass (on meta tensors: their
    shapes, no memory), other than `weights` and views of them: the activations a training step holds at its peak.
    A tensor saved by several operations, or through several views, counts once (its base); tensors that need no
    gradient (masks, indices) are not counted."""
    weight_ids = {id(weight) for weight in weights}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if tensor.requires_grad and tensor.is_floating_point() and id(tensor) not in weight_ids \
                and id(base) not in weight_ids:
            saved[id(base)] = base.untyped_storage().nbytes()  # an expanded tensor holds less than its numel
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(saved.values())
