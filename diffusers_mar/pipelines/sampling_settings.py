"""The recommended sampling settings of a pipeline folder: the one place that defines, checks and resolves them.

A pipeline stores the settings its model was made for in its own config (`model_index.json`, key `sampling`), so
`MARPipeline.from_pretrained(folder)(class_labels=...)` samples as recommended with no other argument. The converter
and the training script write them; the command line, the benchmarks and the pipeline's defaults read them here.
Settings a folder does not store fall back to the paper's (`PAPER_SAMPLING`), clipped to what the model allows.
"""

from __future__ import annotations

import math

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


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling_settings(
    settings: dict, num_tokens: int | None = None, num_train_timesteps: int | None = None, name: str | None = None
) -> dict:
    """Return `settings` (a subset of `SAMPLING_KEYS`) if every value is usable, else raise a `ValueError` that names
    the key and its allowed values. `num_tokens` and `num_train_timesteps` bound the step counts when given; `name`
    (e.g. "sampling") prefixes the keys in messages, for settings stored in a dict rather than given as arguments."""

    def label(key: str) -> str:
        return f"`{key}`" if name is None else f"`{name}['{key}']`"

    if not isinstance(settings, dict):
        raise ValueError(f"`{name or 'sampling'}` must be a dict with keys among {SAMPLING_KEYS}; got {settings!r}.")
    unknown = sorted(set(settings) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"`{name or 'sampling'}` has unknown keys {unknown}; allowed keys are {SAMPLING_KEYS}.")
    bounds = {"num_inference_steps": num_tokens, "num_diffusion_steps": num_train_timesteps}
    for key, high in bounds.items():
        value = settings.get(key)
        if key in settings and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high is not None and value > high)
        ):
            allowed = f"[1, {high}]" if high is not None else ">= 1"
            raise ValueError(f"{label(key)} must be an int in {allowed}; got {value!r}.")
    if "guidance_scale" in settings and not (
        _is_number(settings["guidance_scale"]) and settings["guidance_scale"] >= 0
    ):
        raise ValueError(
            f"{label('guidance_scale')} must be a finite number >= 0; got {settings['guidance_scale']!r}."
        )
    if "guidance_schedule" in settings and settings["guidance_schedule"] not in GUIDANCE_SCHEDULES:
        raise ValueError(
            f"{label('guidance_schedule')} must be one of {GUIDANCE_SCHEDULES}; got {settings['guidance_schedule']!r}."
        )
    if "temperature" in settings and not (_is_number(settings["temperature"]) and settings["temperature"] > 0):
        raise ValueError(f"{label('temperature')} must be a finite number > 0; got {settings['temperature']!r}.")
    return settings


def resolve_sampling_settings(stored: dict | None, num_tokens: int, num_train_timesteps: int = 1000) -> dict:
    """Every key of `SAMPLING_KEYS`: the stored value, else the paper's clipped to the model's limits."""
    settings = dict(PAPER_SAMPLING)
    settings["num_inference_steps"] = min(settings["num_inference_steps"], num_tokens)
    settings["num_diffusion_steps"] = min(settings["num_diffusion_steps"], num_train_timesteps)
    settings.update(stored or {})
    return settings
