"""The benchmark script runs end to end on the tiny shape (figures are printed, not asserted)."""
from __future__ import annotations

import json

import torch

from benchmarks import fusion_speed


def test_fusion_speed_tiny(tmp_path, capsys):
    assert fusion_speed.main(["--shape", "tiny", "--repeats", "2", "--new-tokens", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "fusion_speed_tiny_cpu.json").read_text())
    assert set(result["train_step"]) == {"llm", "none", "adem", "prefix"}
    assert set(result["generate"]) == {"none", "adem", "prefix"}
    # <bos> text </eos>; adem adds "Image: " (3 tokens, as under SmolLM2's tokenizer) and the [cls] slot.
    sequence = result["sequence_tokens"]
    assert sequence["none"] == result["text_tokens"] + 2
    assert sequence["adem"] == sequence["none"] + 4
    assert sequence["prefix"] == sequence["none"] + 3 + result["visual_tokens_prefix"]
    assert all(result["memory_bytes"][name] > 0 for name in result["train_step"])
    flops = result["flops_one_token_at_256"]
    assert flops["none"] < flops["adem"] < flops["prefix"]
    assert "| adem |" in capsys.readouterr().out and (tmp_path / "fusion_speed_tiny_cpu.md").is_file()


def test_llama7b_towers_are_built_where_they_run_in_bfloat16():
    """Off the CPU the LLaMA-7B shape is built on its device in bfloat16 from the start, never as 28 GB of float32 on
    the host: on the meta device (no memory at all) every frozen weight is a bfloat16 meta tensor, the trainable ones
    stay float32, and the default dtype is restored."""
    llm, variants = fusion_speed.build_variants(fusion_speed.SHAPES["llama7b"], torch.device("meta"))
    frozen = [llm, *(model.vision_tower for model in variants.values() if model.vision_tower is not None)]
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for tower in frozen for p in tower.parameters())
    assert sum(p.numel() for p in llm.parameters()) > 6.7e9
    assert all(p.dtype == torch.float32 for p in variants["adem"].parameters() if p.requires_grad)
    assert torch.get_default_dtype() == torch.float32
