"""Issue 17: generation orders, outer and diffusion step schedules, and the transformer caches of `MARPipeline`."""

import math
import sys
from unittest.mock import patch

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from diffusers_mar import MARDDPMScheduler, MARPipeline
from diffusers_mar.pipelines.head_scheduler import PRESET_SCHEDULERS
from diffusers_mar.pipelines.orders import (
    ORDER_NAMES,
    check_outer_schedule,
    make_orders,
    max_outer_steps,
    skeleton_schedule,
)
from diffusers_mar.pipelines.sampling_settings import SAMPLING_PRESETS, apply_sampling_preset, diffusion_step_schedule
from tests.testing_utils import make_tiny_pipeline

FAST = {"num_inference_steps": 4, "num_diffusion_steps": 5}
LABELS = [1, 2, 3]


def _generators():
    return [torch.Generator().manual_seed(seed) for seed in range(len(LABELS))]


def _latents(pipe, **kwargs):
    arguments = {**FAST, "generator": _generators(), "output_type": "latent", **kwargs}
    return pipe(LABELS, **arguments).images


def _record(pipe, **kwargs):
    """The `mask` and `condition` of every outer step, and the canvas before each step."""
    steps = []

    def keep(pipe, step, timestep, callback_kwargs):
        steps.append({name: value.clone() for name, value in callback_kwargs.items()})
        return {}

    _latents(
        pipe, callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["tokens", "mask", "condition"], **kwargs
    )
    return steps


@pytest.mark.parametrize(
    "options",
    [
        {"order": "random"},
        {"outer_schedule": "cosine"},
        {"guidance_cache_interval": 1, "feature_cache_interval": 1},
        {"guidance_cache_interval": None, "feature_cache_interval": None},
        {"num_diffusion_steps": [5, 5, 5, 5]},
        {"num_diffusion_steps": "linear-5-5"},
        {"guidance_cache_interval": 3, "guidance_scale": 1.0},  # no guidance: nothing to cache
    ],
)
def test_every_option_switched_off_is_exactly_the_default(options):
    pipe = make_tiny_pipeline()
    options = {"guidance_scale": 2.0, **options}
    plain = _latents(pipe, guidance_scale=options["guidance_scale"])
    torch.testing.assert_close(_latents(pipe, **options), plain, rtol=0, atol=0)


def test_random_order_draws_what_the_pipeline_always_drew():
    generator = torch.Generator().manual_seed(3)
    expected = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(make_orders("random", 1, 4, generator)[0], expected)


@pytest.mark.parametrize("grid_size", [3, 4, 8])
@pytest.mark.parametrize("order", ORDER_NAMES)
def test_each_order_is_a_permutation_per_image(order, grid_size):
    orders = make_orders(order, 3, grid_size, [torch.Generator().manual_seed(s) for s in range(3)])
    num_tokens = grid_size**2
    assert orders.shape == (3, num_tokens)
    assert torch.equal(orders.sort(dim=1).values, torch.arange(num_tokens).expand(3, -1))
    if order == "raster":  # token 0 first, row by row
        assert torch.equal(orders, torch.arange(num_tokens).expand(3, -1))
    if order == "checkerboard":  # the skeleton, (row + col) even, is the first half of the order
        skeleton = orders[:, : math.ceil(num_tokens / 2)]
        assert (((skeleton // grid_size) + (skeleton % grid_size)) % 2 == 0).all()
        assert not torch.equal(orders[0], orders[1])  # drawn per image


@pytest.mark.parametrize("outer_schedule, num_inference_steps", [("cosine", 4), ("cosine", 16), ("skeleton", 5)])
@pytest.mark.parametrize("order", ORDER_NAMES)
def test_every_token_is_predicted_exactly_once(order, outer_schedule, num_inference_steps):
    pipe = make_tiny_pipeline()
    steps = _record(pipe, order=order, outer_schedule=outer_schedule, num_inference_steps=num_inference_steps)
    assert len(steps) == num_inference_steps
    masks = torch.stack([torch.ones(3, 16)] + [step["mask"] for step in steps])  # (1 + K, B, L)
    predicted = masks[:-1] - masks[1:]  # 1 where a token becomes known at that step
    assert ((predicted == 0) | (predicted == 1)).all()
    assert torch.equal(predicted.sum(dim=0), torch.ones(3, 16))
    assert (predicted.sum(dim=2) >= 1).all()  # every step predicts something
    if order == "raster":  # row by row: a known token never follows an unknown one in raster order
        assert all(torch.equal(m, m.sort(dim=1).values) for m in masks)


def test_checkerboard_with_the_skeleton_schedule_fills_the_skeleton_then_the_rest_at_once():
    pipe = make_tiny_pipeline()
    steps = _record(pipe, order="checkerboard", outer_schedule="skeleton", num_inference_steps=5)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    skeleton = ((rows + cols) % 2 == 0).flatten()
    assert torch.equal(steps[-2]["mask"], (~skeleton).float().expand(3, -1))  # known: the skeleton only
    assert steps[-1]["condition"].shape[1] == 8  # the last step predicts the other 8 tokens at once
    # By hand: 8 + floor(8 cos(pi/2 k/4)) unknown after skeleton step k = 1..4 (7, 5, 3, 0), then none.
    assert skeleton_schedule(16, 5) == [15, 13, 11, 8, 0]
    assert skeleton_schedule(16, 1) == [0] and skeleton_schedule(16, 2) == [8, 0]


def test_max_outer_steps_per_outer_schedule_and_tokens_per_step():
    assert [max_outer_steps("cosine", n) for n in (1, 4, 16)] == [1, 4, 16]
    assert [max_outer_steps("skeleton", n) for n in (1, 2, 4, 5, 16)] == [1, 2, 3, 4, 9]  # ceil(n / 2) + 1, <= n
    assert max_outer_steps("cosine", 16, tokens_per_step=4) == 4
    assert max_outer_steps("skeleton", 256, tokens_per_step=4) == 64
    assert max_outer_steps("cosine", 3, tokens_per_step=4) == 1  # at least one step
    check_outer_schedule("skeleton", 1, 1)
    with pytest.raises(ValueError, match=r"num_inference_steps.*\[1, 1\].*skeleton"):
        check_outer_schedule("skeleton", 1, 2)  # a second step would predict no token


def test_an_order_tensor_equals_the_orders_argument():
    pipe = make_tiny_pipeline()
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in (5, 6, 7)])
    torch.testing.assert_close(_latents(pipe, order=orders), _latents(pipe, orders=orders), rtol=0, atol=0)


def test_diffusion_step_schedules():
    assert diffusion_step_schedule("linear-50-5", 10) == [50, 45, 40, 35, 30, 25, 20, 15, 10, 5]
    assert diffusion_step_schedule("linear-50-5", 1) == [50]
    assert diffusion_step_schedule(7, 3) == [7, 7, 7]
    pipe = make_tiny_pipeline()
    calls = []
    forward = pipe.diffusion_head.forward_with_modulation
    pipe.diffusion_head.forward_with_modulation = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    _latents(pipe, num_diffusion_steps=[3, 5, 2, 4])
    assert len(calls) == 3 + 5 + 2 + 4


def _transformer_batches(pipe, **kwargs):
    batches = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    _latents(pipe, **kwargs)
    hook.remove()
    return batches


def test_caches_skip_transformer_passes():
    pipe = make_tiny_pipeline()
    options = {"guidance_scale": 2.0, "num_inference_steps": 8}
    assert _transformer_batches(pipe, **options) == [6] * 8
    # Guidance cache: both halves at steps 0, 3, 6, the conditional half only at the others.
    assert _transformer_batches(pipe, guidance_cache_interval=3, **options) == [6, 3, 3, 6, 3, 3, 6, 3]
    # Feature cache: a pass at steps 0, 3, 6 only.
    assert _transformer_batches(pipe, feature_cache_interval=3, **options) == [6, 6, 6]
    cached = _latents(pipe, feature_cache_interval=3, **options)
    assert cached.isfinite().all() and not torch.equal(cached, _latents(pipe, **options))


def _full_conditions(pipe, tokens, mask, labels):
    return pipe.transformer(tokens, mask, torch.tensor(labels), return_dict=False)[0]  # (B, L, D)


def test_guidance_cache_reuses_the_difference_of_the_last_refresh():
    pipe = make_tiny_pipeline()
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)])
    steps = _record(pipe, orders=orders, guidance_scale=2.0, guidance_cache_interval=2)
    unconditional = [10] * 3
    with torch.no_grad():
        # Step 0 refreshes the difference on the empty canvas (every token unknown).
        empty, all_unknown = torch.zeros(3, 16, 4), torch.ones(3, 16)
        difference = _full_conditions(pipe, empty, all_unknown, LABELS) - _full_conditions(
            pipe, empty, all_unknown, unconditional
        )
        # Step 1 runs the conditional half on the canvas after step 0 and subtracts that difference.
        tokens, mask = steps[0]["tokens"], steps[0]["mask"]
        conditional = _full_conditions(pipe, tokens, mask, LABELS)
    predicted = steps[1]["condition"].shape[1]
    predict = ((mask - steps[1]["mask"]) == 1).nonzero()[:, 1].view(3, predicted)  # raster order, as the pipeline
    index = predict.unsqueeze(-1).expand(-1, -1, difference.shape[-1])
    expected = torch.cat([conditional.gather(1, index), (conditional - difference).gather(1, index)])
    torch.testing.assert_close(steps[1]["condition"], expected, rtol=1e-5, atol=1e-5)


def test_feature_cache_reuses_the_conditions_of_the_last_refresh():
    pipe = make_tiny_pipeline()
    steps = _record(pipe, guidance_scale=1.0, feature_cache_interval=4)
    with torch.no_grad():
        full = _full_conditions(pipe, torch.zeros(3, 16, 4), torch.ones(3, 16), LABELS)  # step 0: empty canvas
    for step in range(1, 4):
        predict = ((steps[step - 1]["mask"] - steps[step]["mask"]) == 1).nonzero()[:, 1].view(3, -1)
        expected = full.gather(1, predict.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        torch.testing.assert_close(steps[step]["condition"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"order": "spiral"}, r"order.*\('random', 'raster', 'checkerboard'\)"),
        ({"order": torch.zeros(3, 16, dtype=torch.long)}, "order.*permutations"),
        ({"order": torch.arange(16).expand(2, -1)}, r"order.*\(3, 16\)"),
        ({"order": torch.arange(16.0).expand(3, -1)}, "order.*integer"),
        ({"order": "raster", "orders": torch.arange(16).expand(3, -1)}, "either `order` or `orders`"),
        ({"outer_schedule": "uneven"}, r"outer_schedule.*\('cosine', 'skeleton'\)"),
        ({"outer_schedule": "skeleton", "num_inference_steps": 10}, r"num_inference_steps.*\[1, 9\].*skeleton"),
        ({"num_diffusion_steps": [5, 5]}, r"num_diffusion_steps.*one entry per outer step \(4\); got 2"),
        ({"num_diffusion_steps": [5, 0, 5, 5]}, r"num_diffusion_steps.*ints in \[1, 1000\]"),
        ({"num_diffusion_steps": "cosine-50-5"}, "num_diffusion_steps.*unknown schedule.*linear-<first>-<last>"),
        ({"num_diffusion_steps": "linear-50-0"}, r"num_diffusion_steps.*\[1, 1000\]"),
        ({"num_diffusion_steps": 2.5}, "num_diffusion_steps.*int"),
        ({"guidance_cache_interval": 0}, "guidance_cache_interval.*int >= 1"),
        ({"feature_cache_interval": -2}, "feature_cache_interval.*int >= 1"),
        ({"feature_cache_interval": 1.5}, "feature_cache_interval.*int >= 1"),
        ({"guidance_cache_interval": True}, "guidance_cache_interval.*int >= 1"),
    ],
)
def test_bad_fast_sampling_arguments_raise_clear_errors(kwargs, match):
    pipe = make_tiny_pipeline()
    with pytest.raises(ValueError, match=match):
        _latents(pipe, **kwargs)


def _preset_call(pipe, preset: str, num_tokens: int, **given):
    """The call that `sampling_preset=preset` stands for, written out: its arguments (outer steps clipped to the
    tokens) with the given ones winning, and its head scheduler built from the pipeline's config."""
    spec = SAMPLING_PRESETS[preset]
    arguments = {**spec["arguments"], **given}
    if "num_inference_steps" not in given:
        arguments["num_inference_steps"] = min(arguments["num_inference_steps"], num_tokens // spec["tokens_per_step"])
    if spec["head_scheduler"] is not None:
        scheduler_class, overrides = PRESET_SCHEDULERS[spec["head_scheduler"]]
        pipe = MARPipeline(
            **{**pipe.components, "scheduler": scheduler_class.from_config(pipe.scheduler.config, **overrides)}
        )
    return pipe(LABELS, generator=_generators(), output_type="latent", **arguments).images


@pytest.mark.parametrize("preset", sorted(SAMPLING_PRESETS))
def test_a_preset_is_its_arguments_and_given_arguments_win(preset):
    pipe = make_tiny_pipeline()  # 16 tokens
    got = pipe(LABELS, generator=_generators(), output_type="latent", sampling_preset=preset).images
    torch.testing.assert_close(got, _preset_call(pipe, preset, 16), rtol=0, atol=0)
    given = _latents(pipe, sampling_preset=preset, num_inference_steps=4, order="raster")  # and 5 diffusion steps
    mixed = _preset_call(pipe, preset, 16, num_inference_steps=4, order="raster", num_diffusion_steps=5)
    torch.testing.assert_close(given, mixed, rtol=0, atol=0)


def test_the_fast_preset_samples_with_dpm_solver_and_the_exact_default_does_not():
    pipe = make_tiny_pipeline()
    assert SAMPLING_PRESETS["fast"]["head_scheduler"] == "dpm-solver++"
    seen = []
    step = DPMSolverMultistepScheduler.step
    with patch.object(
        DPMSolverMultistepScheduler, "step", lambda self, *a, **k: seen.append(1) or step(self, *a, **k)
    ):
        pipe(LABELS, generator=_generators(), output_type="latent", sampling_preset="fast")
        assert len(seen) == 4 * 8  # 16 tokens // 4 outer steps, 8 head steps each
        seen.clear()
        _latents(pipe)
        assert seen == []
    assert isinstance(pipe.scheduler, MARDDPMScheduler)  # the preset's scheduler is the call's only


def test_the_fast_preset_keeps_a_scheduler_the_user_set_and_refuses_another_temperature():
    pipe = make_tiny_pipeline()
    with pytest.raises(ValueError, match=r"sampling_preset='fast'.*temperature=1.0.*fast-ddpm"):
        _latents(pipe, sampling_preset="fast", temperature=0.9)
    _latents(pipe, sampling_preset="fast-ddpm", temperature=0.9)  # DDPM takes a temperature
    ddim = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    pipe = MARPipeline(**{**pipe.components, "scheduler": ddim})
    got = _latents(pipe, sampling_preset="fast", num_inference_steps=None, num_diffusion_steps=None)
    torch.testing.assert_close(got, _latents(pipe, num_inference_steps=4, num_diffusion_steps=8), rtol=0, atol=0)


def test_the_preset_clips_its_outer_steps_to_the_model():
    arguments = {key: None for key in ("num_inference_steps", "num_diffusion_steps", "guidance_scale")}
    arguments.update(guidance_schedule=None, temperature=None, order="random", outer_schedule="cosine")
    arguments.update(guidance_cache_interval=None, feature_cache_interval=None)
    assert apply_sampling_preset("fast", arguments, num_tokens=16)["num_inference_steps"] == 4  # 4 tokens per step
    assert apply_sampling_preset("fast", arguments, num_tokens=256)["num_inference_steps"] == 8
    assert apply_sampling_preset("fast", arguments, num_tokens=3)["num_inference_steps"] == 1
    assert apply_sampling_preset("fast-ddpm", arguments, num_tokens=4)["num_inference_steps"] == 4
    skeleton = {**arguments, "outer_schedule": "skeleton"}
    assert apply_sampling_preset("fast-ddpm", skeleton, num_tokens=4)["num_inference_steps"] == 3  # ceil(4 / 2) + 1
    assert apply_sampling_preset(None, arguments, num_tokens=4) == arguments
    with pytest.raises(ValueError, match=r"sampling_preset.*\('fast', 'fast-ddpm'\)"):
        apply_sampling_preset("fastest", arguments, num_tokens=4)


def test_a_preset_visits_each_module_once():
    # Issue 24: followed from `MARPipeline.__call__` (every function with a `preset` or `sampling_preset` parameter,
    # and the returns to their callers), the preset returns to a module it has left at most twice.
    pipe = make_tiny_pipeline()
    modules, stack = [], []

    def visit(module):
        if not modules or modules[-1] != module:
            modules.append(module)

    def profile(frame, event, arg):
        names = frame.f_code.co_varnames[: frame.f_code.co_argcount]
        if not (
            {"preset", "sampling_preset"} & set(names) and frame.f_globals["__name__"].startswith("diffusers_mar")
        ):
            return
        if event == "call":
            stack.append(frame.f_globals["__name__"].rsplit(".", 1)[-1])
            visit(stack[-1])
        elif event == "return":
            stack.pop()
            if stack:
                visit(stack[-1])

    sys.setprofile(profile)
    try:
        pipe([1], sampling_preset="fast", generator=torch.manual_seed(0), output_type="latent")
    finally:
        sys.setprofile(None)
    expected = ["pipeline_mar", "sampling_settings", "pipeline_mar", "pipeline_autoregressive", "head_scheduler"]
    # One return to a module left on the way down (pipeline_mar after the preset's arguments are filled in), then the
    # unwinding back to `__call__` (the count was 9 returns in 15 stays over 6 modules).
    assert modules == [*expected, "pipeline_autoregressive", "pipeline_mar"]
