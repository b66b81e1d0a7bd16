"""A 2-row ablation grid on the tiny model: both rows train and evaluate, a finished row is not rerun."""
from __future__ import annotations

from cli import REPO, TINY_SQA

from lavis_ademvl import ablate

ABLATIONS = REPO / "projects" / "ademvl" / "ablations"


def test_every_grid_row_config_exists():
    from omegaconf import OmegaConf

    for grid in sorted(ABLATIONS.glob("table*.yaml")):
        rows = OmegaConf.load(grid).rows
        assert len(rows) >= 3, grid
        for row in rows:
            assert (ABLATIONS / row.config).is_file(), (grid, row.config)


def test_two_row_grid_on_the_tiny_model(sqa_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "title: projection function (tiny)\nrows:\n"
        f"  - name: SiLU\n    config: {ABLATIONS / 'rows' / 't8_silu.yaml'}\n"
        f"  - name: none\n    config: {ABLATIONS / 'rows' / 't8_none.yaml'}\n"
    )
    argv = ["--grid", str(grid), "--base", str(TINY_SQA), "--output-dir", str(tmp_path / "out"),
            "--options", f"datasets.scienceqa_mc.build_info.data_root={sqa_root}", "run.max_epoch=1"]
    assert ablate.main(argv) == 0
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.startswith("### projection function (tiny)")
    assert "| SiLU |" in table and "| none |" in table and "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |" in table
    jobs = sorted((tmp_path / "out").glob("*/*/evaluate.txt"))
    assert len(jobs) == 2
    capsys.readouterr()
    assert ablate.main(argv) == 0  # resumable: both rows are reused, nothing retrains
    assert capsys.readouterr().out.count("finished earlier, reused") == 2
    assert sorted((tmp_path / "out").glob("*/*/evaluate.txt")) == jobs


def test_bad_grid_is_named(tmp_path, capsys):
    assert ablate.main(["--grid", str(tmp_path / "nope.yaml")]) == 2
    assert "grid file not found" in capsys.readouterr().err
