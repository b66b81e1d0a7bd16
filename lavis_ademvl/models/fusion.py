"""ADEM-VL fusion math: parameter-free cross-attention with adaptive dropping, and multiscale pooling.

Pure functions on tensors, usable without LAVIS or Hugging Face. Shapes:
B batch, T text tokens, Nv visual tokens, d LLM width, C vision width.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lavis_ademvl.common.validation import check_choice, check_fraction

ACTIVATIONS = ("silu", "none", "relu", "elu", "softmax", "silu_positive")
POOLINGS = ("avg", "max")


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The feature map applied to both queries and keys before their dot product (paper Table VIII)."""
    if activation == "silu":
        return F.silu(x)
    if activation == "none":
        return x
    if activation == "relu":
        return F.relu(x)
    if activation == "elu":
        return F.elu(x)
    if activation == "softmax":
        return torch.softmax(x, dim=-1)
    if activation == "silu_positive":
        return F.silu(x) - x.amin(dim=-1, keepdim=True)
    check_choice("activation", activation, ACTIVATIONS)
    raise AssertionError("unreachable")


def drop_threshold_rank(num_visual: int, drop_ratio: float) -> int:
    """1-based rank k of the per-row threshold: entries strictly below the k-th smallest are dropped."""
    return math.floor(drop_ratio * num_visual) + 1


def kept_mask(scores: torch.Tensor, drop_ratio: float) -> torch.Tensor:
    """Boolean [..., Nv]: the entries of each row at or above the row's k-th smallest value, k = floor(gamma*Nv)+1.

    Ties at the threshold are kept and drop_ratio = 0 keeps all. A k-th-value selection replaces the paper's full
    sort: same threshold, less work.
    """
    if drop_ratio == 0.0:
        return torch.ones_like(scores, dtype=torch.bool)
    k = drop_threshold_rank(scores.shape[-1], drop_ratio)
    # kthvalue has no bf16/fp16 CPU kernel on every build; the threshold is not differentiated anyway.
    detached = scores.detach().float()
    return detached >= torch.kthvalue(detached, k, dim=-1, keepdim=True).values


def adaptive_drop(scores: torch.Tensor, drop_ratio: float) -> torch.Tensor:
    """Zero, in each row of `scores` [..., Nv], every entry strictly below the row's k-th smallest value."""
    if drop_ratio == 0.0:
        return scores
    return scores * kept_mask(scores, drop_ratio).to(scores.dtype)


def attention_scores(query: torch.Tensor, activated_keys: torch.Tensor, activation: str) -> torch.Tensor:
    """act(query) @ activated_keys^T: [B, T, Nv], each text token's score for each visual feature, the values the
    adaptive drop thresholds per row. The one place the formula is written (the fusion, its fused backward record and
    the drop maps all call it)."""
    return torch.matmul(activate(query, activation), activated_keys.transpose(-1, -2))


def adaptive_cross_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    drop_ratio: float,
    activation: str = "silu",
) -> torch.Tensor:
    """Parameter-free cross-attention of ADEM-VL.

    Args:
        query: [B, T, d] text hidden states (e.g. the decoder MLP's input).
        keys: [B, Nv, d] X_v + E1, before the activation.
        values: [B, Nv, d] X_v + E2.
        drop_ratio: gamma in [0, 1); the fraction of lowest-scoring visual features dropped per text token.
        activation: one of ACTIVATIONS, applied to both query and keys.

    Returns:
        [B, T, d]: drop(act(query) @ act(keys)^T) @ values.
    """
    check_choice("activation", activation, ACTIVATIONS)
    check_fraction("drop_ratio", drop_ratio)
    if query.shape[-1] != keys.shape[-1] or keys.shape != values.shape:
        raise ValueError(
            f"shape mismatch: query {tuple(query.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}"
        )
    scores = attention_scores(query, activate(keys, activation), activation)  # [B, T, Nv]
    return torch.matmul(adaptive_drop(scores, drop_ratio), values)


def check_scales(down_sample_num: Sequence[int], num_patches: int) -> list[int]:
    """Validate the multiscale token counts: each a perfect square no larger than the patch count."""
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"the vision tower gives {num_patches} patch tokens, not a square grid")
    if len(down_sample_num) == 0:
        raise ValueError("down_sample_num is empty; give at least one scale, e.g. [256, 64]")
    sides = []
    for size in down_sample_num:
        side = math.isqrt(int(size))
        if side * side != size or size > num_patches or size <= 0:
            raise ValueError(
                f"down_sample_num entry {size} must be a positive square no larger than the "
                f"{num_patches} patch tokens of the vision tower (e.g. {num_patches}, {num_patches // 4})"
            )
        sides.append(side)
    return sides


def pool_grid(grid: torch.Tensor, side: int, pooling: str) -> torch.Tensor:
    """Pool a patch grid [B, g, g, C] to [B, side, side, C] (avg or max over each window, as adaptive pooling).

    When side divides g the windows are disjoint g/side blocks, pooled by reshape + mean/amax: the same values as
    adaptive pooling, and a backward of view/expand/elementwise ops only, where adaptive pooling's CUDA backward
    raises under `torch.use_deterministic_algorithms(True)`. Only uneven windows (which overlap) keep adaptive pooling.
    """
    batch, size, _, width = grid.shape
    if size % side:
        pool = F.adaptive_avg_pool2d if pooling == "avg" else F.adaptive_max_pool2d
        return pool(grid.permute(0, 3, 1, 2), side).permute(0, 2, 3, 1)
    window = size // side
    blocks = grid.reshape(batch, side, window, side, window, width)
    if pooling == "avg":
        # Summed entry by entry in row-major order, as adaptive pooling's CPU kernel sums a window, so the values are
        # its values exactly (a mean over both window dimensions would add in another order).
        total = blocks[:, :, 0, :, 0]
        for offset in range(1, window * window):
            total = total + blocks[:, :, offset // window, :, offset % window]
        return total / (window * window)
    # Forward values equal adaptive max pooling's; on a tie within a window amax splits the gradient among the tied
    # entries where adaptive_max_pool2d gives all of it to one argmax.
    return blocks.amax(dim=(2, 4))


def multiscale_pool(patches: torch.Tensor, down_sample_num: Sequence[int], pooling: str = "avg") -> torch.Tensor:
    """Pool patch tokens [B, N, C] on their sqrt(N) x sqrt(N) grid (row-major) to each scale, then concatenate.

    Returns [B, sum(down_sample_num), C], each scale's pooled grid flattened row-major; a scale equal to N is the
    identity. Deterministic on CUDA when each scale's side divides the grid's (see `pool_grid`).
    """
    check_choice("pooling", pooling, POOLINGS)
    batch, num_patches, width = patches.shape
    sides = check_scales(down_sample_num, num_patches)
    grid = math.isqrt(num_patches)
    image = patches.reshape(batch, grid, grid, width)
    scales = []
    for side in sides:
        pooled = patches if side == grid else pool_grid(image, side, pooling).reshape(batch, side * side, width)
        scales.append(pooled)
    return torch.cat(scales, dim=1)


class _FusedAttend(torch.autograd.Function):
    """`adaptive_cross_attention` on activated keys, with a leaner backward record: it keeps the query, keys, values,
    the dropped scores and a 1-byte drop mask, and recomputes act(query) (elementwise, cheap) in backward, instead of
    autograd keeping act(query), a float mask and two copies of the scores. Saving the scores spares backward a
    [T, d] x [d, Nv] matmul.

    Padding positions (`real_tokens` False) read nothing and pass no gradient back: left padding attends to nothing,
    which some attention kernels turn into NaN, and a product with a zero mask keeps NaN (0 x NaN), so they are
    selected away (where), in forward and in backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, query, activated_keys, values, drop_ratio, activation, real_tokens):  # type: ignore[override]
        # Computed in the query's (the LLM's) dtype, so backward needs no autocast to match forward.
        ctx.memory_dtypes = activated_keys.dtype, values.dtype
        activated_keys, values = activated_keys.to(query.dtype), values.to(query.dtype)
        with torch.no_grad():
            scores = attention_scores(_real(query, real_tokens), activated_keys, activation)
            dropped = ~kept_mask(scores, drop_ratio) if drop_ratio > 0 else None
            if real_tokens is not None:
                dropped = ~real_tokens if dropped is None else dropped | ~real_tokens
            if dropped is not None:
                scores.masked_fill_(dropped, 0)
            out = torch.matmul(scores, values)
        ctx.activation = activation
        ctx.save_for_backward(query, activated_keys, values, scores, dropped, real_tokens)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):  # type: ignore[override]
        query, keys, values, scores, dropped, real_tokens = ctx.saved_tensors
        needs_query, needs_keys, needs_values = ctx.needs_input_grad[:3]
        grad_query = grad_keys = grad_values = None
        grad_out = _real(grad_out, real_tokens)
        if needs_values:
            grad_values = torch.matmul(scores.transpose(-1, -2), grad_out).to(ctx.memory_dtypes[1])
        if not (needs_query or needs_keys):
            return grad_query, grad_keys, grad_values, None, None, None
        grad_scores = torch.matmul(grad_out, values.transpose(-1, -2))
        if dropped is not None:
            grad_scores.masked_fill_(dropped, 0)
        with torch.enable_grad():
            leaf = query.detach().requires_grad_(needs_query)
            activated = activate(_real(leaf, real_tokens), ctx.activation)
        if needs_keys:
            grad_keys = torch.matmul(grad_scores.transpose(-1, -2), activated.detach())
        if needs_query:
            (grad_query,) = torch.autograd.grad(activated, leaf, torch.matmul(grad_scores, keys))
        grad_keys = None if grad_keys is None else grad_keys.to(ctx.memory_dtypes[0])
        return grad_query, grad_keys, grad_values, None, None, None


def _real(tensor: torch.Tensor, real_tokens: torch.Tensor | None) -> torch.Tensor:
    """`tensor` [B, T, d] with zeros at padding positions (real_tokens [B, T, 1] False); where(), not a product."""
    return tensor if real_tokens is None else torch.where(real_tokens, tensor, 0)


def fused_attend(
    query: torch.Tensor,
    activated_keys: torch.Tensor,
    values: torch.Tensor,
    drop_ratio: float,
    activation: str,
    real_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """drop(act(query) @ activated_keys^T) @ values: `adaptive_cross_attention` on keys activated once per forward,
    with less activation memory.
    `real_tokens` [B, T, 1] (None: no padding): positions where it is False give zeros and receive no gradient."""
    return _FusedAttend.apply(query, activated_keys, values, drop_ratio, activation, real_tokens)
