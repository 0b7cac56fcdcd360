"""MARInpaintPipeline: inpainting, outpainting and class-guided editing with a MAR model, without retraining.

MAR predicts any subset of tokens given the others. The image is turned into tokens (VAE latents, or patchified pixels
without a VAE); the tokens under the mask become unknown and `MARPipeline.__call__` generates them from the known
ones (its `latents` + `mask` arguments). Known tokens are copied unchanged; the cosine schedule runs over the unknown
tokens only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import logging, replace_example_docstring

from diffusers_mar.pipelines.image_inputs import retrieve_latents, to_unit_tensor, token_mask_from_pixels
from diffusers_mar.pipelines.orders import max_outer_steps
from diffusers_mar.pipelines.pipeline_mar import MARPipeline
from diffusers_mar.pipelines.sampling_settings import (
    SAMPLING_KEYS,
    apply_sampling_preset,
    check_sampling_settings,
    preset_tokens_per_step,
)
from diffusers_mar.pipelines.schedules import check_num_images_per_label, prepare_class_labels

logger = logging.get_logger(__name__)

OUTPAINT_MODES = ("shrink", "shift")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_mar import MARInpaintPipeline

        >>> pipe = MARInpaintPipeline.from_pretrained("path/or/hub-id")  # or MARInpaintPipeline.from_pipe(mar_pipe)
        >>> # mask_image: white = regenerate, black = keep
        >>> images = pipe(image, mask_image, class_labels=[207], generator=torch.manual_seed(0)).images
        ```
"""


class MARInpaintPipeline(MARPipeline):
    r"""
    Pipeline for inpainting, outpainting and class-guided editing with MAR.

    Same components as [`MARPipeline`]; build it with `MARInpaintPipeline.from_pipe(pipe)` (no copy of the weights)
    or `MARInpaintPipeline.from_pretrained(folder)`. The image becomes the starting token grid: VAE latents (the
    posterior mode, the mean for a KL VAE, or the `latents` of a deterministic encoder, times
    `vae.config.scaling_factor`), or patchified pixels in `[-1, 1]` without a VAE. Tokens under the mask are
    generated, the others are kept unchanged.

    Parameters:
        transformer ([`MARTransformer2DModel`]):
            The masked encoder-decoder that turns the known tokens into one condition per token.
        diffusion_head ([`MARDiffusionHead`]):
            The per-token denoiser.
        scheduler ([`SchedulerMixin`]):
            The per-token diffusion process, usually [`MARDDPMScheduler`].
        vae ([`AutoencoderKL`], *optional*):
            Encodes the image into latent tokens and decodes the result: any diffusers VAE whose `encode` returns a
            `latent_dist` or `latents` (`AutoencoderKL`, `AutoencoderTiny`, `ConsistencyDecoderVAE`, ...). Without it
            the pipeline works in pixel space.
        id2label (`dict[int, str]`, *optional*):
            Class names, comma-separated synonyms allowed, for `get_label_ids`.
    """

    @property
    def resolution(self) -> int:
        """Side in pixels of the images the model makes (fixed by its learned position embeddings)."""
        return self.transformer.config.sample_size * self.vae_scale_factor

    @property
    def token_size(self) -> int:
        """Side in pixels of one token's footprint: `patch_size` times the VAE's downsampling factor."""
        return self.transformer.config.patch_size * self.vae_scale_factor

    @property
    def image_channels(self) -> int:
        """Channels of the images: those the VAE's encoder takes, or the tokens' without a VAE."""
        if self.vae is None:
            return self.transformer.config.in_channels
        # `in_channels` for AutoencoderKL and AutoencoderTiny, `encoder_in_channels` for ConsistencyDecoderVAE.
        for key in ("in_channels", "encoder_in_channels"):
            if self.vae.config.get(key):
                return self.vae.config.get(key)
        raise ValueError(
            f"Cannot tell how many image channels {type(self.vae).__name__} encodes: its config has neither "
            "`in_channels` nor `encoder_in_channels`."
        )

    def _fit_to_resolution(self, image: torch.Tensor, name: str, resize: bool, is_mask: bool) -> torch.Tensor:
        size = (self.resolution, self.resolution)
        if tuple(image.shape[-2:]) == size:
            return image
        if not resize:
            raise ValueError(
                f"`{name}` is {image.shape[-2]}x{image.shape[-1]} (HxW) but this model makes {size[0]}x{size[1]} "
                "images (fixed by its position embeddings); resize it, or pass `resize=True`."
            )
        if is_mask:
            # A resized pixel is masked when it overlaps a masked pixel of the original.
            return F.adaptive_max_pool2d((image >= 0.5).float(), size)
        return F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)

    def prepare_mask(
        self, mask_image: PipelineImageInput, mask_dilation: int = 0, resize: bool = False
    ) -> torch.Tensor:
        r"""
        Token mask of a mask image: which tokens [`~MARInpaintPipeline.__call__`] regenerates.

        Args:
            mask_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                White (>= 0.5) = regenerate, black = keep. A masked pixel makes its whole token unknown.
            mask_dilation (`int`, *optional*, defaults to 0):
                Grow the unknown region by this many tokens in every direction.
            resize (`bool`, *optional*, defaults to `False`):
                Resize a mask of another size to the model's resolution (a resized pixel is masked when it overlaps
                a masked pixel); without it such a mask is an error.

        Returns:
            `torch.Tensor` of shape `(batch, num_tokens)`: 1 = unknown (regenerate), 0 = known, in raster order.
        """
        if isinstance(mask_dilation, bool) or not isinstance(mask_dilation, int) or mask_dilation < 0:
            raise ValueError(f"`mask_dilation` must be an int >= 0 (in tokens); got {mask_dilation!r}.")
        mask = to_unit_tensor(mask_image, "mask_image", None)
        if mask.shape[1] != 1:
            raise ValueError(f"`mask_image` must have 1 channel (white = regenerate); got {mask.shape[1]}.")
        mask = self._fit_to_resolution(mask, "mask_image", resize, is_mask=True)
        return token_mask_from_pixels((mask >= 0.5).float(), self.token_size, mask_dilation)

    @torch.no_grad()
    def encode_image(self, image: PipelineImageInput, resize: bool = False) -> torch.Tensor:
        r"""
        The token grid of an image, in the space of `output_type="latent"`.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                uint8 (0-255) or float (0-1) images; arrays channels-last, tensors channels-first.
            resize (`bool`, *optional*, defaults to `False`):
                Resize an image of another size to the model's resolution (bicubic, antialiased); without it such
                an image is an error.

        Returns:
            `torch.Tensor` of shape `(batch, in_channels, sample_size, sample_size)`: pixels in `[-1, 1]` without a
            VAE; with one, the mode of the VAE posterior (the mean for a KL VAE; the `latents` of an encoder without a
            posterior, such as `AutoencoderTiny`) times `vae.config.scaling_factor` (after subtracting
            `shift_factor` if the VAE has one).
        """
        image = to_unit_tensor(image, "image", self.image_channels)
        image = self._fit_to_resolution(image, "image", resize, is_mask=False)
        image = self.image_processor.normalize(image).to(self._execution_device)  # [-1, 1]
        if self.vae is None:
            return image
        # As diffusers' image-to-image pipelines; "argmax" takes the mode, so the same image gives the same tokens.
        latents = retrieve_latents(self.vae.encode(image.to(self.vae.dtype)), sample_mode="argmax").float()
        config = self.transformer.config
        expected = (config.in_channels, config.sample_size, config.sample_size)
        if tuple(latents.shape[1:]) != expected:
            raise ValueError(
                f"{type(self.vae).__name__} encodes {tuple(image.shape[1:])} images into {tuple(latents.shape[1:])} "
                f"latents but the transformer takes {expected}: this VAE does not belong to this model."
            )
        if getattr(self.vae.config, "shift_factor", None):
            latents = latents - self.vae.config.shift_factor
        return latents * self.vae.config.scaling_factor

    def prepare_outpainting(
        self,
        image: PipelineImageInput,
        border: int | tuple[int, int, int, int] = 1,
        mode: str = "shrink",
        resize: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Outpainting inputs: a canvas of the model's size with the image inside and the border to regenerate.

        MAR's learned position embeddings fix the output size, so outpainting regenerates a border of the canvas
        rather than enlarging it. Pass the results as `image` and `mask_image` to [`~MARInpaintPipeline.__call__`].

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The images to extend.
            border (`int` or `tuple[int, int, int, int]`, *optional*, defaults to 1):
                Tokens to regenerate on each side, `(top, right, bottom, left)` like CSS, or one int for all sides.
                One token is `token_size` pixels, so the kept region is aligned to the token grid.
            mode (`str`, *optional*, defaults to `"shrink"`):
                `"shrink"`: the image is resized (bicubic, antialiased) into the box inside the border (zoom out).
                `"shift"`: the image keeps its scale and moves away from the border, by `left - right` tokens to the
                right and `top - bottom` down (pan: `border=(0, 2, 0, 0)` shows 2 new token columns on the right);
                the pixels that leave the canvas are dropped.
            resize (`bool`, *optional*, defaults to `False`):
                With `mode="shift"`, resize an image of another size to the model's resolution first.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: the canvas `(batch, C, H, W)` in `[0, 1]` (0.5 in the border) and
            the mask `(batch, 1, H, W)` (1 in the border).
        """
        if mode not in OUTPAINT_MODES:
            raise ValueError(f"`mode` must be one of {OUTPAINT_MODES}; got {mode!r}.")
        if isinstance(border, int) and not isinstance(border, bool):
            border = (border,) * 4
        grid = self.transformer.grid_size
        if (
            not isinstance(border, (tuple, list))
            or len(border) != 4
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in border)
            or border[0] + border[2] >= grid
            or border[1] + border[3] >= grid
        ):
            raise ValueError(
                f"`border` must be an int or (top, right, bottom, left) ints >= 0, in tokens, leaving at least one "
                f"token of the {grid}x{grid} grid inside; got {border!r}."
            )
        image = to_unit_tensor(image, "image", self.image_channels)
        top, right, bottom, left = (b * self.token_size for b in border)
        size = self.resolution
        canvas = torch.full((image.shape[0], image.shape[1], size, size), 0.5)
        mask = torch.ones(image.shape[0], 1, size, size)
        mask[:, :, top : size - bottom, left : size - right] = 0
        if mode == "shrink":
            inner = (size - top - bottom, size - left - right)
            inner_image = F.interpolate(image, size=inner, mode="bicubic", antialias=True, align_corners=False)
            canvas[:, :, top : size - bottom, left : size - right] = inner_image.clamp(0, 1)
        else:
            image = self._fit_to_resolution(image, "image", resize, is_mask=False)
            canvas[:, :, top : size - bottom, left : size - right] = image[
                :, :, bottom : size - top, right : size - left
            ]
        return canvas, mask

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: PipelineImageInput,
        mask_image: PipelineImageInput,
        class_labels: int | list[int] | torch.Tensor,
        num_inference_steps: int | None = None,
        num_diffusion_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        temperature: float | None = None,
        num_images_per_label: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        mask_dilation: int = 0,
        resize: bool = False,
        order: str | torch.Tensor = "random",
        outer_schedule: str = "cosine",
        guidance_cache_interval: int | None = None,
        feature_cache_interval: int | None = None,
        sampling_preset: str | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Regenerate the masked part of images, given the rest and a class label.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The images to edit, one per batch item or one shared: uint8 (0-255) or float (0-1); arrays
                channels-last `(H, W[, C])` / `(B, H, W, C)`, tensors channels-first `(C, H, W)` / `(B, C, H, W)`,
                as `output_type="np"` / `"pt"` return them. Without a VAE, kept pixels come back unchanged (exactly,
                for uint8 inputs and `"pil"` output); with a VAE the kept latents are unchanged but the decoded
                pixels are not (the VAE is lossy).
            mask_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                White (>= 0.5) = regenerate, black = keep, as in diffusers inpainting; one per batch item or shared.
                A masked pixel makes its whole token unknown (a token is `token_size` pixels square). A mask with no
                unknown token returns that image's tokens unchanged, with a warning.
            class_labels (`int`, `list[int]` or `torch.Tensor`):
                One class id per image (or one shared), in `[0, num_classes]`; `num_classes` means unconditional.
                A class other than the image's edits the masked region towards it (class-guided editing).
            num_inference_steps (`int`, *optional*):
                Masked-autoregressive steps. Each image uses at most as many steps as it has unknown tokens (a step
                predicts at least one token). This and the next four arguments default to `pipe.sampling_defaults`
                (the folder's recommended settings, else the paper's), as in `MARPipeline`.
            num_diffusion_steps (`int`, *optional*):
                Scheduler steps of the diffusion head per token.
            guidance_scale (`float`, *optional*):
                Classifier-free guidance scale; 1.0 disables guidance.
            guidance_schedule (`str`, *optional*):
                `"linear"`: the scale rises with the ratio of known tokens (the kept tokens count as known);
                `"constant"`.
            temperature (`float`, *optional*):
                Multiplies the noise of every diffusion step.
            num_images_per_label (`int`, *optional*, defaults to 1):
                Edits per batch item (image, mask and label), next to each other in the output (diffusers'
                `num_images_per_prompt`).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One generator, or one per output image (batch size times `num_images_per_label`): then each image
                equals the image edited alone with its generator. Images with different numbers of unknown tokens
                run as separate groups (the transformer needs the same count per row), so a single generator is
                shared by the groups in turn. A VAE decoder that samples (`ConsistencyDecoderVAE`) draws from it too.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"` (the token grid, as `encode_image` returns it).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`ImagePipelineOutput`] or a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                As in [`MARPipeline`]: called after each outer step as `callback_on_step_end(pipe, step, timestep,
                callback_kwargs)`, `timestep` being the number of tokens still unknown. Each group of images with the
                same number of unknown tokens runs its own steps (`step` starts at 0 for each group), and the tensors
                are that group's. Setting `pipe._interrupt = True` stops the group and skips the groups after it;
                tokens not generated yet keep their values from `image`. A `pipe._guidance_scale` set by a callback
                lasts until the end of its group (each group starts from `guidance_scale`).
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Among `"latents"`, `"tokens"`, `"mask"` and `"condition"` (see [`MARPipeline`]). Defaults to
                `["tokens"]`.
            mask_dilation (`int`, *optional*, defaults to 0):
                Grow the unknown region by this many tokens in every direction (useful with a VAE, whose latents
                next to the mask still carry some of the masked content).
            resize (`bool`, *optional*, defaults to `False`):
                Resize `image` (bicubic, antialiased) and `mask_image` (a pixel is masked when it overlaps a masked
                pixel) to the model's resolution. Without it, another size is an error.
            order (`str` or `torch.LongTensor`, *optional*, defaults to `"random"`):
                As in [`MARPipeline`]; a tensor has one permutation per output image (kept tokens move to the end).
            outer_schedule (`str`, *optional*, defaults to `"cosine"`):
                As in [`MARPipeline`], over each image's unknown tokens (steps clipped to what the schedule allows).
            guidance_cache_interval (`int`, *optional*):
                As in [`MARPipeline`] (None or 1: no cache).
            feature_cache_interval (`int`, *optional*):
                As in [`MARPipeline`] (None or 1: no cache).
            sampling_preset (`str`, *optional*):
                As in [`MARPipeline`]; its outer steps are clipped to each group's unknown tokens, so
                `num_diffusion_steps` must then be an int or a named schedule (a list fits one step count).

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the edited images.
        """
        # 1. Check inputs
        arguments = apply_sampling_preset(sampling_preset, locals(), self.transformer.num_tokens)
        class_labels = prepare_class_labels(class_labels, num_classes=self.transformer.config.num_classes)
        check_num_images_per_label(num_images_per_label)
        settings = self.resolve_sampling_settings(**{key: arguments[key] for key in SAMPLING_KEYS})
        if not isinstance(resize, bool):
            raise ValueError(f"`resize` must be True or False; got {resize!r}.")
        # The sampling arguments are checked once here (each group is checked again by MARPipeline); the step count
        # only needs to be >= 1, since each group clips it to its number of unknown tokens.
        check_sampling_settings(settings)
        settings["num_inference_steps"] = min(settings["num_inference_steps"], self.transformer.num_tokens)
        callback_inputs = self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(
            class_labels, settings, None, output_type, callback_on_step_end_tensor_inputs=callback_inputs
        )
        mask = self.prepare_mask(mask_image, mask_dilation, resize)  # (Bm, L)
        images = to_unit_tensor(image, "image", self.image_channels)
        counts = {"image": images.shape[0], "mask_image": mask.shape[0], "class_labels": len(class_labels)}
        batch_size = max(counts.values())
        if any(count not in (1, batch_size) for count in counts.values()):
            raise ValueError(
                f"Batch sizes differ: {', '.join(f'`{k}` has {v}' for k, v in counts.items())}; each must be 1 "
                f"(shared) or {batch_size}."
            )
        num_images = batch_size * num_images_per_label
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators for {num_images} images (batch size "
                f"{batch_size} times `num_images_per_label`); pass one generator per image or a single generator."
            )
        if isinstance(order, torch.Tensor) and order.shape[:1] != (num_images,):
            raise ValueError(
                f"`order` as a tensor must have one row per output image ({num_images}); got {tuple(order.shape)}."
            )
        class_labels = class_labels * batch_size if len(class_labels) == 1 else class_labels
        class_labels = [label for label in class_labels for _ in range(num_images_per_label)]
        mask = mask.expand(batch_size, -1).repeat_interleave(num_images_per_label, dim=0)  # (B * n, L)

        # 2. Starting token grid: VAE latents or pixels in [-1, 1]
        latents = self.encode_image(images, resize=resize).expand(batch_size, -1, -1, -1)
        latents = latents.repeat_interleave(num_images_per_label, dim=0)  # (B * n, C, H, W)

        # 3. Generate, one group per number of unknown tokens (the transformer needs the same count in each row)
        unknown = mask.sum(dim=1).long().tolist()
        unchanged = [i for i, count in enumerate(unknown) if count == 0]
        if unchanged:
            logger.warning(
                f"`mask_image` marks no token to regenerate for batch items {unchanged}; their tokens are returned "
                "unchanged."
            )
        output = latents.clone()
        self._interrupt = False
        # A preset that chose the steps keeps its tokens per step in every group.
        tokens_per_step = preset_tokens_per_step(sampling_preset, num_inference_steps) or 1
        for count in dict.fromkeys(count for count in unknown if count > 0):
            if self.interrupt:
                break
            rows = [i for i, c in enumerate(unknown) if c == count]
            high = max_outer_steps(arguments["outer_schedule"], count, tokens_per_step)
            steps = min(settings["num_inference_steps"], high)
            group_order = order[rows] if isinstance(order, torch.Tensor) else arguments["order"]
            output[rows] = (
                super()
                .__call__(
                    [class_labels[i] for i in rows],
                    num_inference_steps=steps,
                    num_diffusion_steps=settings["num_diffusion_steps"],
                    guidance_scale=settings["guidance_scale"],
                    guidance_schedule=settings["guidance_schedule"],
                    temperature=settings["temperature"],
                    generator=[generator[i] for i in rows] if isinstance(generator, list) else generator,
                    output_type="latent",
                    callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_inputs,
                    latents=latents[rows],
                    mask=mask[rows].to(latents.device),
                    order=group_order,
                    outer_schedule=arguments["outer_schedule"],
                    guidance_cache_interval=arguments["guidance_cache_interval"],
                    feature_cache_interval=arguments["feature_cache_interval"],
                    sampling_preset=sampling_preset,
                )
                .images
            )

        # 4. Decode
        return self.decode_output(output, output_type, generator, return_dict)
