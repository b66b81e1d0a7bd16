"""The fusion functions against a slow, literal re-statement of design §2."""
from __future__ import annotations

import math

import pytest
import torch

from lavis_ademvl.models.fusion import ACTIVATIONS, adaptive_cross_attention, multiscale_pool


def literal_activation(x: list[float], name: str) -> list[float]:
    if name == "silu":
        return [v / (1 + math.exp(-v)) for v in x]
    if name == "none":
        return list(x)
    if name == "relu":
        return [max(v, 0.0) for v in x]
    if name == "elu":
        return [v if v > 0 else math.exp(v) - 1 for v in x]
    if name == "softmax":
        total = sum(math.exp(v) for v in x)
        return [math.exp(v) / total for v in x]
    if name == "silu_positive":
        smallest = min(x)
        return [v / (1 + math.exp(-v)) - smallest for v in x]
    raise AssertionError(name)


def literal_cross_attention(query, keys, values, gamma, activation):
    """Loops over samples, tokens and visual features; sorts each row as the paper describes."""
    batch, tokens, width = query.shape
    num_visual = keys.shape[1]
    out = torch.zeros(batch, tokens, width, dtype=torch.float64)
    for b in range(batch):
        act_keys = [literal_activation(keys[b, j].tolist(), activation) for j in range(num_visual)]
        for t in range(tokens):
            q = literal_activation(query[b, t].tolist(), activation)
            row = [sum(qi * ki for qi, ki in zip(q, act_keys[j])) for j in range(num_visual)]
            threshold = sorted(row)[math.floor(gamma * num_visual)]
            for j in range(num_visual):
                if gamma == 0 or row[j] >= threshold:
                    out[b, t] += row[j] * values[b, j].double()
    return out


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 0.9])
def test_matches_literal_math(activation, gamma, device):
    generator = torch.Generator().manual_seed(7)
    query = torch.randn(2, 3, 6, generator=generator, dtype=torch.float64)
    keys = torch.randn(2, 10, 6, generator=generator, dtype=torch.float64)
    values = torch.randn(2, 10, 6, generator=generator, dtype=torch.float64)
    got = adaptive_cross_attention(query.to(device), keys.to(device), values.to(device), gamma, activation)
    want = literal_cross_attention(query, keys, values, gamma, activation)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9)


def test_ties_at_threshold_are_kept(device):
    # activation none, query 1: the scores are the keys' first coordinates [1, 2, 2, 2, 3].
    query = torch.tensor([[[1.0, 0.0]]], device=device)
    keys = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [3.0, 0.0]]], device=device)
    values = torch.arange(1.0, 6.0, device=device).view(1, 5, 1).expand(1, 5, 2).contiguous()
    # gamma 0.4: threshold = 3rd smallest = 2, so only the 1 is dropped and all three 2s are kept.
    got = adaptive_cross_attention(query, keys, values, 0.4, "none")
    kept = 2 * 2 + 2 * 3 + 2 * 4 + 3 * 5
    assert got[0, 0].tolist() == [kept, kept]
    # gamma 0.2: threshold = 2nd smallest = 2 as well.
    assert adaptive_cross_attention(query, keys, values, 0.2, "none")[0, 0, 0].item() == kept
    # gamma 0 keeps everything.
    assert adaptive_cross_attention(query, keys, values, 0.0, "none")[0, 0, 0].item() == kept + 1


def test_gradients_reach_query_keys_values(device):
    query = torch.randn(1, 4, 8, requires_grad=True, device=device)
    keys = torch.randn(1, 5, 8, requires_grad=True, device=device)
    values = torch.randn(1, 5, 8, requires_grad=True, device=device)
    adaptive_cross_attention(query, keys, values, 0.2).sum().backward()
    for tensor in (query, keys, values):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"drop_ratio": 1.0}, "drop_ratio=1.0"),
        ({"drop_ratio": -0.1}, "drop_ratio=-0.1"),
        ({"drop_ratio": 0.1, "activation": "gelu"}, "activation='gelu'.*silu"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    x = torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match=message):
        adaptive_cross_attention(x, torch.randn(1, 3, 4), torch.randn(1, 3, 4), **kwargs)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_multiscale_pool_matches_blocks(pooling, device):
    patches = torch.randn(2, 16, 3, device=device)  # 4 x 4 grid, row-major
    pooled = multiscale_pool(patches, [16, 4, 1], pooling)
    assert pooled.shape == (2, 21, 3)
    torch.testing.assert_close(pooled[:, :16], patches)
    grid = patches.view(2, 4, 4, 3)
    reduce = (lambda block: block.mean(dim=(1, 2))) if pooling == "avg" else (lambda block: block.amax(dim=(1, 2)))
    for index, (row, col) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        torch.testing.assert_close(pooled[:, 16 + index], reduce(grid[:, row : row + 2, col : col + 2]))
    torch.testing.assert_close(pooled[:, 20], reduce(grid))


@pytest.mark.parametrize("scales", [[15], [64], [0], []])
def test_bad_scales_are_rejected(scales):
    with pytest.raises(ValueError, match="down_sample_num"):
        multiscale_pool(torch.randn(1, 16, 3), scales)


def test_unknown_pooling():
    with pytest.raises(ValueError, match="pooling='min'"):
        multiscale_pool(torch.randn(1, 16, 3), [4], "min")
