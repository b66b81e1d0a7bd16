"""The benchmark script runs end to end on the tiny shape (figures are printed, not asserted)."""
from __future__ import annotations

import json

from benchmarks import fusion_speed


def test_fusion_speed_tiny(tmp_path, capsys):
    assert fusion_speed.main(["--shape", "tiny", "--repeats", "2", "--new-tokens", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "fusion_speed_tiny_cpu.json").read_text())
    assert set(result["train_step"]) == {"llm", "none", "adem", "prefix"}
    assert set(result["generate"]) == {"none", "adem", "prefix"}
    assert all(result["memory_bytes"][name] > 0 for name in result["train_step"])
    flops = result["flops_one_token_at_256"]
    assert flops["none"] < flops["adem"] < flops["prefix"]
    assert "| adem |" in capsys.readouterr().out and (tmp_path / "fusion_speed_tiny_cpu.md").is_file()
