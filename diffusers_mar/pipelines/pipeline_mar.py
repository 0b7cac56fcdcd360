"""MARPipeline: class-conditional image generation with MAR (masked autoregression + per-token diffusion).

Sampling follows LTH14/mar `models/mar.py` `sample_tokens` and `models/diffloss.py` `DiffLoss.sample`. Both loops
are visible in `MARPipeline.__call__`: the outer masked-autoregressive loop over `num_inference_steps` and, inside
it, the scheduler loop of the diffusion head over `num_diffusion_steps`.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from diffusers_mar.models.diffusion_head_mar import MARDiffusionHead
from diffusers_mar.models.transformer_mar import MARTransformer2DModel, is_plain_linear

logger = logging.get_logger(__name__)

GUIDANCE_SCHEDULES = ("linear", "constant")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_mar import MARPipeline

        >>> pipe = MARPipeline.from_pretrained("path/or/hub-id")
        >>> images = pipe(class_labels=[207, 360], guidance_scale=3.0, generator=torch.manual_seed(0)).images
        ```
"""


def mask_schedule(num_tokens: int, num_inference_steps: int) -> list[int]:
    """Tokens still unknown after each step: cosine schedule, clamped to predict at least one token per step.

    As in LTH14/mar `sample_tokens`: `max(1, min(unknown - 1, floor(L cos(pi/2 (k+1)/K))))`. The last entry is
    clamped to 1 as in the original, although the last step predicts every remaining token.
    """
    mask_lens = []
    unknown = num_tokens
    for step in range(num_inference_steps):
        target = np.floor(num_tokens * np.cos(math.pi / 2.0 * (step + 1) / num_inference_steps))
        unknown = int(max(1, min(unknown - 1, target)))
        mask_lens.append(unknown)
    return mask_lens


def guidance_schedule_values(
    guidance_scale: float, mask_lens: list[int], num_tokens: int, schedule: str = "linear"
) -> list[float]:
    """Guidance per step: 'linear' rises with the known-token ratio after the step (never reaching the scale)."""
    if schedule == "constant":
        return [float(np.float32(guidance_scale))] * len(mask_lens)
    # As in LTH14/mar sample_tokens: 1 + (cfg - 1) * (L - mask_len) / L, in float32.
    mask_len = torch.tensor(mask_lens, dtype=torch.float32)
    return (1 + (guidance_scale - 1) * (num_tokens - mask_len) / num_tokens).tolist()


def mask_by_order(num_unknown: int, orders: torch.Tensor) -> torch.Tensor:
    """Mask (1 = unknown) of the first `num_unknown` positions of each order: (B, L) float."""
    mask = torch.zeros(orders.shape, device=orders.device)
    return mask.scatter(1, orders[:, :num_unknown], 1.0)


@contextlib.contextmanager
def prepacked_linears(*modules: torch.nn.Module):
    """Run the modules' float32 `nn.Linear` layers on CPU through oneDNN with weights reordered once, for inference.

    PyTorch's CPU linear repacks the weight matrix on every call. The diffusion head runs `num_diffusion_steps` times
    per outer step on a few tokens (a few rows), so that repacking dominates its time at small batch. Inside this
    context every eligible layer uses a copy of its weight in oneDNN's blocked layout (`torch.ops.mkldnn`), packed
    once on entry; the results equal the plain layer's to float32 rounding. Outside it, nothing is changed. Layers are
    left alone unless they are float32 on the CPU, gradients are off, oneDNN is available, and nothing else (an
    Accelerate hook, `torch.compile`) has replaced their forward.
    """
    swapped = []
    usable = (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )
    for module in modules if usable else ():
        # torch.compile'd (wrapped, or in place with `module.compile()`): leave it to the compiler.
        if hasattr(module, "_orig_mod") or any(getattr(m, "_compiled_call_impl", None) for m in module.modules()):
            continue
        for layer in module.modules():
            if not is_plain_linear(layer) or layer.weight.device.type != "cpu" or layer.weight.dtype != torch.float32:
                continue
            # 64: the row count oneDNN picks the layout for; calls with any other row count use the same copy.
            packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 64)
            bias = None if layer.bias is None else layer.bias.detach()

            def forward(x: torch.Tensor, packed=packed, bias=bias, fallback=layer.forward) -> torch.Tensor:
                if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 2 or x.numel() == 0:
                    return fallback(x)
                out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
                return out.reshape(*x.shape[:-1], out.shape[-1])

            layer.forward = forward
            swapped.append(layer)
    try:
        yield len(swapped)
    finally:
        for layer in swapped:
            del layer.forward


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
            The per-token diffusion process, usually [`MARDDPMScheduler`]. [`DDPMScheduler`], [`DDIMScheduler`]
            and [`DPMSolverMultistepScheduler`] built from its config also work.
        vae ([`AutoencoderKL`], *optional*):
            Decodes the tokens' latent grid into images. Without it the pipeline works in pixel space: the tokens
            are patchified pixels in `[-1, 1]`.
        id2label (`dict[int, str]`, *optional*):
            Class names, comma-separated synonyms allowed (as `DiTPipeline`), for `get_label_ids`.
    """

    model_cpu_offload_seq = "transformer->vae"
    # The head runs between transformer calls at every step; it stays on the device instead of thrashing.
    _exclude_from_cpu_offload = ["diffusion_head"]
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: MARTransformer2DModel,
        diffusion_head: MARDiffusionHead,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        id2label: dict[int, str] | dict[str, str] | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, diffusion_head=diffusion_head, scheduler=scheduler, vae=vae)
        id2label = {int(key): value for key, value in id2label.items()} if id2label else None
        self.register_to_config(id2label=id2label)
        self.labels = {}
        for key, value in (id2label or {}).items():
            for label in value.split(","):
                self.labels[label.strip()] = key
        self.labels = dict(sorted(self.labels.items()))
        vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)

    # The diffusion head's float32 CPU linears run on weights packed once per call (see `prepacked_linears`).
    _cpu_prepacking = True
    # Rows of the head's AdaLN modulation computed in one product: when a diffusion step has fewer rows, the
    # modulations of several steps are computed together, in equal chunks of about this many rows (1: one step at a
    # time, as the original). 256 rows keep the product efficient and its output small.
    modulation_rows = 256

    def enable_cpu_prepacking(self) -> None:
        """Run the diffusion head's float32 CPU linears on weights packed once per call (the default; see
        `prepacked_linears`): about 1.03x on MAR-B at batch 1 (16 x 25 steps), equal to float32 rounding. Costs one
        extra copy of the head's weights during the call. Has no effect on CUDA, in half precision, or on a compiled
        head."""
        self._cpu_prepacking = True

    def disable_cpu_prepacking(self) -> None:
        """Use PyTorch's plain CPU linear for the diffusion head (no packed weight copy)."""
        self._cpu_prepacking = False

    @property
    def id2label(self) -> dict[int, str]:
        return dict(self.config.id2label or {})

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
        num_inference_steps: int,
        num_diffusion_steps: int,
        guidance_scale: float,
        guidance_schedule: str,
        temperature: float,
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        latents: torch.Tensor | None,
        mask: torch.Tensor | None,
        orders: torch.Tensor | None,
        noise: list[torch.Tensor] | None,
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
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= num_unknown:
            raise ValueError(
                f"`num_inference_steps` must be an int in [1, {num_unknown}] (one step predicts at least one of the "
                f"{num_unknown} tokens to generate); got {num_inference_steps!r}."
            )
        max_steps = self.scheduler.config.num_train_timesteps
        if not isinstance(num_diffusion_steps, int) or not 1 <= num_diffusion_steps <= max_steps:
            raise ValueError(f"`num_diffusion_steps` must be an int in [1, {max_steps}]; got {num_diffusion_steps!r}.")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a number >= 0 (1 disables guidance); got {guidance_scale!r}.")
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"`guidance_schedule` must be one of {GUIDANCE_SCHEDULES}; got {guidance_schedule!r}.")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"`temperature` must be a number > 0; got {temperature!r}.")
        if isinstance(generator, list) and len(generator) != len(class_labels):
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but {len(class_labels)} images were "
                "requested; pass one generator per image or a single generator."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}; got {output_type!r}.")
        if orders is not None:
            expected = torch.arange(num_tokens).expand(len(class_labels), -1)
            if orders.shape != expected.shape or not torch.equal(orders.sort(dim=1).values.cpu(), expected):
                raise ValueError(
                    f"`orders` must be a ({len(class_labels)}, {num_tokens}) tensor whose rows are permutations "
                    f"of 0..{num_tokens - 1}."
                )
        if noise is not None and len(noise) != num_inference_steps:
            raise ValueError(f"`noise` must hold one tensor per step ({num_inference_steps}); got {len(noise)}.")
        return num_unknown

    def _prepare_class_labels(self, class_labels: int | list[int] | torch.Tensor) -> list[int]:
        if isinstance(class_labels, torch.Tensor):
            if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool or class_labels.ndim > 1:
                raise ValueError(
                    f"`class_labels` must be a 1-D integer tensor; got {class_labels.dtype} {class_labels.shape}."
                )
            class_labels = class_labels.tolist()
        elif isinstance(class_labels, int) and not isinstance(class_labels, bool):
            class_labels = [class_labels]
        if (
            not isinstance(class_labels, (list, tuple))
            or len(class_labels) == 0
            or any(isinstance(label, bool) or not isinstance(label, (int, np.integer)) for label in class_labels)
        ):
            raise ValueError(
                f"`class_labels` must be an int, a non-empty list of ints or a 1-D integer tensor; got {class_labels!r}."
            )
        return [int(label) for label in class_labels]

    def _head_scheduler(
        self, temperature: float, generator: torch.Generator | list | None
    ) -> tuple[SchedulerMixin, bool, str | None]:
        """The scheduler to run per token, whether it takes the learned variance, and how it gets its noise."""
        scheduler = self.scheduler
        learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
        keep_variance = learned and isinstance(scheduler, DDPMScheduler)
        if learned and not keep_variance:
            # DPM-Solver and friends would slice a learned-variance output to 3 channels; give them eps only.
            scheduler = scheduler.__class__.from_config(scheduler.config, variance_type=None)
        step_params = inspect.signature(scheduler.step).parameters
        if "variance_noise" not in step_params:
            if temperature != 1.0:
                raise ValueError(
                    f"`temperature` != 1 needs a scheduler whose `step` takes the noise (e.g. MARDDPMScheduler); "
                    f"{scheduler.__class__.__name__} does not."
                )
            if isinstance(generator, list):
                raise ValueError(
                    f"{scheduler.__class__.__name__} draws its own noise and takes one generator, not a list; pass "
                    "a single `generator` or use MARDDPMScheduler."
                )
        if "variance_noise" in step_params:
            noise_mode = "temperature" if "temperature" in step_params else "variance_noise"
        else:
            noise_mode = "generator" if "generator" in step_params else None
        return scheduler, keep_variance, noise_mode

    def _decode_latents(self, latents: torch.Tensor, output_type: str):
        """Token grid `(B, C, H, W)` (scaled latents, or pixels in [-1, 1]) -> images of `output_type`."""
        if output_type == "latent":
            return latents
        if self.vae is not None:
            latents = latents / self.vae.config.scaling_factor
            if getattr(self.vae.config, "shift_factor", None):
                latents = latents + self.vae.config.shift_factor
            image = self.vae.decode(latents.to(self.vae.dtype)).sample
        else:
            image = latents  # pixel space: tokens are pixels in [-1, 1]
        return self.image_processor.postprocess(image.float(), output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        num_inference_steps: int = 64,
        num_diffusion_steps: int = 100,
        guidance_scale: float = 3.0,
        guidance_schedule: str = "linear",
        temperature: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        orders: torch.Tensor | None = None,
        noise: list[torch.Tensor] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images of the given classes.

        Args:
            class_labels (`int`, `list[int]` or `torch.Tensor`):
                One class id per image, in `[0, num_classes]`; `num_classes` means unconditional.
            num_inference_steps (`int`, *optional*, defaults to 64):
                Masked-autoregressive steps (the original's `num_iter`), in `[1, num_tokens]`.
            num_diffusion_steps (`int`, *optional*, defaults to 100):
                Scheduler steps of the diffusion head per token (the original's `num_sampling_steps`).
            guidance_scale (`float`, *optional*, defaults to 3.0):
                Classifier-free guidance scale; 1.0 disables guidance (and the doubled batch).
            guidance_schedule (`str`, *optional*, defaults to `"linear"`):
                `"linear"`: the scale rises with the ratio of known tokens, as in the original; `"constant"`.
            temperature (`float`, *optional*, defaults to 1.0):
                Multiplies the noise of every diffusion step (not the initial noise), as in the original.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One generator, or one per image: then each image equals the image generated alone with its
                generator. All randomness (orders and noise) comes from it.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"` (the token grid `(B, C, H, W)`, scaled latents with a VAE).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`ImagePipelineOutput`] or a tuple.
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
                Per step `k`, a `(1 + num_diffusion_steps, batch, n_k, C)` tensor: `[0]` the initial noise and
                `[1 + i]` the noise of diffusion step `i` for the `n_k` tokens predicted at step `k` (raster order).
                Drawn with `generator` if not given; for replaying recorded randomness in tests.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        # 1. Check inputs
        class_labels = self._prepare_class_labels(class_labels)
        num_unknown = self.check_inputs(
            class_labels,
            num_inference_steps,
            num_diffusion_steps,
            guidance_scale,
            guidance_schedule,
            temperature,
            generator,
            output_type,
            latents,
            mask,
            orders,
            noise,
        )
        scheduler, keep_variance, noise_mode = self._head_scheduler(temperature, generator)
        device = self._execution_device
        batch_size, num_tokens = len(class_labels), self.transformer.num_tokens
        token_dim = self.transformer.token_dim
        do_guidance = guidance_scale != 1.0
        generators = generator if isinstance(generator, list) else [generator] * batch_size

        # 2. Class labels; the unconditional half follows the conditional one under guidance
        labels = torch.tensor(class_labels, device=device)
        if do_guidance:
            null_labels = torch.full_like(labels, self.transformer.config.num_classes)
            labels = torch.cat([labels, null_labels])

        # 3. Generation orders, one random permutation per image
        if orders is None:
            orders = torch.stack(
                [torch.randperm(num_tokens, generator=g, device=g.device if g else "cpu") for g in generators]
            )
        orders = orders.to(device=device, dtype=torch.long)
        if mask is not None:
            # Tokens to keep go to the end of each order (stable, so the random order of the others is kept).
            keep = (mask.to(device).gather(1, orders) == 0).to(torch.uint8)
            orders = orders.gather(1, torch.argsort(keep, dim=1, stable=True))

        # 4. Mask and guidance schedules, over the tokens to generate
        mask_lens = mask_schedule(num_unknown, num_inference_steps)
        guidance = guidance_schedule_values(guidance_scale, mask_lens, num_tokens, guidance_schedule)

        # 5. Masked-autoregressive loop; inside it, the diffusion head's scheduler loop
        if latents is None:
            tokens = torch.zeros(batch_size, num_tokens, token_dim, device=device)  # (B, L, C), float32 canvas
        else:
            tokens = self.transformer.patchify(latents.to(device=device, dtype=torch.float32))
        packing = prepacked_linears(self.diffusion_head) if self._cpu_prepacking else contextlib.nullcontext()
        head_dtype = self.diffusion_head.dtype  # a walk over the parameters: once, not per step
        with packing:
            for step in self.progress_bar(range(num_inference_steps)):
                next_unknown = 0 if step == num_inference_steps - 1 else mask_lens[step]
                # Tokens predicted now: order[next_unknown:num_unknown], in raster order as the original's nonzero().
                predict = orders[:, next_unknown:num_unknown].sort(dim=1).values  # (B, n)
                n = predict.shape[1]
                step_mask = mask_by_order(num_unknown, orders)
                tokens_in, mask_in, predict_in = tokens, step_mask, predict
                if do_guidance:
                    tokens_in, mask_in, predict_in = (torch.cat([x, x]) for x in (tokens, step_mask, predict))
                condition = self.transformer(
                    tokens_in.to(self.transformer.dtype), mask_in, labels, predict_indices=predict_in
                )  # (B', n, D)
                condition_embedding = self.diffusion_head.embed_condition(
                    condition.reshape(-1, condition.shape[-1]).to(head_dtype)
                )  # (B' * n, W)

                if noise is None:
                    step_noise = randn_tensor(
                        (batch_size, 1 + num_diffusion_steps, n, token_dim), generator=generator, device=device
                    ).transpose(0, 1)  # (1 + S, B, n, C)
                else:
                    step_noise = noise[step].to(device=device, dtype=torch.float32)
                step_noise = step_noise.reshape(1 + num_diffusion_steps, batch_size * n, token_dim)

                # Timesteps stay on the host for the scheduler (no device sync per step); the head gets a device copy.
                scheduler.set_timesteps(num_diffusion_steps)
                head_timesteps = scheduler.timesteps.to(device)
                # The AdaLN modulation depends on (timestep, condition) only: with few rows per step, that of
                # several steps is one matrix product (the weights are read once instead of once per step),
                # in equal chunks of at most about `modulation_rows` rows.
                chunks = -(-len(head_timesteps) * condition_embedding.shape[0] // max(1, self.modulation_rows))
                steps_per_modulation = -(-len(head_timesteps) // min(chunks, len(head_timesteps)))
                sample = step_noise[0] * scheduler.init_noise_sigma  # (B * n, C), not scaled by temperature
                for i, t in enumerate(scheduler.timesteps):
                    if i % steps_per_modulation == 0:
                        modulation = self.diffusion_head.compute_modulation(
                            head_timesteps[i : i + steps_per_modulation], condition_embedding
                        )  # (steps, B' * n, M)
                    model_input = scheduler.scale_model_input(sample, t)
                    if do_guidance:
                        model_input = torch.cat([model_input, model_input])
                    model_output = self.diffusion_head(
                        model_input.to(head_dtype),
                        head_timesteps[i],
                        modulation=modulation[i % steps_per_modulation],
                    ).float()  # (B' * n, 2C)
                    if do_guidance:
                        # Guide eps only; keep the conditional rows' variance, as the original's forward_with_cfg.
                        cond, uncond = model_output.chunk(2)
                        eps = uncond[:, :token_dim] + guidance[step] * (cond[:, :token_dim] - uncond[:, :token_dim])
                        model_output = torch.cat([eps, cond[:, token_dim:]], dim=1)
                    if not keep_variance:
                        model_output = model_output[:, :token_dim]
                    if noise_mode == "temperature":
                        step_kwargs = {"variance_noise": step_noise[1 + i], "temperature": temperature}
                    elif noise_mode == "variance_noise":
                        step_kwargs = {"variance_noise": step_noise[1 + i] * temperature}
                    else:
                        step_kwargs = {"generator": generator} if noise_mode == "generator" else {}
                    sample = scheduler.step(model_output, t, sample, **step_kwargs).prev_sample

                tokens = tokens.scatter(
                    1, predict.unsqueeze(-1).expand(-1, -1, token_dim), sample.view(batch_size, n, -1)
                )
                num_unknown = next_unknown

        # 6. Decode
        image = self._decode_latents(self.transformer.unpatchify(tokens), output_type)  # from (B, C, H, W)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


MARPipeline.__call__.__doc__ = MARPipeline.__call__.__doc__.replace("        Examples:\n", EXAMPLE_DOC_STRING, 1)
