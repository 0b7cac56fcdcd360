"""The Python code and the `diffusers-mar generate` command that make the same images as a demo generation.

Both make image `i` with `torch.Generator().manual_seed(seed + i)`, as the command line does, and pass the call
arguments that the command line resolves from the given options (`GenerationRequest.call`), so that the command's
grid equals the demo's PNG.
"""

from __future__ import annotations

import os
import shlex

from diffusers_mar import DEFAULT_MODEL
from diffusers_mar.demo.inputs import GenerationRequest


def _is_default_model(model: str) -> bool:
    return os.path.abspath(os.path.expanduser(model)) == os.path.abspath(DEFAULT_MODEL)


def cli_command(
    model: str, request: GenerationRequest, output: str = "grid.png", device: str = "cpu", dtype: str = "float32"
) -> str:
    """`diffusers-mar generate ...` for `request` (the options given; the others are the model's recommended ones)."""
    words = ["diffusers-mar", "generate"]
    if not _is_default_model(model):
        words += ["--model", model]
    words += ["--class-labels", *map(str, request.labels)]
    words += ["--num-images-per-label", str(request.num_images_per_label), "--seed", str(request.seed)]
    for key, value in request.options.items():
        words += ["--" + key.replace("_", "-"), str(value)]
    if device != "cpu":
        words += ["--device", device]
    if dtype != "float32":
        words += ["--dtype", dtype]
    words += ["--output", output]
    return shlex.join(words)


def python_command(
    model: str, pipeline_class: str, request: GenerationRequest, device: str = "cpu", dtype: str = "float32"
) -> str:
    """Python code that makes `request`'s images as `images` (a list of PIL images, row after row)."""
    default = _is_default_model(model)
    imports = f"{pipeline_class}, DEFAULT_MODEL" if default else pipeline_class
    source = "DEFAULT_MODEL" if default else repr(model)
    load = f"pipe = {pipeline_class}.from_pretrained({source})"
    if device != "cpu" or dtype != "float32":
        load += f".to(device={device!r}, dtype=torch.{dtype})"
    arguments = [
        f"class_labels={list(request.labels)!r}",
        f"num_images_per_label={request.num_images_per_label}",
        *(f"{key}={value!r}" for key, value in request.call.items()),
        "generator=generator",
    ]
    body = "".join(f"    {argument},\n" for argument in arguments)
    return (
        "import torch\n"
        f"from diffusers_mar import {imports}\n\n"
        f"{load}\n"
        f"# image i: seed {request.seed} + i, as `diffusers-mar generate --seed {request.seed}`\n"
        f"generator = [torch.Generator().manual_seed({request.seed} + i) for i in range({request.num_images})]\n"
        f"images = pipe(\n{body}).images\n"
    )
