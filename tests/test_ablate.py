"""A 2-row ablation grid on the tiny model: both rows train and evaluate, a finished row is not rerun."""
from __future__ import annotations

import json

from cli import REPO, TINY_SQA

from lavis_ademvl.cli import ablate
from lavis_ademvl.common.results import finished_test_metrics, read_evaluations, write_evaluation

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
    assert capsys.readouterr().err == f"error: grid file not found: {tmp_path / 'nope.yaml'}\n"


def test_a_failed_row_stops_the_grid(sqa_root, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "row.yaml").write_text(f"includes: [{TINY_SQA}]\nmodel: {{fusion: late}}\n")
    (tmp_path / "grid.yaml").write_text("title: broken\nrows:\n  - {name: late fusion, config: row.yaml}\n")
    argv = ["--grid", str(tmp_path / "grid.yaml"), "--output-dir", str(tmp_path / "out"),
            "--options", f"datasets.scienceqa_mc.build_info.data_root={sqa_root}"]
    assert ablate.main(argv) == 1
    captured = capfd.readouterr()  # the training subprocess writes to the file descriptors
    assert "error: fusion='late' is not supported" in captured.err  # the training process's own error line
    assert captured.err.splitlines()[-1].startswith("error: late fusion: the run did not finish (status 2)")
    assert not (tmp_path / "out" / "results.md").exists()


def test_finished_runs_are_read_in_every_record_shape(tmp_path):
    job = tmp_path / "run" / "20260101000000"
    job.mkdir(parents=True)
    records = [{"val": {"Avg": 40.0}}, {"agg_metrics": 1.0, "acc": 1.0}, {"split": "test", "Avg": 50.0, "epoch": 3}]
    (job / "evaluate.txt").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert read_evaluations(job / "evaluate.txt") == [
        ("val", {"Avg": 40.0}), (None, {"agg_metrics": 1.0, "acc": 1.0}), ("test", {"Avg": 50.0, "epoch": 3})
    ]  # LAVIS's shape, LAVIS's flat gqa/vqa records, and ScienceQA's records from before LAVIS's shape
    assert finished_test_metrics(tmp_path / "run") == {"Avg": 50.0, "epoch": 3}
    write_evaluation("test", {"Avg": 60.0}, output_dir=job)
    assert finished_test_metrics(tmp_path / "run") == {"Avg": 60.0}
    assert finished_test_metrics(tmp_path / "elsewhere") is None
