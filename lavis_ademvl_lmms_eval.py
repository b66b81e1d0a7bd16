"""The lmms-eval entry point of ADEM-VL: `lmms-eval --model ademvl ...` (setup.cfg, group `lmms_eval.models`).

lmms-eval loads every entry point of that group each time its model registry is built, for whatever model it runs;
so this module stays outside the `lavis_ademvl` package (whose import brings LAVIS and torch) and imports nothing
itself: the model class (lavis_ademvl.integrations.lmms_eval) is imported only when `--model ademvl` is asked for.
"""
from __future__ import annotations

MODEL_ID = "ademvl"
MODEL_CLASS = "lavis_ademvl.integrations.lmms_eval.AdemVLLmms"


def manifest():  # -> lmms_eval.models.registry_v2.ModelManifest (called by lmms-eval only, so it is installed)
    """The `ModelManifest` that lmms-eval's registry_v2 expects from an entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
