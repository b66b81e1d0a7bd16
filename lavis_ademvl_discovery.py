"""Lets LAVIS find the ADEM-VL plugin with no `import lavis_ademvl`, and provides `python -m lavis.train`.

LAVIS has no plugin discovery of its own, so the install puts `lavis_ademvl_discovery.pth` into site-packages; at
interpreter start that file calls `install()`, which only puts `LavisPluginFinder` first on `sys.meta_path`. The
finder answers three names and passes every other import through untouched:

- `lavis`: found as usual by the other finders. Before `lavis/__init__.py` runs, `lavis_ademvl_compat` puts back
  what LAVIS 1.0.2 imports from transformers and transformers 5 removed (a no-op on 4.x), so that LAVIS imports on
  both; once it has run, `lavis_ademvl` is imported, which registers ADEM-VL's model, processors, builder, tasks,
  runner and scheduler. The plugin import is skipped when the environment variable LAVIS_ADEMVL_DISCOVERY is
  0/false/no/off (the compatibility step is not: without it LAVIS does not import on transformers 5), and both are
  no-ops when the plugin is not installed.
- `lavis.train`, `lavis.evaluate` (the LAVIS wheel ships no such modules: its train.py and evaluate.py live only at
  the root of a source checkout): `lavis_ademvl/train.py` and `evaluate.py` under these names, so that
  `python -m lavis.train --cfg-path X.yaml` (and `torchrun -m lavis.train`) behave as `python -m lavis_ademvl.train`.
  Only when no other finder has them: a LAVIS that ships its own `lavis.train` wins.

This module is imported by every Python process of the environment: it imports only standard-library modules that
the interpreter has loaded at start anyway, and reads the variable only when `lavis` is imported.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
import warnings

ENV_VAR = "LAVIS_ADEMVL_DISCOVERY"
OFF_VALUES = ("0", "false", "no", "off")
ON_VALUES = ("", "1", "true", "yes", "on")
PLUGIN = "lavis_ademvl"
COMPAT = "lavis_ademvl_compat"
SCRIPTS = {"lavis.train": "lavis_ademvl.train", "lavis.evaluate": "lavis_ademvl.evaluate"}


def discovery_enabled() -> bool:
    """False when LAVIS_ADEMVL_DISCOVERY turns discovery off; an unknown value warns and leaves it on."""
    raw = os.environ.get(ENV_VAR, "")
    value = raw.strip().lower()
    if value in OFF_VALUES:
        return False
    if value not in ON_VALUES:
        warnings.warn(
            f"{ENV_VAR}={raw!r} is not understood (use one of {list(OFF_VALUES)} to turn plugin discovery off, "
            f"or one of {[v for v in ON_VALUES if v]}); discovery stays on",
            RuntimeWarning,
            stacklevel=2,
        )
    return True


def apply_compat() -> None:
    """Run lavis_ademvl_compat.apply() if it is installed; a failure is a warning (LAVIS then fails as it would)."""
    try:
        if importlib.util.find_spec(COMPAT) is not None:
            importlib.import_module(COMPAT).apply()
    except Exception as error:  # never break an import that might have worked without it
        warnings.warn(f"{COMPAT}.apply() failed before LAVIS was imported: {error!r}", RuntimeWarning, stacklevel=2)


def import_plugin() -> None:
    """Import lavis_ademvl if it is installed; a failure is a warning, so that `import lavis` itself still works."""
    try:
        # find_spec is None when the plugin is not installed (e.g. a stale .pth), or its import is blocked.
        if importlib.util.find_spec(PLUGIN) is not None:
            importlib.import_module(PLUGIN)  # while lavis_ademvl itself is importing lavis: its partial module, no loop
    except Exception as error:  # any error of the plugin must not break `import lavis`
        warnings.warn(
            f"LAVIS was imported, but the ADEM-VL plugin could not be registered: {error!r} "
            f"(`import {PLUGIN}` shows the full error; {ENV_VAR}=0 turns this discovery off)",
            RuntimeWarning,
            stacklevel=2,
        )


class LavisPluginFinder:
    """Meta path finder for `lavis` (import the plugin after it) and `lavis.train`/`lavis.evaluate` (our scripts)."""

    def __init__(self) -> None:
        # Names this finder is asking the other finders about: one that asks back gets None, not a loop.
        self._looking_up: set[str] = set()

    def find_spec(
        self, fullname: str, path: list[str] | None = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "lavis" and fullname not in SCRIPTS or fullname in self._looking_up:
            return None
        spec = self._find_with_other_finders(fullname, path, target)
        if fullname == "lavis":
            if spec is not None and spec.loader is not None:
                apply_compat()
                if discovery_enabled():
                    _import_plugin_after_exec(spec.loader)
            return spec
        return spec if spec is not None else _script_spec(fullname)

    def _find_with_other_finders(
        self, fullname: str, path: list[str] | None, target: types.ModuleType | None
    ) -> importlib.machinery.ModuleSpec | None:
        self._looking_up.add(fullname)
        try:
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                if finder is self or find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    return spec
            return None
        finally:
            self._looking_up.discard(fullname)


def _import_plugin_after_exec(loader: importlib.abc.Loader) -> None:
    """Make this spec's own loader import the plugin once `lavis/__init__.py` has run (the registry is filled)."""
    exec_module = loader.exec_module

    def exec_module_then_import_plugin(module: types.ModuleType) -> None:
        try:
            exec_module(module)
        finally:
            del loader.exec_module  # the loader is this import's own instance: leave it as it was
        import_plugin()

    loader.exec_module = exec_module_then_import_plugin


def _script_spec(fullname: str) -> importlib.machinery.ModuleSpec | None:
    """`lavis.train` -> a spec loading lavis_ademvl/train.py as `lavis.train` (which runpy runs as __main__)."""
    try:
        source = importlib.util.find_spec(SCRIPTS[fullname])  # imports lavis_ademvl (lavis is imported by now)
    except ModuleNotFoundError as error:
        if error.name == PLUGIN:  # not installed; any other missing module is the plugin's real error
            return None
        raise
    if source is None or source.origin is None:
        return None
    return importlib.util.spec_from_file_location(fullname, source.origin)


def install() -> None:
    """Put the finder first on sys.meta_path, once per process (called by lavis_ademvl_discovery.pth)."""
    if not any(isinstance(finder, LavisPluginFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, LavisPluginFinder())
