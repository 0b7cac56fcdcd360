"""The diffusion head's scheduler inside `MARPipeline`: which diffusers schedulers can sample it, and how.

The head was trained on MAR's per-token process, a 1000-step cosine DDPM (`MARDDPMScheduler`). Any diffusers scheduler
built from that config (`X.from_config(pipe.scheduler.config)`) discretises the same process, with one trap: the
cosine schedule caps its last beta, so at t = 999 `sqrt(alpha_bar)` is 4.9e-5 and `x0_hat` multiplies the head's
error by 20,000. DDPM's posterior (the original's sampler) and DDIM with `clip_sample` survive a start there; every
other solver samples noise, so it must start lower: DPM-Solver reads the config's `lambda_min_clipped` (t = 995), the
others need `timestep_spacing="leading"`. `prepare_head_scheduler` adapts a scheduler that starts there (it builds it
with `timestep_spacing="leading"` for the call and logs one warning that says so, as diffusers adapts what a config
cannot run) and refuses what cannot work at all, with what to set.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from diffusers.schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging

from diffusers_mar.pipelines.sampling_settings import SAMPLING_PRESETS
from diffusers_mar.schedulers.scheduling_ddpm_mar import LAMBDA_MIN_CLIPPED, MARDDPMScheduler, mar_alphas_cumprod

logger = logging.get_logger(__name__)

# The head schedulers a sampling preset may name: a class and the config overrides it is built with from the
# pipeline's scheduler config. DPM-Solver++ (2M) with `leading` spacing keeps the quality at 8-10 head steps
# (docs/benchmarks.md); it is deterministic, so it samples at temperature 1 only.
PRESET_SCHEDULERS = {"dpm-solver++": (DPMSolverMultistepScheduler, {"timestep_spacing": "leading"})}


def preset_head_scheduler(scheduler: SchedulerMixin, preset: str | None, temperature: float) -> SchedulerMixin:
    """The head's scheduler of a call with `sampling_preset=preset`: the preset's (`SAMPLING_PRESETS`), built from
    `scheduler.config`, when the pipeline has the model's own `MARDDPMScheduler`; otherwise `scheduler` itself."""
    name = SAMPLING_PRESETS[preset]["head_scheduler"] if preset is not None else None
    if name is None or type(scheduler) is not MARDDPMScheduler:
        return scheduler
    if temperature != 1.0:
        raise ValueError(
            f"`sampling_preset={preset!r}` samples the head with {name} (DPMSolverMultistepScheduler), which adds no "
            f"noise, so it needs `temperature=1.0`; got {temperature!r}. Pass `temperature=1.0`, or use "
            '`sampling_preset="fast-ddpm"`, which keeps the DDPM sampler and its temperature.'
        )
    scheduler_class, overrides = PRESET_SCHEDULERS[name]
    return scheduler_class.from_config(scheduler.config, **overrides)


def prepare_head_scheduler(
    scheduler: SchedulerMixin, num_diffusion_steps: int, temperature: float, generator: torch.Generator | list | None
) -> tuple[SchedulerMixin, bool, Callable[[torch.Tensor, int], dict]]:
    """The scheduler to run per token (a `ValueError` saying what to set if it cannot sample the head), whether it
    takes the learned variance, and its `step` noise arguments for step `i` given the drawn noise `(1 + S, N, C)`."""
    name = scheduler.__class__.__name__
    # 1. It must discretise the head's training process (MAR's cosine DDPM) and take an epsilon prediction.
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    reference = mar_alphas_cumprod(scheduler.config.get("num_train_timesteps", 1000))
    if alphas_cumprod is None or not torch.allclose(alphas_cumprod.double(), reference, rtol=1e-3, atol=0):
        raise ValueError(
            f"{name} does not follow the diffusion head's process, MAR's 1000-step cosine DDPM "
            '(`beta_schedule="squaredcos_cap_v2"`): build it from the pipeline\'s scheduler without changing '
            f"`beta_schedule` or `num_train_timesteps`, `pipe.scheduler = {name}.from_config(pipe.scheduler.config)`"
            " (EDM and flow-matching schedulers cannot sample this head)."
        )
    if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f'The diffusion head predicts noise: {name} needs `prediction_type="epsilon"`.')
    learned = scheduler.config.get("variance_type") in ("learned", "learned_range")
    keep_variance = learned and isinstance(scheduler, DDPMScheduler)
    if learned and not keep_variance:
        # DPM-Solver and friends would slice a learned-variance output to 3 channels; give them eps only.
        scheduler = scheduler.__class__.from_config(scheduler.config, variance_type=None)

    # 2. It must not start at the degenerate end of the schedule unless it survives it (see the module docstring):
    # one that would is built with `leading` spacing for the call, which starts it below t = 996.
    first = _first_timestep(scheduler, num_diffusion_steps)
    clips = isinstance(scheduler, DDIMScheduler) and scheduler.config.clip_sample
    survives = isinstance(scheduler, DDPMScheduler) or clips
    spacing = scheduler.config.get("timestep_spacing")
    if _degenerate(reference, first) and not survives and spacing not in (None, "leading"):
        scheduler = scheduler.__class__.from_config(scheduler.config, timestep_spacing="leading")
        adapted = _first_timestep(scheduler, num_diffusion_steps)
        logger.warning(
            f'{name} with timestep_spacing="{spacing}" starts at t = {first}, where MAR\'s cosine schedule is '
            f"degenerate (sqrt(alpha_bar) = {math.sqrt(reference[first]):.1e}) and it would sample noise; this "
            f'call runs it with timestep_spacing="leading" (from t = {adapted}). To silence this, set it: '
            f'`pipe.scheduler = {name}.from_config(pipe.scheduler.config, timestep_spacing="leading")`.'
        )
        first = adapted
    if _degenerate(reference, first) and not survives:
        raise ValueError(
            f"{name} starts at t = {first}, where sqrt(alpha_bar) = {math.sqrt(reference[first]):.1e} (MAR's "
            "cosine schedule caps its last step); it does not clip `x0_hat` there and would sample noise. Make it "
            f'start below t = 996: `timestep_spacing="leading"` with fewer `num_diffusion_steps` (fewer than '
            f"{len(reference) // 4} always do; DPM-Solver reads `lambda_min_clipped` instead: keep the config's "
            f"{LAMBDA_MIN_CLIPPED})."
        )

    # 3. Noise: the pipeline's own draws (one generator per image) where `step` takes them, else the scheduler's.
    step_params = inspect.signature(scheduler.step).parameters
    takes_noise = "variance_noise" in step_params
    if takes_noise and len(scheduler.timesteps) > num_diffusion_steps:
        raise ValueError(f"{name} runs more steps than `num_diffusion_steps`; the pipeline cannot give it noise.")
    if takes_noise and "temperature" in step_params:
        return scheduler, keep_variance, lambda noise, i: {"variance_noise": noise[1 + i], "temperature": temperature}
    # DDIM runs with eta = 0 and DPM-Solver's ODE algorithms add no noise: only its SDE ones use `variance_noise`.
    if takes_noise and str(scheduler.config.get("algorithm_type", "")).startswith("sde-"):
        return scheduler, keep_variance, lambda noise, i: {"variance_noise": noise[1 + i] * temperature}
    if temperature != 1.0:
        how = "is deterministic here" if takes_noise or "generator" not in step_params else "draws its own noise"
        raise ValueError(
            "`temperature` != 1 needs a scheduler that adds noise at every step and takes it from the pipeline: "
            f'MARDDPMScheduler, or DPMSolverMultistepScheduler with `algorithm_type="sde-dpmsolver++"`. {name} {how}; '
            "pass `temperature=1.0`."
        )
    draws_own_noise = "generator" in step_params and not takes_noise
    if draws_own_noise and isinstance(generator, list):
        raise ValueError(
            f"{name} draws its own noise and takes one generator, not a list; pass a single `generator` or use "
            "MARDDPMScheduler."
        )
    kwargs = {"generator": generator} if draws_own_noise else {}
    return scheduler, keep_variance, lambda noise, i: kwargs


def _first_timestep(scheduler: SchedulerMixin, num_diffusion_steps: int) -> int:
    scheduler.set_timesteps(num_diffusion_steps)
    return min(int(scheduler.timesteps[0]), scheduler.config.num_train_timesteps - 1)


def _degenerate(alphas_cumprod: torch.Tensor, t: int) -> bool:
    """Whether MAR's cosine schedule at `t` is past DPM-Solver's `lambda_min_clipped` (t >= 996 of 1000)."""
    alpha_bar = float(alphas_cumprod[t])
    return 0.5 * math.log(alpha_bar / (1 - alpha_bar)) < LAMBDA_MIN_CLIPPED


def prepare_call_scheduler(
    scheduler: SchedulerMixin,
    preset: str | None,
    diffusion_steps: list[int],
    temperature: float,
    generator: torch.Generator | list | None,
) -> tuple[SchedulerMixin, bool, Callable[[torch.Tensor, int], dict]]:
    """`prepare_head_scheduler` for a call: the preset's scheduler (`preset_head_scheduler`), checked for every step
    count of `diffusion_steps` (one per outer step)."""
    scheduler = preset_head_scheduler(scheduler, preset, temperature)
    for num_diffusion_steps in dict.fromkeys(diffusion_steps):
        prepared = prepare_head_scheduler(scheduler, num_diffusion_steps, temperature, generator)
        scheduler = prepared[0]  # as adapted for the first count: one warning per call
    return prepared
