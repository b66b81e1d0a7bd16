from lavis_ademvl.processors.ademvl_processors import (
    AdemImageEvalProcessor,
    AdemImageTrainProcessor,
    AdemTextProcessor,
)

__all__ = ["AdemImageEvalProcessor", "AdemImageTrainProcessor", "AdemTextProcessor"]
