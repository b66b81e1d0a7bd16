"""The benchmark script runs end to end on the tiny shape (figures are printed, not asserted)."""
from __future__ import annotations

import json

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
