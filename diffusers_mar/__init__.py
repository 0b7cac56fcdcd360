"""diffusers-mar: MAR (masked autoregressive image generation with a per-token diffusion loss), causal AR and VAR
(next-scale prediction) for diffusers."""

import os

import diffusers
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin  # noqa: F401  (looked up by from_pretrained)

from diffusers_mar.configs import AR_PRESETS, MAR_PRESETS, VAR_PRESETS, get_preset_config
from diffusers_mar.models.diffusion_head_mar import MARDiffusionHead
from diffusers_mar.models.transformer_ar import ARTransformer2DModel
from diffusers_mar.models.transformer_mar import MARTransformer2DModel
from diffusers_mar.models.transformer_var import VARTransformer2DModel
from diffusers_mar.models.vq_model_var import VARVQModel
from diffusers_mar.pipelines.orders import orders_from_original
from diffusers_mar.pipelines.pipeline_ar import ARPipeline
from diffusers_mar.pipelines.pipeline_mar import MARPipeline, mask_by_order, mask_schedule
from diffusers_mar.pipelines.pipeline_mar_inpaint import MARInpaintPipeline
from diffusers_mar.pipelines.pipeline_var import VARPipeline
from diffusers_mar.pipelines.pipeline_var_inpaint import VARInpaintPipeline
from diffusers_mar.schedulers.scheduling_ddpm_mar import MARDDPMScheduler

__version__ = "0.1.0"

# The small class-conditional digits model shipped as package data: `MARPipeline.from_pretrained(DEFAULT_MODEL)`
# works offline. It is the default `--model` of the `diffusers-mar` command line.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")

# `save_pretrained` writes ["<class.__module__>", "<class name>"] into model_index.json and `from_pretrained` looks
# the class and its diffusers base (ModelMixin, SchedulerMixin, DiffusionPipeline) up as attributes of that module.
# Public classes therefore live at `diffusers_mar.<ClassName>`, so folders name ["diffusers_mar", "<ClassName>"].
for _cls in (
    MARTransformer2DModel,
    ARTransformer2DModel,
    VARTransformer2DModel,
    VARVQModel,
    MARDiffusionHead,
    MARDDPMScheduler,
    MARPipeline,
    MARInpaintPipeline,
    ARPipeline,
    VARPipeline,
    VARInpaintPipeline,
):
    _cls.__module__ = __name__
# `DiffusionPipeline.from_pretrained` resolves the `_class_name` of model_index.json in the diffusers namespace.
for _cls in (MARPipeline, MARInpaintPipeline, ARPipeline, VARPipeline, VARInpaintPipeline):
    setattr(diffusers, _cls.__name__, _cls)
del _cls

__all__ = [
    "AR_PRESETS",
    "ARPipeline",
    "ARTransformer2DModel",
    "DEFAULT_MODEL",
    "MAR_PRESETS",
    "MARDDPMScheduler",
    "MARDiffusionHead",
    "MARInpaintPipeline",
    "MARPipeline",
    "MARTransformer2DModel",
    "VARInpaintPipeline",
    "VARPipeline",
    "VAR_PRESETS",
    "VARTransformer2DModel",
    "VARVQModel",
    "get_preset_config",
    "mask_by_order",
    "mask_schedule",
    "orders_from_original",
]
