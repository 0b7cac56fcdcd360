from diffusers_mar.pipelines.pipeline_ar import ARPipeline
from diffusers_mar.pipelines.pipeline_autoregressive import AutoregressivePipeline
from diffusers_mar.pipelines.pipeline_mar import MARPipeline
from diffusers_mar.pipelines.pipeline_mar_inpaint import MARInpaintPipeline
from diffusers_mar.pipelines.pipeline_token_generator import TokenGeneratorPipeline
from diffusers_mar.pipelines.pipeline_var import VARPipeline
from diffusers_mar.pipelines.pipeline_var_inpaint import VARInpaintPipeline

__all__ = [
    "ARPipeline",
    "AutoregressivePipeline",
    "MARInpaintPipeline",
    "MARPipeline",
    "TokenGeneratorPipeline",
    "VARInpaintPipeline",
    "VARPipeline",
]
