"""`benchmarks/fast_orders_digits.py`'s candidate grammar (the measurements themselves are never run in tests)."""

import pytest

from benchmarks.fast_orders_digits import parse_candidate


def test_a_candidate_maps_to_pipeline_arguments_and_a_head_scheduler():
    setting = parse_candidate(
        "steps=8,diffusion=linear-25-5,order=checkerboard,outer=skeleton,gcache=2,scheduler=dpm-leading"
    )
    assert setting["arguments"] == {
        "num_inference_steps": 8,
        "num_diffusion_steps": "linear-25-5",
        "order": "checkerboard",
        "outer_schedule": "skeleton",
        "guidance_cache_interval": 2,
    }
    assert setting["scheduler"] == ("dpm", "leading")
    assert parse_candidate("diffusion=15,preset=fast")["arguments"] == {
        "num_diffusion_steps": 15,
        "sampling_preset": "fast",
    }


@pytest.mark.parametrize("text", ["steps", "speed=2", "scheduler=euler"])
def test_bad_candidates_are_refused(text):
    with pytest.raises(ValueError, match="KEY=VALUE|scheduler must be one of"):
        parse_candidate(text)
