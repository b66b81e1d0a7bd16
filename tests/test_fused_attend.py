"""The fast fusion path equals the reference, in values and gradients, for every activation and gamma."""
from __future__ import annotations

import pytest
import torch

from lavis_ademvl.models.fusion import ACTIVATIONS, activate, adaptive_drop, fused_attend


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 0.9])
def test_fused_equals_reference(activation, gamma, device):
    generator = torch.Generator().manual_seed(11)  # drawn on the CPU, so every device gets the same numbers
    query, raw_keys, values = (torch.randn(*shape, generator=generator, dtype=torch.float64).to(device).requires_grad_(True)
                               for shape in ((2, 5, 16), (2, 20, 16), (2, 20, 16)))
    upstream = torch.randn(2, 5, 16, generator=generator, dtype=torch.float64).to(device)
    results = []
    for function in (lambda q, k, v: attend(activate(q, activation), k, v, gamma),
                     lambda q, k, v: fused_attend(q, k, v, gamma, activation)):
        out = function(query, activate(raw_keys, activation), values)
        grads = torch.autograd.grad(out, (query, raw_keys, values), upstream)
        results.append((out, grads))
    (reference, reference_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10)
    for got, want in zip(fused_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def attend(activated_query, activated_keys, values, drop_ratio):
    """The fusion restated with autograd's own record: drop(act(q) @ act(k)^T) @ v."""
    return torch.matmul(adaptive_drop(torch.matmul(activated_query, activated_keys.transpose(-1, -2)), drop_ratio), values)


def test_fused_float32_tolerance_and_gradcheck(device):
    torch.manual_seed(0)
    query, keys, values = (torch.randn(*shape, dtype=torch.float64).to(device).requires_grad_(True)
                           for shape in ((1, 3, 8), (1, 6, 8), (1, 6, 8)))
    assert torch.autograd.gradcheck(lambda q, k, v: fused_attend(q, k, v, 0.3, "silu"), (query, keys, values))
    q32, k32, v32 = (t.detach().float() for t in (query, keys, values))
    torch.testing.assert_close(fused_attend(q32, k32, v32, 0.3, "silu"), attend(activate(q32, "silu"), k32, v32, 0.3))


@pytest.mark.parametrize("needs", [(False, False, True), (False, True, False), (True, False, False), (False, True, True)])
def test_fused_gradients_when_only_some_inputs_need_them(needs, device):
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(2, 4, 8, generator=generator, dtype=torch.float64).to(device)] + [
        torch.randn(2, 10, 8, generator=generator, dtype=torch.float64).to(device) for _ in range(2)
    ]
    upstream = torch.randn(2, 4, 8, generator=generator, dtype=torch.float64).to(device)
    grads = []
    for function in (lambda q, k, v: attend(activate(q, "silu"), k, v, 0.2),
                     lambda q, k, v: fused_attend(q, k, v, 0.2, "silu")):
        inputs = [t.clone().requires_grad_(need) for t, need in zip(tensors, needs)]
        wanted = [t for t in inputs if t.requires_grad]
        grads.append(torch.autograd.grad(function(*inputs), wanted, upstream))
    for got, want in zip(*reversed(grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_fused_runs_in_the_query_dtype_and_returns_gradients_in_the_inputs_dtypes(device):
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(2, 4, 8, generator=generator).bfloat16().to(device).requires_grad_(True)
    keys = torch.randn(2, 10, 8, generator=generator).to(device).requires_grad_(True)
    values = torch.randn(2, 10, 8, generator=generator).to(device).requires_grad_(True)
    out = fused_attend(query, keys, values, 0.2, "silu")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert (query.grad.dtype, keys.grad.dtype, values.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    rounded = [t.detach().bfloat16().float() for t in (query, keys, values)]
    reference = attend(activate(rounded[0], "silu"), rounded[1], rounded[2], 0.2)
    assert (out.float() - reference).norm() < 1e-2 * reference.norm()  # bfloat16 rounding of the scores only
