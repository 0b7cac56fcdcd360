"""What a person types or uploads, checked before anything runs: class labels and sampling settings through the command
line's own checks (`parse_class_labels`, `sampling_settings`), so that a generation equals its printed command;
uploaded images (type, size, pixel count) and the mask drawn on them.

Every refusal is a `CLIError` whose message the interface shows (`user_message`), never a traceback.
"""

from __future__ import annotations

import argparse
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from diffusers_mar.cli.errors import CLIError
from diffusers_mar.cli.model import call_settings, parse_class_labels, sampling_settings
from diffusers_mar.pipelines.sampling_settings import check_sampling_settings

MAX_IMAGES = 64  # per generation: one pipeline call, as the command line's default --batch-size
MAX_SEED = 2**63 - 1 - MAX_IMAGES  # torch.Generator.manual_seed takes 64-bit seeds; image i uses seed + i
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
MAX_UPLOAD_PIXELS = 4096 * 4096  # decoded size of an upload, checked before decoding it
# The command line's options, as the interface names them in messages.
FIELD_NAMES = {
    "--class-labels": "class labels",
    "--num-inference-steps": "num_inference_steps",
    "--num-diffusion-steps": "num_diffusion_steps",
    "--guidance-scale": "guidance_scale",
    "--temperature": "temperature",
    "--sampling-preset": "sampling preset",
    "--order": "order",
    "--model": "model",
}


def user_message(error: Exception) -> str:
    """The message the interface shows for a refused input: a `CLIError` names the field, not the option."""
    if isinstance(error, CLIError) and error.argument:
        return f"{FIELD_NAMES.get(error.argument, error.argument)}: {error.args[0]}"
    return str(error)


@dataclass(frozen=True)
class GenerationRequest:
    """A checked generation: class ids, images per label, seed, the command line's options that were given
    (`options`, flag name without dashes -> value) and the pipeline call's arguments they resolve to (`call`)."""

    labels: tuple[int, ...]
    num_images_per_label: int
    seed: int
    options: dict
    call: dict
    settings_text: str

    @property
    def num_images(self) -> int:
        return len(self.labels) * self.num_images_per_label


def _whole_number(value: object, name: str, low: int, high: int) -> int:
    if value is None or (isinstance(value, float) and not value.is_integer()) or isinstance(value, bool):
        raise CLIError(f"{name} must be a whole number in [{low}, {high}]; got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise CLIError(f"{name} must be a whole number in [{low}, {high}]; got {value}")
    return value


def parse_labels(pipe: DiffusionPipeline, text: str) -> list[int]:
    """Class ids or `id2label` names separated by spaces or commas (quote a name with spaces), as `--class-labels`."""
    try:
        tokens = shlex.split((text or "").replace(",", " "))
    except ValueError as error:
        raise CLIError(f"cannot read {text!r}: {error}", "--class-labels") from None
    if not tokens:
        raise CLIError("give at least one class id or name", "--class-labels")
    return parse_class_labels(pipe, tokens)


def generation_request(
    pipe: DiffusionPipeline,
    labels_text: str,
    num_images_per_label: object,
    seed: object,
    settings: dict,
    sampling_preset: str | None = None,
    order: str | None = None,
) -> GenerationRequest:
    """Check a generation as `diffusers-mar generate` checks it. `settings`: the sampling settings given (None or
    missing: the model's recommended value, or the preset's)."""
    labels = parse_labels(pipe, labels_text)
    per_label = _whole_number(num_images_per_label, "images per label", 1, MAX_IMAGES)
    if len(labels) * per_label > MAX_IMAGES:
        raise CLIError(
            f"{len(labels)} labels x {per_label} images per label = {len(labels) * per_label} images; the demo makes "
            f"at most {MAX_IMAGES} per run"
        )
    seed = _whole_number(seed, "seed", 0, MAX_SEED)
    given = {key: value for key, value in settings.items() if key in pipe.sampling_keys and value is not None}
    for key in ("num_inference_steps", "num_diffusion_steps"):  # a number field gives 16.0: the CLI checks ints
        if isinstance(given.get(key), float) and given[key].is_integer():
            given[key] = int(given[key])
    for key in ("guidance_scale", "temperature"):  # and 1 for 1.0: the CLI parses floats
        if isinstance(given.get(key), int) and not isinstance(given[key], bool):
            given[key] = float(given[key])
    options = {**given, "sampling_preset": sampling_preset or None, "order": order or None}
    args = argparse.Namespace(**{key: options.get(key) for key in (*pipe.sampling_keys, "sampling_preset", "order")})
    resolved, _ = sampling_settings(args, pipe)
    check_sampling_settings(resolved, keys=pipe.sampling_keys)
    call, text = call_settings(args, pipe, resolved)
    options = {key: value for key, value in options.items() if value is not None}
    return GenerationRequest(tuple(labels), per_label, seed, options, call, text)


def check_upload(path: str | Path) -> None:
    """Refuse an upload that is not a readable image of an allowed format and pixel count, before decoding it."""
    try:
        with PIL.Image.open(path) as image:
            image_format, size = image.format, image.size
            if image_format not in UPLOAD_FORMATS:
                raise CLIError(f"the upload is a {image_format} image; give one of {', '.join(UPLOAD_FORMATS)}")
            if size[0] * size[1] > MAX_UPLOAD_PIXELS:
                raise CLIError(
                    f"the upload is {size[0]}x{size[1]} pixels; the demo takes at most {MAX_UPLOAD_PIXELS:,} pixels"
                )
            image.load()
    except CLIError:
        raise
    except (OSError, ValueError, PIL.Image.DecompressionBombError, SyntaxError):
        raise CLIError("the upload is not a readable image (PNG, JPEG, WebP, BMP or GIF)") from None


def flatten(image: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    """`image` in `mode` ("L" or "RGB"), transparent parts on white."""
    if "A" in image.getbands() or "transparency" in image.info:
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert(mode)


def fit_to_model(
    image: PIL.Image.Image, mask: np.ndarray, resolution: int, mode: str, resize: bool
) -> tuple[PIL.Image.Image, np.ndarray]:
    """An image and its drawn mask (H, W) at the model's size: as they are, or shrunk by a whole factor (the
    interface shows images upscaled: boxes of pixels averaged, a box masked when any pixel of it is). Another size
    is an error unless `resize` (then bicubic for the image; a pixel masked when it overlaps a masked one)."""
    width, height = image.size
    factor = width // resolution
    if width == height and factor >= 1 and width == factor * resolution:
        if factor > 1:
            image = image.resize((resolution, resolution), PIL.Image.Resampling.BOX)
            mask = mask.reshape(resolution, factor, resolution, factor).any(axis=(1, 3))
        return flatten(image, mode), mask
    if not resize:
        side = resolution * math.ceil(256 / resolution)
        raise CLIError(
            f"the image is {width}x{height} pixels but this model makes {resolution}x{resolution} images: give an "
            f"image of that size or a whole multiple of it (such as {side}x{side}), or tick 'resize'"
        )
    image = image.resize((resolution, resolution), PIL.Image.Resampling.BICUBIC)
    pooled = F.adaptive_max_pool2d(torch.from_numpy(mask).float()[None, None], (resolution, resolution))
    return flatten(image, mode), pooled[0, 0].numpy() > 0


def drawn_mask(layers: list[PIL.Image.Image], size: tuple[int, int]) -> np.ndarray:
    """The pixels painted on any layer of the editor (alpha > 0), as a (H, W) bool array of the image's size."""
    mask = np.zeros((size[1], size[0]), dtype=bool)
    for layer in layers:
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        if alpha.shape != mask.shape:  # a layer of another size: onto the image, a pixel painted if any under it is
            alpha = torch.from_numpy(alpha).float()[None, None]
            larger = alpha.shape[-2] >= mask.shape[0] and alpha.shape[-1] >= mask.shape[1]
            alpha = F.adaptive_max_pool2d(alpha, mask.shape) if larger else F.interpolate(alpha, size=mask.shape)
            alpha = alpha[0, 0].numpy() > 0
        mask |= alpha
    return mask
