from lavis_ademvl.tasks.scienceqa import ScienceQAMCTask

__all__ = ["ScienceQAMCTask"]
