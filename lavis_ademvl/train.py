"""Train (and evaluate) with LAVIS, ADEM-VL registered: `python -m lavis_ademvl.train --cfg-path X.yaml`,
installed also as `python -m lavis.train` (lavis_ademvl_discovery.py)."""
from __future__ import annotations

import lavis_ademvl  # noqa: F401  (registers the model, data, task and runner)
from lavis_ademvl.common.launch import build_runner, finish, parse_args, prepare


def main(argv: list[str] | None = None) -> None:
    args = parse_args("Training", argv)
    cfg, task, datasets, model, job_id = prepare(args)
    build_runner(cfg, task, datasets, model, job_id).train()
    finish()


if __name__ == "__main__":
    main()
