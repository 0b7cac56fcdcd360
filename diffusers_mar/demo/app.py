"""The Gradio interface of `diffusers-mar demo`: for each model, the tabs Generate, Inpaint / edit, Exact against fast
and Model, on the actions of `actions.py`. Gradio is imported when the interface is built (`pip install
'diffusers-mar[demo]'`), so the package imports without it.

Every model has its own queue (`concurrency_id`, one event at a time): users of one model wait in line, users of two
models do not wait for each other. A refused input shows its message (`gr.Error`); an unexpected failure shows one
line and leaves the traceback in the server's log.
"""

import shutil
import sys
import traceback
from pathlib import Path

from diffusers_mar.cli.errors import CLIError
from diffusers_mar.demo import actions
from diffusers_mar.demo.inputs import check_upload, user_message
from diffusers_mar.demo.model import DemoModel
from diffusers_mar.demo.runner import RunRegistry
from diffusers_mar.demo.security import DELETE_CACHE, QUEUE_SIZE, launch_settings, make_outputs_dir, use_outputs_dir

NO_PRESET = "none (exact)"
DEFAULT_ORDER = "the pipeline's default"
BRUSH_COLOR = ("#ff3030", 0.6)  # the mask as painted: any painted pixel is regenerated
FONTS = (["ui-sans-serif", "system-ui", "sans-serif"], ["ui-monospace", "monospace"])  # no web fonts: works offline
INTRO = (
    "# diffusers-mar demo\n"
    "Class-conditional generation with MAR and causal AR token models (`docs/demo.md`). The live image shows the "
    "known tokens, the unknown ones in grey and the tokens of the next step outlined."
)


def refusal(gr, error: Exception) -> Exception:
    """The `gr.Error` for an exception of an action: our message for a refused input, one line otherwise."""
    if isinstance(error, (CLIError, ValueError)):
        return gr.Error(user_message(error), print_exception=False)
    traceback.print_exception(error, file=sys.stderr)
    return gr.Error(f"unexpected failure ({type(error).__name__}); the server's log has the details")


def stopper(gr, runs: RunRegistry):
    """A Stop button's function: cancel the pipeline call of the session that clicked; the line for the tab's status.
    The tab's event is not cancelled through Gradio (`cancels=`): its function sees the cancelled run after the
    pipeline's current step and ends normally with its own status line. A Gradio cancel races with that ending, and
    a lost race marks the tab's outputs with Gradio's 'Error' badge."""

    def stop(request: gr.Request) -> str:
        if runs.cancel(request.session_hash):
            return "Cancelled: the pipeline stops after its current step."
        return "Stopped (no run was going on)."

    return stop


def check_uploads(gr, editor):
    """Make `editor` refuse an upload of another type, too many pixels or unreadable data with our message
    (`inputs.check_upload`) before Gradio decodes it. The instance's `preprocess` is wrapped: a subclass would make
    Gradio write a `.pyi` stub next to this file."""
    decode = editor.preprocess

    def preprocess(payload):
        files = () if payload is None else (payload.background, *(payload.layers or []), payload.composite)
        try:
            for file in files:
                if getattr(file, "path", None):
                    check_upload(file.path)
            return decode(payload)
        except CLIError as error:
            raise gr.Error(user_message(error), print_exception=False) from None
        except Exception as error:
            raise gr.Error(
                f"the upload is not a readable image ({type(error).__name__})", print_exception=False
            ) from None

    editor.preprocess = preprocess
    return editor


def generate_tab(gr, model: DemoModel, queue: dict, runs: RunRegistry, outputs_dir: Path) -> None:
    pipe, adapter = model.pipe, model.adapter
    defaults = pipe.sampling_defaults
    num_classes = pipe.transformer.config.num_classes
    small = actions.image_size(pipe) <= 32
    with gr.Row():
        with gr.Column(scale=2):
            labels = gr.Textbox(
                " ".join(str(label) for label in range(min(num_classes, 10))),
                label="Class labels",
                info=f"ids 0..{num_classes - 1} ({num_classes} = unconditional) or names, separated by spaces or commas",
                elem_id="labels",
            )
            with gr.Row():
                per_label = gr.Number(4 if small else 1, label="Images per label", precision=0, elem_id="per-label")
                seed = gr.Number(0, label="Seed (image i: seed + i)", precision=0, elem_id="seed")
            preset = order = None
            if adapter.presets:
                preset = gr.Dropdown([NO_PRESET, *adapter.presets], value=NO_PRESET, label="Sampling preset")
            if adapter.orders:
                order = gr.Dropdown([DEFAULT_ORDER, *adapter.orders], value=DEFAULT_ORDER, label="Order")
            settings = {}
            for key in pipe.sampling_keys:
                value = defaults[key]
                if key == "guidance_schedule":
                    settings[key] = gr.Dropdown(["linear", "constant"], value=value, label=key)
                elif key in ("num_inference_steps", "num_diffusion_steps"):
                    value = value if isinstance(value, int) else None  # a named schedule: the folder's
                    settings[key] = gr.Number(value, label=key, precision=0, elem_id=key.replace("_", "-"))
                else:
                    settings[key] = gr.Number(value, label=key, elem_id=key.replace("_", "-"))
            with gr.Row():
                start = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Stop", variant="stop", elem_id="stop")
        with gr.Column(scale=3):
            image = gr.Image(label="Live image, then the grid", type="pil", format="png", elem_id="live")
            status = gr.Markdown(elem_id="status")
            download = gr.DownloadButton("Download PNG", interactive=False, elem_id="download")
    with gr.Row():
        python = gr.Code(label="Python", language="python", interactive=False, wrap_lines=True, elem_id="python")
        cli = gr.Code(label="Command line", language="shell", interactive=False, wrap_lines=True, elem_id="cli")

    if preset is not None:
        preset_steps = ("num_inference_steps", "num_diffusion_steps")

        def on_preset(name):  # the preset sets the step counts (docs/usage.md); empty: not given
            exact = name == NO_PRESET
            values = [defaults[key] if exact and isinstance(defaults[key], int) else None for key in preset_steps]
            return [gr.update(interactive=exact, value=value) for value in values]

        preset.change(
            on_preset, preset, [settings[key] for key in preset_steps], queue=False, api_visibility="private"
        )

    inputs = {labels, per_label, seed, *settings.values(), *(c for c in (preset, order) if c is not None)}
    outputs = {"live": image, "status": status, "python": python, "cli": cli}

    def run(data: dict, request: gr.Request):
        chosen_preset = data[preset] if preset is not None and data[preset] != NO_PRESET else None
        chosen_order = data[order] if order is not None and data[order] != DEFAULT_ORDER else None
        given = {key: data[component] for key, component in settings.items()}
        try:
            generation = actions.generation_request(
                pipe, data[labels], data[per_label], data[seed], given, chosen_preset, chosen_order
            )
            yield {download: gr.update(value=None, interactive=False)}
            for update in actions.generate(model, generation, runs, request.session_hash, outputs_dir):
                result = {outputs[key]: value for key, value in update.items() if key in outputs}
                if "png" in update:
                    result[download] = gr.update(value=update["png"], interactive=True)
                yield result
        except Exception as error:
            raise refusal(gr, error) from None

    start.click(run, inputs, [image, status, python, cli, download], api_name="generate", **queue)
    stop.click(stopper(gr, runs), None, status, queue=False, api_visibility="private")


def inpaint_tab(gr, model: DemoModel, queue: dict, runs: RunRegistry) -> None:
    if model.inpaint_pipe is None:
        gr.Markdown(f"{model.adapter.name} models have no inpainting pipeline: load a MAR model to inpaint.")
        return
    pipe = model.pipe
    resolution = actions.image_size(pipe)
    side = resolution * actions.display_scale(resolution)
    gr.Markdown(
        f"Paint over the part to regenerate (any painted pixel regenerates its whole token); outpainting is the same: "
        f"paint the border. Images are {resolution}x{resolution} (shown {side}x{side}; uploads of that size or a "
        "whole multiple of it, or tick 'resize')."
    )
    with gr.Row():
        with gr.Column():
            editor = gr.ImageEditor(
                label="Image and mask",
                type="pil",
                image_mode="RGBA",
                sources=("upload", "clipboard"),
                brush=gr.Brush(colors=[BRUSH_COLOR], color_mode="fixed", default_size=max(4, side // 16)),
                transforms=(),
                layers=False,
                format="png",
                canvas_size=(side, side),
                elem_id="editor",
            )
            check_uploads(gr, editor)
            with gr.Row():
                sample = gr.Number(0, label="Digits sample (0-1796)", precision=0, elem_id="sample")
                load = gr.Button("Load digits sample", elem_id="load-sample")
            choices = actions.label_choices(model)
            label = gr.Dropdown(choices, value=choices[0][1], label="Class", elem_id="inpaint-label")
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0)
                guidance = gr.Number(pipe.sampling_defaults["guidance_scale"], label="guidance_scale")
                dilation = gr.Number(0, label="Mask dilation (tokens)", precision=0)
            resize = gr.Checkbox(False, label="resize an image of another size to the model's size")
            with gr.Row():
                start = gr.Button("Inpaint", variant="primary", elem_id="inpaint")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column():
            kept = gr.Image(label="Input (grey: regenerated)", type="pil", format="png", elem_id="kept")
            result = gr.Image(label="Result", type="pil", format="png", elem_id="result")
            status = gr.Markdown(elem_id="inpaint-status")

    def load_sample(index):
        try:
            image, label_id = actions.digits_sample(model, index)
        except Exception as error:
            raise refusal(gr, error) from None
        value = {"background": image, "layers": [], "composite": image}
        return value, (label_id if label_id is not None else gr.update())

    load.click(load_sample, sample, [editor, label], api_name="digits_sample")

    def run(value, label_id, seed_value, guidance_value, dilation_value, resize_value, request: gr.Request):
        try:
            value = value or {}
            outputs = actions.inpaint(
                model, value.get("background"), value.get("layers"), label_id, seed_value, guidance_value,
                dilation_value, resize_value, runs, request.session_hash,
            )  # fmt: skip
        except Exception as error:
            raise refusal(gr, error) from None
        return outputs.get("kept"), outputs.get("result"), outputs["status"]

    inputs = [editor, label, seed, guidance, dilation, resize]
    start.click(run, inputs, [kept, result, status], api_name="inpaint", **queue)
    stop.click(stopper(gr, runs), None, status, queue=False, api_visibility="private")


def compare_tab(gr, model: DemoModel, queue: dict, runs: RunRegistry) -> None:
    if not model.adapter.presets:
        gr.Markdown(f"Sampling presets apply to MAR models; this is a {model.adapter.name} model.")
        return
    num_classes = model.pipe.transformer.config.num_classes
    gr.Markdown(
        "The model's exact recommended settings and a sampling preset, on the same labels and seed (no live image, so "
        "that the times compare)."
    )
    with gr.Row():
        labels = gr.Textbox(" ".join(str(label) for label in range(min(num_classes, 10))), label="Class labels")
        per_label = gr.Number(4 if actions.image_size(model.pipe) <= 32 else 1, label="Images per label", precision=0)
        seed = gr.Number(0, label="Seed", precision=0)
        preset = gr.Dropdown(list(model.adapter.presets), value=model.adapter.presets[0], label="Preset")
    with gr.Row():
        start = gr.Button("Compare", variant="primary", elem_id="compare")
        stop = gr.Button("Stop", variant="stop")
    with gr.Row():
        with gr.Column():
            exact = gr.Image(label="Exact (the model's recommended settings)", type="pil", format="png")
            exact_text = gr.Markdown()
            exact_cli = gr.Code(language="shell", interactive=False, wrap_lines=True, label="Command line")
        with gr.Column():
            fast = gr.Image(label="Preset", type="pil", format="png")
            fast_text = gr.Markdown()
            fast_cli = gr.Code(language="shell", interactive=False, wrap_lines=True, label="Command line")
    status = gr.Markdown(elem_id="compare-status")
    quality = gr.Markdown()
    names = {
        "exact": exact, "exact_text": exact_text, "exact_cli": exact_cli, "preset": fast, "preset_text": fast_text,
        "preset_cli": fast_cli, "status": status, "quality": quality,
    }  # fmt: skip

    def run(labels_text, per_label_value, seed_value, preset_name, request: gr.Request):
        try:
            outputs = actions.compare(
                model, labels_text, per_label_value, seed_value, preset_name, runs, request.session_hash
            )
        except Exception as error:
            raise refusal(gr, error) from None
        return {component: outputs[key] for key, component in names.items() if key in outputs}

    start.click(run, [labels, per_label, seed, preset], list(names.values()), api_name="compare", **queue)
    stop.click(stopper(gr, runs), None, status, queue=False, api_visibility="private")


def model_tab(gr, model: DemoModel) -> None:
    info = actions.model_info(model)
    gr.Markdown(info["summary"])
    with gr.Accordion("Model card", open=True):
        gr.Markdown(info["card"])
    with gr.Accordion("Configuration", open=False):
        gr.JSON(info["config"])


def model_interface(gr, model: DemoModel, index: int, runs: RunRegistry, outputs_dir: Path) -> None:
    queue = {"concurrency_limit": 1, "concurrency_id": f"model-{index}"}
    with gr.Tabs():
        with gr.Tab("Generate"):
            generate_tab(gr, model, queue, runs, outputs_dir)
        with gr.Tab("Inpaint / edit"):
            inpaint_tab(gr, model, queue, runs)
        with gr.Tab("Exact against fast"):
            compare_tab(gr, model, queue, runs)
        with gr.Tab("Model"):
            model_tab(gr, model)


def build_demo(models: list[DemoModel], outputs_dir: Path):
    """The interface (a `gr.Blocks`, queue set) for `models`; `outputs_dir` receives the PNGs to download."""
    import gradio as gr

    runs = RunRegistry()
    with gr.Blocks(title="diffusers-mar demo", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(INTRO)
        if len(models) == 1:
            model_interface(gr, models[0], 0, runs, outputs_dir)
        else:
            with gr.Tabs():
                for index, model in enumerate(models):
                    with gr.Tab(f"{model.name} ({model.adapter.name})"):
                        model_interface(gr, model, index, runs, outputs_dir)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo


def launch_demo(models: list[DemoModel], host: str | None = None, port: int | None = None, share: bool = False):
    """Serve `models` until Ctrl-C (the `diffusers-mar demo` command); uploads and outputs live in a fresh folder,
    deleted at the end."""
    import gradio as gr

    outputs_dir = make_outputs_dir()
    use_outputs_dir(outputs_dir)
    try:
        demo = build_demo(models, outputs_dir)
        theme = gr.themes.Default(font=FONTS[0], font_mono=FONTS[1])
        _, local_url, share_url = demo.launch(theme=theme, **launch_settings(outputs_dir, host, port, share))
        names = ", ".join(f"{model.name} ({type(model.pipe).__name__})" for model in models)
        print(f"diffusers-mar demo: serving {names} on {local_url}", flush=True)
        print(f"diffusers-mar demo: uploads and outputs in {outputs_dir}, deleted when it stops", flush=True)
        if share_url:
            print(f"diffusers-mar demo: public link (--share) {share_url}", flush=True)
        print("diffusers-mar demo: Ctrl-C stops it", flush=True)
        demo.block_thread()
    finally:
        shutil.rmtree(outputs_dir, ignore_errors=True)
