from diffusers_mar.pipelines.pipeline_mar import MARPipeline

__all__ = ["MARPipeline"]
