"""The live frames, built from the tensors of `callback_on_step_end`: known tokens shown, unknown ones grey, the tokens
of the next step outlined; the last frame is the final grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_mar.demo.frames import (
    OUTLINE,
    OUTLINE_WIDTH,
    UNKNOWN_GREY,
    DecodedFrames,
    TokenFrames,
    grid_layout,
    render_canvas,
    to_uint8,
)

SCALE = 4


class Cells:
    """A layout that returns the frames' images instead of a labelled grid."""

    scale = SCALE

    def grid(self, images, upscaled=False):
        return [np.asarray(image) for image in images]


def border(side: int) -> np.ndarray:
    mask = np.zeros((side, side), dtype=bool)
    w = OUTLINE_WIDTH
    mask[:w], mask[-w:], mask[:, :w], mask[:, -w:] = True, True, True, True
    return mask


def cell_states(frame: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(grey, outlined) per token of a frame: interior all grey; border all the outline colour."""
    rows, columns = frame.shape[0] // side, frame.shape[1] // side
    grey, outlined = np.zeros((rows, columns), bool), np.zeros((rows, columns), bool)
    edge = border(side)
    for r in range(rows):
        for c in range(columns):
            cell = frame[r * side : (r + 1) * side, c * side : (c + 1) * side]
            grey[r, c] = (cell[~edge] == UNKNOWN_GREY).all()
            outlined[r, c] = (cell[edge] == OUTLINE).all()
    return grey, outlined


def test_render_canvas_greys_the_unknown_tokens_and_frames_the_outlined_ones():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 100, size=(2, 4, 4, 3), dtype=np.uint8)  # never the grey or the outline colour
    unknown = np.array([[[True, False], [False, False]], [[False, False], [False, True]]])
    outlined = np.array([[[False, True], [False, False]], [[False, False], [False, True]]])
    frames = [np.asarray(frame) for frame in render_canvas(images, unknown, outlined, token_size=2, scale=3)]
    side, edge = 6, border(6)
    for image, frame, grey, framed in zip(images, frames, unknown, outlined):
        assert frame.shape == (12, 12, 3)
        upscaled = np.repeat(np.repeat(image, 3, axis=0), 3, axis=1)
        for r in range(2):
            for c in range(2):
                cell = frame[r * side : (r + 1) * side, c * side : (c + 1) * side]
                source = upscaled[r * side : (r + 1) * side, c * side : (c + 1) * side]
                inside = UNKNOWN_GREY if grey[r, c] else source[~edge]
                assert (cell[~edge] == inside).all()
                assert (
                    cell[edge] == (OUTLINE if framed[r, c] else (UNKNOWN_GREY if grey[r, c] else source[edge]))
                ).all()


def run_with_frames(model, frames, labels=(3, 7), **kwargs):
    """Generate with `frames` fed by the callback; the frames, the masks after each step and the output."""
    pipe, collected, masks = model.pipe, [], []

    def callback(pipe, step, timestep, callback_kwargs):
        masks.append(callback_kwargs["mask"].clone() if "mask" in callback_kwargs else None)
        collected.extend(frames.update(pipe, callback_kwargs))
        return {}

    output = pipe(
        class_labels=list(labels),
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=list(frames.tensor_inputs),
        output_type="np",
        **kwargs,
    ).images
    collected.extend(frames.finish(pipe))
    return collected, masks, output


@pytest.mark.parametrize("family", ["mar", "ar", "latent"])
def test_each_frame_shows_the_canvas_before_a_step_with_that_steps_tokens_outlined(family, request):
    model = request.getfixturevalue(f"{family}_model")
    frames, masks, output = run_with_frames(model, TokenFrames(model.pipe, Cells()))
    grid_size = model.pipe.transformer.grid_size
    side = model.pipe.transformer.config.patch_size * model.pipe.vae_scale_factor * SCALE
    assert len(frames) == len(masks) + 1 == model.pipe.num_timesteps + 1  # one per step, and the last canvas
    unknown = [torch.ones_like(masks[0]).bool(), *(mask.bool() for mask in masks)]  # before each step, after the last
    final = to_uint8(output)
    for k, frame in enumerate(frames):
        for b in range(len(output)):
            cells = frame[b]
            grey, outlined = cell_states(cells, side)
            before = unknown[k][b].reshape(grid_size, grid_size).numpy()
            made = (
                (before & ~unknown[k + 1][b].reshape(grid_size, grid_size).numpy()) if k < len(masks) else 0 * before
            )
            assert (grey == before).all(), (k, b)
            assert (outlined == made.astype(bool)).all(), (k, b)
            if family != "latent":  # a known token shows its final pixels (a VAE decodes latents jointly)
                known = np.kron(~before, np.ones((side, side), dtype=bool))
                upscaled = np.repeat(np.repeat(final[b], SCALE, axis=0), SCALE, axis=1)
                assert (cells[known] == upscaled[known]).all(), (k, b)
    assert not unknown[-1].any()
    for b in range(len(output)):  # the last frame is the output itself
        assert (frames[-1][b] == np.repeat(np.repeat(final[b], SCALE, axis=0), SCALE, axis=1)).all()


def test_the_last_frame_of_the_grid_layout_is_the_final_grid(mar_model):
    pipe = mar_model.pipe
    layout = grid_layout(pipe, ["3 three", "7 seven"], 2)
    frames, _, _ = run_with_frames(mar_model, TokenFrames(pipe, layout), num_images_per_label=2)
    images = pipe(
        class_labels=[3, 7], num_images_per_label=2, generator=torch.Generator().manual_seed(0), output_type="pil"
    ).images
    assert layout.scale == 8  # 8x8 images in cells of 64 pixels, as `diffusers-mar generate`
    assert np.array_equal(np.asarray(frames[-1]), np.asarray(layout.grid(images)))
    assert np.asarray(frames[0]).shape == np.asarray(frames[-1]).shape
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(frames[-1]))


def test_decoded_frames_decode_the_running_latents(latent_model):
    pipe = latent_model.pipe
    frames, _, output = run_with_frames(latent_model, DecodedFrames(pipe, Cells()))
    assert len(frames) == pipe.num_timesteps  # one per step, none at the end
    assert all(frame.shape == (16, 16, 3) for frame in frames[-1])  # Cells: not upscaled
    final = to_uint8(output)  # the last step's running latents are the output's
    assert all(np.array_equal(frame, image) for frame, image in zip(frames[-1], final))
    assert not np.array_equal(frames[0][0], frames[-1][0])


def test_var_frames_decode_the_running_latent_of_each_scale(var_model):
    pipe = var_model.pipe
    frames, _, output = run_with_frames(var_model, DecodedFrames(pipe, Cells()))
    assert len(frames) == pipe.num_timesteps == len(pipe.transformer.config.patch_nums)  # one per scale
    final = to_uint8(output)  # the last scale's running latent is the output's
    assert all(np.array_equal(frame, image) for frame, image in zip(frames[-1], final))
    assert not np.array_equal(frames[0][0], frames[-1][0])  # the coarse scale is another picture
