"""The `diffusers-mar` command line: `generate` a labelled image grid with a MARPipeline, `info` about a model.

Exit codes: 0 success; 2 bad input (a wrong argument, a model, label or output path that cannot be used, as
argparse does); 1 a failure while loading or running the model, or a model missing from the installation.
Every check that does not need the model (output paths, device, dtype, numbers) runs before the model loads, and
all checks run before anything is generated, so a failing command leaves no output file behind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image, ImageDraw, ImageFont

from diffusers_mar import DEFAULT_MODEL, MARPipeline
from diffusers_mar.pipelines.sampling_settings import SAMPLING_KEYS

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GRID_MIN_CELL = 64  # the automatic `--scale` upscales images smaller than this (pixels) to at least this size

EPILOG = """\
exit codes:
  0  success
  1  failure while loading or running the model (or the shipped default model is missing)
  2  bad input: a wrong argument, or a model, class label or output path that cannot be used

--model defaults to diffusers_mar.DEFAULT_MODEL, the model folder inside the package (default_model/).
Documentation: docs/cli.md
"""


class CLIError(Exception):
    """An error to report without a traceback: `argument` names the option at fault, `exit_code` is 1 or 2."""

    def __init__(self, message: str, argument: str | None = None, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.argument = argument
        self.exit_code = exit_code

    def __str__(self) -> str:
        message = super().__str__()
        return f"argument {self.argument}: {message}" if self.argument else message


# ----------------------------------------------------------------------------------------------------------------
# Argument types: argparse turns their ValueError/ArgumentTypeError into an exit-2 error that names the option.


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0; got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", text):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda, cuda:N or mps; got {text!r}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} was requested but CUDA is not available on this machine")
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r} was requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if text == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("'mps' was requested but MPS is not available on this machine")
    return text


_positive_int.__name__ = "integer >= 1"  # argparse names the type in "invalid <name> value" messages
_non_negative_float.__name__ = "number"
_positive_float.__name__ = "number"
_device.__name__ = "device"


# ----------------------------------------------------------------------------------------------------------------
# Output paths: checked before the model loads, written atomically (a temporary file renamed into place).


def _check_writable_folder(path: Path, argument: str) -> None:
    """`path` is, or can be created as, a folder we can write in."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"cannot write under {str(path)!r}: {str(existing)!r} is not a folder", argument)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise CLIError(f"cannot write in {str(existing)!r}: {error.strerror or error}", argument) from None


def _image_format(path: Path, argument: str) -> str:
    extensions = Image.registered_extensions()
    suffix = path.suffix.lower()
    if suffix not in extensions or extensions[suffix] not in Image.SAVE:
        raise CLIError(f"{str(path)!r} needs an image extension such as .png, .jpg or .webp", argument)
    return extensions[suffix]


def check_output_paths(output: str | None, output_dir: str | None) -> None:
    """Validate `--output` and `--output-dir` before anything is loaded or generated."""
    if output is None and output_dir is None:
        raise CLIError("give --output (a grid image) and/or --output-dir (one file per image)", "--output")
    if output is not None:
        path = Path(output).expanduser()
        if path.is_dir():
            raise CLIError(f"{output!r} is a folder; give a file name such as grid.png", "--output")
        _image_format(path, "--output")
        _check_writable_folder(path.parent, "--output")
    if output_dir is not None:
        path = Path(output_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise CLIError(f"{output_dir!r} exists and is not a folder", "--output-dir")
        _check_writable_folder(path, "--output-dir")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save `image` to `path` (format from the extension), creating folders; no partial file on failure."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    image_format = _image_format(path, "--output")
    if image_format == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            image.save(file, format=image_format)
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp makes the file private (0600); a PNG is not
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------------------------
# The model: a local folder or a Hub id, and the sampling settings its folder recommends.


def _looks_like_local_path(model: str) -> bool:
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or "\\" in model
        or model.count("/") > 1
        or model.endswith("/")
    )


def load_pipeline(model: str, device: str = "cpu", dtype: str = "float32") -> MARPipeline:
    """Load a MARPipeline from a local folder or a Hugging Face Hub id, with errors that name `--model`.

    Raises `CLIError` (exit 2) when the model cannot be found, (exit 1) when the shipped default model is missing
    or a found model fails to load.
    """
    path = Path(model).expanduser()
    if os.path.abspath(path) == os.path.abspath(DEFAULT_MODEL) and not (path / "model_index.json").is_file():
        raise CLIError(
            f"the default model is not installed: {DEFAULT_MODEL} has no model_index.json. "
            "Pass --model with a MARPipeline folder or Hub id.",
            "--model",
            exit_code=EXIT_FAILURE,
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CLIError(f"{model!r} is a folder but not a saved pipeline (no model_index.json)", "--model")
        source = str(path)
    elif path.exists():
        raise CLIError(f"{model!r} is a file; give a pipeline folder (with model_index.json) or a Hub id", "--model")
    elif _looks_like_local_path(model):
        raise CLIError(f"no such folder: {model!r}", "--model")
    else:
        source = model
    verbosity = diffusers_logging.get_verbosity()
    if verbosity == diffusers_logging.WARNING:
        # Loading logs a progress bar and notes a CLI user cannot act on: the str keys of id2label in JSON, and a
        # "modules to keep in float32: []" warning whenever a model is cast with `.to(dtype)`.
        diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        pipe = MARPipeline.from_pretrained(source)
        if not isinstance(pipe, MARPipeline):
            raise CLIError(f"{model!r} holds a {type(pipe).__name__}, not a MARPipeline", "--model")
        pipe.to(device=device, dtype=DTYPES[dtype])
    except CLIError:
        raise
    except Exception as error:  # diffusers reports a missing or unreachable Hub repository as OSError/ValueError
        if source == model and not path.exists():
            reason = " ".join(str(error).split())[:300]
            raise CLIError(
                f"{model!r} is not a local folder, and loading it as a Hugging Face Hub id failed "
                f"(the id may be wrong, or there is no network; HF_HUB_OFFLINE=1 forbids downloads): {reason}",
                "--model",
            ) from None
        raise CLIError(f"could not load the pipeline in {model!r}: {error}", "--model", EXIT_FAILURE) from error
    finally:
        diffusers_logging.set_verbosity(verbosity)
        diffusers_logging.enable_progress_bar()
    return pipe


def recommended_sampling(pipe: MARPipeline) -> tuple[dict, str]:
    """The sampling settings a model recommends (`pipe.sampling_defaults`), and where they come from."""
    if pipe.config.get("sampling"):
        return pipe.sampling_defaults, "the pipeline folder's recommended settings (model_index.json)"
    return pipe.sampling_defaults, "the paper's settings clipped to this model (the folder stores none)"


def parse_class_labels(pipe: MARPipeline, tokens: list[str]) -> list[int]:
    """Integers are class ids in `[0, num_classes]` (`num_classes` = unconditional); other tokens are names."""
    num_classes = pipe.transformer.config.num_classes
    labels = []
    for token in tokens:
        token = token.strip()
        if re.fullmatch(r"[+-]?\d+", token):
            label = int(token)
            if not 0 <= label <= num_classes:
                raise CLIError(
                    f"class id {label} is out of range: this model has classes 0..{num_classes - 1} "
                    f"({num_classes} = unconditional)",
                    "--class-labels",
                )
            labels.append(label)
        elif not pipe.labels:
            raise CLIError(
                f"{token!r} is not an integer, and this model has no id2label to look names up in; "
                f"give class ids in 0..{num_classes - 1}",
                "--class-labels",
            )
        elif token not in pipe.labels:
            names = list(pipe.labels)
            shown = ", ".join(repr(name) for name in names[:20]) + (", ..." if len(names) > 20 else "")
            raise CLIError(f"unknown class name {token!r}; known names: {shown}", "--class-labels")
        else:
            labels.extend(pipe.get_label_ids(token))
    return labels


def label_text(pipe: MARPipeline, label: int, max_chars: int = 24) -> str:
    if label == pipe.transformer.config.num_classes:
        return "uncond."
    name = pipe.id2label.get(label, "").split(",")[0].strip()
    text = str(label) if not name or name == str(label) else f"{label} {name}"
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


# ----------------------------------------------------------------------------------------------------------------
# The grid.


def auto_scale(image_size: int) -> int:
    """Integer NEAREST upscaling so that a cell is at least `GRID_MIN_CELL` pixels (1 for big images)."""
    return max(1, math.ceil(GRID_MIN_CELL / max(1, image_size)))


def make_grid(images: list[list[Image.Image]], row_labels: list[str], scale: int = 1) -> Image.Image:
    """Rows of images with a text label left of each row, upscaled `scale` times with NEAREST, on white."""
    width, height = images[0][0].size
    cell_w, cell_h = width * scale, height * scale
    gap, margin = 4, 6
    font = ImageFont.load_default(size=min(20, max(10, cell_h // 4)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_boxes = [measure.textbbox((0, 0), text, font=font) for text in row_labels]
    label_w = max(box[2] - box[0] for box in text_boxes) + 2 * margin
    columns = max(len(row) for row in images)
    grid = Image.new(
        "RGB",
        (label_w + columns * (cell_w + gap) - gap + margin, margin + len(images) * (cell_h + gap) - gap + margin),
        "white",
    )
    draw = ImageDraw.Draw(grid)
    for r, (row, text, box) in enumerate(zip(images, row_labels, text_boxes)):
        top = margin + r * (cell_h + gap)
        draw.text((margin - box[0], top + (cell_h - (box[3] - box[1])) // 2 - box[1]), text, fill="black", font=font)
        for c, image in enumerate(row):
            cell = image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST)
            grid.paste(cell, (label_w + c * (cell_w + gap), top))
    return grid


# ----------------------------------------------------------------------------------------------------------------
# Subcommands.


def _sampling_settings(args: argparse.Namespace, pipe: MARPipeline) -> tuple[dict, str]:
    """Options given on the command line, else the model's recommendations; range checks that name the option."""
    settings, source = recommended_sampling(pipe)
    given = {key for key in SAMPLING_KEYS if getattr(args, key, None) is not None}
    settings.update({key: getattr(args, key) for key in given})
    num_tokens = pipe.transformer.num_tokens
    max_steps = pipe.scheduler.config.num_train_timesteps
    ranges = {"num_inference_steps": (1, num_tokens), "num_diffusion_steps": (1, max_steps)}
    for key, (low, high) in ranges.items():
        if not (isinstance(settings[key], int) and low <= settings[key] <= high):
            option = "--" + key.replace("_", "-")
            message = f"must be an integer in [{low}, {high}] for this model"
            if key == "num_inference_steps":
                message += f" ({num_tokens} tokens, a step predicts at least one)"
            if key in given:
                raise CLIError(f"{message}; got {settings[key]}", option)
            raise CLIError(
                f"{source} gives {key}={settings[key]!r}, which is not an integer in [{low}, {high}] for this "
                f"model; pass {option}",
                option,
                EXIT_FAILURE,
            )
    return settings, source


def cmd_generate(args: argparse.Namespace) -> int:
    # 1. Checks that need no model
    check_output_paths(args.output, args.output_dir)

    # 2. Model, labels and settings (all checked before generating)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    labels = parse_class_labels(pipe, args.class_labels)
    settings, source = _sampling_settings(args, pipe)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    settings_text = ", ".join(f"{key}={settings[key]}" for key in SAMPLING_KEYS)
    print(f"Sampling with {settings_text} (options not given: {source})", file=sys.stderr)

    # 3. Generate: one generator per image (seed + index), so an image does not depend on --batch-size
    requested = [label for label in labels for _ in range(args.num_images_per_label)]
    images = []
    start = time.perf_counter()
    for first in range(0, len(requested), args.batch_size):
        batch = requested[first : first + args.batch_size]
        generators = [torch.Generator().manual_seed(args.seed + first + i) for i in range(len(batch))]
        try:
            images.extend(pipe(class_labels=batch, generator=generators, output_type="pil", **settings).images)
        except ValueError as error:  # an argument that the pipeline rejected (e.g. a stored setting)
            raise CLIError(f"the pipeline rejected the settings ({settings_text}): {error}") from None
    seconds = time.perf_counter() - start
    print(f"Generated {len(images)} images in {seconds:.1f} s ({len(images) / seconds:.1f} img/s)", file=sys.stderr)

    # 4. Write the grid and the single files
    rows = [images[r * args.num_images_per_label : (r + 1) * args.num_images_per_label] for r in range(len(labels))]
    if args.output is not None:
        scale = args.scale or auto_scale(max(images[0].size))
        grid = make_grid(rows, [label_text(pipe, label) for label in labels], scale=scale)
        print(save_image(grid, args.output))
    if args.output_dir is not None:
        for label, row in zip(labels, rows):
            for k, image in enumerate(row):
                if args.scale and args.scale > 1:
                    image = image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST)
                print(save_image(image, Path(args.output_dir).expanduser() / f"label-{label}-{k}.png"))
    return EXIT_OK


def model_summary(pipe: MARPipeline, model: str) -> dict:
    """What `info` prints: components, sizes, classes and the recommended sampling settings."""
    transformer = pipe.transformer
    config = transformer.config
    vae = getattr(pipe, "vae", None)
    components = {}
    for name, component in pipe.components.items():
        if component is None:
            continue
        entry = {"class": type(component).__name__}
        if isinstance(component, torch.nn.Module):
            entry["parameters"] = sum(p.numel() for p in component.parameters())
        components[name] = entry
    image_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    settings, source = recommended_sampling(pipe)
    return {
        "model": model,
        "pipeline": type(pipe).__name__,
        "space": "latent" if vae is not None else "pixel",
        "components": components,
        "total_parameters": sum(entry.get("parameters", 0) for entry in components.values()),
        "token_grid": [transformer.grid_size, transformer.grid_size],
        "num_tokens": transformer.num_tokens,
        "patch_size": config.patch_size,
        "token_dim": transformer.token_dim,
        "in_channels": config.in_channels,
        "image_size": [config.sample_size * image_factor, config.sample_size * image_factor],
        "image_channels": vae.config.out_channels if vae is not None else config.in_channels,
        "num_classes": config.num_classes,
        "unconditional_label": config.num_classes,
        "id2label": {str(key): value for key, value in sorted(pipe.id2label.items())},
        "recommended_sampling": settings,
        "recommended_sampling_source": source,
        "scheduler_config": {
            key: value for key, value in dict(pipe.scheduler.config).items() if not key.startswith("_")
        },
    }


def cmd_info(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.model)
    summary = model_summary(pipe, args.model)
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    height, width = summary["image_size"]
    grid = "x".join(map(str, summary["token_grid"]))
    if summary["space"] == "pixel":
        space = f"pixel space (no VAE): tokens are {summary['patch_size']}x{summary['patch_size']} patches of pixels"
    else:
        space = f"latent space: tokens are {summary['patch_size']}x{summary['patch_size']} patches of VAE latents"
    lines = [
        f"model:        {summary['model']}",
        f"pipeline:     {summary['pipeline']}, {space}",
        f"images:       {height}x{width}, {summary['image_channels']} channel(s)",
        f"token grid:   {grid} = {summary['num_tokens']} tokens of {summary['token_dim']} values "
        f"(patch size {summary['patch_size']}, {summary['in_channels']} channel(s))",
        "components:",
    ]
    for name, entry in summary["components"].items():
        if "parameters" in entry:
            detail = f"{entry['parameters']:>13,} parameters"
        else:
            config = summary["scheduler_config"] if name == "scheduler" else {}
            keys = ("num_train_timesteps", "beta_schedule", "variance_type", "prediction_type")
            detail = ", ".join(f"{key}={config[key]}" for key in keys if key in config)
        lines.append(f"  {name:<16}{entry['class']:<30}{detail}".rstrip())
    lines.append(f"  {'total':<46}{summary['total_parameters']:>13,} parameters")
    num_classes = summary["num_classes"]
    lines.append(f"classes:      {num_classes} (ids 0..{num_classes - 1}; {num_classes} = unconditional)")
    if summary["id2label"]:
        names = [f"{key}: {value}" for key, value in summary["id2label"].items()]
        shown = names if len(names) <= 30 else names[:30] + [f"... ({len(names) - 30} more)"]
        lines.extend(f"  {name}" for name in shown)
    else:
        lines.append("  (no id2label: use class ids)")
    lines.append(f"recommended sampling, from {summary['recommended_sampling_source']}:")
    lines.extend(f"  {key}: {value}" for key, value in summary["recommended_sampling"].items())
    print("\n".join(lines))
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# The parser and the entry point.


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="diffusers-mar",
        description="Generate images with MAR (masked autoregression + per-token diffusion), and inspect models.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="{generate,info}")
    model_help = (
        "a MARPipeline folder (saved with save_pretrained) or a Hugging Face Hub id "
        "(default: diffusers_mar.DEFAULT_MODEL, the model folder inside the package)"
    )

    generate = subparsers.add_parser(
        "generate",
        help="generate a labelled image grid and/or single image files",
        description=(
            "Generate --num-images-per-label images for each of --class-labels and write them as one grid\n"
            "(rows = labels) and/or one PNG per image. Sampling options not given take the values that the\n"
            "pipeline folder recommends (`sampling` in model_index.json), else the paper's, clipped to the model."
        ),
        epilog=EPILOG
        + "\nexample:\n  diffusers-mar generate --class-labels 0 1 2 --num-images-per-label 4 --output grid.png\n",
        formatter_class=formatter,
    )
    generate.add_argument(
        "--class-labels",
        nargs="+",
        required=True,
        metavar="LABEL",
        help="class ids (integers; num_classes = unconditional) or class names from the model's id2label "
        '(quote names with spaces: "golden retriever")',
    )
    generate.add_argument(
        "--num-images-per-label", type=_positive_int, default=4, metavar="N", help="images per label (default 4)"
    )
    generate.add_argument("--output", "-o", metavar="FILE", help="the grid image to write (.png, .jpg, ...)")
    generate.add_argument(
        "--output-dir", metavar="DIR", help="a folder for single files label-<id>-<k>.png (created if missing)"
    )
    generate.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH_OR_HUB_ID", help=model_help)
    generate.add_argument(
        "--guidance-scale", type=_non_negative_float, metavar="S", help="classifier-free guidance, 1 = off"
    )
    generate.add_argument(
        "--guidance-schedule", choices=("linear", "constant"), help="how guidance grows over the steps"
    )
    generate.add_argument("--num-inference-steps", type=_positive_int, metavar="K", help="masked-autoregressive steps")
    generate.add_argument(
        "--num-diffusion-steps", type=_positive_int, metavar="S", help="diffusion-head steps per token"
    )
    generate.add_argument(
        "--temperature", type=_positive_float, metavar="T", help="scales each diffusion step's noise"
    )
    generate.add_argument(
        "--seed", type=int, default=0, help="image i uses torch.Generator seeded seed + i (default 0)"
    )
    generate.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda, cuda:N or mps")
    generate.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights dtype (default float32)")
    generate.add_argument(
        "--batch-size", type=_positive_int, default=64, metavar="N", help="images per pipeline call (default 64)"
    )
    generate.add_argument(
        "--scale",
        type=_positive_int,
        metavar="N",
        help=f"integer NEAREST upscaling; default for the grid: cells of at least {GRID_MIN_CELL} px "
        "(8 for 8x8 digits), for single files: 1",
    )
    generate.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    generate.set_defaults(func=cmd_generate, parser=generate)

    info = subparsers.add_parser(
        "info",
        help="print a model's components, parameter counts, classes and recommended settings",
        description="Print a model's components, parameter counts, classes, sizes and recommended sampling settings.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    info.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH_OR_HUB_ID", help=model_help)
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(func=cmd_info, parser=info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 runtime failure, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) and argparse's own usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except CLIError as error:
        print(f"{args.parser.prog}: error: {error}", file=sys.stderr)
        if error.exit_code == EXIT_USAGE:
            print(f"(see: {args.parser.prog} --help)", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{args.parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"{args.parser.prog}: error: unexpected failure (traceback above)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
