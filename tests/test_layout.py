"""The package's layering: `common/` depends on nothing above it, and no tool reaches into the model's privates."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lavis_ademvl"
ABOVE_COMMON = ("lavis_ademvl.models", "lavis_ademvl.tasks", "lavis_ademvl.datasets", "lavis_ademvl.runners",
                "lavis_ademvl.processors")
TOOLS = [*sorted(PACKAGE.glob("*.py")), *sorted((PACKAGE / "cli").glob("*.py")),
         PACKAGE.parent / "benchmarks" / "fusion_speed.py"]
# The model's modules use one another through their public faces too (scoring is a mixin of the model).
MODELS = sorted((PACKAGE / "models").glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


@pytest.mark.parametrize("path", sorted((PACKAGE / "common").glob("*.py")), ids=lambda path: path.name)
def test_common_imports_nothing_above_it(path):
    above = sorted(m for m in imported_modules(path) if m == "lavis_ademvl" or m.startswith(ABOVE_COMMON))
    assert above == [], f"common/{path.name} imports {above}"


@pytest.mark.parametrize("path", TOOLS + MODELS, ids=lambda path: path.name)
def test_tools_and_model_modules_read_no_private_attribute(path):
    private = sorted(
        f"{ast.unparse(node)} (line {node.lineno})"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    )
    assert private == [], f"{path.name} reads private attributes: {private}"


def module_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (TYPE_CHECKING imports too), package __init__ files left out: they
    import their submodules to register them, which is not a dependency of one module on another."""
    modules = {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): path
               for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for module in imported_modules(path):
            while module and module not in modules:  # `from a.b import c` names module a.b.c or a name of a.b
                module = module.rpartition(".")[0]
            if module and module != name:
                imported.add(module)
        graph[name] = imported
    return graph


def test_no_import_cycle_between_modules():
    """A module never reaches itself through imports (as `pydeps lavis_ademvl --show-cycles` checks); scoring once
    imported the model it served under TYPE_CHECKING."""
    graph = module_graph()
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert cycles == []


def test_every_docs_page_is_reachable_from_the_readme_and_every_link_resolves():
    """README stays short because the details live in docs/: each page must be linked from it, and no relative link
    of README or docs/ may point at a file that is gone."""
    import re

    root = PACKAGE.parent
    readme = (root / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    assert {f"docs/{path.name}" for path in (root / "docs").glob("*.md")} <= linked
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([\w./-]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(root)} links to {target}, which does not exist"
