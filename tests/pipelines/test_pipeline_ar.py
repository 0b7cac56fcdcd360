"""ARPipeline: the KV cache equals no cache, orders, guidance schedule, folders and input errors (issue 15).

The generic diffusers pipeline checks (outputs, save/load, variants, offloading, callbacks, several images per label)
run on it, pixel and latent space, in test_pipeline_common_mar.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils.testing_utils import CaptureLogger

from diffusers_mar import DEFAULT_MODEL, ARPipeline, MARPipeline
from diffusers_mar.pipelines import pipeline_ar
from diffusers_mar.pipelines.schedules import guidance_schedule_values, mask_schedule
from tests.testing_utils import make_tiny_pipeline

FAST = {"num_diffusion_steps": 5}


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def _pipe() -> ARPipeline:
    return make_tiny_pipeline(ar=True, clip_sample=True)


def _run(pipe: ARPipeline, **kwargs) -> torch.Tensor:
    call = {"class_labels": [1, 2], "generator": _generators(0, 1), "output_type": "latent", **FAST, **kwargs}
    return pipe(**call).images


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("order", ["raster", "random"])
def test_cache_equals_no_cache_in_images_and_in_every_step_condition(order, guidance_scale):
    pipe = _pipe()
    runs = {}
    for use_cache in (True, False):
        conditions = []

        def record(pipeline, step, timestep, callback_kwargs, conditions=conditions):
            conditions.append(callback_kwargs["condition"].clone())
            return {}

        latents = _run(
            pipe,
            order=order,
            guidance_scale=guidance_scale,
            use_cache=use_cache,
            callback_on_step_end=record,
            callback_on_step_end_tensor_inputs=["condition"],
        )
        runs[use_cache] = latents, torch.stack(conditions)
    (cached, cached_conditions), (plain, plain_conditions) = runs[True], runs[False]
    assert cached_conditions.shape == (16, 4 if guidance_scale != 1.0 else 2, 1, 16)
    # float32 rounding only: the cached step attends over the filled rows, the full pass over all with a causal mask.
    # The rounding compounds through the tokens each step samples (guidance 3 scales it by 3): on an AVX2 CPU the
    # conditions differed by up to 3.4e-5 (1e-5 held on AVX-512), hence 1e-4; a wrong cache is off by ~1e-1.
    assert cached_conditions.abs().amax() > 0.1
    torch.testing.assert_close(cached_conditions, plain_conditions, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-4)
    assert cached.abs().amin() > 0  # every token made


def test_orders_raster_random_and_given():
    pipe = _pipe()
    first_made = {}

    def record_first(pipeline, step, timestep, callback_kwargs):
        if step == 0:
            first_made["mask"] = callback_kwargs["mask"].clone()  # 1 = still unknown
        return {}

    kwargs = {"callback_on_step_end": record_first, "callback_on_step_end_tensor_inputs": ["mask"]}
    raster = _run(pipe, **kwargs)
    assert torch.equal(first_made["mask"].argmin(dim=1), torch.tensor([0, 0]))
    # "random": one torch.randperm per image from its generator, drawn before any noise.
    random = _run(pipe, order="random", **kwargs)
    expected_first = [int(torch.randperm(16, generator=g)[0]) for g in _generators(0, 1)]
    assert first_made["mask"].argmin(dim=1).tolist() == expected_first
    assert (random - raster).abs().mean() > 0.05
    # A given order: one (L,) permutation for every image, or one per image; raster given equals "raster".
    assert torch.equal(_run(pipe, order=torch.arange(16)), raster)
    flipped = torch.arange(16).flip(0)
    assert torch.equal(_run(pipe, order=flipped), _run(pipe, order=flipped.expand(2, -1), **kwargs))
    assert torch.equal(first_made["mask"].argmin(dim=1), torch.tensor([15, 15]))


def test_random_order_with_one_generator_per_image_equals_each_image_alone():
    pipe = _pipe()
    both = _run(pipe, order="random", guidance_scale=2.0)
    alone = pipe([2], generator=_generators(1), order="random", guidance_scale=2.0, output_type="latent", **FAST)
    torch.testing.assert_close(both[1:], alone.images, rtol=1e-5, atol=1e-5)  # batch size: float32 rounding only
    assert (both[0] - both[1]).abs().mean() > 0.05


def test_linear_guidance_schedule_is_mars_at_one_token_per_step():
    # Step j: 1 + (scale - 1) * (j + 1) / L, the last step as the one before (MAR clamps its last mask length to 1).
    values = guidance_schedule_values(3.0, mask_schedule(16, 16), 16, "linear")
    expected = [1 + 2.0 * (j + 1) / 16 for j in range(15)] + [1 + 2.0 * 15 / 16]
    assert values == pytest.approx(expected, abs=1e-6)


def test_folder_names_the_ar_classes_and_sampling_defaults_round_trip(tmp_path):
    pipe = _pipe()
    pipe.set_sampling_defaults(num_diffusion_steps=5, guidance_scale=2.0)
    assert pipe.sampling_defaults == {
        "num_diffusion_steps": 5,
        "guidance_scale": 2.0,
        "guidance_schedule": "linear",
        "temperature": 1.0,
    }
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ARPipeline"
    assert index["transformer"] == ["diffusers_mar", "ARTransformer2DModel"]
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is ARPipeline and loaded.sampling_defaults == pipe.sampling_defaults
    images = [p([3], generator=_generators(0), output_type="pt").images for p in (pipe, loaded)]
    assert torch.equal(images[0], images[1])
    # The MAR class refuses the AR folder (diffusers would build it from the class it is called on) and says how.
    with pytest.raises(
        ValueError, match="must be a MARTransformer2DModel.*DiffusionPipeline.from_pretrained"
    ) as error:
        MARPipeline.from_pretrained(tmp_path)
    assert "the folder holds a ARPipeline. Load it with `ARPipeline.from_pretrained(folder)`" in str(error.value)


def test_ar_pipeline_on_a_mar_folder_says_it_holds_a_mar_pipeline():
    # Issue 23: the shipped MAR folder's `sampling` has `num_inference_steps`; the transformer's class speaks first.
    with pytest.raises(ValueError) as error:
        ARPipeline.from_pretrained(DEFAULT_MODEL)
    message = str(error.value)
    assert "must be a ARTransformer2DModel, got a MARTransformer2DModel: the folder holds a MARPipeline" in message
    assert "`MARPipeline.from_pretrained(folder)` or `DiffusionPipeline.from_pretrained(folder)`" in message
    assert "num_inference_steps" not in message
    assert type(DiffusionPipeline.from_pretrained(DEFAULT_MODEL)) is MARPipeline  # as the message says


def test_input_errors_name_the_argument():
    pipe = _pipe()
    with pytest.raises(ValueError, match="`order` must be one of"):
        _run(pipe, order="zigzag")
    with pytest.raises(ValueError, match="`order` must be one of"):
        _run(pipe, order=torch.rand(16))
    with pytest.raises(ValueError, match="permutation"):
        _run(pipe, order=torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="permutation"):
        _run(pipe, order=torch.arange(16).expand(3, -1))  # 3 orders for 2 images
    with pytest.raises(ValueError, match="use_cache"):
        _run(pipe, use_cache="yes")
    with pytest.raises(ValueError, match="noise"):
        _run(pipe, noise=[torch.zeros(6, 2, 1, 4)])
    with pytest.raises(ValueError, match="class_labels"):
        _run(pipe, class_labels=[11, 2])
    with pytest.raises(ValueError, match="num_diffusion_steps"):
        _run(pipe, num_diffusion_steps=0)
    with pytest.raises(TypeError, match="num_inference_steps"):
        _run(pipe, num_inference_steps=4)  # always one token per step
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe.set_sampling_defaults(num_inference_steps=4)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ARPipeline(**pipe.components, sampling={"num_inference_steps": 4})


def test_training_order_round_trips_and_random_sampling_of_a_raster_trained_model_warns(tmp_path):
    pipe = ARPipeline(**_pipe().components, training_order="anneal")
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["training_order"] == "anneal"
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.training_order == "anneal"
    assert _pipe().config.training_order is None  # unknown: a folder written before the key loads the same
    with pytest.raises(ValueError, match=r"`training_order` must be one of \(None, 'raster', 'random', 'anneal'\)"):
        ARPipeline(**_pipe().components, training_order="zigzag")

    warned = {}
    for training_order in ("anneal", "raster", "random", None):
        pipe = ARPipeline(**_pipe().components, training_order=training_order)
        pipe.set_progress_bar_config(disable=True)
        for order in ("random", "raster"):
            with CaptureLogger(pipeline_ar.logger) as captured:
                _run(pipe, order=order, num_diffusion_steps=2)
            warned[training_order, order] = captured.out
    assert warned["raster", "random"].startswith(
        'Sampling with order="random" a model trained with `--order raster` (`training_order` in its model_index.json): '
        'it generates noise in random order. Use order="raster".'
    )
    assert "`--order anneal`" in warned["anneal", "random"]
    assert "RAR annealing ends in raster order" in warned["anneal", "random"]
    assert {key for key, out in warned.items() if out} == {("raster", "random"), ("anneal", "random")}
