"""MARPipeline: class-conditional image generation with MAR (masked autoregression + per-token diffusion).

Sampling follows LTH14/mar `models/mar.py` `sample_tokens` and `models/diffloss.py` `DiffLoss.sample`. Both loops
are visible in `MARPipeline.__call__`: the outer masked-autoregressive loop over `num_inference_steps` and, inside
it, the scheduler loop of the diffusion head over `num_diffusion_steps`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from diffusers_mar.models.cpu_inference import cpu_inference
from diffusers_mar.models.transformer_mar import MARTransformer2DModel
from diffusers_mar.pipelines.caches import TransformerPass
from diffusers_mar.pipelines.orders import check_fast_sampling, outer_mask_schedule, prepare_orders
from diffusers_mar.pipelines.pipeline_autoregressive import AutoregressivePipeline
from diffusers_mar.pipelines.sampling_settings import (
    FAST_SAMPLING_KEYS,
    SAMPLING_KEYS,
    apply_sampling_preset,
    check_sampling_settings,
    diffusion_step_schedule,
)
from diffusers_mar.pipelines.schedules import (
    mask_by_order,
    mask_schedule,  # noqa: F401  (re-exported: `diffusers_mar.mask_schedule`)
    prepare_class_labels,
)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_mar import MARPipeline

        >>> pipe = MARPipeline.from_pretrained("path/or/hub-id")
        >>> # Sampling settings not given come from the folder (`pipe.sampling_defaults`).
        >>> images = pipe(class_labels=[207, 360], generator=torch.manual_seed(0)).images
        ```
"""


class MARPipeline(AutoregressivePipeline):
    r"""
    Pipeline for class-conditional image generation with MAR.

    This model inherits from [`AutoregressivePipeline`] (components, labels, guidance, the head's sampling,
    callbacks, decoding) and [`DiffusionPipeline`] (downloading, saving, running on a particular device, etc.).

    Parameters:
        transformer ([`MARTransformer2DModel`]):
            The masked encoder-decoder that turns the known tokens into one condition per token.
        diffusion_head ([`MARDiffusionHead`]):
            The per-token denoiser.
        scheduler ([`SchedulerMixin`]):
            The per-token diffusion process, usually [`MARDDPMScheduler`]. Schedulers built from its config with
            `from_config` work, adapted at call time where needed, or are refused (`head_scheduler.py`;
            `docs/usage.md`).
        vae ([`AutoencoderKL`], *optional*):
            Decodes the tokens' latent grid into images (any diffusers VAE whose `decode` returns `.sample`).
        id2label (`dict[int, str]`, *optional*):
            Class names, comma-separated synonyms allowed (as `DiTPipeline`), for `get_label_ids`.
        sampling (`dict`, *optional*):
            The recommended sampling settings of the model (keys among `SAMPLING_KEYS`), the defaults of `__call__`;
            saved in `model_index.json`. Keys not given take the paper's values clipped to the model
            (`sampling_settings.resolve_sampling_settings`).
        token_space (`str`, *optional*):
            What the tokens are: `"pixel"` (patchified pixels in `[-1, 1]`) or `"latent"` (latents of a VAE).
            Defaults to `"latent"` with a `vae` and `"pixel"` without one. A latent-space pipeline without a VAE
            can only return `output_type="latent"`. Pixel tokens need a scheduler that clips (`clip_sample=True`);
            a DDPM or DDIM scheduler that does not logs a warning with the fix.
    """

    _transformer_class = MARTransformer2DModel
    sampling_keys = SAMPLING_KEYS

    def check_inputs(
        self,
        class_labels: list[int],
        settings: dict,
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        latents: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        orders: torch.Tensor | None = None,
        noise: list[torch.Tensor] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        fast_sampling: dict | None = None,
    ) -> int:
        """Validate the arguments of `__call__`; returns the number of tokens to generate per image."""
        num_tokens = self.transformer.num_tokens
        batch_size = len(class_labels)
        config = self.transformer.config
        grid_shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if latents is not None and tuple(latents.shape) != grid_shape:
            raise ValueError(f"`latents` must have shape {grid_shape}; got {tuple(latents.shape)}.")
        num_unknown = num_tokens
        if mask is not None:
            if tuple(mask.shape) != (batch_size, num_tokens) or not ((mask == 0) | (mask == 1)).all():
                raise ValueError(f"`mask` must be a ({batch_size}, {num_tokens}) tensor of 0 (keep) and 1 (generate).")
            counts = mask.sum(dim=1).long().tolist()
            if len(set(counts)) > 1 or counts[0] == 0:
                raise ValueError(
                    f"Every row of `mask` must mark the same number (>= 1) of tokens to generate; got {counts}."
                )
            num_unknown = counts[0]
            if latents is None and num_unknown < num_tokens:
                raise ValueError("`mask` keeps some tokens, so `latents` must give their values.")
        self.check_common_inputs(class_labels, generator, output_type, callback_on_step_end_tensor_inputs)
        check_sampling_settings(settings, num_unknown, self.scheduler.config.num_train_timesteps)
        check_fast_sampling(
            fast_sampling or {}, orders, batch_size, num_tokens, num_unknown, settings["num_inference_steps"]
        )
        if noise is not None and len(noise) != settings["num_inference_steps"]:
            raise ValueError(
                f"`noise` must hold one tensor per step ({settings['num_inference_steps']}); got {len(noise)}."
            )
        return num_unknown

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
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
        latents: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        orders: torch.Tensor | None = None,
        noise: list[torch.Tensor] | None = None,
        order: str | torch.Tensor = "random",
        outer_schedule: str = "cosine",
        guidance_cache_interval: int | None = None,
        feature_cache_interval: int | None = None,
        sampling_preset: str | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images of the given classes.

        The five sampling arguments (`num_inference_steps` to `temperature`) default to the pipeline's recommended
        settings, `pipe.sampling_defaults`: those stored in its folder, else the paper's (64 steps clipped to the
        number of tokens, 100 diffusion steps, guidance 3.0 with the linear schedule, temperature 1.0).

        Args:
            class_labels (`int`, `list[int]` or `torch.Tensor`):
                One class id per image, in `[0, num_classes]`; `num_classes` means unconditional.
            num_inference_steps (`int`, *optional*):
                Masked-autoregressive steps (the original's `num_iter`), in `[1, num_tokens]`.
            num_diffusion_steps (`int`, `list[int]` or `str`, *optional*):
                Scheduler steps of the diffusion head per token (the original's `num_sampling_steps`): one int, one
                per outer step, or a named schedule such as `"linear-50-5"` (DiSA's annealing; `docs/usage.md`).
            guidance_scale (`float`, *optional*):
                Classifier-free guidance scale; 1.0 disables guidance (and the doubled batch).
            guidance_schedule (`str`, *optional*):
                `"linear"`: the scale rises with the ratio of known tokens, as in the original; `"constant"`.
            temperature (`float`, *optional*):
                Multiplies the noise of every diffusion step (not the initial noise), as in the original.
            num_images_per_label (`int`, *optional*, defaults to 1):
                Images per class label, next to each other in the output (diffusers' `num_images_per_prompt`).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One generator, or one per image (`len(class_labels) * num_images_per_label`): then each image equals
                the image generated alone with its generator. All randomness (orders and noise) comes from it.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"` (the token grid `(B, C, H, W)`, scaled latents with a VAE).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`ImagePipelineOutput`] or a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after each outer step as `callback_on_step_end(pipe, step, timestep, callback_kwargs)`, with
                `timestep` the number of tokens still unknown after the step. It may return a dict with a new
                `"tokens"` or `"latents"` canvas, set `pipe._interrupt = True` to stop early (unknown tokens stay
                zero), and set `pipe._guidance_scale` (a guided call's scale from the next step on).
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                The tensors put in `callback_kwargs`, among `"latents"` (the canvas `(B, C, H, W)`, as diffusers'
                pipelines offer it), `"tokens"` (the same canvas `(B, L, C)`), `"mask"` (`(B, L)`, 1 = still
                unknown after the step) and `"condition"` (the step's conditions `(B', n, D)`, the unconditional
                half after the conditional one under guidance). Defaults to `["tokens"]`.
            latents (`torch.Tensor` of shape `(batch, in_channels, sample_size, sample_size)`, *optional*):
                A starting token grid, in the space of `output_type="latent"`: the values of the tokens that `mask`
                keeps. They are copied to the output unchanged.
            mask (`torch.Tensor` of shape `(batch, num_tokens)`, *optional*):
                1 = generate the token, 0 = keep it from `latents`. Every row must generate the same number of
                tokens; the mask schedule then runs over those tokens only. Defaults to generating all tokens.
            orders (`torch.LongTensor` of shape `(batch, num_tokens)`, *optional*):
                Generation orders, one permutation per image: `orders[:, k]` is the `k`-th token made (LTH14/mar
                lists them the other way round: `orders_from_original` converts). Drawn with `generator`
                (`torch.randperm`) if not given. With `mask`, kept tokens are moved (stably) to the start.
            noise (`list[torch.Tensor]`, *optional*):
                Per step `k`, a `(1 + S, batch, n_k, C)` tensor: `[0]` the initial noise and `[1 + i]` the noise of
                diffusion step `i` for the `n_k` tokens predicted at step `k` (raster order). `S` is the number of
                scheduler timesteps: `num_diffusion_steps`, or more for second-order and PNDM schedulers. Drawn with
                `generator` if not given; for replaying recorded randomness in tests.
            order (`str` or `torch.LongTensor`, *optional*, defaults to `"random"`):
                The generation order when `orders` is not given: `"random"` (the original's), `"raster"`,
                `"checkerboard"` (a checkerboard skeleton first; see `orders.py`), or a permutation tensor as `orders`.
            outer_schedule (`str`, *optional*, defaults to `"cosine"`):
                Tokens per outer step: `"cosine"` (the original's) or `"skeleton"` (the first half of the order over all
                steps but the last, the rest in the last step; at most `ceil(num_tokens / 2) + 1` steps).
            guidance_cache_interval (`int`, *optional*):
                Reuse the guidance difference of the transformer's conditions, refreshed every that many outer steps
                (`caches.py`; 1 = refresh at every step, the same as None, no cache).
            feature_cache_interval (`int`, *optional*):
                Reuse the transformer's conditions of the still-unknown tokens, refreshed every that many outer steps
                (`caches.py`; 1 = refresh at every step, the same as None, no cache).
            sampling_preset (`str`, *optional*):
                A named set of the arguments above, among `SAMPLING_PRESETS` (`docs/usage.md`), for the arguments
                left at their defaults (`None`, `"random"`, `"cosine"`); the others keep their given value.
                `"fast"`: 8 outer steps (at most a quarter of the tokens) x 8 head steps of DPM-Solver++ (2M,
                `leading` spacing, built from `pipe.scheduler.config` for the call when `pipe.scheduler` is the
                model's `MARDDPMScheduler`; it needs temperature 1). `"fast-ddpm"`: 8 outer steps, head steps
                annealed from 25 to 5 (`"linear-25-5"`), the pipeline's own scheduler.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        # 1. Check inputs (a `sampling_preset` fills in the arguments left at their defaults)
        arguments = apply_sampling_preset(sampling_preset, locals(), self.transformer.num_tokens)
        settings = self.resolve_sampling_settings(**{key: arguments[key] for key in SAMPLING_KEYS})
        fast = {key: arguments[key] for key in FAST_SAMPLING_KEYS}
        class_labels = prepare_class_labels(class_labels, num_images_per_label, self.transformer.config.num_classes)
        callback_inputs = self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        num_unknown = self.check_inputs(
            class_labels, settings, generator, output_type, latents, mask, orders, noise, callback_inputs, fast
        )
        num_inference_steps = settings["num_inference_steps"]
        diffusion_steps = diffusion_step_schedule(settings["num_diffusion_steps"], num_inference_steps)
        head = self.prepare_head_sampler(diffusion_steps, settings["temperature"], generator, sampling_preset)
        device = self._execution_device
        batch_size, num_tokens, token_dim = len(class_labels), self.transformer.num_tokens, self.transformer.token_dim
        self._interrupt = False
        self._num_timesteps = num_inference_steps

        # 2. Class labels; the unconditional half follows the conditional one under guidance
        labels = self.prepare_labels(class_labels, settings["guidance_scale"], device)

        # 3. Generation orders, one permutation per image (random unless `order` says otherwise)
        orders = prepare_orders(fast["order"], orders, batch_size, self.transformer.grid_size, generator, device, mask)

        # 4. Mask and guidance schedules, over the tokens to generate
        mask_lens = outer_mask_schedule(fast["outer_schedule"], num_unknown, num_inference_steps)
        self.prepare_guidance(mask_lens, num_tokens, settings["guidance_schedule"])

        # 5. Masked-autoregressive loop; inside it, the diffusion head samples the step's tokens
        if latents is None:
            tokens = torch.zeros(batch_size, num_tokens, token_dim, device=device)  # (B, L, C), float32 canvas
        else:
            tokens = self.transformer.patchify(latents.to(device=device, dtype=torch.float32))
        transformer_pass = TransformerPass(
            self.transformer, labels, self._guided, fast["guidance_cache_interval"], fast["feature_cache_interval"]
        )
        with cpu_inference(self.transformer):
            for step in self.progress_bar(range(num_inference_steps)):
                if self.interrupt:
                    break
                next_unknown = 0 if step == num_inference_steps - 1 else mask_lens[step]
                # Tokens predicted now: the first of the unknown ones in the order, in raster order as the original's
                # nonzero().
                predict = orders[:, num_tokens - num_unknown : num_tokens - next_unknown].sort(dim=1).values  # (B, n)
                condition = transformer_pass(step, tokens, mask_by_order(num_unknown, orders), predict)  # (B', n, D)
                sample = self.sample_tokens(
                    condition, head, diffusion_steps[step], self.step_guidance(step), generator, noise and noise[step]
                )  # (B, n, C)
                tokens = tokens.scatter(1, predict.unsqueeze(-1).expand(-1, -1, token_dim), sample)
                num_unknown = next_unknown

                if callback_on_step_end is not None:
                    mask_after = functools.partial(mask_by_order, num_unknown, orders)  # (B, L), only if asked for
                    tokens = self.run_callback(
                        callback_on_step_end,
                        callback_inputs,
                        step,
                        num_unknown,
                        tokens,
                        mask=mask_after,
                        condition=condition,
                    )

        # 6. Decode
        return self.decode_output(self.transformer.unpatchify(tokens), output_type, generator, return_dict)
