from diffusers_mar.pipelines.pipeline_ar import ARPipeline
from diffusers_mar.pipelines.pipeline_autoregressive import AutoregressivePipeline
from diffusers_mar.pipelines.pipeline_mar import MARPipeline
from diffusers_mar.pipelines.pipeline_mar_inpaint import MARInpaintPipeline
from diffusers_mar.pipelines.pipeline_token_generator import TokenGeneratorPipeline

__all__ = ["ARPipeline", "AutoregressivePipeline", "MARInpaintPipeline", "MARPipeline", "TokenGeneratorPipeline"]
