"""AutoregressivePipeline: the shared base of the token-wise generators with a diffusion head (`MARPipeline`,
`ARPipeline`, ...).

A token-wise generator makes an image's tokens over several outer steps. At each step its transformer turns the known
tokens into one condition per token to make, and the per-token diffusion head samples those tokens from their
conditions: `sample_tokens`, the role of LTH14/mar's `DiffLoss.sample` (and of DiT's `forward_with_cfg`), so that a
reader sees one call inside each family's outer loop. On `TokenGeneratorPipeline` (class labels and the null label,
the recommended sampling settings, guidance's doubled batch and properties, the common checks, saving), this base
holds what the diffusion-head families do the same way: the components and `token_space`, the guidance schedule over
the outer steps, the head's sampling, the callback block on the token canvas, decoding and the output. Each family
writes its outer loop in its own `__call__` (`docs/new_family.md`). A family without a diffusion head (VAR)
subclasses `TokenGeneratorPipeline` directly.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import AutoencoderKL, ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging

from diffusers_mar.models.diffusion_head_mar import MARDiffusionHead
from diffusers_mar.pipelines.head_scheduler import prepare_call_scheduler
from diffusers_mar.pipelines.pipeline_token_generator import TokenGeneratorPipeline
from diffusers_mar.pipelines.sampling_settings import PAPER_SAMPLING, SAMPLING_KEYS
from diffusers_mar.pipelines.schedules import guidance_schedule_values, guide, head_calls, prepare_step_noise

logger = logging.get_logger(__name__)

TOKEN_SPACES = ("pixel", "latent")


def vae_scale_factor(vae: torch.nn.Module | dict | None) -> int:
    """Pixels per latent cell of a diffusers VAE (or of its config): `2 ** (levels - 1)`; 1 without a VAE."""
    config = vae if vae is None or isinstance(vae, dict) else vae.config
    channels = None if config is None else config.get("block_out_channels")
    return 2 ** (len(channels) - 1) if channels else 1


def check_pixel_clipping(scheduler: SchedulerMixin) -> None:
    """Warn when pixel tokens are sampled by a DDPM or DDIM scheduler that does not clip `x0_hat` to [-1, 1]."""
    # A warning, not an error: folders and the parity fixtures of LTH14/mar sample unclipped, as the original does.
    if not scheduler.config.get("clip_sample", False):
        name = type(scheduler).__name__
        logger.warning(
            f'This pipeline\'s tokens are pixels (`token_space="pixel"`) but its {name} does not clip '
            "(`clip_sample=False`, the default of a scheduler built by hand): pixel models usually sample badly "
            "without it (digits models: accuracy 0.18 or less, against 0.9 or more with clipping). "
            "training/train_mar.py writes pixel-space folders with `clip_sample=True`; build the scheduler so: "
            f"`pipe.scheduler = {name}.from_config(pipe.scheduler.config, clip_sample=True)`."
        )


class HeadSampler(NamedTuple):
    """The head's scheduler of a call, prepared once (`AutoregressivePipeline.prepare_head_sampler`)."""

    scheduler: SchedulerMixin
    keep_variance: bool  # whether `step` takes the head's learned variance
    noise_kwargs: Callable[[torch.Tensor, int], dict]  # `step`'s noise arguments for step `i` of the drawn noise
    dtype: torch.dtype  # the head's


class AutoregressivePipeline(TokenGeneratorPipeline):
    r"""
    Base of the pipelines that generate an image's tokens step by step, each token sampled by a diffusion head.

    This model inherits from [`TokenGeneratorPipeline`] (labels, sampling settings, guidance properties, common
    checks, saving) and [`DiffusionPipeline`]. A family subclasses it, sets `_transformer_class` and
    `sampling_keys`, and writes its outer loop in `__call__`; see `docs/new_family.md`.

    Parameters:
        transformer ([`ModelMixin`]):
            The family's transformer (`_transformer_class`): tokens in, one condition per token to make out.
        diffusion_head ([`MARDiffusionHead`]):
            The per-token denoiser.
        scheduler ([`SchedulerMixin`]):
            The per-token diffusion process, usually [`MARDDPMScheduler`]. Schedulers built from its config with
            `from_config` work, adapted at call time where needed, or are refused (`head_scheduler.py`).
        vae ([`AutoencoderKL`], *optional*):
            Decodes the tokens' latent grid into images (any diffusers VAE whose `decode` returns `.sample`).
        id2label (`dict[int, str]`, *optional*):
            Class names, comma-separated synonyms allowed (as `DiTPipeline`), for `get_label_ids`.
        sampling (`dict`, *optional*):
            The recommended sampling settings of the model (keys among the family's `sampling_keys`), the defaults
            of `__call__`; saved in `model_index.json`. Keys not given take the paper's values clipped to the model.
        token_space (`str`, *optional*):
            What the tokens are: `"pixel"` (patchified pixels in `[-1, 1]`) or `"latent"` (latents of a VAE).
            Defaults to `"latent"` with a `vae` and `"pixel"` without one. A latent-space pipeline without a VAE
            can only return `output_type="latent"`. Pixel tokens need a scheduler that clips (`clip_sample=True`);
            a DDPM or DDIM scheduler that does not logs a warning with the fix.
    """

    model_cpu_offload_seq = "transformer->vae"
    # The head runs between transformer calls at every step; it stays on the device instead of thrashing.
    _exclude_from_cpu_offload = ["diffusion_head"]
    _optional_components = ["vae"]
    # "latents" is the canvas as diffusers' pipelines offer it, (B, C, H, W); "tokens" the same canvas as (B, L, C).
    _callback_tensor_inputs = ["latents", "tokens", "mask", "condition"]
    _default_callback_tensor_inputs = ["tokens"]
    sampling_keys: tuple[str, ...] = SAMPLING_KEYS  # the `__call__` arguments a family's folder may recommend
    paper_sampling = PAPER_SAMPLING

    # Rows of the head's AdaLN modulation computed in one product per block (`schedules.head_calls`): steps with at
    # most half as many rows share a chunk; larger steps (and all steps, with 1) compute it block by block inside the
    # head, as the original. 128 rows (10 MB for MAR-B) read the weights once for several steps at small batch while
    # keeping the peak memory within 1.2x of the original's (docs/benchmarks.md).
    modulation_rows = 128

    def __init__(
        self,
        transformer: ModelMixin,
        diffusion_head: MARDiffusionHead,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        id2label: dict[int, str] | dict[str, str] | None = None,
        sampling: dict | None = None,
        token_space: str | None = None,
    ):
        super().__init__()
        self.check_transformer(transformer)
        self.register_modules(transformer=transformer, diffusion_head=diffusion_head, scheduler=scheduler, vae=vae)
        self.register_labels_and_sampling(id2label, sampling)
        token_space = token_space or ("latent" if vae is not None else "pixel")
        if token_space not in TOKEN_SPACES:
            raise ValueError(f"`token_space` must be one of {TOKEN_SPACES}; got {token_space!r}.")
        if token_space == "pixel" and isinstance(scheduler, DDPMScheduler | DDIMScheduler):
            check_pixel_clipping(scheduler)
        self.register_to_config(token_space=token_space)
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def sampling_limits(self) -> dict:
        return {
            "num_tokens": self.transformer.num_tokens,
            "num_train_timesteps": self.scheduler.config.num_train_timesteps,
        }

    def check_common_inputs(
        self,
        class_labels: list[int],
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> None:
        """Validate the arguments every family's `__call__` takes (`TokenGeneratorPipeline.check_common_inputs`), and
        that images can be decoded."""
        super().check_common_inputs(class_labels, generator, output_type, callback_on_step_end_tensor_inputs)
        if output_type != "latent" and self.vae is None and self.config.token_space == "latent":
            raise ValueError(
                f"`output_type={output_type!r}` needs a VAE: this pipeline's tokens are VAE latents "
                '(`token_space="latent"`) and it has no `vae`. Pass `output_type="latent"`, or load it with '
                "`vae=AutoencoderKL.from_pretrained(...)`."
            )

    def prepare_guidance(self, mask_lens: list[int], num_tokens: int, schedule: str) -> None:
        """The guidance schedule of the call's outer steps (`mask_lens`: tokens still unknown after each)."""
        self._guidance_plan = (mask_lens, num_tokens, schedule)
        self._guidance_values = (
            self._guidance_scale,
            guidance_schedule_values(self._guidance_scale, *self._guidance_plan),
        )

    def step_guidance(self, step: int) -> float | None:
        """The guidance scale of outer step `step` (None: no guidance), from the current `_guidance_scale`."""
        if not self._guided:
            return None
        if self._guidance_values[0] != self._guidance_scale:  # a callback changed it: reschedule the steps left
            self._guidance_values = (
                self._guidance_scale,
                guidance_schedule_values(self._guidance_scale, *self._guidance_plan),
            )
        return self._guidance_values[1][step]

    def prepare_head_sampler(
        self,
        diffusion_steps: list[int],
        temperature: float,
        generator: torch.Generator | list[torch.Generator] | None,
        preset: str | None = None,
    ) -> HeadSampler:
        """The head's scheduler for a call's step counts (`head_scheduler.prepare_call_scheduler`)."""
        scheduler, keep_variance, noise_kwargs = prepare_call_scheduler(
            self.scheduler, preset, diffusion_steps, temperature, generator
        )
        return HeadSampler(scheduler, keep_variance, noise_kwargs, self.diffusion_head.dtype)

    def sample_tokens(
        self,
        condition: torch.Tensor,
        head: HeadSampler,
        num_diffusion_steps: int,
        guidance_scale: float | None,
        generator: torch.Generator | list[torch.Generator] | None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""
        Sample tokens from their conditions with the diffusion head: the scheduler loop, guided.

        As LTH14/mar `DiffLoss.sample` (with `forward_with_cfg` under guidance).

        Args:
            condition (`torch.Tensor` of shape `(batch', n, hidden)`):
                One condition per token to make; under guidance the unconditional half follows the conditional one.
            head (`HeadSampler`):
                The call's head scheduler (`prepare_head_sampler`).
            num_diffusion_steps (`int`):
                Scheduler steps.
            guidance_scale (`float`, *optional*):
                The step's guidance scale; None without guidance.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Draws the noise, one draw per image.
            noise (`torch.Tensor` of shape `(1 + S, batch, n, C)`, *optional*):
                The initial noise and that of each scheduler step, instead of drawing it.

        Returns:
            `torch.Tensor` of shape `(batch, n, C)`: the sampled tokens.
        """
        batch_size, n = condition.shape[0] // (1 if guidance_scale is None else 2), condition.shape[1]
        token_dim, scheduler = self.transformer.token_dim, head.scheduler
        condition_embedding = self.diffusion_head.embed_condition(
            condition.reshape(-1, condition.shape[-1]).to(head.dtype)
        )  # (B' * n, W)
        # Timesteps stay on the host for the scheduler (no device sync per step); the head gets a device copy.
        scheduler.set_timesteps(num_diffusion_steps)
        step_noise = prepare_step_noise(
            len(scheduler.timesteps), batch_size, n, token_dim, generator, condition.device, noise
        )  # (1 + S, B * n, C)
        heads = head_calls(
            self.diffusion_head, scheduler.timesteps.to(condition.device), condition_embedding, self.modulation_rows
        )
        sample = step_noise[0] * scheduler.init_noise_sigma  # (B * n, C), not scaled by temperature
        for i, (t, head_call) in enumerate(zip(scheduler.timesteps, heads)):
            model_input = scheduler.scale_model_input(sample, t)
            model_input = torch.cat([model_input, model_input]) if guidance_scale is not None else model_input
            model_output = head_call(model_input.to(head.dtype))
            model_output = guide(model_output.float(), guidance_scale, token_dim, head.keep_variance)
            sample = scheduler.step(model_output, t, sample, **head.noise_kwargs(step_noise, i)).prev_sample
        return sample.view(batch_size, n, token_dim)

    def run_callback(
        self,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks,
        callback_on_step_end_tensor_inputs: list[str],
        step: int,
        timestep: int,
        tokens: torch.Tensor,
        **tensors: torch.Tensor | Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """Call `callback_on_step_end` after an outer step; returns the canvas `(B, L, C)`, which the callback may
        write back as `"tokens"` or as `"latents"` `(B, C, H, W)`. `tensors`: the family's other inputs, tensors or
        functions that compute them, called only when asked for."""
        available = {"tokens": tokens, "latents": functools.partial(self.transformer.unpatchify, tokens), **tensors}
        callback_kwargs = {
            name: value() if callable(value) else value
            for name, value in ((name, available[name]) for name in callback_on_step_end_tensor_inputs)
        }
        callback_outputs = callback_on_step_end(self, step, timestep, callback_kwargs) or {}
        new_tokens = callback_outputs.pop("tokens", tokens)
        if new_tokens is tokens and "latents" in callback_outputs:
            new_tokens = self.transformer.patchify(callback_outputs["latents"].to(tokens))
        return new_tokens

    def decode_output(
        self,
        latents: torch.Tensor,
        output_type: str,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Token grid `(B, C, H, W)` (scaled latents, or pixels in [-1, 1]) -> the call's output of `output_type`;
        `generator` goes to decoders that sample (ConsistencyDecoderVAE), as diffusers' pipelines pass it."""
        if output_type == "latent":
            image = latents
        else:
            if self.vae is not None:
                latents = latents / self.vae.config.scaling_factor
                if getattr(self.vae.config, "shift_factor", None):
                    latents = latents + self.vae.config.shift_factor
                takes_generator = "generator" in inspect.signature(self.vae.decode).parameters
                kwargs = {"generator": generator} if takes_generator else {}
                image = self.vae.decode(latents.to(self.vae.dtype), **kwargs).sample
            else:
                image = latents  # pixel space: tokens are pixels in [-1, 1]
            image = self.image_processor.postprocess(image.float(), output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
