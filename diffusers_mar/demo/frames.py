"""The live image of a generation, built from the tensors that `callback_on_step_end` receives after each outer step.

A token-wise family (MAR, causal AR) makes some tokens at each step: `TokenFrames` shows the known tokens, greys out
the unknown ones and outlines the tokens the next step makes. Which tokens a step makes is known only once it has run
(the callback gets the canvas and the mask, not the order), so the frame of the canvas *before* step k is drawn right
after step k: the live image is one step behind the pipeline, and exact. A family whose every step refines the whole
image (VAR's next-scale steps, whose `"latents"` is the running latent) uses `DecodedFrames`: each frame decodes it.

Frames have the layout of the final grid (`GridLayout`: one row per label, `make_grid` of `diffusers-mar generate`),
so the live image turns into the grid that the PNG download holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusers_mar.image_grid import auto_scale, make_grid

UNKNOWN_GREY = (160, 160, 160)  # the footprint of a token not made yet
OUTLINE = (255, 120, 0)  # the frame around a token that the next step makes
OUTLINE_WIDTH = 2  # pixels of the displayed (upscaled) image


@dataclass(frozen=True)
class GridLayout:
    """Rows of `per_row` images, one row per label text, upscaled `scale` times: the grid of `diffusers-mar generate`."""

    row_labels: tuple[str, ...]
    per_row: int
    scale: int

    def grid(self, images: list[Image.Image], upscaled: bool = False) -> Image.Image:
        """The grid of `images` (row after row); `upscaled`: the images are already `scale` times larger."""
        rows = [images[r * self.per_row : (r + 1) * self.per_row] for r in range(len(self.row_labels))]
        return make_grid(rows, list(self.row_labels), scale=1 if upscaled else self.scale)


def image_size(pipe) -> int:
    """Side in pixels of the images a pipeline makes (a token grid through its VAE, or VAR's VQ-VAE)."""
    if getattr(pipe, "vqvae", None) is not None:
        return pipe.vqvae.config.sample_size
    return pipe.transformer.config.sample_size * pipe.vae_scale_factor


def grid_layout(pipe, row_labels: list[str], per_row: int) -> GridLayout:
    """The layout of `diffusers-mar generate --output`: cells of at least 64 pixels (`auto_scale`)."""
    return GridLayout(tuple(row_labels), per_row, auto_scale(image_size(pipe)))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] -> uint8 with three channels (B, H, W, 3), as `VaeImageProcessor.numpy_to_pil` rounds."""
    images = (images * 255).round().clip(0, 255).astype(np.uint8)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images[..., :3]


def render_canvas(
    images: np.ndarray, unknown: np.ndarray, outlined: np.ndarray, token_size: int, scale: int
) -> list[Image.Image]:
    """Each image (B, H, W, 3) uint8 upscaled `scale` times (NEAREST), the `token_size`-pixel footprints of the
    `unknown` tokens (B, h, w) grey, those of the `outlined` tokens (B, h, w) framed."""
    side = token_size * scale
    frames = []
    for image, grey, framed in zip(images, unknown, outlined):
        image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)  # (H * s, W * s, 3)
        cells = np.kron(grey, np.ones((side, side), dtype=bool))  # (H * s, W * s)
        image[cells] = UNKNOWN_GREY
        frame = Image.fromarray(image)
        draw = ImageDraw.Draw(frame)
        for row, column in zip(*np.nonzero(framed)):
            box = (column * side, row * side, (column + 1) * side - 1, (row + 1) * side - 1)
            draw.rectangle(box, outline=OUTLINE, width=OUTLINE_WIDTH)
        frames.append(frame)
    return frames


class TokenFrames:
    """Live frames of a token-wise family: known tokens, unknown ones grey, the next step's tokens outlined.

    `update` takes a callback's `"tokens"` `(B, L, C)` and `"mask"` `(B, L)` (1 = unknown after the step) and returns
    the frame of the canvas before that step, with the tokens the step made outlined; `finish` returns the last
    canvas. `initial` is the canvas and mask before the first step (default: nothing known).
    """

    tensor_inputs = ("tokens", "mask")

    def __init__(self, pipe, layout: GridLayout, initial: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.layout = layout
        self.token_size = pipe.transformer.config.patch_size * pipe.vae_scale_factor
        self.grid_size = pipe.transformer.grid_size
        self.previous = initial

    @torch.no_grad()
    def render(self, pipe, tokens: torch.Tensor, unknown: torch.Tensor, outlined: torch.Tensor) -> Image.Image:
        latents = pipe.transformer.unpatchify(tokens.float())  # (B, C, H, W)
        images = pipe.decode_output(latents, output_type="np", return_dict=False)[0]  # (B, H, W, C) in [0, 1]
        shape = (-1, self.grid_size, self.grid_size)
        frames = render_canvas(
            to_uint8(images),
            unknown.reshape(shape).cpu().numpy(),
            outlined.reshape(shape).cpu().numpy(),
            self.token_size,
            self.layout.scale,
        )
        return self.layout.grid(frames, upscaled=True)

    def update(self, pipe, callback_kwargs: dict) -> list[Image.Image]:
        tokens, unknown = callback_kwargs["tokens"], callback_kwargs["mask"] > 0.5  # (B, L, C), (B, L)
        if self.previous is None:
            self.previous = (torch.zeros_like(tokens), torch.ones_like(unknown))
        previous_tokens, previous_unknown = self.previous
        made = previous_unknown & ~unknown  # the tokens this step made
        frame = self.render(pipe, previous_tokens, previous_unknown, made)
        self.previous = (tokens.clone(), unknown.clone())
        return [frame]

    def finish(self, pipe) -> list[Image.Image]:
        if self.previous is None:
            return []
        tokens, unknown = self.previous
        return [self.render(pipe, tokens, unknown, torch.zeros_like(unknown))]


class DecodedFrames:
    """Live frames of a family whose every step refines the whole image: each frame decodes the callback's
    `"latents"`, the running latent `(B, C, H, W)` (VAR's next-scale steps)."""

    tensor_inputs = ("latents",)

    def __init__(self, pipe, layout: GridLayout, initial: object = None):
        self.layout = layout

    @torch.no_grad()
    def update(self, pipe, callback_kwargs: dict) -> list[Image.Image]:
        images = pipe.decode_output(callback_kwargs["latents"].float(), output_type="np", return_dict=False)[0]
        return [self.layout.grid([Image.fromarray(image) for image in to_uint8(images)])]

    def finish(self, pipe) -> list[Image.Image]:
        return []
