"""MARDDPMScheduler: `DDPMScheduler` plus the original's sampling temperature, with float64 tables.

The per-token process of MAR is an improved-DDPM process (cosine schedule, 1000 steps, learned-range variance,
epsilon prediction) respaced to `num_inference_steps`. Stock `DDPMScheduler` reproduces it up to its float32
tables; this subclass keeps the tables in float64 like LTH14/mar `diffusion/gaussian_diffusion.py`, casts each
coefficient to float32 just before it multiplies, and multiplies each step's noise by `temperature`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict, register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

_SUPPORTED_VARIANCE_TYPES = ("learned_range", "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")

# The cosine schedule caps its last beta at 0.999, so at t = 999 sqrt(alpha_bar) is 4.9e-5 (half log-SNR -9.9): an
# `x0_hat` there amplifies the head's error 20,000 times. DPM-Solver starts where the half log-SNR is above this
# (its `lambda_min_clipped`, the value diffusers documents for the cosine schedule): t = 995.
LAMBDA_MIN_CLIPPED = -5.1


def _float64_betas(betas: torch.Tensor, num_train_timesteps: int, beta_schedule: str) -> np.ndarray:
    if beta_schedule != "squaredcos_cap_v2":
        return betas.double().numpy()

    # As in LTH14/mar diffusion/gaussian_diffusion.py betas_for_alpha_bar, kept in float64.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = range(num_train_timesteps)
    return np.array(
        [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999) for i in steps]
    )


class MARDDPMScheduler(DDPMScheduler):
    r"""
    `DDPMScheduler` with MAR's defaults, float64 tables and a `temperature` on the per-step noise.

    At `temperature=1.0` it computes the same update as `DDPMScheduler.step` (to float32 rounding). `step` also
    accepts `variance_noise`, so a pipeline can draw the noise itself (one generator per image).

    Parameters are those of [`DDPMScheduler`]; the defaults are MAR's: `num_train_timesteps=1000`,
    `beta_schedule="squaredcos_cap_v2"`, `variance_type="learned_range"`, `prediction_type="epsilon"`,
    `clip_sample=False`, `timestep_spacing="linspace"`.

    The whole config, defaults included, is handed to schedulers built with `from_config(scheduler.config)` (diffusers
    otherwise drops the values a config did not set, and a `DPMSolverMultistepScheduler` built from a
    `MARDDPMScheduler()` would get a linear schedule). `lambda_min_clipped` (defaults to -5.1) is not used here: it is
    stored for DPM-Solver, which reads it and then starts at t = 995 instead of the degenerate t = 999.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "squaredcos_cap_v2",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "learned_range",
        clip_sample: bool = False,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        lambda_min_clipped: float = LAMBDA_MIN_CLIPPED,
    ):
        if variance_type not in _SUPPORTED_VARIANCE_TYPES:
            raise ValueError(f"`variance_type` must be one of {_SUPPORTED_VARIANCE_TYPES}, got {variance_type!r}.")
        if prediction_type != "epsilon":
            raise ValueError(f"`prediction_type` must be 'epsilon' for MAR's diffusion head, got {prediction_type!r}.")
        if thresholding:
            raise ValueError("`thresholding` is not supported by MARDDPMScheduler; use `clip_sample` instead.")
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            variance_type=variance_type,
            clip_sample=clip_sample,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        # Keep every value in the config for other schedulers (see the class docstring).
        self._internal_dict = FrozenDict({k: v for k, v in self._internal_dict.items() if k != "_use_default_values"})
        betas = _float64_betas(self.betas, num_train_timesteps, beta_schedule)
        # The original's training process is a SpacedDiffusion keeping every step: betas recomputed from alphas_cumprod.
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.betas_float64 = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        self.alphas_cumprod_float64 = np.cumprod(1.0 - self.betas_float64)
        self.alphas_cumprod = torch.from_numpy(self.alphas_cumprod_float64).float()
        self._tables: dict[str, np.ndarray] = {}
        self._step_index_of: dict[int, int] = {}
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Set the timesteps as `DDPMScheduler` does and build the respaced float64 tables for them."""
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, timesteps=timesteps)
        kept = np.sort(self.timesteps.cpu().numpy().astype(np.int64))  # ascending original timesteps
        self._tables = self.process_tables(kept)
        self._step_index_of = {int(t): i for i, t in enumerate(kept)}

    def process_tables(self, timesteps: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The float64 tables of the chain respaced to `timesteps` (ascending; all `num_train_timesteps` if not
        given, the training process): `sqrt_recip_alphas_cumprod`, `sqrt_recipm1_alphas_cumprod`,
        `posterior_mean_coef1`, `posterior_mean_coef2`, `posterior_log_variance_clipped` and `log_betas`."""
        kept = np.arange(self.config.num_train_timesteps) if timesteps is None else np.asarray(timesteps)

        # As in LTH14/mar diffusion/respace.py SpacedDiffusion: betas of the respaced chain, then its tables.
        alphas_cumprod = self.alphas_cumprod_float64[kept]
        betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        clipped = np.append(posterior_variance[1], posterior_variance[1:]) if len(kept) > 1 else posterior_variance
        return {
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            "posterior_log_variance_clipped": np.log(np.maximum(clipped, 1e-20)),
            "log_betas": np.log(betas),
        }

    def _coefficient(self, name: str, index: int) -> float:
        # float64 value rounded to float32, as the original's `_extract_into_tensor(...).float()`.
        return float(np.float32(self._tables[name][index]))

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """`q(x_t | x_0)` with float64 square roots cast to the sample dtype, as the original's `q_sample`."""
        abar = torch.from_numpy(self.alphas_cumprod_float64).to(timesteps.device)[timesteps]
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        sqrt_abar = abar.sqrt().to(original_samples.dtype).reshape(shape)
        sqrt_one_minus_abar = (1.0 - abar).sqrt().to(original_samples.dtype).reshape(shape)
        return sqrt_abar * original_samples + sqrt_one_minus_abar * noise

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        temperature: float = 1.0,
        variance_noise: torch.Tensor | None = None,
    ) -> DDPMSchedulerOutput | tuple:
        r"""
        One reverse step `x_t -> x_{t-1}` of the respaced chain.

        Args:
            model_output (`torch.Tensor` of shape `(N, 2C)` or `(N, C)`):
                `[eps, v]` from the diffusion head (`v` only with `variance_type="learned_range"`).
            timestep (`int` or `torch.Tensor`):
                The current timestep, one of `self.timesteps`.
            sample (`torch.Tensor` of shape `(N, C)`):
                The current noisy tokens `x_t`.
            generator (`torch.Generator`, *optional*):
                Draws the step noise when `variance_noise` is not given.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`DDPMSchedulerOutput`] or a tuple.
            temperature (`float`, *optional*, defaults to 1.0):
                Multiplies the step noise (the original's sampling temperature).
            variance_noise (`torch.Tensor` of shape `(N, C)`, *optional*):
                Standard normal noise for this step, instead of drawing it with `generator`.

        Returns:
            [`DDPMSchedulerOutput`] or `tuple`: `prev_sample` and `pred_original_sample`.
        """
        index = self._step_index_of.get(int(timestep))
        if index is None:
            raise ValueError(f"`timestep` {int(timestep)} is not one of the scheduler's timesteps.")
        channels = sample.shape[1]
        learned = self.config.variance_type == "learned_range"
        if learned and model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"`model_output` must have {2 * channels} channels ([eps, v]) with variance_type='learned_range', "
                f"got {model_output.shape[1]}."
            )
        eps = model_output[:, :channels]

        # As in LTH14/mar gaussian_diffusion.py p_mean_variance / p_sample (no clipping unless clip_sample).
        pred_original_sample = (
            self._coefficient("sqrt_recip_alphas_cumprod", index) * sample
            - self._coefficient("sqrt_recipm1_alphas_cumprod", index) * eps
        )
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-limit, limit)
        prev_sample = (
            self._coefficient("posterior_mean_coef1", index) * pred_original_sample
            + self._coefficient("posterior_mean_coef2", index) * sample
        )
        if index > 0:
            min_log = self._coefficient("posterior_log_variance_clipped", index)
            max_log = self._coefficient("log_betas", index)
            if learned:
                frac = (model_output[:, channels:] + 1) / 2
                log_variance = frac * max_log + (1 - frac) * min_log
            elif self.config.variance_type.startswith("fixed_large"):
                log_variance = torch.full_like(sample, max_log)
            else:
                log_variance = torch.full_like(sample, min_log)
            if variance_noise is None:
                variance_noise = randn_tensor(
                    sample.shape, generator=generator, device=sample.device, dtype=sample.dtype
                )
            prev_sample = prev_sample + torch.exp(0.5 * log_variance) * variance_noise * temperature

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


@functools.lru_cache
def mar_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """`alpha_bar` of MAR's per-token process (the diffusion head's training process), float64 `(T,)`."""
    return torch.from_numpy(MARDDPMScheduler(num_train_timesteps=num_train_timesteps).alphas_cumprod_float64)
