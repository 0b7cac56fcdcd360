"""MARPipeline: class-conditional image generation with MAR (masked autoregression + per-token diffusion).

Sampling follows LTH14/mar `models/mar.py` `sample_tokens` and `models/diffloss.py` `DiffLoss.sample`. Both loops
are visible in `MARPipeline.__call__`: the outer masked-autoregressive loop over `num_inference_steps` and, inside
it, the scheduler loop of the diffusion head over `num_diffusion_steps`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffusers_mar.models.cpu_inference import cpu_inference
from diffusers_mar.models.diffusion_head_mar import MARDiffusionHead
from diffusers_mar.models.transformer_mar import MARTransformer2DModel
from diffusers_mar.pipelines.caches import TransformerPass
from diffusers_mar.pipelines.head_scheduler import guide, prepare_call_scheduler
from diffusers_mar.pipelines.model_card import copy_model_card
from diffusers_mar.pipelines.orders import check_fast_sampling, outer_mask_schedule, prepare_orders
from diffusers_mar.pipelines.sampling_settings import (
    FAST_SAMPLING_KEYS,
    SAMPLING_KEYS,
    apply_sampling_preset,
    check_sampling_settings,
    diffusion_step_schedule,
    resolve_sampling_settings,
)
from diffusers_mar.pipelines.schedules import (
    guidance_schedule_values,
    head_calls,
    mask_by_order,
    mask_schedule,  # noqa: F401  (re-exported: `diffusers_mar.mask_schedule`)
    prepare_class_labels,
    prepare_step_noise,
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
TOKEN_SPACES = ("pixel", "latent")

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


def vae_scale_factor(vae: torch.nn.Module | dict | None) -> int:
    """Pixels per latent cell of a diffusers VAE (or of its config): `2 ** (levels - 1)`; 1 without a VAE."""
    config = vae if vae is None or isinstance(vae, dict) else vae.config
    channels = None if config is None else config.get("block_out_channels")
    return 2 ** (len(channels) - 1) if channels else 1


class MARPipeline(DiffusionPipeline):
    r"""
    Pipeline for class-conditional image generation with MAR.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    Parameters:
        transformer ([`MARTransformer2DModel`]):
            The masked encoder-decoder that turns the known tokens into one condition per token.
        diffusion_head ([`MARDiffusionHead`]):
            The per-token denoiser.
        scheduler ([`SchedulerMixin`]):
            The per-token diffusion process, usually [`MARDDPMScheduler`]. Schedulers built from its config with
            `from_config` work or are refused at call time with what to set (`head_scheduler.py`; `docs/usage.md`).
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
            can only return `output_type="latent"`.
    """

    model_cpu_offload_seq = "transformer->vae"
    # The head runs between transformer calls at every step; it stays on the device instead of thrashing.
    _exclude_from_cpu_offload = ["diffusion_head"]
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["tokens", "mask", "condition"]
    _transformer_class, sampling_keys = MARTransformer2DModel, SAMPLING_KEYS  # ARPipeline: its own of both

    def __init__(
        self,
        transformer: MARTransformer2DModel,
        diffusion_head: MARDiffusionHead,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        id2label: dict[int, str] | dict[str, str] | None = None,
        sampling: dict | None = None,
        token_space: str | None = None,
    ):
        super().__init__()
        if not isinstance(transformer, self._transformer_class):
            # The pipeline a folder with this transformer holds: the first of the family whose transformer it is.
            family = [MARPipeline, *MARPipeline.__subclasses__()]
            owner = next((c.__name__ for c in family if c._transformer_class is type(transformer)), "other pipeline")
            raise ValueError(
                f"`transformer` of a {type(self).__name__} must be a {self._transformer_class.__name__}, got a "
                f"{type(transformer).__name__}: the folder holds a {owner}. Load it with `{owner}.from_pretrained("
                "folder)` or `DiffusionPipeline.from_pretrained(folder)`."
            )
        self.register_modules(transformer=transformer, diffusion_head=diffusion_head, scheduler=scheduler, vae=vae)
        id2label = {int(key): value for key, value in id2label.items()} if id2label else None
        if sampling is not None:
            check_sampling_settings(sampling, transformer.num_tokens, scheduler.config.num_train_timesteps, "sampling")
        token_space = token_space or ("latent" if vae is not None else "pixel")
        if token_space not in TOKEN_SPACES:
            raise ValueError(f"`token_space` must be one of {TOKEN_SPACES}; got {token_space!r}.")
        self.register_to_config(
            id2label=id2label, sampling=dict(sampling) if sampling else None, token_space=token_space
        )
        self.labels = {}
        for key, value in (id2label or {}).items():
            for label in value.split(","):
                self.labels[label.strip()] = key
        self.labels = dict(sorted(self.labels.items()))
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # Rows of the head's AdaLN modulation computed in one product per block (`schedules.head_calls`): steps with at
    # most half as many rows share a chunk; larger steps (and all steps, with 1) compute it block by block inside the
    # head, as the original. 128 rows (10 MB for MAR-B) read the weights once for several steps at small batch while
    # keeping the peak memory within 1.2x of the original's (docs/benchmarks.md).
    modulation_rows = 128

    @property
    def id2label(self) -> dict[int, str]:
        return dict(self.config.id2label or {})

    @property
    def sampling_defaults(self) -> dict:
        """The defaults of `__call__`'s sampling arguments: the folder's `sampling`, else the paper's (clipped)."""
        stored = self.config.get("sampling")
        return resolve_sampling_settings(
            stored, self.transformer.num_tokens, self.scheduler.config.num_train_timesteps
        )

    def set_sampling_defaults(self, **settings) -> None:
        """Store recommended sampling settings (keys among `SAMPLING_KEYS`) in the config; `save_pretrained` saves
        them. Keys not given keep their stored value."""
        check_sampling_settings(settings, self.transformer.num_tokens, self.scheduler.config.num_train_timesteps)
        self.register_to_config(sampling={**(self.config.get("sampling") or {}), **settings})

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`DiffusionPipeline.save_pretrained`, keeping the model card (`README.md`) of the folder loaded from."""
        super().save_pretrained(save_directory, *args, **kwargs)
        copy_model_card(self.config.get("_name_or_path"), save_directory)

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        r"""
        Map class names to class ids.

        Args:
            label (`str` or `list[str]`):
                Class names known to `id2label` (any of the comma-separated synonyms).

        Returns:
            `list[int]`: the class ids.
        """
        labels = [label] if isinstance(label, str) else list(label)
        if not self.labels:
            raise ValueError("This pipeline has no `id2label`; pass integer `class_labels` instead of names.")
        unknown = [name for name in labels if name not in self.labels]
        if unknown:
            raise ValueError(f"`label` has unknown names {unknown}; allowed names are: {list(self.labels)}.")
        return [self.labels[name] for name in labels]

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
        num_classes = self.transformer.config.num_classes
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
        bad = [label for label in class_labels if not 0 <= label <= num_classes]
        if bad:
            raise ValueError(
                f"`class_labels` must be in [0, {num_classes}] ({num_classes} = unconditional); got {bad}."
            )
        check_sampling_settings(settings, num_unknown, self.scheduler.config.num_train_timesteps)
        check_fast_sampling(
            fast_sampling or {}, orders, batch_size, num_tokens, num_unknown, settings["num_inference_steps"]
        )
        generators = generator if isinstance(generator, list) else [generator]
        if not all(g is None or isinstance(g, torch.Generator) for g in generators) or generators == []:
            raise ValueError(
                f"`generator` must be a `torch.Generator`, a list of them (one per image) or None; got {generator!r}."
            )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but the effective batch size is {batch_size} "
                "(class labels times `num_images_per_label`); pass one generator per image or a single generator."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}; got {output_type!r}.")
        if output_type != "latent" and self.vae is None and self.config.token_space == "latent":
            raise ValueError(
                f"`output_type={output_type!r}` needs a VAE: this pipeline's tokens are VAE latents "
                '(`token_space="latent"`) and it has no `vae`. Pass `output_type="latent"`, or load it with '
                "`vae=AutoencoderKL.from_pretrained(...)`."
            )
        if noise is not None and len(noise) != settings["num_inference_steps"]:
            raise ValueError(
                f"`noise` must hold one tensor per step ({settings['num_inference_steps']}); got {len(noise)}."
            )
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {sorted(unknown)}; allowed: {self._callback_tensor_inputs}."
            )
        return num_unknown

    def resolve_sampling_settings(
        self,
        num_inference_steps: int | None = None,
        num_diffusion_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        temperature: float | None = None,
    ) -> dict:
        """The five sampling arguments of a call: those given, else `sampling_defaults` (not yet checked)."""
        given = (num_inference_steps, num_diffusion_steps, guidance_scale, guidance_schedule, temperature)
        return {
            **self.sampling_defaults,
            **{key: value for key, value in zip(SAMPLING_KEYS, given) if value is not None},
        }

    def _decode_latents(self, latents: torch.Tensor, output_type: str, generator=None):
        """Token grid `(B, C, H, W)` (scaled latents, or pixels in [-1, 1]) -> images of `output_type`; `generator`
        goes to decoders that sample (ConsistencyDecoderVAE), as diffusers' pipelines pass it."""
        if output_type == "latent":
            return latents
        if self.vae is not None:
            latents = latents / self.vae.config.scaling_factor
            if getattr(self.vae.config, "shift_factor", None):
                latents = latents + self.vae.config.shift_factor
            takes_generator = "generator" in inspect.signature(self.vae.decode).parameters
            kwargs = {"generator": generator} if takes_generator else {}
            image = self.vae.decode(latents.to(self.vae.dtype), **kwargs).sample
        else:
            image = latents  # pixel space: tokens are pixels in [-1, 1]
        return self.image_processor.postprocess(image.float(), output_type=output_type)

    @torch.no_grad()
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
                `"tokens"` canvas, and set `pipe._interrupt = True` to stop early (unknown tokens stay zero).
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                The tensors put in `callback_kwargs`, among `"tokens"` (the canvas `(B, L, C)`), `"mask"` (`(B, L)`,
                1 = still unknown after the step) and `"condition"` (the step's conditions `(B', n, D)`, the
                unconditional half after the conditional one under guidance). Defaults to `["tokens"]`.
            latents (`torch.Tensor` of shape `(batch, in_channels, sample_size, sample_size)`, *optional*):
                A starting token grid, in the space of `output_type="latent"`: the values of the tokens that `mask`
                keeps. They are copied to the output unchanged.
            mask (`torch.Tensor` of shape `(batch, num_tokens)`, *optional*):
                1 = generate the token, 0 = keep it from `latents`. Every row must generate the same number of
                tokens; the mask schedule then runs over those tokens only. Defaults to generating all tokens.
            orders (`torch.LongTensor` of shape `(batch, num_tokens)`, *optional*):
                Generation orders, one permutation per image; the first entries stay unknown longest. Drawn with
                `generator` (`torch.randperm`) if not given. With `mask`, kept tokens are moved (stably) to the end.
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
        settings = self.resolve_sampling_settings(*(arguments[key] for key in SAMPLING_KEYS))
        fast = {key: arguments[key] for key in FAST_SAMPLING_KEYS}
        class_labels = prepare_class_labels(class_labels, num_images_per_label, self.transformer.config.num_classes)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["tokens"]
        num_unknown = self.check_inputs(
            class_labels, settings, generator, output_type, latents, mask, orders, noise,
            callback_on_step_end_tensor_inputs, fast,
        )  # fmt: skip
        num_inference_steps = settings["num_inference_steps"]
        diffusion_steps = diffusion_step_schedule(settings["num_diffusion_steps"], num_inference_steps)
        scheduler, keep_variance, step_noise_kwargs = prepare_call_scheduler(
            self.scheduler, sampling_preset, diffusion_steps, settings["temperature"], generator
        )
        device = self._execution_device
        batch_size, num_tokens, token_dim = len(class_labels), self.transformer.num_tokens, self.transformer.token_dim
        do_guidance = settings["guidance_scale"] != 1.0
        self._interrupt = False
        self._num_timesteps = num_inference_steps

        # 2. Class labels; the unconditional half follows the conditional one under guidance
        labels = torch.tensor(class_labels, device=device)
        if do_guidance:
            null_labels = torch.full_like(labels, self.transformer.config.num_classes)
            labels = torch.cat([labels, null_labels])

        # 3. Generation orders, one permutation per image (random unless `order` says otherwise)
        orders = prepare_orders(fast["order"], orders, batch_size, self.transformer.grid_size, generator, device, mask)

        # 4. Mask and guidance schedules, over the tokens to generate
        mask_lens = outer_mask_schedule(fast["outer_schedule"], num_unknown, num_inference_steps)
        guidance = guidance_schedule_values(
            settings["guidance_scale"], mask_lens, num_tokens, settings["guidance_schedule"]
        )

        # 5. Masked-autoregressive loop; inside it, the diffusion head's scheduler loop
        if latents is None:
            tokens = torch.zeros(batch_size, num_tokens, token_dim, device=device)  # (B, L, C), float32 canvas
        else:
            tokens = self.transformer.patchify(latents.to(device=device, dtype=torch.float32))
        head_dtype = self.diffusion_head.dtype  # a walk over the parameters: once, not per step
        transformer_pass = TransformerPass(
            self.transformer, labels, do_guidance, fast["guidance_cache_interval"], fast["feature_cache_interval"]
        )
        with cpu_inference(self.transformer):
            for step in self.progress_bar(range(num_inference_steps)):
                if self.interrupt:
                    break
                next_unknown = 0 if step == num_inference_steps - 1 else mask_lens[step]
                # Tokens predicted now: order[next_unknown:num_unknown], in raster order as the original's nonzero().
                predict = orders[:, next_unknown:num_unknown].sort(dim=1).values  # (B, n)
                n = predict.shape[1]
                condition = transformer_pass(step, tokens, mask_by_order(num_unknown, orders), predict)  # (B', n, D)
                condition_embedding = self.diffusion_head.embed_condition(
                    condition.reshape(-1, condition.shape[-1]).to(head_dtype)
                )  # (B' * n, W)

                # Timesteps stay on the host for the scheduler (no device sync per step); the head gets a device copy.
                scheduler.set_timesteps(diffusion_steps[step])
                step_noise = prepare_step_noise(
                    len(scheduler.timesteps), batch_size, n, token_dim, generator, device, noise and noise[step]
                )  # (1 + S, B * n, C)
                heads = head_calls(
                    self.diffusion_head, scheduler.timesteps.to(device), condition_embedding, self.modulation_rows
                )
                step_guidance = guidance[step] if do_guidance else None
                sample = step_noise[0] * scheduler.init_noise_sigma  # (B * n, C), not scaled by temperature
                for i, (t, head) in enumerate(zip(scheduler.timesteps, heads)):
                    model_input = scheduler.scale_model_input(sample, t)
                    model_input = torch.cat([model_input, model_input]) if do_guidance else model_input
                    model_output = head(model_input.to(head_dtype))
                    model_output = guide(model_output.float(), step_guidance, token_dim, keep_variance)
                    sample = scheduler.step(model_output, t, sample, **step_noise_kwargs(step_noise, i)).prev_sample

                tokens = tokens.scatter(
                    1, predict.unsqueeze(-1).expand(-1, -1, token_dim), sample.view(batch_size, n, -1)
                )
                num_unknown = next_unknown

                if callback_on_step_end is not None:
                    available = {"tokens": tokens, "mask": mask_by_order(num_unknown, orders), "condition": condition}
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, step, num_unknown, callback_kwargs) or {}
                    tokens = callback_outputs.pop("tokens", tokens)

        # 6. Decode
        image = self._decode_latents(self.transformer.unpatchify(tokens), output_type, generator)  # from (B, C, H, W)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


MARPipeline.__call__.__doc__ = MARPipeline.__call__.__doc__.replace("        Examples:\n", EXAMPLE_DOC_STRING, 1)
