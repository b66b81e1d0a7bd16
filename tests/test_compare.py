"""The comparison harness on the tiny model: two ADEM-VL variants evaluated, an unloadable LAVIS model skipped."""
from __future__ import annotations

import os

from cli import TINY_SQA

from lavis_ademvl.cli import compare


def test_two_variants_and_a_skipped_model(sqa_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    config = tmp_path / "compare.yaml"
    config.write_text(
        f"includes: [{TINY_SQA}]\n"
        "compare:\n  models:\n"
        "    - {name: ADEM-VL tiny, model: {arch: ademvl, model_type: tiny, fusion: adem}}\n"
        "    - {name: text only tiny, model: {arch: ademvl, model_type: tiny, fusion: none}}\n"
        "    - {name: not registered, model: {arch: no_such_model, model_type: base}}\n"
        f"run:\n  output_dir: {tmp_path / 'out'}\n  test_splits: [test]\n  valid_splits: []\n"
    )
    out = tmp_path / "table.md"
    argv = ["--cfg-path", str(config), "--out", str(out), "--options", f"datasets.scienceqa_mc.build_info.data_root={sqa_root}"]
    assert compare.main(argv) == 0
    table = out.read_text().splitlines()
    assert table[0].startswith("| model | agg_metrics | IMG | NO | TXT | trainable | total | samples/s | peak MB |")
    adem, text_only, missing = table[2:5]
    assert adem.startswith("| ADEM-VL tiny |") and "6,304" in adem  # the tiny model's trainable count
    assert text_only.startswith("| text only tiny |") and "2,560" in text_only  # E1 + E2 only: 2 x 20 x 64
    assert missing.startswith("| not registered | skipped: KeyError") and "no_such_model" in missing
    assert os.path.isdir(tmp_path / "out")
