"""The parameter report: the paper's counts from configs alone, nothing downloaded or allocated."""
from __future__ import annotations

from cli import REPO

from lavis_ademvl.cli import params

SQA = REPO / "projects" / "ademvl" / "sqa.yaml"


def test_llama7b_vit_l14(capsys):
    assert params.main(["--cfg-path", str(SQA)]) == 0
    out = capsys.readouterr().out
    assert "total trainable                    4,505,856" in out
    for line in ("E1 (key offset)                    1,310,720", "low-rank projection W'               659,584",
                 "[cls] projection                     659,584", "vision adapters                      565,248"):
        assert line in out


def test_llama13b(capsys):
    assert params.main(["--cfg-path", str(SQA), "--options", "model.llm_model=huggyllama/llama-13b"]) == 0
    assert "total trainable                    5,425,408" in capsys.readouterr().out


def test_local_config_json_and_unknown_model(tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,'
        ' "num_attention_heads": 4, "vocab_size": 100}'
    )
    assert params.main(["--cfg-path", str(SQA), "--options", f"model.llm_model={tmp_path}"]) == 0
    assert "total trainable" in capsys.readouterr().out
    assert params.main(["--cfg-path", str(SQA), "--options", "model.llm_model=someone/unknown-llm"]) == 2
    assert "no local config.json and no built-in shape" in capsys.readouterr().err


def test_meta_model_allocates_nothing():
    from lavis_ademvl.common.config_files import load_experiment
    from lavis_ademvl.models.ademvl import AdemVL

    model = AdemVL.on_meta_device(load_experiment(SQA).config.model)
    assert all(p.is_meta for p in model.parameters())
    assert model.parameter_counts()["trainable"] == 4_505_856
