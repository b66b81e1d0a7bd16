"""The authors' released checkpoint layout maps onto our model."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_model import make_batch


def authors_layout(model, prefix=""):
    """Our trained weights written the way the authors' code saves them (OpenAI-CLIP block numbering)."""
    state = {
        "adapter_emb1": model.visual_key_offset, "adapter_emb2": model.visual_value_offset,
        "adapter_proj.fc1.weight": model.visual_proj[0].weight, "adapter_proj.fc1.bias": model.visual_proj[0].bias,
        "adapter_proj.fc2.weight": model.visual_proj[2].weight, "adapter_proj.fc2.bias": model.visual_proj[2].bias,
        "adapter_proj_cls.fc1.weight": model.cls_proj[0].weight, "adapter_proj_cls.fc1.bias": model.cls_proj[0].bias,
        "adapter_proj_cls.fc2.weight": model.cls_proj[2].weight, "adapter_proj_cls.fc2.bias": model.cls_proj[2].bias,
    }
    for block, adapter in enumerate(model.vision_adapters):
        for linear in ("fc1", "fc2"):
            state[f"backbone.visual.transformer.resblocks.{block}.adapter_mlp.{linear}.weight"] = getattr(adapter, linear).weight
    # Their last CLIP block carries an adapter too, saved although its output is never read.
    last = len(model.vision_adapters)
    state[f"backbone.visual.transformer.resblocks.{last}.adapter_mlp.fc1.weight"] = torch.randn(4, 32)
    state[f"backbone.visual.transformer.resblocks.{last}.adapter_mlp.fc2.weight"] = torch.randn(32, 4)
    return {prefix + key: value.detach().clone() for key, value in state.items()}


@pytest.fixture
def trained():
    torch.manual_seed(1)
    model = tiny_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("prefix", ["", "module."])
def test_round_trip_gives_identical_outputs(trained, tmp_path, prefix):
    path = tmp_path / "checkpoint_7B_sqa.pth"
    torch.save({"model": authors_layout(trained, prefix), "epoch": 19}, path)
    torch.manual_seed(1)  # the same random frozen LLM and tower as `trained`
    loaded = tiny_model().eval()
    loaded.load_checkpoint(str(path))
    for name, value in trained.trainable_state_dict().items():
        torch.testing.assert_close(loaded.trainable_state_dict()[name], value, rtol=0, atol=0, msg=name)
    batch = make_batch()
    torch.testing.assert_close(loaded.next_token_logprobs(batch), trained.next_token_logprobs(batch), rtol=0, atol=0)


def test_unmapped_and_missing_keys_are_errors(trained, tmp_path):
    state = authors_layout(trained)
    state["backbone.visual.proj"] = torch.zeros(2)
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(KeyError, match="map to nothing in this model: \\['backbone.visual.proj'\\]"):
        tiny_model().load_checkpoint(str(tmp_path / "extra.pth"))
    state = {k: v for k, v in authors_layout(trained).items() if not k.startswith("adapter_proj_cls")}
    torch.save({"model": state}, tmp_path / "missing.pth")
    with pytest.raises(KeyError, match="missing trainable keys \\['cls_proj.0.bias'"):
        tiny_model().load_checkpoint(str(tmp_path / "missing.pth"))
