"""Evaluate with LAVIS, ADEM-VL registered: `python -m lavis_ademvl.evaluate --cfg-path X.yaml`,
installed also as `python -m lavis.evaluate` (lavis_ademvl_discovery.py).

Unlike LAVIS's evaluate.py, the runner comes from `run.runner` instead of being fixed to RunnerBase.
"""
from __future__ import annotations

import sys

import lavis_ademvl  # noqa: F401  (registers the model, data, task and runner)
from lavis_ademvl.common.launch import lavis_script

main = lavis_script("lavis_ademvl.evaluate", __doc__, lambda runner: runner.evaluate(skip_reload=True))

if __name__ == "__main__":
    sys.exit(main())
