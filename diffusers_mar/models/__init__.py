from diffusers_mar.models.diffusion_head_mar import MARDiffusionHead
from diffusers_mar.models.transformer_ar import ARTransformer2DModel
from diffusers_mar.models.transformer_mar import MARTransformer2DModel
from diffusers_mar.models.transformer_var import VARTransformer2DModel
from diffusers_mar.models.vq_model_var import VARVQModel

__all__ = ["ARTransformer2DModel", "MARDiffusionHead", "MARTransformer2DModel", "VARTransformer2DModel", "VARVQModel"]
