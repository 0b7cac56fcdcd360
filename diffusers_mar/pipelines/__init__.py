from diffusers_mar.pipelines.pipeline_mar import MARPipeline
from diffusers_mar.pipelines.pipeline_mar_inpaint import MARInpaintPipeline

__all__ = ["MARInpaintPipeline", "MARPipeline"]
