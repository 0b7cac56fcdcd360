"""The pipeline families the demo knows, one `FamilyAdapter` each: how to draw a live frame from the callback's tensors,
which settings to show, and how to inpaint. A folder of a family that no adapter serves is refused with a message
that names the families the demo knows (`family_for`), before its weights are loaded.

Adding a family is one call, in the family's own module or in the application that serves it; VAR's (below):

    register_family(FamilyAdapter("VAR", ("VARPipeline", "VARInpaintPipeline"), frames=DecodedFrames,
                                  inpaint=VARInpaintPipeline.from_pipe))

The sampling settings shown are the pipeline's `sampling_keys` (defaults: `pipe.sampling_defaults`); the adapter adds
the options that are not sampling settings (`presets`, `orders`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffusers_mar.cli.errors import CLIError
from diffusers_mar.demo.frames import DecodedFrames, TokenFrames
from diffusers_mar.pipelines.pipeline_ar import ORDERS
from diffusers_mar.pipelines.pipeline_mar_inpaint import MARInpaintPipeline
from diffusers_mar.pipelines.pipeline_var_inpaint import VARInpaintPipeline
from diffusers_mar.pipelines.sampling_settings import SAMPLING_PRESETS

__all__ = ["FAMILIES", "DecodedFrames", "FamilyAdapter", "TokenFrames", "family_for", "register_family"]


@dataclass(frozen=True)
class FamilyAdapter:
    """How the demo shows one pipeline family.

    Args:
        name (`str`): the family's name in the interface ("MAR").
        pipeline_names (`tuple[str, ...]`): the pipeline classes it serves, as `_class_name` in `model_index.json`.
        frames (`Callable`): `frames(pipe, layout, initial=None)` -> the live view of one call, an object with
            `tensor_inputs` (the callback tensors it reads), `update(pipe, callback_kwargs)` and `finish(pipe)`
            (each returns the frames ready, PIL images): `TokenFrames` or `DecodedFrames` (`frames.py`).
        presets (`tuple[str, ...]`): the `sampling_preset` names the family takes (none: no preset choice).
        orders (`tuple[str, ...]`): the `order` names offered (none: no order choice).
        inpaint (`Callable`, *optional*): the family's inpainting pipeline from a loaded one (`from_pipe`); None: no
            inpainting.
    """

    name: str
    pipeline_names: tuple[str, ...]
    frames: Callable
    presets: tuple[str, ...] = ()
    orders: tuple[str, ...] = ()
    inpaint: Callable | None = None


FAMILIES: dict[str, FamilyAdapter] = {}  # by pipeline class name


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Make the demo serve the folders whose pipeline class is one of `adapter.pipeline_names`."""
    for name in adapter.pipeline_names:
        FAMILIES[name] = adapter
    return adapter


def family_for(pipeline_class: str | None, model: str) -> FamilyAdapter:
    """The adapter of a folder's pipeline class; a `CLIError` (exit 2, `--model`) for a family the demo does not know."""
    adapter = FAMILIES.get(pipeline_class or "")
    if adapter is None:
        known = ", ".join(sorted(FAMILIES))
        raise CLIError(
            f"{model!r} holds a {pipeline_class or 'folder without a pipeline class'}, which the demo does not know: "
            f"it shows {known}. A family joins the demo with one adapter, "
            "diffusers_mar.demo.register_family(FamilyAdapter(...)) (docs/demo.md, 'Adding a family')",
            "--model",
        )
    return adapter


register_family(
    FamilyAdapter(
        "MAR",
        ("MARPipeline", "MARInpaintPipeline"),
        frames=TokenFrames,
        presets=tuple(SAMPLING_PRESETS),
        inpaint=MARInpaintPipeline.from_pipe,
    )
)
register_family(FamilyAdapter("AR", ("ARPipeline",), frames=TokenFrames, orders=ORDERS))
register_family(
    FamilyAdapter(
        "VAR", ("VARPipeline", "VARInpaintPipeline"), frames=DecodedFrames, inpaint=VARInpaintPipeline.from_pipe
    )
)
