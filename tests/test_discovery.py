"""LAVIS finds the plugin without `import lavis_ademvl` (lavis_ademvl_discovery.py and its .pth), in fresh processes.

`python -m lavis.train` / `lavis.evaluate` on the ScienceQA fixture: test_scienceqa.py's train-then-evaluate test.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli import REPO, TINY_SQA, job_dirs

import lavis_ademvl.evaluate
import lavis_ademvl.train
from lavis_ademvl.common.results import read_evaluations
from lavis_ademvl_discovery import ENV_VAR, discovery_enabled

PTH = REPO / "lavis_ademvl_discovery.pth"
# Loaded at interpreter start, they would make every Python process of the environment slow.
HEAVY = ("lavis", "lavis_ademvl", "torch", "transformers", "omegaconf")


def run_python(code: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               python_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    # The hook's warnings are RuntimeWarnings naming the variable: shown on stderr, the rest stays quiet.
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                       PYTHONWARNINGS="ignore,always::RuntimeWarning")
    environment.pop(ENV_VAR, None)
    environment.update(env or {})
    command = [sys.executable, *python_args, "-c", textwrap.dedent(code), *args]
    result = subprocess.run(command, env=environment, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def last_json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


# The fresh process reports what it holds, as its last line.
REPORT = """
import json, sys

def report(**extra):
    from lavis.common.registry import registry
    model = registry.get_model_class("ademvl")
    finders = [type(f).__name__ for f in sys.meta_path].count("LavisPluginFinder")
    print(json.dumps(dict(model=model and f"{model.__module__}.{model.__qualname__}", finders=finders,
                          plugin_imported=sys.modules.get("lavis_ademvl") is not None, **extra)))
"""
ADEMVL = "lavis_ademvl.models.ademvl.AdemVL"


def installed_pth_files() -> list[Path]:
    site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return [Path(d) / PTH.name for d in site_dirs if (Path(d) / PTH.name).is_file()]


def test_installed_pth_makes_import_lavis_register_the_plugin():
    installed = installed_pth_files()
    assert [path.read_bytes() for path in installed] == [PTH.read_bytes()], (
        f"{PTH.name} is not installed once, as in the repository, in this interpreter's site directories "
        f"({sys.executable}): run `make install`"
    )
    code = REPORT + textwrap.dedent(f"""
        at_start = sorted(m for m in ("lavis_ademvl_discovery", *{HEAVY!r}) if m in sys.modules)
        import lavis  # no import of lavis_ademvl anywhere in this process
        loader_patched = "exec_module" in vars(lavis.__spec__.loader)
        import lavis_ademvl  # importing it explicitly, as before, registers nothing twice
        import lavis.evaluate, lavis.train
        report(at_start=at_start, loader_patched=loader_patched,
               scripts=[lavis.train.__file__, lavis.evaluate.__file__])
    """)
    process = run_python(code)
    result = last_json(process)
    assert result["at_start"] == ["lavis_ademvl_discovery"]  # the .pth ran, and imported nothing heavy
    assert result["model"] == ADEMVL and result["finders"] == 1 and ENV_VAR not in process.stderr
    assert not result["loader_patched"]  # LAVIS's loader is left as it was
    assert result["scripts"] == [lavis_ademvl.train.__file__, lavis_ademvl.evaluate.__file__]


def test_plugin_imported_first_registers_once():
    code = REPORT + textwrap.dedent("""
        import lavis_ademvl_discovery
        lavis_ademvl_discovery.install()
        lavis_ademvl_discovery.install()  # the .pth may have installed it already: still one finder
        import lavis_ademvl  # imports lavis, whose hook imports lavis_ademvl again while it is half done
        import lavis
        report()
    """)
    process = run_python(code)
    assert last_json(process) == {"model": ADEMVL, "finders": 1, "plugin_imported": True}
    assert ENV_VAR not in process.stderr


def test_variable_turns_discovery_off():
    code = REPORT + textwrap.dedent("""
        import lavis_ademvl_discovery
        lavis_ademvl_discovery.install()
        import lavis
        from lavis.common.registry import registry
        off = registry.get_model_class("ademvl"), "lavis_ademvl" in sys.modules
        import lavis_ademvl  # the explicit import still works
        report(off=[off[0] is None, off[1]])
    """)
    process = run_python(code, env={ENV_VAR: "0"})
    assert last_json(process) == {"model": ADEMVL, "finders": 1, "plugin_imported": True, "off": [True, False]}
    assert ENV_VAR not in process.stderr


def test_pth_line_is_silent_without_the_hook_module_and_installs_it_with(tmp_path):
    stale, complete = tmp_path / "stale", tmp_path / "complete"
    for folder in (stale, complete):
        folder.mkdir()
        shutil.copy(PTH, folder)
    shutil.copy(REPO / "lavis_ademvl_discovery.py", complete)
    code = """
        import site, sys
        site.addsitedir(sys.argv[1])
        print([type(f).__name__ for f in sys.meta_path].count("LavisPluginFinder"))
    """
    env = {"PYTHONPATH": ""}  # with -S: no site-packages, so only the folder given can provide the hook
    for folder, finders in ((stale, "0"), (complete, "1")):
        result = run_python(code, str(folder), env=env, cwd=tmp_path, python_args=("-S",))
        assert (result.stdout.strip(), result.stderr) == (finders, "")


def fake_lavis(root: Path, with_train: bool) -> Path:
    """A stand-in `lavis` package without torch: for the name rules, which do not depend on LAVIS's code."""
    package = root / "lavis"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if with_train:
        (package / "train.py").write_text("print('LAVIS train.py')\n")
    return root


def test_absent_plugin_is_a_no_op(tmp_path):
    code = """
        import sys
        sys.modules["lavis_ademvl"] = None  # as if uninstalled: its import fails, importlib.util.find_spec is None
        import lavis_ademvl_discovery
        lavis_ademvl_discovery.install()
        import lavis
        try:
            import lavis.train
        except ModuleNotFoundError as error:
            print(error.name)
    """
    root = fake_lavis(tmp_path, with_train=False)
    result = run_python(code, env={"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    assert (result.stdout, result.stderr) == ("lavis.train\n", "")


def test_a_lavis_that_ships_lavis_train_wins(tmp_path):
    code = """
        import runpy
        import lavis_ademvl_discovery
        lavis_ademvl_discovery.install()
        runpy.run_module("lavis.train", run_name="__main__", alter_sys=True)  # what `python -m lavis.train` does
    """
    root = fake_lavis(tmp_path, with_train=True)
    python_path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    result = run_python(code, env={ENV_VAR: "0", "PYTHONPATH": python_path})
    assert result.stdout == "LAVIS train.py\n"


def test_a_plugin_that_fails_to_import_is_a_warning_not_a_broken_lavis(tmp_path):
    code = """
        import lavis_ademvl_discovery
        lavis_ademvl_discovery.install()
        import lavis  # this stand-in has no lavis.common, which lavis_ademvl needs
        print(lavis.__file__)
    """
    root = fake_lavis(tmp_path, with_train=False)
    result = run_python(code, env={"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    assert result.stdout == f"{root / 'lavis' / '__init__.py'}\n"
    (message,) = [line for line in result.stderr.splitlines() if ENV_VAR in line]
    assert "ADEM-VL plugin could not be registered" in message and "No module named 'lavis.common'" in message


@pytest.mark.parametrize("value, enabled", [(None, True), ("", True), ("1", True), ("On", True), ("0", False),
                                            ("false", False), (" NO ", False), ("off", False)])
def test_variable_values(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, value)
    assert discovery_enabled() is enabled


def test_unknown_variable_value_is_named(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "maybe")
    with pytest.warns(RuntimeWarning, match=r"LAVIS_ADEMVL_DISCOVERY='maybe' is not understood.*'0', 'false'"):
        assert discovery_enabled()


def test_lavis_script_without_the_plugin_import_trains_ademvl(sqa_root, tmp_path):
    """The calls LAVIS 1.0.2's own train.py makes (its file is not in the wheel), in a process that never imports
    lavis_ademvl: the runner comes from the registry and resolves `run.device: auto` itself."""
    code = """
        import argparse
        import lavis.tasks as tasks
        from lavis.common.config import Config
        from lavis.common.dist_utils import init_distributed_mode
        from lavis.common.registry import registry
        from lavis.common.utils import now

        parser = argparse.ArgumentParser()
        parser.add_argument("--cfg-path", required=True)
        parser.add_argument("--options", nargs="+")
        cfg = Config(parser.parse_args())
        init_distributed_mode(cfg.run_cfg)
        task = tasks.setup_task(cfg)
        datasets = task.build_datasets(cfg)
        model = task.build_model(cfg)
        runner_cls = registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))
        runner_cls(cfg=cfg, job_id=now(), task=task, model=model, datasets=datasets).train()
    """
    options = [f"datasets.scienceqa_mc.build_info.data_root={sqa_root}", f"run.output_dir={tmp_path / 'out'}",
               "run.max_epoch=1", "run.batch_size_train=8"]
    run_python(code, "--cfg-path", str(TINY_SQA), "--options", *options, cwd=tmp_path)
    (job,) = job_dirs(tmp_path / "out")
    assert (job / "checkpoint_latest.pth").is_file()
    assert [split for split, _ in read_evaluations(job / "evaluate.txt")] == ["val", "test"]
