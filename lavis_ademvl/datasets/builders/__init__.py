from lavis_ademvl.datasets.builders.scienceqa_builder import ScienceQAMCBuilder

__all__ = ["ScienceQAMCBuilder"]
