"""VARInpaintPipeline: FoundationVision/VAR's zero-shot editing (demo_zero_shot_edit.ipynb) on the recorded tiny VAR
and a random tiny one: the per-scale keep masks, which tokens are kept, what is kept in pixels, inputs and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_mar import VARInpaintPipeline, VARPipeline
from diffusers_mar.pipelines.pipeline_var import edit_keep_masks
from tests.testing_utils import make_tiny_var_pipeline, var_fixture_io, var_fixture_pipeline


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fixture_editor() -> VARInpaintPipeline:
    pipe = VARInpaintPipeline.from_pipe(var_fixture_pipeline())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fixture_images() -> torch.Tensor:
    return (var_fixture_io()["vae.images"] + 1) / 2  # (2, 3, 8, 8) in [0, 1]


def _center_mask(size: int = 8) -> np.ndarray:
    """White (regenerate) in the centre quarter: the centre 2x2 of the last scale's 4x4 tokens."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return mask


def test_keep_masks_of_each_scale_are_the_bilinear_downsampling_above_one_half():
    # The centre 2x2 of 4x4 tokens generated: 3x3 keeps all but its centre (the bilinear weights of the corners and
    # edges are at least 5/6 on kept tokens, the centre's 0), 2x2 keeps all (3/4 each), 1x1 is always kept.
    mask = torch.zeros(1, 4, 4)
    mask[:, 1:3, 1:3] = 1
    masks = edit_keep_masks(mask.flatten(1), [1, 2, 3, 4])
    assert [tuple(m.shape) for m in masks] == [(1, 1, p, p) for p in (1, 2, 3, 4)]
    assert masks[0].all() and masks[1].all()
    expected_3 = torch.ones(3, 3, dtype=torch.bool)
    expected_3[1, 1] = False
    assert torch.equal(masks[2][0, 0], expected_3) and torch.equal(masks[3][0, 0], mask[0] == 0)
    # Only the top-left token generated: at 2x2 its cell averages 3/4 kept; the 3x3 corner samples it with weight
    # 25/36, so only 11/36 is kept: generated too.
    corner = torch.zeros(1, 16)
    corner[0, 0] = 1
    masks = edit_keep_masks(corner, [1, 2, 3, 4])
    assert masks[0].all() and masks[1].all()
    for m in masks[2:]:
        assert not m[0, 0, 0, 0] and m.sum() == m.numel() - 1
    # The left half generated: the 3x3 middle column samples half kept, half generated, and 0.5 is not above 0.5.
    left = torch.zeros(1, 4, 4)
    left[:, :, :2] = 1
    expected_3 = torch.tensor([[False, False, True]] * 3)
    assert torch.equal(edit_keep_masks(left.flatten(1), [1, 2, 3, 4])[2][0, 0], expected_3)
    # Everything generated: only the scales of at most 3 tokens are the image's.
    everything = edit_keep_masks(torch.ones(1, 16), [1, 2, 3, 4])
    assert everything[0].all() and not any(m.any() for m in everything[1:])


@pytest.mark.parity
def test_kept_tokens_are_the_image_tokens_at_every_scale_and_only_masked_ones_change():
    pipe = _fixture_editor()
    images = _fixture_images()
    image_tokens = pipe.encode_image(images)
    assert [tuple(t.shape) for t in image_tokens] == [(2, 1), (2, 4), (2, 9), (2, 16)]
    assert all(
        torch.equal(a, b) for a, b in zip(image_tokens, [var_fixture_io()[f"vae.idx_Bl.{k}"] for k in range(4)])
    )
    keep = edit_keep_masks(pipe.prepare_mask(_center_mask()), [1, 2, 3, 4])
    record = []

    def callback(pipeline, scale, timestep, callback_kwargs):
        record.append((callback_kwargs["indices"].clone(), callback_kwargs["latents"].clone()))
        return {}

    latents = pipe(images, _center_mask(), class_labels=[7, 2], guidance_scale=4.0, generator=_seeded(0),
                   output_type="latent", callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["indices", "latents"]).images  # fmt: skip
    changed = 0
    for scale, (indices, _) in enumerate(record):
        kept = keep[scale].flatten(1).expand(2, -1)
        assert torch.equal(indices[kept], image_tokens[scale][kept])
        changed += int((indices[~kept] != image_tokens[scale][~kept]).sum())
    assert changed >= 4  # the masked tokens were sampled (a new class for both images)
    # The latent is the partial sum of the edited tokens, scale by scale.
    sums = pipe.vqvae.partial_sums([indices for indices, _ in record])
    for (_, f_hat), expected in zip(record, sums):
        torch.testing.assert_close(f_hat, expected, rtol=0, atol=1e-6)
    assert torch.equal(latents, record[-1][1])


@pytest.mark.parity
@pytest.mark.parametrize("output_type, more_smooth", [("pil", False), ("pt", True)])
def test_with_nothing_masked_the_output_is_the_vq_reconstruction_of_the_image(output_type, more_smooth):
    # What editing keeps exactly is tokens: with every token kept, the image comes back as the VQ-VAE reconstructs it
    # from its own tokens (not as given: the reconstruction is lossy). With more_smooth the kept codes are the
    # image's codebook entries, not a mix.
    pipe = _fixture_editor()
    images = _fixture_images()
    mask = np.zeros((8, 8), np.uint8)
    output = pipe(images, mask, 3, generator=_seeded(0), output_type=output_type, more_smooth=more_smooth)
    with torch.no_grad():
        reconstruction = (pipe.vqvae(images * 2 - 1).sample + 1) / 2  # (2, 3, 8, 8) in [0, 1]
    if output_type == "pil":
        pixels = np.stack([np.asarray(image) for image in output.images]).astype(int)
        expected = np.round(reconstruction.permute(0, 2, 3, 1).numpy() * 255).astype(int)
        assert np.abs(pixels - expected).max() <= 1  # to 1/255
    else:
        # The same latent; the reconstruction's is channels-last (from the encoder), so the decoder's kernels differ.
        torch.testing.assert_close(output.images, reconstruction, rtol=0, atol=1e-5)
    assert (reconstruction - images).abs().max() > 0.1  # the reconstruction is lossy: the input is not what is kept


def test_outpainting_keeps_the_inside_and_generates_the_border():
    pipe = _fixture_editor()
    border = np.full((8, 8), 255, np.uint8)
    border[2:6, 2:6] = 0  # keep the centre 2x2 tokens of the last scale, generate the ring around them
    record = []
    pipe(_fixture_images()[:1], border, class_labels=5, generator=_seeded(1), output_type="latent",
         callback_on_step_end=lambda p, s, t, kw: record.append(kw["indices"].clone()) or {},
         callback_on_step_end_tensor_inputs=["indices"])  # fmt: skip
    last, image_last = record[-1].view(4, 4), pipe.encode_image(_fixture_images()[:1])[-1].view(4, 4)
    assert torch.equal(last[1:3, 1:3], image_last[1:3, 1:3])
    ring = torch.ones(4, 4, dtype=torch.bool)
    ring[1:3, 1:3] = False
    assert (last[ring] != image_last[ring]).any()


def test_batches_share_an_image_or_mask_and_a_generator_per_image_equals_each_edit_alone():
    base = make_tiny_var_pipeline()
    pipe = VARInpaintPipeline.from_pipe(base)  # no copy of the weights
    pipe.set_progress_bar_config(disable=True)
    assert all(pipe.components[name] is component for name, component in base.components.items())
    image = np.random.default_rng(0).integers(0, 256, (6, 6, 3), np.uint8)
    mask = np.zeros((6, 6), np.uint8)
    mask[3:] = 255
    both = pipe(image, mask, class_labels=[1, 2], num_images_per_label=2, output_type="pt",
                generator=[_seeded(i) for i in range(4)]).images  # fmt: skip
    assert both.shape == (4, 3, 6, 6)
    alone = [pipe(image, mask, class_labels=label, output_type="pt", generator=_seeded(i)).images
             for i, label in enumerate([1, 1, 2, 2])]  # fmt: skip
    torch.testing.assert_close(both, torch.cat(alone), rtol=0, atol=1e-5)
    assert isinstance(pipe, VARPipeline) and pipe.resolution == 6 and pipe.token_size == 2


def test_resize_and_mask_dilation():
    pipe = VARInpaintPipeline.from_pipe(make_tiny_var_pipeline())
    pipe.set_progress_bar_config(disable=True)
    big = np.random.default_rng(1).integers(0, 256, (12, 12, 3), np.uint8)
    mask = np.zeros((12, 12), np.uint8)
    mask[0, 0] = 255
    with pytest.raises(ValueError, match=r"`mask_image` is 12x12 .* makes 6x6 images; resize it, or pass `resize="):
        pipe(big, mask, class_labels=1)
    with pytest.raises(ValueError, match=r"`image` is 12x12 \(HxW\) but this model makes 6x6 images"):
        pipe(big, np.zeros((6, 6), np.uint8), class_labels=1)
    assert pipe(big, mask, class_labels=1, resize=True, output_type="pt").images.shape == (1, 3, 6, 6)
    small = np.zeros((6, 6), np.uint8)
    small[0, 0] = 255
    assert pipe.prepare_mask(small).sum() == 1 and pipe.prepare_mask(small, mask_dilation=1).sum() == 4


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"mask_dilation": -1}, r"`mask_dilation` must be an int >= 0"),
        ({"resize": "yes"}, r"`resize` must be True or False"),
        ({"mask_image": np.zeros((6, 6, 3), np.uint8)}, r"`mask_image` must have 1 channel"),
        ({"image": np.zeros((6, 6), np.uint8)}, r"`image` must have 3 channel"),
        ({"class_labels": [1, 2, 3], "mask_image": [np.zeros((6, 6), np.uint8)] * 2}, r"Batch sizes differ"),
        ({"top_k": 100}, r"`top_k` must be an int in \[0, 32\]"),
        ({"generator": [torch.Generator()] * 2}, r"one generator per image"),
    ],
)
def test_argument_errors(arguments, match):
    pipe = VARInpaintPipeline.from_pipe(make_tiny_var_pipeline())
    inputs = {"image": np.zeros((6, 6, 3), np.uint8), "mask_image": np.zeros((6, 6), np.uint8), "class_labels": 1}
    with pytest.raises(ValueError, match=match):
        pipe(**{**inputs, **arguments})
