from lavis_ademvl.models.ademvl import AdemVL
from lavis_ademvl.models.fusion import adaptive_cross_attention, multiscale_pool

__all__ = ["AdemVL", "adaptive_cross_attention", "multiscale_pool"]
