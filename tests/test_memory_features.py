"""Gradient checkpointing of the LLM or the vision tower gives the same loss and gradients; quantization is refused
on CPU."""
from __future__ import annotations

import pytest
import torch
from helpers import make_batch, tiny_config, tiny_model


@pytest.mark.parametrize(
    "tower, placement, adapter_dropout",
    [
        ("llm", {}, 0.0),
        ("llm", {"query_from": "attn_in", "add_to": "mlp_out"}, 0.0),
        # The vision adapters' dropout must be replayed identically when the tower is recomputed.
        ("vision", {}, 0.5),
    ],
)
def test_checkpointing_matches_plain_backward(tower, placement, adapter_dropout, device):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_model(**{f"{tower}_gradient_checkpointing": checkpointing}, adapter_dropout=adapter_dropout,
                           **placement).to(device)
        model.train()
        with torch.no_grad():
            for adapter in model.vision_adapters:
                adapter.fc2.weight.normal_(0, 0.1)
        torch.manual_seed(1)
        loss = model(make_batch(device=device))["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        checkpointed = model.llm if tower == "llm" else model.vision_tower
        assert checkpointed.is_gradient_checkpointing == checkpointing
    (plain_loss, plain_grads), (ckpt_loss, ckpt_grads) = results
    torch.testing.assert_close(ckpt_loss, plain_loss)
    # Every vision adapter, the first one included (its block's input needs no gradient), is reached.
    assert all(plain_grads[f"vision_adapters.{i}.fc1.weight"].abs().sum() > 0 for i in range(len(model.vision_adapters)))
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error path")
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantization_needs_cuda(quantization, tmp_path):
    with pytest.raises(RuntimeError, match=f"llm_quantization='{quantization}' needs a CUDA GPU"):
        tiny_model(llm_model=str(tmp_path), llm_config=None, tokenizer="byte_level", llm_quantization=quantization)


def test_unknown_quantization_is_named():
    with pytest.raises(ValueError, match="llm_quantization='3bit'"):
        tiny_model(llm_quantization="3bit")


def test_device_map_keeps_the_llm_in_place(tmp_path, device):
    """`llm_device_map` loads through accelerate's dispatch; `to` moves only our modules."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**tiny_config()["llm_config"])).save_pretrained(tmp_path / "llm")
    device_map = {"": "cpu" if device == "cpu" else 0}  # GPU 0, as a Hugging Face device map names it
    model = tiny_model(llm_model=str(tmp_path / "llm"), llm_config=None, llm_device_map=device_map)
    # transformers 4.x records the map (hf_device_map); 5.x places a one-device map without dispatch hooks.
    assert model.llm_dispatched and getattr(model.llm, "hf_device_map", device_map) == device_map
    assert {parameter.device.type for parameter in model.llm.parameters()} == {torch.device(device).type}
    assert model.to(device) is model
    model.train()
    loss = model(make_batch(device=device))["loss"]
    loss.backward()
    assert model.visual_value_offset.grad is not None and torch.isfinite(loss)
    assert not tiny_model().llm_dispatched
    with pytest.raises(ValueError, match="llm_device_map needs pretrained weights"):
        tiny_model(llm_device_map="auto")
