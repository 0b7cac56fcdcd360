from diffusers_mar.models.diffusion_head_mar import MARDiffusionHead
from diffusers_mar.models.transformer_mar import MARTransformer2DModel

__all__ = ["MARDiffusionHead", "MARTransformer2DModel"]
