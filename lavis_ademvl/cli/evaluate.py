"""Evaluate with LAVIS, ADEM-VL registered: `ademvl evaluate --cfg-path X.yaml`, also `python -m
lavis_ademvl.evaluate` and, once installed, `python -m lavis.evaluate` (lavis_ademvl_discovery.py).

Unlike LAVIS's evaluate.py, the runner comes from `run.runner` instead of being fixed to RunnerBase, and the model must
load a checkpoint (`model.load_finetuned`, `model.finetuned`) unless `run.allow_untrained: true` says to score it
untrained; evaluate.txt names the checkpoint, and the result files say `finetuned` or `untrained` where LAVIS's say
`best`.
"""
from __future__ import annotations

import sys
from typing import Any

import lavis_ademvl  # noqa: F401  (registers the model, data, task and runner)
from lavis_ademvl.common.launch import lavis_script
from lavis_ademvl.common.run_config import UNTRAINED, built_checkpoint


def evaluate_built_model(runner: Any) -> None:
    untrained = built_checkpoint(runner.config) == UNTRAINED
    runner.evaluate(cur_epoch=UNTRAINED if untrained else "finetuned", skip_reload=True)


main = lavis_script("evaluate", __doc__, evaluate_built_model, evaluating=True)

if __name__ == "__main__":
    sys.exit(main())
