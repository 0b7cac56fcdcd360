"""ARPipeline: class-conditional image generation with a causal AR transformer and MAR's per-token diffusion head.

The paper's Table 1 "AR" rows: one token per step in a raster, random or given order. Both loops are visible in
`ARPipeline.__call__`: the outer loop over the `num_tokens` positions of the order and, inside it, the scheduler loop
of the diffusion head. With `use_cache=True` (the default) the transformer keeps each block's keys and values
(`ARKVCache`), so a step computes one sequence row: O(L) per step instead of O(L^2), with the same values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging, replace_example_docstring

from diffusers_mar.models.diffusion_head_mar import MARDiffusionHead
from diffusers_mar.models.transformer_ar import ARTransformer2DModel
from diffusers_mar.pipelines.orders import are_permutations, make_orders
from diffusers_mar.pipelines.pipeline_autoregressive import AutoregressivePipeline
from diffusers_mar.pipelines.sampling_settings import SAMPLING_KEYS, check_sampling_settings
from diffusers_mar.pipelines.schedules import mask_by_order, mask_schedule, prepare_class_labels

ORDERS = ("raster", "random")
# `--order` of training/train_mar.py, recorded as the pipeline's `training_order` (RAR's "anneal" ends in raster).
TRAINING_ORDERS = (None, "raster", "random", "anneal")
# The AR pipeline always makes one token per step: `num_inference_steps` is not one of its settings.
AR_SAMPLING_KEYS = tuple(key for key in SAMPLING_KEYS if key != "num_inference_steps")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_mar import ARPipeline

        >>> pipe = ARPipeline.from_pretrained("path/to/ar-pipeline")  # trained with `--order random`
        >>> images = pipe(class_labels=[3, 7], order="random", generator=torch.manual_seed(0)).images
        ```
"""

logger = logging.get_logger(__name__)


class ARPipeline(AutoregressivePipeline):
    r"""
    Pipeline for class-conditional image generation with a causal autoregressive transformer (the paper's "AR").

    A sibling of [`MARPipeline`] on [`AutoregressivePipeline`] (components, labels, guidance, the head's sampling,
    callbacks, decoding, saving and model card); its outer loop makes one token per step.

    Parameters:
        transformer ([`ARTransformer2DModel`]):
            The causal transformer that turns the tokens before each position in the order into its condition.
        diffusion_head ([`MARDiffusionHead`]):
            The per-token denoiser.
        scheduler ([`SchedulerMixin`]):
            The per-token diffusion process, usually [`MARDDPMScheduler`] (the same rules as `MARPipeline`).
        vae ([`AutoencoderKL`], *optional*):
            Decodes the tokens' latent grid into images.
        id2label (`dict[int, str]`, *optional*):
            Class names, comma-separated synonyms allowed, for `get_label_ids`.
        sampling (`dict`, *optional*):
            Recommended sampling settings (keys among `AR_SAMPLING_KEYS`), the defaults of `__call__`.
        token_space (`str`, *optional*):
            `"pixel"` or `"latent"`; defaults to `"latent"` with a `vae` and `"pixel"` without one.
        training_order (`str`, *optional*):
            The order the model was trained with (`--order` of `training/train_mar.py`): `"raster"`, `"random"` or
            `"anneal"` (RAR's annealing, which ends in raster); `None` if unknown. Sampling a raster- or
            anneal-trained model with `order="random"` logs a warning: such models give noise in random order.
    """

    _transformer_class = ARTransformer2DModel
    sampling_keys = AR_SAMPLING_KEYS

    def __init__(
        self,
        transformer: ARTransformer2DModel,
        diffusion_head: MARDiffusionHead,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        id2label: dict[int, str] | dict[str, str] | None = None,
        sampling: dict | None = None,
        token_space: str | None = None,
        training_order: str | None = None,
    ):
        if training_order not in TRAINING_ORDERS:
            raise ValueError(f"`training_order` must be one of {TRAINING_ORDERS}; got {training_order!r}.")
        super().__init__(transformer, diffusion_head, scheduler, vae, id2label, sampling, token_space)
        self.register_to_config(training_order=training_order)

    def check_inputs(
        self,
        class_labels: list[int],
        settings: dict,
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        use_cache: bool,
        noise: list[torch.Tensor] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> None:
        """Validate the arguments of `__call__` (`order` is checked by `prepare_ar_orders`)."""
        num_tokens = self.transformer.num_tokens
        if not isinstance(use_cache, bool):
            raise ValueError(f"`use_cache` must be True or False; got {use_cache!r}.")
        if noise is not None and len(noise) != num_tokens:
            raise ValueError(f"`noise` must hold one tensor per step ({num_tokens}); got {len(noise)}.")
        self.check_common_inputs(class_labels, generator, output_type, callback_on_step_end_tensor_inputs)
        check_sampling_settings(settings, num_tokens, self.scheduler.config.num_train_timesteps, keys=AR_SAMPLING_KEYS)

    def prepare_ar_orders(
        self,
        order: str | torch.Tensor,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Generation orders `(B, L)` from `order`: raster, one `torch.randperm` per image, or the given permutations
        (one `(L,)` order for every image or one per image); a `ValueError` names the allowed values."""
        num_tokens = self.transformer.num_tokens
        if isinstance(order, str):
            if order not in ORDERS:
                raise ValueError(f"`order` must be one of {ORDERS} or a tensor of permutations; got {order!r}.")
            if order == "raster":
                return torch.arange(num_tokens, device=device).expand(batch_size, -1)
            # MAR's random orders (one `torch.randperm` per image); a permutation reads the same either way round.
            return make_orders("random", batch_size, self.transformer.grid_size, generator).to(device)
        if not isinstance(order, torch.Tensor) or order.dtype.is_floating_point or order.dtype == torch.bool:
            raise ValueError(f"`order` must be one of {ORDERS} or an integer tensor of permutations; got {order!r}.")
        orders = order.expand(batch_size, -1) if order.ndim == 1 else order
        if not are_permutations(orders, batch_size, num_tokens):
            raise ValueError(
                f"`order` as a tensor must be ({num_tokens},) or ({batch_size}, {num_tokens}), each row a permutation "
                f"of 0..{num_tokens - 1}; got shape {tuple(order.shape)}."
            )
        return orders.to(device=device, dtype=torch.long)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
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
        order: str | torch.Tensor = "raster",
        use_cache: bool = True,
        noise: list[torch.Tensor] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images of the given classes, one token per step in the given order.

        The four sampling arguments (`num_diffusion_steps` to `temperature`) default to `pipe.sampling_defaults`:
        those stored in the folder, else the paper's (100 diffusion steps, guidance 3.0 with the linear schedule,
        temperature 1.0).

        Args:
            class_labels (`int`, `list[int]` or `torch.Tensor`):
                One class id per image, in `[0, num_classes]`; `num_classes` means unconditional.
            num_diffusion_steps (`int`, *optional*):
                Scheduler steps of the diffusion head per token.
            guidance_scale (`float`, *optional*):
                Classifier-free guidance scale; 1.0 disables guidance (and the doubled batch).
            guidance_schedule (`str`, *optional*):
                `"linear"`: the scale rises with the number of known tokens, as MAR's at one token per step
                (`1 + (scale - 1) * (j + 1) / L` at step `j`, the last step as the one before); `"constant"`.
            temperature (`float`, *optional*):
                Multiplies the noise of every diffusion step (not the initial noise), as in MAR.
            num_images_per_label (`int`, *optional*, defaults to 1):
                Images per class label, next to each other in the output.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One generator, or one per image (`len(class_labels) * num_images_per_label`): then each image equals
                the image generated alone with its generator.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"` (the token grid `(B, C, H, W)`, scaled latents with a VAE).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`ImagePipelineOutput`] or a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after each step as `callback_on_step_end(pipe, step, timestep, callback_kwargs)`, with
                `timestep` the number of tokens still unknown after the step. It may return a dict with a new
                `"tokens"` or `"latents"` canvas, set `pipe._interrupt = True` to stop early (unknown tokens stay
                zero), and set `pipe._guidance_scale` (a guided call's scale from the next step on). With
                the cache, a changed token enters later conditions only if it is the one made at this step (the
                others are already in the cache); without it, every known token does.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Among `"latents"` (the canvas `(B, C, H, W)`), `"tokens"` (the same canvas `(B, L, C)`), `"mask"`
                (`(B, L)`, 1 = still unknown) and `"condition"` (the step's conditions `(B', 1, D)`, the
                unconditional half after the conditional one under guidance). Defaults to `["tokens"]`.
            order (`str` or `torch.LongTensor`, *optional*, defaults to `"raster"`):
                `"raster"`, `"random"` (one `torch.randperm` per image from `generator`), or permutations of the
                token positions: `(num_tokens,)` for every image or `(batch, num_tokens)`.
            use_cache (`bool`, *optional*, defaults to `True`):
                Keep the keys and values of the tokens already made (one sequence row per step). `False` recomputes
                the whole causal sequence at every step (the reference; same values to float32 rounding).
            noise (`list[torch.Tensor]`, *optional*):
                Per step `j`, a `(1 + S, batch, 1, C)` tensor: `[0]` the initial noise and `[1 + i]` the noise of
                diffusion step `i` of the token made at step `j`. Drawn with `generator` if not given.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        # 1. Check inputs
        settings = self.resolve_sampling_settings(
            num_diffusion_steps=num_diffusion_steps,
            guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule,
            temperature=temperature,
        )
        class_labels = prepare_class_labels(class_labels, num_images_per_label, self.transformer.config.num_classes)
        callback_inputs = self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(class_labels, settings, generator, output_type, use_cache, noise, callback_inputs)
        num_diffusion_steps = settings["num_diffusion_steps"]
        head = self.prepare_head_sampler([num_diffusion_steps], settings["temperature"], generator)
        device = self._execution_device
        num_tokens, batch_size, token_dim = self.transformer.num_tokens, len(class_labels), self.transformer.token_dim
        self._interrupt = False
        self._num_timesteps = num_tokens

        # 2. Class labels; the unconditional half follows the conditional one under guidance
        labels = self.prepare_labels(class_labels, settings["guidance_scale"], device)

        # 3. Generation orders
        training_order = self.config.get("training_order")
        if isinstance(order, str) and order == "random" and training_order in ("raster", "anneal"):
            logger.warning(
                f'Sampling with order="random" a model trained with `--order {training_order}` (`training_order` in '
                f"its model_index.json{'; RAR annealing ends in raster order' if training_order == 'anneal' else ''}"
                '): it generates noise in random order. Use order="raster".'
            )
        orders = self.prepare_ar_orders(order, batch_size, generator, device)  # (B, L)
        orders_in = torch.cat([orders, orders]) if self._guided else orders

        # 4. Guidance schedule: MAR's linear schedule at one token per step
        self.prepare_guidance(mask_schedule(num_tokens, num_tokens), num_tokens, settings["guidance_schedule"])

        # 5. Autoregressive loop over the order; inside it, the diffusion head samples the step's token
        tokens = torch.zeros(batch_size, num_tokens, token_dim, device=device)  # (B, L, C), float32 canvas
        kv_cache = self.transformer.make_kv_cache(len(labels)) if use_cache else None
        for step in self.progress_bar(range(num_tokens)):
            if self.interrupt:
                break
            predict = orders[:, step : step + 1]  # (B, 1): the position made now
            tokens_in = torch.cat([tokens, tokens]) if self._guided else tokens
            tokens_in = tokens_in.to(self.transformer.dtype)
            if use_cache:
                condition = self.transformer(tokens_in, labels, orders_in, kv_cache=kv_cache, return_dict=False)[0]
            else:
                condition = self.transformer(tokens_in, labels, orders_in, return_dict=False)[0]  # (B', L, D)
                index = orders_in[:, step : step + 1].unsqueeze(-1).expand(-1, -1, condition.shape[-1])
                condition = torch.gather(condition, 1, index)  # (B', 1, D)
            sample = self.sample_tokens(
                condition, head, num_diffusion_steps, self.step_guidance(step), generator, noise and noise[step]
            )  # (B, 1, C)
            tokens = tokens.scatter(1, predict.unsqueeze(-1).expand(-1, -1, token_dim), sample)

            if callback_on_step_end is not None:
                num_unknown = num_tokens - step - 1
                mask = functools.partial(mask_by_order, num_unknown, orders)  # (B, L), only if asked for
                tokens = self.run_callback(
                    callback_on_step_end, callback_inputs, step, num_unknown, tokens, mask=mask, condition=condition
                )

        # 6. Decode
        return self.decode_output(self.transformer.unpatchify(tokens), output_type, generator, return_dict)
