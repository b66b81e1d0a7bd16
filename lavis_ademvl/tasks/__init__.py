from lavis_ademvl.tasks.captioning import OfflineCaptionTask
from lavis_ademvl.tasks.mmbench import MMBenchTask
from lavis_ademvl.tasks.mme import MMETask
from lavis_ademvl.tasks.scienceqa import ScienceQAMCTask
from lavis_ademvl.tasks.vqa import SubsetVQATask

__all__ = ["MMBenchTask", "MMETask", "OfflineCaptionTask", "ScienceQAMCTask", "SubsetVQATask"]
