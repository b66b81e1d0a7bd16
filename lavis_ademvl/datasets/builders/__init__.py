from lavis_ademvl.datasets.builders.instruct_builder import InstructionBuilder
from lavis_ademvl.datasets.builders.mmbench_builder import MMBenchBuilder
from lavis_ademvl.datasets.builders.mme_builder import MMEBuilder
from lavis_ademvl.datasets.builders.scienceqa_builder import ScienceQAMCBuilder

__all__ = ["InstructionBuilder", "MMBenchBuilder", "MMEBuilder", "ScienceQAMCBuilder"]
