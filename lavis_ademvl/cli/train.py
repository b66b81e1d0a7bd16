"""Train (and evaluate) with LAVIS, ADEM-VL registered: `ademvl train --cfg-path X.yaml`, also `python -m
lavis_ademvl.train` and, once installed, `python -m lavis.train` (lavis_ademvl_discovery.py)."""
from __future__ import annotations

import sys

import lavis_ademvl  # noqa: F401  (registers the model, data, task and runner)
from lavis_ademvl.common.launch import lavis_script

main = lavis_script("train", __doc__, lambda runner: runner.train())

if __name__ == "__main__":
    sys.exit(main())
