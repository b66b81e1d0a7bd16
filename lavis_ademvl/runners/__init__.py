from lavis_ademvl.runners.runner_ademvl import RunnerAdemVL

__all__ = ["RunnerAdemVL"]
