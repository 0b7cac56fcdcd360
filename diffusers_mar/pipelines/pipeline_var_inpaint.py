"""VARInpaintPipeline: inpainting, outpainting and class-conditional editing with a VAR model, without retraining.

VAR's zero-shot editing (FoundationVision/VAR `demo_zero_shot_edit.ipynb`): the image is encoded to its tokens at
every scale (`VARVQModel.encode`, the multi-scale residual quantization of its latent), and the next-scale sampling
runs as usual except that, at each scale, the tokens outside the mask (the mask downsampled to that scale) are the
image's own tokens instead of the sampled ones (`VARPipeline.__call__`'s `indices` + `mask`). Outpainting masks the
border; class-conditional editing gives the masked region another class label.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from diffusers_mar.pipelines.image_inputs import fit_to_size, to_unit_tensor, token_mask_from_pixels
from diffusers_mar.pipelines.pipeline_var import VARPipeline
from diffusers_mar.pipelines.schedules import check_num_images_per_label, prepare_class_labels

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_mar import VARInpaintPipeline

        >>> pipe = VARInpaintPipeline.from_pretrained("path/to/var-d16")  # or VARInpaintPipeline.from_pipe(var_pipe)
        >>> # mask_image: white = regenerate, black = keep; class_labels: the masked region's class
        >>> images = pipe(image, mask_image, class_labels=[207], generator=torch.Generator().manual_seed(0)).images
        ```
"""


class VARInpaintPipeline(VARPipeline):
    r"""
    Pipeline for inpainting, outpainting and class-conditional editing with VAR (its zero-shot editing).

    Same components as [`VARPipeline`]; build it with `VARInpaintPipeline.from_pipe(pipe)` (no copy of the weights)
    or `VARInpaintPipeline.from_pretrained(folder)`. The image's tokens at every scale are kept outside the mask and
    generated under it. What is kept exactly is tokens, not pixels: the VQ-VAE's reconstruction is lossy, and each
    scale's codes are upsampled (bicubic) and filtered (phi) into the latent and decoded by convolutions and
    attention, so kept pixels near (and, through attention, far from) the mask move a little. With nothing masked
    the output is the VQ-VAE's reconstruction of the image.

    Parameters:
        transformer ([`VARTransformer2DModel`]):
            The next-scale transformer.
        vqvae ([`VARVQModel`]):
            The multi-scale VQ-VAE: encodes the image to its tokens, decodes the result.
        id2label (`dict[int, str]`, *optional*):
            Class names, comma-separated synonyms allowed, for `get_label_ids`.
        sampling (`dict`, *optional*):
            Recommended sampling settings (as [`VARPipeline`]).
    """

    @property
    def resolution(self) -> int:
        """Side in pixels of the images the model makes."""
        return self.vqvae.config.sample_size

    @property
    def token_size(self) -> int:
        """Side in pixels of one token of the last (finest) scale."""
        return self.vae_scale_factor

    @property
    def image_channels(self) -> int:
        """Channels of the images (the VQ-VAE's `in_channels`), as `MARInpaintPipeline.image_channels`."""
        return self.vqvae.config.in_channels

    def prepare_mask(
        self, mask_image: PipelineImageInput, mask_dilation: int = 0, resize: bool = False
    ) -> torch.Tensor:
        r"""
        Token mask of a mask image over the last scale: which tokens [`~VARInpaintPipeline.__call__`] generates.

        Args:
            mask_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                White (>= 0.5) = regenerate, black = keep. A masked pixel makes its whole token unknown.
            mask_dilation (`int`, *optional*, defaults to 0):
                Grow the unknown region by this many tokens of the last scale in every direction.
            resize (`bool`, *optional*, defaults to `False`):
                Resize a mask of another size to the model's resolution (a resized pixel is masked when it overlaps
                a masked pixel); without it such a mask is an error.

        Returns:
            `torch.Tensor` of shape `(batch, patch_nums[-1] ** 2)`: 1 = generate, 0 = keep, in raster order.
        """
        if isinstance(mask_dilation, bool) or not isinstance(mask_dilation, int) or mask_dilation < 0:
            raise ValueError(f"`mask_dilation` must be an int >= 0 (in tokens); got {mask_dilation!r}.")
        mask = to_unit_tensor(mask_image, "mask_image", None)
        if mask.shape[1] != 1:
            raise ValueError(f"`mask_image` must have 1 channel (white = regenerate); got {mask.shape[1]}.")
        mask = fit_to_size(mask, self.resolution, "mask_image", resize, is_mask=True)
        return token_mask_from_pixels((mask >= 0.5).float(), self.token_size, mask_dilation)

    @torch.no_grad()
    def encode_image(self, image: PipelineImageInput, resize: bool = False) -> list[torch.Tensor]:
        r"""
        The tokens of images at every scale (`VARVQModel.encode`).

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                uint8 (0-255) or float (0-1) images; arrays channels-last, tensors channels-first.
            resize (`bool`, *optional*, defaults to `False`):
                Resize an image of another size to the model's resolution (bicubic, antialiased); without it such
                an image is an error.

        Returns:
            `list[torch.Tensor]`: one `(batch, patch_nums[k] ** 2)` tensor of codebook indices per scale.
        """
        image = to_unit_tensor(image, "image", self.vqvae.config.in_channels)
        image = fit_to_size(image, self.resolution, "image", resize, is_mask=False)
        image = self.image_processor.normalize(image).to(self._execution_device, self.vqvae.dtype)  # [-1, 1]
        return self.vqvae.encode(image).indices

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: PipelineImageInput,
        mask_image: PipelineImageInput,
        class_labels: int | list[int] | torch.Tensor,
        guidance_scale: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        more_smooth: bool | None = None,
        num_images_per_label: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        mask_dilation: int = 0,
        resize: bool = False,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Regenerate the masked part of images, given the rest and a class label.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The images to edit, one per batch item or one shared: uint8 (0-255) or float (0-1); arrays
                channels-last `(H, W, C)` / `(B, H, W, C)`, tensors channels-first `(C, H, W)` / `(B, C, H, W)`, as
                `output_type="np"` / `"pt"` return them.
            mask_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                White (>= 0.5) = regenerate, black = keep, as in diffusers inpainting; one per batch item or shared.
                A masked pixel makes its whole token of the last scale unknown; coarser scales keep a token where the
                bilinear downsampling of the keep mask is above 0.5, and the 1x1 scale is always the image's
                (`VARPipeline.__call__`'s `mask`). Mask the border to outpaint.
            class_labels (`int`, `list[int]` or `torch.Tensor`):
                One class id per image (or one shared), in `[0, num_classes]`; `num_classes` means unconditional.
                A class other than the image's edits the masked region towards it (class-conditional editing).
            guidance_scale (`float`, *optional*):
                As in [`VARPipeline`] (`1 + cfg`). This and the next three default to `pipe.sampling_defaults`.
            top_k (`int`, *optional*):
                As in [`VARPipeline`].
            top_p (`float`, *optional*):
                As in [`VARPipeline`].
            more_smooth (`bool`, *optional*):
                As in [`VARPipeline`]; the kept tokens stay the image's codebook entries.
            num_images_per_label (`int`, *optional*, defaults to 1):
                Edits per batch item (image, mask and label), next to each other in the output.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One generator (drawing as the original's `rng`; the tokens it draws for kept positions are replaced),
                or one per output image (batch size times `num_images_per_label`): each image then equals the image
                edited alone with its generator.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"` (the last latent `f_hat`).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`ImagePipelineOutput`] or a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                As in [`VARPipeline`]: called after each scale; `"indices"` are the scale's tokens after the kept ones
                replaced the sampled ones.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Among `"latents"`, `"indices"` and `"logits"` (see [`VARPipeline`]). Defaults to `["latents"]`.
            mask_dilation (`int`, *optional*, defaults to 0):
                Grow the unknown region by this many tokens of the last scale in every direction.
            resize (`bool`, *optional*, defaults to `False`):
                Resize `image` (bicubic, antialiased) and `mask_image` (a pixel is masked when it overlaps a masked
                pixel) to the model's resolution. Without it, another size is an error.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the edited images.
        """
        # 1. Check inputs, and give every batch item its image, mask and label
        class_labels = prepare_class_labels(class_labels, num_classes=self.transformer.config.num_classes)
        check_num_images_per_label(num_images_per_label)
        if not isinstance(resize, bool):
            raise ValueError(f"`resize` must be True or False; got {resize!r}.")
        mask = self.prepare_mask(mask_image, mask_dilation, resize)  # (Bm, L_last)
        images = to_unit_tensor(image, "image", self.vqvae.config.in_channels)
        counts = {"image": images.shape[0], "mask_image": mask.shape[0], "class_labels": len(class_labels)}
        batch_size = max(counts.values())
        if any(count not in (1, batch_size) for count in counts.values()):
            raise ValueError(
                f"Batch sizes differ: {', '.join(f'`{k}` has {v}' for k, v in counts.items())}; each must be 1 "
                f"(shared) or {batch_size}."
            )
        class_labels = class_labels * batch_size if len(class_labels) == 1 else class_labels
        mask = mask.expand(batch_size, -1).repeat_interleave(num_images_per_label, dim=0)  # (B * n, L_last)

        # 2. The image's tokens at every scale
        indices = self.encode_image(images, resize=resize)
        indices = [t.expand(batch_size, -1).repeat_interleave(num_images_per_label, dim=0) for t in indices]

        # 3. Generate under the mask (VARPipeline's next-scale loop with the known tokens)
        return super().__call__(
            class_labels,
            guidance_scale=guidance_scale,
            top_k=top_k,
            top_p=top_p,
            more_smooth=more_smooth,
            num_images_per_label=num_images_per_label,
            generator=generator,
            output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            indices=indices,
            mask=mask,
        )
