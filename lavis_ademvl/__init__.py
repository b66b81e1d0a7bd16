"""ADEM-VL for LAVIS: `import lavis_ademvl` registers model `ademvl`, its processors, the `scienceqa_mc`,
`ademvl_mme` and `ademvl_mmbench` builders and tasks, the `ademvl_instruct` builder, the captioning and VQA tasks,
runner `runner_ademvl` and the `linear_warmup_cosine_iter_lr` scheduler. Installed, it is imported
by itself right after `import lavis` (lavis_ademvl_discovery.py)."""
import os

import lavis_ademvl_compat

# Before LAVIS: what it imports from transformers 4.x, on 5.x (the discovery hook has done it already when installed).
lavis_ademvl_compat.apply()
# ruff: noqa: E402  (the imports below need the step above)
import lavis  # noqa: F401  (LAVIS registers its own components first)
from lavis.common.registry import registry

from lavis_ademvl import common, datasets, models, processors, runners, tasks  # noqa: F401
from lavis_ademvl.common import optims  # noqa: F401
from lavis_ademvl.datasets import builders  # noqa: F401

__version__ = "0.1.0"

# LAVIS 1.0.2 puts its cache under /export/home/.cache/lavis; use a user-writable default instead.
if registry.get_path("cache_root").startswith("/export/home"):
    registry.mapping["paths"]["cache_root"] = os.environ.get(
        "LAVIS_CACHE_ROOT", os.path.join(os.path.expanduser("~"), ".cache", "lavis")
    )
