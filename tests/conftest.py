from __future__ import annotations

import ast
import inspect
import os
import socket
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from filelock import FileLock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli import REPO, job_dirs, run_module  # noqa: E402
from instruct_fixtures import make_all_data  # noqa: E402
from scienceqa_fixture import make_scienceqa  # noqa: E402

import lavis_ademvl  # noqa: E402,F401

# A device-taking test runs on the CPU and, marked `cuda` (`pytest -m cuda`: the GPU cases only, as
# `make gpu-check` runs them), on the GPU where there is one.
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")])


@pytest.fixture
def single_process_group():
    """A one-process gloo group, as torchrun --nproc_per_node 1 makes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=["cpu", CUDA])
def device(request) -> str:
    """Module-scoped, so a module's own fixtures (a model built once) can take it too."""
    return request.param


@pytest.fixture(scope="session")
def sqa_root(tmp_path_factory) -> Path:
    return make_scienceqa(tmp_path_factory.mktemp("scienceqa"))


@pytest.fixture(scope="session")
def instruct_checkpoint(tmp_path_factory) -> Path:
    """A tiny model instruction-tuned for 2 iterations on a generated all_data.json (its checkpoint_0.pth), by
    `python -m lavis_ademvl.train` on projects/ademvl/debug/instruct_tiny.yaml."""
    tmp = tmp_path_factory.mktemp("instruct")
    root = make_all_data(tmp / "data")
    options = [f"datasets.ademvl_instruct.build_info.data_root={root}", f"run.output_dir={tmp / 'out'}"]
    run_module("lavis_ademvl.train", REPO / "projects" / "ademvl" / "debug" / "instruct_tiny.yaml", options, tmp)
    (job,) = job_dirs(tmp / "out")
    return job / "checkpoint_0.pth"


# The test lanes. A test is `slow` when it, one of its fixtures, or a helper function of their module calls one of these:
# a training or evaluation run (in a subprocess or in this process), a tool that starts one, or a demo asset builder.
# `make test-fast` (pytest -m "not slow") is the edit-run loop; `make test` runs everything.
SLOW_CALLS = frozenset({
    "run_module", "run", "Popen", "check_output", "train_or_reuse", "prepare_assets", "assets_main",
    "build_scienceqa_from_easyvqa", "build_vqa_from_easyvqa", "convert_smollm2", "build_demo_clip", "pretrain_clip",
    "train.main", "evaluate.main", "demo.main", "ablate.main", "compare.main", "gpu_check.main", "fusion_speed.main",
})


def _called_names(node: ast.AST) -> set[str]:
    """`f` and `module.f` of every call in `node`."""
    names = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            if isinstance(call.func, ast.Name):
                names.add(call.func.id)
            elif isinstance(call.func, ast.Attribute):
                names.add(call.func.attr)
                if isinstance(call.func.value, ast.Name):
                    names.add(f"{call.func.value.id}.{call.func.attr}")
    return names


@cache
def _slow_functions(path: str) -> frozenset[str]:
    """The functions of a test module that reach a SLOW_CALLS call, directly or through another of its functions."""
    functions = {node.name: _called_names(node) for node in ast.parse(Path(path).read_text()).body
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    slow = {name for name, calls in functions.items() if calls & SLOW_CALLS}
    while True:
        more = {name for name, calls in functions.items() if calls & slow} - slow
        if not more:
            return frozenset(slow)
        slow |= more


def _is_slow(function) -> bool:
    function = inspect.unwrap(function)
    return function.__name__ in _slow_functions(inspect.getsourcefile(function))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = [definition.func for definitions in item._fixtureinfo.name2fixturedefs.values()
                    for definition in definitions if inspect.getsourcefile(definition.func).startswith(str(REPO))]
        if any(_is_slow(function) for function in [item.function, *fixtures]):
            item.add_marker(pytest.mark.slow)


# A shortened CLIP pretraining recipe for the tests (the shipped one, RECIPE["steps"], takes minutes on 2 cores);
# test_demo_clip.py states what this one reaches on held-out images.
TEST_CLIP_STEPS = 150


@pytest.fixture(scope="session")
def asset_cache(tmp_path_factory) -> Path:
    """One asset cache for the whole session, laid out as `ademvl assets` lays it out."""
    return tmp_path_factory.mktemp("asset_cache")


def built_once_per_run(tmp_path_factory, asset_cache: Path, asset: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)` of the demo asset `asset` once per test run, linked into this session's asset cache where
    `ademvl assets` puts it. `make test` runs two pytest-xdist workers, each a session of its own: the first to get
    here builds it in the run's folder under a file lock, the other waits and finds it finished."""
    from lavis_ademvl.assets import FOLDERS

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared_assets"
    shared.mkdir(exist_ok=True)
    with FileLock(shared / f"{asset}.lock"):
        built = build(shared / FOLDERS[asset])
    link = asset_cache / FOLDERS[asset]
    link.symlink_to(built, target_is_directory=True)
    return link


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, asset_cache) -> Path:
    """One GGUF conversion per test run (about 25 s on 2 cores)."""
    from lavis_ademvl.assets import convert_smollm2

    return built_once_per_run(tmp_path_factory, asset_cache, "smollm2", convert_smollm2)


@pytest.fixture(scope="session")
def demo_clip_dir(tmp_path_factory, asset_cache) -> Path:
    """The demo's CLIP, pretrained with TEST_CLIP_STEPS steps (seed 0) once per test run."""
    from lavis_ademvl.assets import build_demo_clip

    return built_once_per_run(tmp_path_factory, asset_cache, "clip",
                              lambda folder: build_demo_clip(folder, steps=TEST_CLIP_STEPS, progress=False))
