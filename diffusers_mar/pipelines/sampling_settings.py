"""The recommended sampling settings of a pipeline folder: the one place that defines, checks and resolves them.

A pipeline stores the settings its model was made for in its own config (`model_index.json`, key `sampling`), so
`MARPipeline.from_pretrained(folder)(class_labels=...)` samples as recommended with no other argument. The converter
and the training script write them; the command line, the benchmarks and the pipeline's defaults read them here.
Settings a folder does not store fall back to the paper's (`PAPER_SAMPLING`; VAR's `VAR_PAPER_SAMPLING`), clipped
to what the model allows. A family declares its keys (`sampling_keys` of its pipeline, among `SAMPLING_CHECKS`).
"""

from __future__ import annotations

import math
import re

from diffusers_mar.pipelines.orders import max_outer_steps

# `MARPipeline.__call__` arguments a pipeline folder may recommend, in display order.
SAMPLING_KEYS = ("num_inference_steps", "num_diffusion_steps", "guidance_scale", "guidance_schedule", "temperature")
GUIDANCE_SCHEDULES = ("linear", "constant")

# LTH14/mar's evaluation settings (README: 64 steps, 100 diffusion steps, linear guidance, temperature 1.0); the
# guidance scale of a preset is that preset's (2.9 / 3.0 / 3.2), 3.0 otherwise.
PAPER_SAMPLING = {
    "num_inference_steps": 64,
    "num_diffusion_steps": 100,
    "guidance_scale": 3.0,
    "guidance_schedule": "linear",
    "temperature": 1.0,
}

# `VARPipeline.__call__` arguments a VAR folder may recommend: guidance, top-k / top-p filtering of the logits, and
# VAR's Gumbel smoothing of the codes (`more_smooth`).
VAR_SAMPLING_KEYS = ("guidance_scale", "top_k", "top_p", "more_smooth")
# FoundationVision/VAR's FID setting (README: `cfg=1.5, top_p=0.96, top_k=900, more_smooth=False`). Our guidance scale
# is `1 + cfg` (`uncond + s (cond - uncond)`, as MAR's and diffusers'; docs/var.md), so cfg 1.5 is 2.5.
VAR_PAPER_SAMPLING = {"guidance_scale": 2.5, "top_k": 900, "top_p": 0.96, "more_smooth": False}

# `MARPipeline.__call__` arguments of issue 17's faster sampling (orders, schedules, caches), and their defaults.
FAST_SAMPLING_KEYS = ("order", "outer_schedule", "guidance_cache_interval", "feature_cache_interval")
_CALL_DEFAULTS = {**dict.fromkeys(SAMPLING_KEYS + FAST_SAMPLING_KEYS), "order": "random", "outer_schedule": "cosine"}

# Named sets of sampling arguments (`MARPipeline.__call__(sampling_preset=...)`), measured in docs/benchmarks.md:
# the call arguments they set, the fewest tokens an outer step predicts on average (`num_inference_steps` is clipped
# to `num_tokens // tokens_per_step`, and to what the model and the outer schedule allow), and the head's scheduler
# (`head_scheduler.PRESET_SCHEDULERS`; None: the pipeline's own).
SAMPLING_PRESETS = {
    "fast": {
        "arguments": {"num_inference_steps": 8, "num_diffusion_steps": 8},
        "tokens_per_step": 4,
        "head_scheduler": "dpm-solver++",
    },
    "fast-ddpm": {
        "arguments": {"num_inference_steps": 8, "num_diffusion_steps": "linear-25-5"},
        "tokens_per_step": 1,
        "head_scheduler": None,
    },
}


def preset_tokens_per_step(preset: str | None, num_inference_steps: int | None) -> int | None:
    """The tokens per outer step, on average, that `preset` asks for when it chose the steps (`num_inference_steps`
    not given); None otherwise. `max_outer_steps` turns it into a step limit."""
    if preset is None or num_inference_steps is not None:
        return None
    return SAMPLING_PRESETS[preset]["tokens_per_step"]


def apply_sampling_preset(preset: str | None, arguments: dict, num_tokens: int) -> dict:
    """The sampling arguments of a call (`SAMPLING_KEYS` and `FAST_SAMPLING_KEYS`, taken from `arguments`), with
    the preset's values for those left at their defaults (its head scheduler: `head_scheduler.preset_head_scheduler`)."""
    if preset is not None and preset not in SAMPLING_PRESETS:
        raise ValueError(f"`sampling_preset` must be None or one of {tuple(SAMPLING_PRESETS)}; got {preset!r}.")
    resolved = {key: arguments[key] for key in _CALL_DEFAULTS}
    for key, value in (SAMPLING_PRESETS[preset]["arguments"] if preset is not None else {}).items():
        default = _CALL_DEFAULTS[key]
        if isinstance(resolved[key], str | type(None)) and resolved[key] == default:
            resolved[key] = value
    tokens_per_step = preset_tokens_per_step(preset, arguments["num_inference_steps"])
    if tokens_per_step is not None:
        high = max_outer_steps(resolved["outer_schedule"], num_tokens, tokens_per_step)
        resolved["num_inference_steps"] = min(resolved["num_inference_steps"], high)
    return resolved


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The check of each sampling key: `check(value, label, settings, limits)` raises a `ValueError` that names the key
# (`label`) and its allowed values. `limits` bounds the values where the model does: `num_tokens` (outer steps),
# `num_train_timesteps` (diffusion steps) and `vocab_size` (top-k), each None when unknown. A family declares its keys
# (`TokenGeneratorPipeline.sampling_keys`); a new key adds its check here.


def _check_step_count(key: str):
    def check(value: object, label: str, settings: dict, limits: dict) -> None:
        high = limits.get("num_tokens" if key == "num_inference_steps" else "num_train_timesteps")
        if key == "num_diffusion_steps" and isinstance(value, (list, tuple, str)):
            steps = settings.get("num_inference_steps")
            diffusion_step_schedule(value, steps if isinstance(steps, int) else None, high, label)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high is not None and value > high):
            allowed = f"[1, {high}]" if high is not None else ">= 1"
            also = (
                ", a list with one such int per outer step or a named schedule" if key == "num_diffusion_steps" else ""
            )
            raise ValueError(f"{label} must be an int in {allowed}{also}; got {value!r}.")

    return check


def _check_guidance_scale(value: object, label: str, settings: dict, limits: dict) -> None:
    if not (_is_number(value) and value >= 0):
        raise ValueError(f"{label} must be a finite number >= 0; got {value!r}.")


def _check_guidance_schedule(value: object, label: str, settings: dict, limits: dict) -> None:
    if value not in GUIDANCE_SCHEDULES:
        raise ValueError(f"{label} must be one of {GUIDANCE_SCHEDULES}; got {value!r}.")


def _check_temperature(value: object, label: str, settings: dict, limits: dict) -> None:
    if not (_is_number(value) and value > 0):
        raise ValueError(f"{label} must be a finite number > 0; got {value!r}.")


def _check_top_k(value: object, label: str, settings: dict, limits: dict) -> None:
    high = limits.get("vocab_size")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (high is not None and value > high):
        allowed = f"[0, {high}] (the codebook size)" if high is not None else ">= 0"
        raise ValueError(f"{label} must be an int in {allowed}, 0 = no top-k filtering; got {value!r}.")


def _check_top_p(value: object, label: str, settings: dict, limits: dict) -> None:
    if not (_is_number(value) and 0 <= value <= 1):
        raise ValueError(f"{label} must be a number in [0, 1], 0 = no top-p filtering; got {value!r}.")


def _check_more_smooth(value: object, label: str, settings: dict, limits: dict) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{label} must be True or False; got {value!r}.")


SAMPLING_CHECKS = {
    "num_inference_steps": _check_step_count("num_inference_steps"),
    "num_diffusion_steps": _check_step_count("num_diffusion_steps"),
    "guidance_scale": _check_guidance_scale,
    "guidance_schedule": _check_guidance_schedule,
    "temperature": _check_temperature,
    "top_k": _check_top_k,
    "top_p": _check_top_p,
    "more_smooth": _check_more_smooth,
}


def check_sampling_settings(
    settings: dict,
    num_tokens: int | None = None,
    num_train_timesteps: int | None = None,
    name: str | None = None,
    keys: tuple[str, ...] = SAMPLING_KEYS,
    vocab_size: int | None = None,
) -> dict:
    """Return `settings` (a subset of `keys`, a family's sampling keys) if every value is usable, else raise a
    `ValueError` that names the key and its allowed values. `num_tokens`, `num_train_timesteps` and `vocab_size`
    bound the step counts and top-k when given; `name` (e.g. "sampling") prefixes the keys in messages, for settings
    stored in a dict rather than given as arguments."""

    def label(key: str) -> str:
        return f"`{key}`" if name is None else f"`{name}['{key}']`"

    if not isinstance(settings, dict):
        raise ValueError(f"`{name or 'sampling'}` must be a dict with keys among {keys}; got {settings!r}.")
    unknown = sorted(set(settings) - set(keys))
    if unknown:
        raise ValueError(f"`{name or 'sampling'}` has unknown keys {unknown}; allowed keys are {keys}.")
    limits = {"num_tokens": num_tokens, "num_train_timesteps": num_train_timesteps, "vocab_size": vocab_size}
    for key, check in SAMPLING_CHECKS.items():
        if key in settings:
            check(settings[key], label(key), settings, limits)
    return settings


def resolve_sampling_settings(
    stored: dict | None,
    num_tokens: int | None = None,
    num_train_timesteps: int | None = 1000,
    paper: dict = PAPER_SAMPLING,
    vocab_size: int | None = None,
) -> dict:
    """Every key of `paper` (a family's paper settings, MAR's by default): the stored value, else the paper's clipped
    to the model's limits (the steps to `num_tokens` and `num_train_timesteps`, top-k to `vocab_size`)."""
    settings = dict(paper)
    limits = {"num_inference_steps": num_tokens, "num_diffusion_steps": num_train_timesteps, "top_k": vocab_size}
    for key, high in limits.items():
        if key in settings and high is not None:
            settings[key] = min(settings[key], high)
    settings.update(stored or {})
    return settings


def diffusion_step_schedule(
    value: int | list[int] | tuple[int, ...] | str,
    num_inference_steps: int | None,
    num_train_timesteps: int | None = None,
    name: str = "`num_diffusion_steps`",
) -> list[int]:
    """Diffusion steps of each outer step (a `ValueError` naming `name` if `value` is unusable).

    `value` is an int (every outer step), a list with one int per outer step, or a named schedule
    `"linear-<first>-<last>"` (DiSA's annealing: `round(first + (last - first) k / (K - 1))` at outer step `k` of `K`,
    e.g. `"linear-50-5"`). Without `num_inference_steps` only the values are checked.
    """
    high = num_train_timesteps
    allowed = f"[1, {high}]" if high is not None else ">= 1"

    def valid(step: object) -> bool:
        return isinstance(step, int) and not isinstance(step, bool) and step >= 1 and (high is None or step <= high)

    if isinstance(value, str):
        match = re.fullmatch(r"linear-(\d+)-(\d+)", value)
        if match is None:
            raise ValueError(
                f'{name} names an unknown schedule {value!r}; the named schedule is "linear-<first>-<last>" '
                '(e.g. "linear-50-5"), or pass an int or a list with one int per outer step.'
            )
        first, last = int(match.group(1)), int(match.group(2))
        if not (valid(first) and valid(last)):
            raise ValueError(f"{name}: the steps of {value!r} must be in {allowed}.")
        if num_inference_steps is None:
            return [first, last]
        span = max(1, num_inference_steps - 1)
        return [round(first + (last - first) * k / span) for k in range(num_inference_steps)]
    if isinstance(value, (list, tuple)):
        if not value or not all(valid(step) for step in value):
            raise ValueError(f"{name} as a list must hold ints in {allowed}; got {list(value)!r}.")
        if num_inference_steps is not None and len(value) != num_inference_steps:
            raise ValueError(
                f"{name} as a list must have one entry per outer step ({num_inference_steps}); got {len(value)}."
            )
        return list(value)
    if not valid(value):
        raise ValueError(f"{name} must be an int in {allowed}; got {value!r}.")
    return [value] * (num_inference_steps or 1)
