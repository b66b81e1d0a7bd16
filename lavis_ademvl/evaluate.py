"""Evaluate with LAVIS, ADEM-VL registered: `python -m lavis_ademvl.evaluate --cfg-path X.yaml`,
installed also as `python -m lavis.evaluate` (lavis_ademvl_discovery.py).

Unlike LAVIS's evaluate.py, the runner comes from `run.runner` instead of being fixed to RunnerBase.
"""
from __future__ import annotations

import lavis_ademvl  # noqa: F401  (registers the model, data, task and runner)
from lavis_ademvl.common.launch import build_runner, finish, parse_args, prepare


def main(argv: list[str] | None = None) -> None:
    args = parse_args("Evaluation", argv)
    cfg, task, datasets, model, job_id = prepare(args)
    build_runner(cfg, task, datasets, model, job_id).evaluate(skip_reload=True)
    finish()


if __name__ == "__main__":
    main()
