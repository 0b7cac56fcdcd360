"""Strict loading for our models: weights that do not match `config.json` fail at `from_pretrained`.

diffusers' `ModelMixin.from_pretrained` only warns about missing and unexpected keys. A missing key then leaves its
parameter on the `meta` device (or randomly initialised with `low_cpu_mem_usage=False`), and the model fails later
with "Tensor on device meta ..." or, worse, runs with random weights. `StrictLoadingMixin.from_pretrained` asks
diffusers for its loading info and raises a `ValueError` that names the keys instead.

The mixin also keeps diffusers 0.42's `ModelMixin.to(dtype)` from warning that there are "modules that should be kept
in float32: []" on every cast (it tests `(self._keep_in_fp32_modules or []) is not None`, always true): our models
keep none in float32, and `DiffusionPipeline.from_pipe` casts every model, so each `from_pipe` printed it per model.
"""

from __future__ import annotations

import inspect
import logging
import os

from diffusers import ModelMixin

from diffusers_mar.quantization import refuse_saving_int8

SHOWN_GROUPS = 8  # key groups quoted per kind in the error; the count covers the rest


def _describe(keys: list[str]) -> str:
    """`264 key(s) (decoder_blocks.1-11.*, encoder_blocks.1-11.*)`: keys of numbered blocks grouped into ranges."""
    blocks: dict[str, set[int]] = {}
    plain = []
    for key in keys:
        parts = key.split(".")
        number = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if number is None:
            plain.append(key)
        else:
            blocks.setdefault(".".join(parts[:number]), set()).add(int(parts[number]))
    groups = sorted(plain)
    for name, numbers in sorted(blocks.items()):
        low, high = min(numbers), max(numbers)
        span = (
            f"{low}-{high}" if len(numbers) == high - low + 1 and high > low else ",".join(map(str, sorted(numbers)))
        )
        groups.append(f"{name}.{span}.*")
    shown = ", ".join(groups[:SHOWN_GROUPS]) + (", ..." if len(groups) > SHOWN_GROUPS else "")
    return f"{len(keys)} key(s) ({shown})"


def check_loading_info(model_name: str, source: str, loading_info: dict) -> None:
    """Raise a `ValueError` naming the missing and unexpected keys of a `from_pretrained` call, if there are any."""
    missing = loading_info.get("missing_keys") or []
    unexpected = loading_info.get("unexpected_keys") or []
    if not missing and not unexpected:
        return
    problems = []
    if missing:
        problems.append(f"{_describe(missing)} of the model are missing from the weights")
    if unexpected:
        problems.append(f"{_describe(unexpected)} of the weights are not in the model")
    raise ValueError(
        f"The weights of {model_name} in {source!r} do not match its config.json: "
        + "; ".join(problems)
        + ". The config (e.g. `num_layers`, `num_res_blocks`, widths) must describe the model the weights were "
        "saved from: restore the config.json saved with them, or load weights saved with this config."
    )


class _NoEmptyFloat32ListWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "that should be kept in float32: []." not in record.getMessage()


class StrictLoadingMixin:
    """Put before `ModelMixin` in the bases: `from_pretrained` fails on missing or unexpected weight keys, `to`
    casts without diffusers' warning about an empty list of float32 modules (see the module docstring), and
    `save_pretrained` refuses a model quantized to int8 (`diffusers_mar.quantization`)."""

    def to(self, *args, **kwargs):
        logger, quiet = logging.getLogger("diffusers.models.modeling_utils"), _NoEmptyFloat32ListWarning()
        logger.addFilter(quiet)
        try:
            return super().to(*args, **kwargs)
        finally:
            logger.removeFilter(quiet)

    def save_pretrained(self, *args, **kwargs):
        refuse_saving_int8([type(self).__name__] if getattr(self, "int8_quantized", False) else [], "This")
        return super().save_pretrained(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, **kwargs):
        output_loading_info = kwargs.pop("output_loading_info", False)
        loaded = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        if not isinstance(loaded, tuple):  # a loader without loading info (FlashPack): nothing to check
            return loaded
        model, loading_info = loaded
        source = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        check_loading_info(cls.__name__, source.rstrip(os.sep), loading_info)
        return (model, loading_info) if output_loading_info else model


# DiffusionPipeline.save_pretrained passes `variant`, `safe_serialization`, ... only to a save_pretrained whose
# signature names them: the override above must show ModelMixin's.
StrictLoadingMixin.save_pretrained.__signature__ = inspect.signature(ModelMixin.save_pretrained)
