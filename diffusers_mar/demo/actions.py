"""What the demo's buttons do, without Gradio: generate (with live frames), inpaint, compare the exact default with a
preset, describe the model. Each returns (or yields) a dict of outputs by name; `app.py` puts them in components
and turns a refused input (`CLIError`, a pipeline's `ValueError`) into a `gr.Error` with its message.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from diffusers_mar.cli.errors import CLIError
from diffusers_mar.cli.model import label_text
from diffusers_mar.cli.outputs import save_image
from diffusers_mar.demo.commands import cli_command, python_command
from diffusers_mar.demo.frames import grid_layout, image_size, render_canvas, to_uint8
from diffusers_mar.demo.inputs import GenerationRequest, drawn_mask, fit_to_model, generation_request
from diffusers_mar.demo.model import DemoModel
from diffusers_mar.demo.quality import quality_table
from diffusers_mar.demo.runner import PipelineRun, RunRegistry

EDITOR_SIZE = 256  # pixels of the side of the images shown for drawing (small images are upscaled to it)


def display_scale(resolution: int) -> int:
    """NEAREST upscaling that shows a `resolution`-pixel image at about `EDITOR_SIZE` pixels (1 for large ones)."""
    return max(1, math.ceil(EDITOR_SIZE / resolution))


def commands(model: DemoModel, request: GenerationRequest, output: str = "grid.png") -> dict:
    pipeline_class = type(model.pipe).__name__
    return {
        "python": python_command(model.source, pipeline_class, request, model.device, model.dtype),
        "cli": cli_command(model.source, request, output, model.device, model.dtype),
    }


def _call(request: GenerationRequest) -> dict:
    generators = [torch.Generator().manual_seed(request.seed + i) for i in range(request.num_images)]
    return {
        "class_labels": list(request.labels),
        "num_images_per_label": request.num_images_per_label,
        "generator": generators,
        "output_type": "pil",
        **request.call,
    }


def _finished(run: PipelineRun) -> list[PIL.Image.Image] | None:
    """The run's images; raises its error; None if it was cancelled."""
    run.join()
    if run.error is not None:
        raise run.error
    return run.images


def _timing(count: int, seconds: float) -> str:
    return f"{count} image(s) in {seconds:.2f} s ({count / max(seconds, 1e-9):.1f} img/s)"


def generate(
    model: DemoModel, request: GenerationRequest, runs: RunRegistry, session: str, outputs_dir: Path
) -> Iterator[dict]:
    """Run `request`, yielding the live frame at every outer step, then the grid, its PNG (in `outputs_dir`) and the
    time. A cancelled run (the Stop button, `RunRegistry.cancel`) ends it after the pipeline's current step with a
    'Cancelled after N step(s).' status; closing the iterator early (the browser went away) cancels the run too."""
    pipe = model.pipe
    layout = grid_layout(pipe, [label_text(pipe, label) for label in request.labels], request.num_images_per_label)
    frames = model.adapter.frames(pipe, layout)
    run = runs.start(session, PipelineRun(pipe, model.lock, _call(request), frames, model.num_threads))
    finished = False
    try:
        yield {"status": f"Sampling with {request.settings_text}", **commands(model, request)}
        for count, frame in enumerate(run, start=1):
            yield {"live": frame, "status": f"Step {min(count, run.steps)} of {pipe.num_timesteps}"}
        finished = True
    finally:
        if not finished:
            run.cancel()
        runs.finish(session, run)
    images = _finished(run)
    if images is None:
        yield {"status": f"Cancelled after {run.steps} step(s)."}
        return
    grid = layout.grid(images)
    png = save_image(grid, outputs_dir / f"grid-{uuid.uuid4().hex[:12]}.png")
    extra = f"; drawing the live image took {run.frame_seconds:.2f} s more" if run.frame_seconds >= 0.01 else ""
    status = f"{_timing(len(images), run.seconds)}{extra}; {request.settings_text}"
    yield {"live": grid, "grid": grid, "png": str(png), "status": status}


def compare(
    model: DemoModel, labels_text: str, num_images_per_label: object, seed: object, preset: str, runs: RunRegistry,
    session: str,
) -> dict:  # fmt: skip
    """The model's exact recommended settings and `preset` on the same labels and seed, each timed."""
    if not model.adapter.presets:
        raise CLIError(f"sampling presets apply to MAR models; {model.name} is a {model.adapter.name} model")
    outputs = {}
    for name, chosen in (("exact", None), ("preset", preset)):
        request = generation_request(model.pipe, labels_text, num_images_per_label, seed, {}, chosen)
        run = runs.start(session, PipelineRun(model.pipe, model.lock, _call(request), None, model.num_threads))
        try:
            images = _finished(run)
        finally:
            runs.finish(session, run)
        if images is None:
            return {"status": "Cancelled."}
        row_labels = [label_text(model.pipe, label) for label in request.labels]
        layout = grid_layout(model.pipe, row_labels, request.num_images_per_label)
        outputs[name] = layout.grid(images)
        outputs[f"{name}_text"] = f"{_timing(len(images), run.seconds)}; {request.settings_text}"
        outputs[f"{name}_cli"] = commands(model, request, f"{name}.png")["cli"]
        outputs[f"{name}_seconds"] = run.seconds
    speedup = outputs["exact_seconds"] / max(outputs["preset_seconds"], 1e-9)
    outputs["status"] = f"The preset {preset!r} took {speedup:.1f}x less time than the exact settings here."
    outputs["quality"] = quality_table(model.is_default)
    return outputs


def digits_sample(model: DemoModel, index: object) -> tuple[PIL.Image.Image, int | None]:
    """Digit number `index` of scikit-learn's 8x8 digits at the model's size and channels, shown upscaled; and its
    class id if the model has a class named like the digit."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CLIError("digits samples need scikit-learn: pip install 'diffusers-mar[demo]'") from None
    digits = load_digits()
    if index is None or not float(index).is_integer() or not 0 <= int(index) < len(digits.target):
        raise CLIError(f"the digits sample must be a whole number in [0, {len(digits.target) - 1}]; got {index!r}")
    pixels = np.round(digits.images[int(index)] * 255.0 / 16.0).astype(np.uint8)  # ink white, as in training
    resolution = image_size(model.pipe)
    filter_ = PIL.Image.Resampling.NEAREST if resolution % 8 == 0 else PIL.Image.Resampling.BICUBIC
    image = PIL.Image.fromarray(pixels, "L").resize((resolution, resolution), filter_)
    side = resolution * display_scale(resolution)
    image = image.convert("RGB").resize((side, side), PIL.Image.Resampling.NEAREST)
    digit = str(int(digits.target[int(index)]))
    return image, model.pipe.labels.get(digit)


def inpaint(
    model: DemoModel, background: PIL.Image.Image | None, layers: list, label: object, seed: object,
    guidance_scale: object, mask_dilation: object, resize: bool, runs: RunRegistry, session: str,
) -> dict:  # fmt: skip
    """Regenerate the painted part of `background` as class `label` (MARInpaintPipeline): the image with the tokens
    to regenerate greyed out (`kept`) and the result, both shown upscaled."""
    pipe = model.inpaint_pipe
    if pipe is None:
        raise CLIError(f"{model.adapter.name} models have no inpainting pipeline; load a MAR or VAR model to inpaint")
    if background is None:
        raise CLIError("upload an image or load a digits sample first")
    mask = drawn_mask(layers or [], background.size)
    if not mask.any():
        raise CLIError("paint the part to regenerate on the image first (the brush of the editor)")
    channels = pipe.image_channels
    if channels not in (1, 3):
        raise CLIError(f"this model's images have {channels} channels; the demo inpaints grey or RGB images")
    resolution = image_size(pipe)
    image, mask = fit_to_model(background, mask, resolution, "L" if channels == 1 else "RGB", bool(resize))
    request = generation_request(model.pipe, str(label), 1, seed, {"guidance_scale": guidance_scale})
    dilation, grid_size = int(mask_dilation or 0), resolution // pipe.token_size  # tokens per side (VAR: last scale)
    if dilation < 0 or dilation > grid_size:
        raise CLIError(f"mask dilation must be in [0, {grid_size}] tokens; got {mask_dilation!r}")
    mask_image = PIL.Image.fromarray(mask.astype(np.uint8) * 255, "L")
    call = {
        "image": image,
        "mask_image": mask_image,
        "class_labels": list(request.labels),
        "mask_dilation": dilation,
        "generator": torch.Generator().manual_seed(request.seed),
        "output_type": "pil",
        **request.call,
    }
    run = runs.start(session, PipelineRun(pipe, model.lock, call, None, model.num_threads))
    try:
        images = _finished(run)
    finally:
        runs.finish(session, run)
    if images is None:
        return {"status": "Cancelled."}
    scale = display_scale(resolution)
    tokens = pipe.prepare_mask(mask_image, dilation)[0].reshape(grid_size, -1).numpy() > 0.5
    pixels = to_uint8(np.asarray(image, dtype=np.float32).reshape(resolution, resolution, -1)[None] / 255.0)
    token_size = pipe.token_size
    kept = render_canvas(pixels, tokens[None], np.zeros_like(tokens)[None], token_size, scale)[0]
    result = images[0].convert("RGB").resize((resolution * scale,) * 2, PIL.Image.Resampling.NEAREST)
    count = int(tokens.sum())
    status = (
        f"Regenerated {count} of {tokens.size} tokens (grey in the input) as "
        f"{label_text(model.pipe, request.labels[0])} in {run.seconds:.2f} s; {request.settings_text}"
    )
    return {"kept": kept, "result": result, "status": status}


def label_choices(model: DemoModel) -> list[tuple[str, int]]:
    """(text, id) of every class and of the unconditional label, for a dropdown."""
    num_classes = model.pipe.transformer.config.num_classes
    return [(label_text(model.pipe, label, max_chars=40), label) for label in range(num_classes + 1)]


def model_info(model: DemoModel) -> dict:
    """The model card, a summary (classes, sizes, parameter counts, recommended settings) and the configs."""
    summary = model.summary()
    rows = [
        f"| {name} | {entry['class']} | {entry.get('parameters', 0):,} |"
        for name, entry in summary["components"].items()
    ]
    rows.append(f"| **total** | | **{summary['total_parameters']:,}** |")
    settings = "\n".join(f"| `{key}` | `{value!r}` |" for key, value in summary["recommended_sampling"].items())
    size = "x".join(map(str, summary["image_size"])) if summary["image_size"] else "none"
    text = (
        f"**{summary['pipeline']}** ({model.adapter.name} family), {summary['space']} space; images {size}, "
        f"{summary['num_tokens']} tokens; {summary['num_classes']} classes ({summary['num_classes']} = unconditional)."
        "\n\n| component | class | parameters |\n|---|---|---:|\n"
        + "\n".join(rows)
        + f"\n\nRecommended sampling settings ({summary['recommended_sampling_source']}):\n\n"
        "| setting | value |\n|---|---|\n" + settings
    )
    configs = {"model_index.json": dict(model.pipe.config)}
    for name, component in model.pipe.components.items():
        if component is not None and hasattr(component, "config"):
            configs[name] = dict(component.config)
    return {"card": model.card, "summary": text, "config": json.loads(json.dumps(configs, default=str))}
