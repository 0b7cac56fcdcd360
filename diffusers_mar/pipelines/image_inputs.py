"""Image and mask inputs of `MARInpaintPipeline`: PIL images, arrays or tensors in [0, 1], pixel masks as token
masks, and VAE encoder outputs as latents."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor

PIL_MODES = {1: "L", 3: "RGB"}


# Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img.retrieve_latents
# (kept here because importing that module imports `transformers`, which the base install does not need)
def retrieve_latents(
    encoder_output: torch.Tensor, generator: torch.Generator | None = None, sample_mode: str = "sample"
):
    if hasattr(encoder_output, "latent_dist") and sample_mode == "sample":
        return encoder_output.latent_dist.sample(generator)
    elif hasattr(encoder_output, "latent_dist") and sample_mode == "argmax":
        return encoder_output.latent_dist.mode()
    elif hasattr(encoder_output, "latents"):
        return encoder_output.latents
    else:
        raise AttributeError("Could not access latents of provided encoder_output")


def to_unit_tensor(image: PipelineImageInput, name: str, channels: int | None) -> torch.Tensor:
    """PIL images, arrays or tensors (one or a list) -> a float32 (B, C, H, W) tensor in [0, 1]."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError(f"`{name}` is empty; pass a PIL image, a NumPy array or a torch tensor (or a list of them).")
    tensors = []
    for item in items:
        if isinstance(item, PIL.Image.Image):
            mode = PIL_MODES.get(channels if channels is not None else 1)
            if mode is None:
                raise ValueError(f"`{name}` is a PIL image but the model takes {channels} channels; pass an array.")
            item = VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy(item.convert(mode)))
        elif isinstance(item, np.ndarray):
            # Channels last, as `output_type="np"` returns: (H, W), (H, W, C) or (B, H, W, C).
            if item.ndim not in (2, 3, 4):
                raise ValueError(f"`{name}` arrays must be (H, W), (H, W, C) or (B, H, W, C); got {item.shape}.")
            item = torch.from_numpy(np.ascontiguousarray(item))
            item = item[None, :, :, None] if item.ndim == 2 else item[None] if item.ndim == 3 else item
            item = item.permute(0, 3, 1, 2)
        elif isinstance(item, torch.Tensor):
            # Channels first, as `output_type="pt"` returns: (H, W), (C, H, W) or (B, C, H, W).
            if item.ndim not in (2, 3, 4):
                raise ValueError(
                    f"`{name}` tensors must be (H, W), (C, H, W) or (B, C, H, W); got {tuple(item.shape)}."
                )
            item = item[None, None] if item.ndim == 2 else item[None] if item.ndim == 3 else item
        else:
            raise ValueError(
                f"`{name}` must be a PIL image, a NumPy array or a torch tensor (or a list of them); got {type(item)}."
            )
        if item.dtype == torch.uint8:
            item = item.float() / 255.0  # as VaeImageProcessor.pil_to_numpy
        elif item.dtype == torch.bool or item.is_floating_point():
            item = item.float()
        else:
            raise ValueError(f"`{name}` must hold uint8 (0-255), bool or float (0-1) values; got {item.dtype}.")
        if item.numel() and (item.min() < 0 or item.max() > 1):
            raise ValueError(
                f"`{name}` float values must be in [0, 1] (as `output_type='np'` or `'pt'` give); got "
                f"[{item.min().item():.3g}, {item.max().item():.3g}]."
            )
        tensors.append(item.cpu())
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"All images of `{name}` must have the same channels and size; got {sorted(shapes)}.")
    image = torch.cat(tensors)
    if channels is not None and image.shape[1] != channels:
        raise ValueError(f"`{name}` must have {channels} channel(s) for this model; got {image.shape[1]}.")
    return image


def token_mask_from_pixels(mask: torch.Tensor, token_size: int, mask_dilation: int = 0) -> torch.Tensor:
    """Binary pixel mask (B, 1, H, W) -> token mask (B, L), 1 = unknown; any masked pixel makes its token unknown.

    `mask_dilation` grows the unknown region by that many tokens in every direction (a (2d + 1)^2 square).
    """
    tokens = F.max_pool2d(mask.float(), kernel_size=token_size, stride=token_size)  # (B, 1, h, w)
    if mask_dilation > 0:
        tokens = F.max_pool2d(tokens, kernel_size=2 * mask_dilation + 1, stride=1, padding=mask_dilation)
    return tokens.flatten(1)  # (B, L), raster order as `MARTransformer2DModel.patchify`


def fit_to_size(image: torch.Tensor, size: int, name: str, resize: bool, is_mask: bool) -> torch.Tensor:
    """A (B, C, H, W) image or mask in [0, 1] at the model's `size` x `size`: as it is, resized when `resize` (a
    resized mask pixel is masked when it overlaps a masked pixel; images bicubic, antialiased), else an error."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    if not resize:
        raise ValueError(
            f"`{name}` is {image.shape[-2]}x{image.shape[-1]} (HxW) but this model makes {size}x{size} images; resize "
            "it, or pass `resize=True`."
        )
    if is_mask:
        return F.adaptive_max_pool2d((image >= 0.5).float(), (size, size))
    return F.interpolate(image, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
