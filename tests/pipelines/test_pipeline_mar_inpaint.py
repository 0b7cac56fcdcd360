import logging

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderTiny, ConsistencyDecoderVAE, DiffusionPipeline

from diffusers_mar import (
    MARDDPMScheduler,
    MARDiffusionHead,
    MARInpaintPipeline,
    MARPipeline,
    MARTransformer2DModel,
    mask_schedule,
)
from diffusers_mar.pipelines.image_inputs import token_mask_from_pixels
from tests.testing_utils import (
    TINY_PIXEL_HEAD_CONFIG,
    TINY_PIXEL_TRANSFORMER_CONFIG,
    make_tiny_pipeline,
    make_tiny_vae,
    perturb_,
    relative_error,
)

FAST = {"num_inference_steps": 4, "num_diffusion_steps": 5}
# The tiny pixel model: 8x8 grey images, 2x2-pixel tokens on a 4x4 grid.


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


def _inpaint_pipeline(**kwargs) -> MARInpaintPipeline:
    pipe = MARInpaintPipeline.from_pipe(make_tiny_pipeline(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _random_image(seed: int, size: int = 8, mode: str = "L") -> PIL.Image.Image:
    shape = (size, size) if mode == "L" else (size, size, 3)
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _half_mask(rows: slice = slice(4, None), size: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[rows] = 255
    return mask


def test_kept_pixels_and_tokens_are_bit_identical_in_pixel_space():
    pipe = _inpaint_pipeline()
    image = _random_image(0)
    mask = _half_mask()
    mask[0, 0] = 255  # and the top-left token
    out = pipe(image, mask, 3, generator=_seeded(0), **FAST).images[0]
    kept = np.ones((8, 8), dtype=bool)
    kept[4:] = False
    kept[:2, :2] = False
    assert out.mode == "L" and out.size == (8, 8)
    np.testing.assert_array_equal(np.array(out)[kept], np.array(image)[kept])
    assert (np.array(out)[~kept] != np.array(image)[~kept]).mean() > 0.9

    latents = pipe(image, mask, 3, generator=_seeded(0), output_type="latent", **FAST).images
    original = torch.from_numpy(np.array(image)).float()[None, None] / 255 * 2 - 1
    assert torch.equal(latents[0, 0][torch.from_numpy(kept)], original[0, 0][torch.from_numpy(kept)])


def test_kept_latents_are_unchanged_with_a_vae():
    vae = make_tiny_vae()
    pipe = _inpaint_pipeline(vae=vae)
    assert (pipe.resolution, pipe.token_size) == (16, 4)
    image = _random_image(1, size=16, mode="RGB")
    mask = _half_mask(slice(8, None), size=16)
    latents = pipe(image, mask, 5, generator=_seeded(0), output_type="latent", **FAST).images
    encoded = pipe.encode_image(image)
    with torch.no_grad():
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255 * 2 - 1
        posterior_mean = vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(encoded, posterior_mean * 0.5, rtol=0, atol=1e-6)  # times scaling_factor
    assert torch.equal(latents[..., :4, :], encoded[..., :4, :])  # top half of the 8x8 latent grid: kept
    assert (latents[..., 4:, :] - encoded[..., 4:, :]).abs().min() > 0
    images = pipe(image, mask, 5, generator=_seeded(0), output_type="pt", **FAST).images
    assert images.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("generator", ["one", "list"])
def test_all_unknown_mask_equals_mar_pipeline(generator):
    pipe = _inpaint_pipeline()
    plain = MARPipeline.from_pipe(pipe)
    white = np.full((8, 8), 255, dtype=np.uint8)
    images = [_random_image(2), _random_image(3)]
    if generator == "list":
        inpainted = pipe(images, white, [1, 2], generator=[_seeded(4), _seeded(5)], output_type="np", **FAST)
        expected = plain([1, 2], generator=[_seeded(4), _seeded(5)], output_type="np", **FAST)
    else:
        inpainted = pipe(images, white, [1, 2], generator=_seeded(4), output_type="np", **FAST)
        expected = plain([1, 2], generator=_seeded(4), output_type="np", **FAST)
    np.testing.assert_array_equal(inpainted.images, expected.images)


def test_mixed_unknown_counts_equal_single_image_calls():
    pipe = _inpaint_pipeline()
    images = [_random_image(seed) for seed in (10, 11, 12)]
    masks = [_half_mask(), _half_mask(slice(6, None)), _half_mask(slice(0, 4))]  # 8, 4 and 8 unknown tokens
    labels, seeds = [7, 8, 9], [20, 21, 22]
    calls = []
    pipe.transformer.register_forward_hook(lambda module, args, out: calls.append(args[2].tolist()))
    batch = pipe(images, masks, labels, generator=[_seeded(s) for s in seeds], output_type="latent", **FAST).images
    # Two groups (8 unknown tokens: items 0 and 2; then 4: item 1), each with its own labels and CFG half.
    assert calls[0] == [7, 9, 10, 10] and calls[-1] == [8, 10]
    singles = torch.cat(
        [
            pipe(image, mask, label, generator=_seeded(seed), output_type="latent", **FAST).images
            for image, mask, label, seed in zip(images, masks, labels, seeds)
        ]
    )
    # Batched matmuls may round differently; random weights blow tokens up to ~1e4, so compare relatively.
    assert relative_error(batch, singles) < 1e-6
    kept = torch.from_numpy(np.stack(masks) == 0)
    assert torch.equal(batch[:, 0][kept], singles[:, 0][kept])


@pytest.mark.parametrize(
    "options",
    [
        {"order": "raster", "outer_schedule": "skeleton", "guidance_cache_interval": 2, "feature_cache_interval": 2},
        {"sampling_preset": "fast", "num_inference_steps": None, "num_diffusion_steps": None},
        {"sampling_preset": "fast-ddpm", "num_inference_steps": None, "num_diffusion_steps": None},
        {"order": "tensor"},
    ],
)
def test_fast_sampling_options_equal_mar_pipeline_with_latents_and_mask(options):
    pipe = _inpaint_pipeline()
    plain = MARPipeline.from_pipe(pipe)
    images, labels, seeds = [_random_image(13), _random_image(14)], [3, 4], [30, 31]
    masks = [_half_mask(), _half_mask(slice(0, 4))]  # 8 unknown tokens each: one group
    if options.get("order") == "tensor":
        options = {"order": torch.stack([torch.randperm(16, generator=_seeded(s)) for s in seeds])}
    arguments = {**FAST, "guidance_scale": 2.0, **options}
    got = pipe(images, masks, labels, generator=[_seeded(s) for s in seeds], output_type="latent", **arguments)
    mask = torch.stack([token_mask_from_pixels(torch.from_numpy(m / 255.0)[None, None], 2)[0] for m in masks])
    latents = torch.cat([pipe.encode_image(image) for image in images])
    if arguments.get("sampling_preset") and arguments["num_inference_steps"] is None:  # clipped to the 8 unknown
        arguments["num_inference_steps"] = 2 if arguments["sampling_preset"] == "fast" else 8
    if arguments.get("outer_schedule") == "skeleton":
        arguments["num_inference_steps"] = min(arguments["num_inference_steps"], 5)  # ceil(8 / 2) + 1
    expected = plain(labels, generator=[_seeded(s) for s in seeds], output_type="latent", latents=latents,
                     mask=mask, **arguments)  # fmt: skip
    torch.testing.assert_close(got.images, expected.images, rtol=0, atol=0)


def test_a_single_masked_pixel_makes_exactly_its_token_unknown():
    pipe = _inpaint_pipeline()
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[5, 2] = 255  # pixel row 5, column 2 -> token row 2, column 1 -> token 9 of the 4x4 grid
    token_mask = pipe.prepare_mask(mask)
    assert token_mask.tolist() == [[1.0 if i == 9 else 0.0 for i in range(16)]]
    image = _random_image(6)
    out = np.array(pipe(image, mask, 0, generator=_seeded(0), **FAST).images[0])
    changed = out != np.array(image)
    assert changed[4:6, 2:4].any() and not changed.sum() - changed[4:6, 2:4].sum()


def test_mask_dilation_grows_the_unknown_region_in_tokens():
    pipe = _inpaint_pipeline()
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[0, 0] = 255
    grid = pipe.prepare_mask(mask, mask_dilation=1).reshape(4, 4)
    assert grid.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    pixel_mask = torch.zeros(1, 1, 8, 8)
    pixel_mask[0, 0, 4, 4] = 1
    grid = token_mask_from_pixels(pixel_mask, token_size=2, mask_dilation=1).reshape(4, 4)
    assert grid[1:, 1:].sum() == 9 and grid.sum() == 9


def test_mask_values_below_one_half_keep_and_formats_agree():
    pipe = _inpaint_pipeline()
    mask = np.zeros((8, 8), dtype=np.float32)
    mask[:2] = 0.49  # keep
    mask[6:] = 0.5  # regenerate
    expected = [0.0] * 12 + [1.0] * 4
    assert pipe.prepare_mask(mask).tolist() == [expected]
    assert pipe.prepare_mask(torch.from_numpy(mask)[None]).tolist() == [expected]
    assert pipe.prepare_mask(PIL.Image.fromarray((mask * 255).round().astype(np.uint8))).tolist() == [expected]
    assert pipe.prepare_mask(torch.from_numpy(mask >= 0.5)).tolist() == [expected]


def test_no_unknown_token_returns_the_input_with_a_warning(caplog):
    pipe = _inpaint_pipeline()
    images = [_random_image(7), _random_image(8)]
    masks = [np.zeros((8, 8), dtype=np.uint8), _half_mask()]
    with caplog.at_level(logging.WARNING, logger="diffusers_mar"):
        out = pipe(images, masks, [1, 2], generator=_seeded(0), **FAST).images
    assert "`mask_image` marks no token to regenerate for batch items [0]" in caplog.text
    np.testing.assert_array_equal(np.array(out[0]), np.array(images[0]))
    assert (np.array(out[1])[4:] != np.array(images[1])[4:]).any()


def test_num_inference_steps_are_capped_at_the_unknown_token_count():
    pipe = _inpaint_pipeline()
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:2, :4] = 255  # 2 tokens
    calls = []
    pipe.transformer.register_forward_hook(lambda module, args, out: calls.append(1))
    pipe(_random_image(9), mask, 1, num_inference_steps=64, num_diffusion_steps=2, guidance_scale=1.0)
    assert len(calls) == 2


def test_shared_image_mask_and_label_broadcast_over_the_batch():
    pipe = _inpaint_pipeline()
    image = _random_image(13)
    out = pipe(image, _half_mask(), [4, 5, 6], generator=[_seeded(s) for s in (1, 2, 3)], **FAST).images
    assert len(out) == 3
    for single in out:
        np.testing.assert_array_equal(np.array(single)[:4], np.array(image)[:4])
    assert not np.array_equal(np.array(out[0]), np.array(out[1]))


def test_resize_flag_resizes_image_and_mask():
    pipe = _inpaint_pipeline()
    image = _random_image(14, size=16)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[15, 15] = 255  # one pixel of the big mask overlaps the last token only
    assert pipe.prepare_mask(mask, resize=True).tolist() == [[0.0] * 15 + [1.0]]
    out = pipe(image, mask, 2, generator=_seeded(0), resize=True, **FAST).images[0]
    assert out.size == (8, 8)
    small = pipe.encode_image(image, resize=True)
    assert small.shape == (1, 1, 8, 8) and small.min() >= -1 and small.max() <= 1


def test_from_pipe_shares_components_and_from_pretrained_loads(tmp_path):
    plain = make_tiny_pipeline()
    plain.register_to_config(id2label={0: "zero", 1: "one"})
    inpaint = MARInpaintPipeline.from_pipe(plain)
    inpaint.set_progress_bar_config(disable=True)
    assert inpaint.transformer is plain.transformer and inpaint.diffusion_head is plain.diffusion_head
    assert inpaint.get_label_ids(["one"]) == [1]
    expected = inpaint(_random_image(15), _half_mask(), 1, generator=_seeded(3), output_type="np", **FAST).images

    plain.save_pretrained(tmp_path / "plain")
    inpaint.save_pretrained(tmp_path / "inpaint")
    for loaded in (
        MARInpaintPipeline.from_pretrained(tmp_path / "plain"),
        DiffusionPipeline.from_pretrained(tmp_path / "inpaint"),
    ):
        assert isinstance(loaded, MARInpaintPipeline)
        loaded.set_progress_bar_config(disable=True)
        again = loaded(_random_image(15), _half_mask(), 1, generator=_seeded(3), output_type="np", **FAST).images
        np.testing.assert_array_equal(again, expected)
        assert loaded.get_label_ids(["zero"]) == [0]
    assert type(MARPipeline.from_pipe(inpaint)) is MARPipeline


def test_from_pipe_and_casts_do_not_warn_about_an_empty_float32_module_list():
    # Issue 23: diffusers 0.42's ModelMixin.to(dtype) warned "modules that should be kept in float32: []" for every
    # model on every cast, so from_pipe (which casts) printed it once per model.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        plain = make_tiny_pipeline()
        MARInpaintPipeline.from_pipe(plain)
        plain.to(dtype=torch.bfloat16)
        assert plain.transformer.dtype == torch.bfloat16 and plain.diffusion_head.dtype == torch.bfloat16
        assert [r.getMessage() for r in records if "float32" in r.getMessage()] == []
        plain.transformer._keep_in_fp32_modules = ["proj_in"]  # a real list is still reported
        plain.transformer.to(torch.float32)
        assert any("kept in float32: ['proj_in']" in r.getMessage() for r in records)
    finally:
        diffusers_logger.removeHandler(handler)


def test_outpainting_shrink_puts_the_image_inside_the_border():
    pipe = _inpaint_pipeline()
    images = torch.rand(2, 1, 8, 8)
    canvas, mask = pipe.prepare_outpainting(images, border=1)
    assert canvas.shape == (2, 1, 8, 8) and mask.shape == (2, 1, 8, 8)
    assert mask[:, :, 2:6, 2:6].sum() == 0 and mask.sum() == 2 * (64 - 16)
    expected = torch.nn.functional.interpolate(images, size=(4, 4), mode="bicubic", antialias=True).clamp(0, 1)
    assert torch.equal(canvas[:, :, 2:6, 2:6], expected)
    assert pipe.prepare_mask(mask).reshape(2, 4, 4)[:, 1:3, 1:3].sum() == 0
    out = pipe(canvas, mask, [1, 2], generator=_seeded(0), output_type="pt", **FAST).images
    torch.testing.assert_close(out[:, :, 2:6, 2:6], expected, rtol=0, atol=1e-6)


def test_outpainting_shift_pans_the_image_at_its_scale():
    pipe = _inpaint_pipeline()
    image = _random_image(16)
    canvas, mask = pipe.prepare_outpainting(image, border=(0, 1, 0, 0), mode="shift")  # 1 new token column right
    pixels = torch.from_numpy(np.array(image)).float() / 255
    assert torch.equal(canvas[0, 0, :, :6], pixels[:, 2:])
    assert mask[0, 0, :, :6].sum() == 0 and mask[0, 0, :, 6:].sum() == 16
    canvas, mask = pipe.prepare_outpainting(image, border=(1, 0, 0, 2), mode="shift")  # down 1, right 2 tokens
    assert torch.equal(canvas[0, 0, 2:, 4:], pixels[:6, :4])
    out = pipe(canvas, mask, 3, generator=_seeded(0), **FAST).images[0]
    np.testing.assert_array_equal(np.array(out)[2:, 4:], np.array(image)[:6, :4])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"border": 2}, "border.*at least one token"),
        ({"border": (0, 0, 4, 0)}, "border.*at least one token"),
        ({"border": (1, 1)}, r"border.*\(top, right, bottom, left\)"),
        ({"border": -1}, "border.*>= 0"),
        ({"mode": "zoom"}, r"mode.*\('shrink', 'shift'\)"),
        ({"mode": "shift", "image": np.zeros((16, 16), np.uint8)}, "image.*16x16.*8x8.*resize=True"),
    ],
)
def test_bad_outpainting_inputs_raise(kwargs, match):
    pipe = _inpaint_pipeline()
    arguments = {"image": _random_image(0), **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe.prepare_outpainting(**arguments)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image": _random_image(0, size=16)}, r"`image` is 16x16 \(HxW\).*8x8.*resize=True"),
        ({"mask_image": np.zeros((8, 6), np.uint8)}, r"`mask_image` is 8x6 \(HxW\).*resize=True"),
        ({"image": [_random_image(0), _random_image(1)], "class_labels": [1, 2, 3]}, "Batch sizes differ.*`image`"),
        ({"mask_image": [_half_mask()] * 3, "class_labels": [1, 2]}, "Batch sizes differ.*`mask_image` has 3"),
        ({"generator": [_seeded(0)] * 3}, "generator.*3 generators for 2 images"),
        ({"image": np.zeros((8, 8, 3), np.uint8)}, "`image` must have 1 channel"),
        ({"image": torch.full((1, 8, 8), 2.0)}, r"`image` float values must be in \[0, 1\]"),
        ({"image": np.zeros((8, 8), np.int64)}, "`image` must hold uint8"),
        ({"image": "digit.png"}, "`image` must be a PIL image"),
        ({"image": []}, "`image` is empty"),
        ({"image": [np.zeros((8, 8), np.uint8), np.zeros((6, 6), np.uint8)]}, "All images of `image`"),
        ({"mask_image": np.zeros((8, 8, 3), np.uint8)}, "`mask_image` must have 1 channel"),
        ({"mask_dilation": -1}, "mask_dilation.*>= 0"),
        ({"resize": "yes"}, "resize.*True or False"),
        ({"num_inference_steps": 0}, "num_inference_steps.*>= 1"),
        ({"class_labels": [11, 1]}, r"class_labels.*\[0, 10\]"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    pipe = _inpaint_pipeline()
    arguments = {"image": _random_image(0), "mask_image": _half_mask(), "class_labels": [1, 2], **FAST, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**arguments)


def _tiny_autoencoder_tiny():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoencoderTiny(
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            latent_channels=1,
            num_encoder_blocks=(1, 1),
            num_decoder_blocks=(1, 1),
        ).eval()


def _tiny_consistency_decoder_vae():
    # Its decoder takes the image and the upsampled latents; the latent statistics it ships fix 4 latent channels.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ConsistencyDecoderVAE(
            latent_channels=4,
            encoder_block_out_channels=(8, 8),
            encoder_down_block_types=("DownEncoderBlock2D",) * 2,
            encoder_layers_per_block=1,
            encoder_norm_num_groups=4,
            decoder_block_out_channels=(8, 16),
            decoder_down_block_types=("ResnetDownsampleBlock2D",) * 2,
            decoder_up_block_types=("ResnetUpsampleBlock2D",) * 2,
            decoder_layers_per_block=1,
            decoder_norm_num_groups=4,
        ).eval()


def _latent_inpaint_pipeline(vae, latent_channels: int) -> MARInpaintPipeline:
    """A tiny latent-space pipeline on a VAE's 8x8 latent grid (16x16 RGB images), 2x2-latent tokens."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformer = perturb_(
            MARTransformer2DModel(**{**TINY_PIXEL_TRANSFORMER_CONFIG, "in_channels": latent_channels})
        )
        head_config = {**TINY_PIXEL_HEAD_CONFIG, "in_channels": 4 * latent_channels}
        head = perturb_(MARDiffusionHead(**head_config), 1)
    pipe = MARInpaintPipeline(transformer.eval(), head.eval(), MARDDPMScheduler(), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "make_vae, latent_channels",
    [(_tiny_autoencoder_tiny, 1), (_tiny_consistency_decoder_vae, 4)],
    ids=["AutoencoderTiny", "ConsistencyDecoderVAE"],
)
def test_other_vae_classes_encode_and_inpaint(make_vae, latent_channels):
    vae = make_vae()
    pipe = _latent_inpaint_pipeline(vae, latent_channels)
    assert (pipe.vae_scale_factor, pipe.resolution, pipe.token_size, pipe.image_channels) == (2, 16, 4, 3)
    image = _random_image(1, size=16, mode="RGB")
    mask = _half_mask(slice(8, None), size=16)
    encoded = pipe.encode_image(image)
    with torch.no_grad():
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255 * 2 - 1
        output = vae.encode(pixels)
        expected = output.latents if isinstance(vae, AutoencoderTiny) else output.latent_dist.mean  # the mode
    torch.testing.assert_close(encoded, expected * vae.config.scaling_factor, rtol=0, atol=1e-6)
    latents = pipe(image, mask, 5, generator=_seeded(0), output_type="latent", **FAST).images
    assert latents.shape == (1, latent_channels, 8, 8)
    assert torch.equal(latents[..., :4, :], encoded[..., :4, :])  # the kept top half of the latent grid
    assert (latents[..., 4:, :] - encoded[..., 4:, :]).abs().min() > 0
    images = pipe(image, mask, 5, generator=_seeded(0), output_type="np", **FAST).images
    again = pipe(image, mask, 5, generator=_seeded(0), output_type="np", **FAST).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(images, again)  # a sampling decoder draws from `generator` too


def test_a_vae_that_does_not_fit_the_transformer_is_named():
    pipe = _latent_inpaint_pipeline(_tiny_autoencoder_tiny(), latent_channels=2)
    with pytest.raises(ValueError, match=r"AutoencoderTiny encodes .* \(1, 8, 8\) latents but the transformer takes"):
        pipe.encode_image(_random_image(0, size=16, mode="RGB"))


def test_num_images_per_label_equals_repeated_inputs():
    pipe = _inpaint_pipeline()
    images, masks = [_random_image(30), _random_image(31)], [_half_mask(), _half_mask(slice(6, None))]
    seeds = [_seeded(s) for s in range(4)]
    out = pipe(images, masks, [3, 4], num_images_per_label=2, generator=seeds, output_type="latent", **FAST).images
    repeated = pipe(
        [images[0], images[0], images[1], images[1]],
        [masks[0], masks[0], masks[1], masks[1]],
        [3, 3, 4, 4],
        generator=[_seeded(s) for s in range(4)],
        output_type="latent",
        **FAST,
    ).images
    assert out.shape == (4, 1, 8, 8)
    torch.testing.assert_close(out, repeated, rtol=0, atol=0)
    assert (out[0] - out[1]).abs().max() > 1e-3  # two different edits of the same input
    with pytest.raises(ValueError, match="list of 2 generators for 4 images.*num_images_per_label"):
        pipe(images, masks, [3, 4], num_images_per_label=2, generator=seeds[:2], **FAST)
    with pytest.raises(ValueError, match="num_images_per_label.*>= 1"):
        pipe(images, masks, [3, 4], num_images_per_label=0, **FAST)


def test_callbacks_see_each_group_and_can_change_and_stop_it():
    pipe = _inpaint_pipeline()
    images = [_random_image(40), _random_image(41)]
    masks = [_half_mask(), _half_mask(slice(6, None))]  # 8 and 4 unknown tokens: two groups
    seen = []

    def watch(pipe, step, timestep, callback_kwargs):
        seen.append((step, timestep, tuple(callback_kwargs["tokens"].shape), int(callback_kwargs["mask"].sum())))
        return {}

    pipe(images, masks, [1, 2], generator=_seeded(0), callback_on_step_end=watch,
         callback_on_step_end_tensor_inputs=["tokens", "mask"], **FAST)  # fmt: skip
    # Group of 8 unknown tokens (4 steps), then of 4 (4 steps); `timestep` and the mask: tokens still unknown.
    expected = [(step, 0 if step == 3 else mask_schedule(count, 4)[step]) for count in (8, 4) for step in range(4)]
    assert [s[:2] for s in seen] == expected
    assert all(shape == (1, 16, 4) for _, _, shape, _ in seen)
    assert [s[3] for s in seen] == [timestep for _, timestep in expected]

    def zero_canvas(pipe, step, timestep, callback_kwargs):
        return {"tokens": torch.zeros_like(callback_kwargs["tokens"])} if timestep == 0 else {}

    zeroed = pipe(images, masks, [1, 2], generator=_seeded(0), callback_on_step_end=zero_canvas,
                  output_type="latent", **FAST).images  # fmt: skip
    assert torch.equal(zeroed, torch.zeros_like(zeroed))  # the canvas returned at the last step is the output

    def stop(pipe, step, timestep, callback_kwargs):
        pipe._interrupt = True
        return {}

    encoded = pipe.encode_image(images)
    stopped = pipe(images, masks, [1, 2], generator=_seeded(0), callback_on_step_end=stop, output_type="latent",
                   **FAST).images  # fmt: skip
    # One step of the first group ran; the second group never ran and keeps the image.
    assert torch.equal(stopped[1], encoded[1])
    assert (stopped[0] != encoded[0]).any() and torch.equal(stopped[0, 0, :4], encoded[0, 0, :4])
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(images, masks, [1, 2], callback_on_step_end=watch, callback_on_step_end_tensor_inputs=["image"], **FAST)
