"""The argument parser of `diffusers-mar`, and the argument types whose errors argparse reports with exit code 2."""

from __future__ import annotations

import argparse
import math
import re

import torch

from diffusers_mar import DEFAULT_MODEL
from diffusers_mar.cli.errors import EXIT_USAGE
from diffusers_mar.cli.model import DTYPE_CHOICES
from diffusers_mar.image_grid import GRID_MIN_CELL
from diffusers_mar.pipelines.sampling_settings import SAMPLING_PRESETS

DTYPE_HELP = (
    "weights dtype (default float32, exact); int8: float32 with dynamic int8 linear layers (CPU only); "
    "auto: bfloat16 where the CPU or GPU runs it natively, else int8 on an AVX2 CPU, else float32"
)

EPILOG = """\
exit codes:
  0  success
  1  failure while loading or running the model (or the shipped default model is missing)
  2  bad input: a wrong argument, or a model, class label or output path that cannot be used

--model defaults to diffusers_mar.DEFAULT_MODEL, the model folder inside the package (default_model/).
Documentation: docs/cli.md
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text}")
    return value


def _num_threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 1; got {text!r}") from None


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


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0; got {text}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1]; got {text}")
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


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [1, 65535]; got {text}")
    return value


_positive_int.__name__ = "integer >= 1"  # argparse names the type in "invalid <name> value" messages
_num_threads.__name__ = "thread count"
_non_negative_float.__name__ = "number"
_positive_float.__name__ = "number"
_non_negative_int.__name__ = "integer >= 0"
_unit_float.__name__ = "number"
_device.__name__ = "device"
_port.__name__ = "port"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors: `prog: error: message` and a pointer to `--help`, as `CLIError`s are
    reported, instead of the whole usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see: {self.prog} --help)\n")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The sampling options of every family; not given, they take the model folder's recommended values. An option
    of another family than the folder's is refused (`cli.model.FAMILY_OPTIONS`)."""
    parser.add_argument(
        "--guidance-scale",
        type=_non_negative_float,
        metavar="S",
        help="classifier-free guidance, 1 = off (VAR: 1 + the original's cfg)",
    )
    parser.add_argument(
        "--guidance-schedule", choices=("linear", "constant"), help="how guidance grows over the steps (MAR, AR)"
    )
    parser.add_argument(
        "--num-inference-steps", type=_positive_int, metavar="K", help="masked-autoregressive steps (MAR only)"
    )
    parser.add_argument(
        "--num-diffusion-steps", type=_positive_int, metavar="S", help="diffusion-head steps per token (MAR, AR)"
    )
    parser.add_argument(
        "--temperature", type=_positive_float, metavar="T", help="scales each diffusion step's noise (MAR, AR)"
    )
    parser.add_argument(
        "--top-k", type=_non_negative_int, metavar="K", help="keep the K largest logits of a token, 0 = all (VAR only)"
    )
    parser.add_argument(
        "--top-p", type=_unit_float, metavar="P", help="keep the nucleus of probability P, 0 = all (VAR only)"
    )
    parser.add_argument(
        "--more-smooth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="VAR's Gumbel-softmax codes, smoother images (not for FID; VAR only)",
    )


def add_preset_option(parser: argparse.ArgumentParser) -> None:
    """`--sampling-preset`: a named faster setting of `MARPipeline` (`SAMPLING_PRESETS`)."""
    parser.add_argument(
        "--sampling-preset",
        choices=tuple(SAMPLING_PRESETS),
        help="a measured faster setting (MAR only; docs/usage.md): sampling options not given take its values",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `diffusers-mar` parser; each subcommand's namespace has `command` and `parser` (for its error lines)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = ArgumentParser(
        prog="diffusers-mar",
        description="Generate images with MAR (masked autoregression + per-token diffusion), causal AR or VAR "
        "(next-scale prediction), and inspect models.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="{generate,info,evaluate,demo}")
    model_help = (
        "a MARPipeline, ARPipeline or VARPipeline folder (saved with save_pretrained) or a Hugging Face Hub id "
        "(default: diffusers_mar.DEFAULT_MODEL, the model folder inside the package)"
    )

    generate = subparsers.add_parser(
        "generate",
        help="generate a labelled image grid and/or single image files",
        description=(
            "Generate --num-images-per-label images for each of --class-labels and write them as one grid\n"
            "(rows = labels) and/or one PNG per image. Sampling options not given take the values that the\n"
            "pipeline folder recommends (`sampling` in model_index.json), else the paper's, clipped to the model.\n"
            "Existing files are not replaced unless --overwrite is given."
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
    generate.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output file or --output-dir files"
    )
    generate.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH_OR_HUB_ID", help=model_help)
    add_sampling_options(generate)
    generate.add_argument(
        "--order", choices=("raster", "random"), help="generation order of an ARPipeline folder (default raster)"
    )
    add_preset_option(generate)
    generate.add_argument(
        "--seed", type=int, default=0, help="image i uses torch.Generator seeded seed + i (default 0)"
    )
    generate.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda, cuda:N or mps")
    generate.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="float32",
        help=DTYPE_HELP,
    )
    generate.add_argument(
        "--num-threads",
        type=_num_threads,
        default="auto",
        metavar="N",
        help="CPU threads for PyTorch; auto (default): 1 for small models (fastest on a busy machine), "
        "PyTorch's default otherwise",
    )
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
    generate.set_defaults(parser=generate)

    info = subparsers.add_parser(
        "info",
        help="print a model's components, parameter counts, classes and recommended settings",
        description="Print a model's components, parameter counts, classes, sizes and recommended sampling settings.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    info.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH_OR_HUB_ID", help=model_help)
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(parser=info)
    add_evaluate_parser(subparsers, model_help)
    add_demo_parser(subparsers)
    return parser


def add_demo_parser(subparsers) -> None:
    """`diffusers-mar demo`: the Gradio app (the `demo` extra) on one or more models."""
    demo = subparsers.add_parser(
        "demo",
        help="serve a Gradio app: generate with a live image, inpaint, exact against fast, the model card",
        description=(
            "Serve the Gradio demo (pip install 'diffusers-mar[demo]') on one or more pipeline folders or Hub ids,\n"
            "each with its own queue. It listens on 127.0.0.1 unless --host is given and makes a public link only\n"
            "with --share. Ctrl-C stops it."
        ),
        epilog=EPILOG + "\nexample:\n  diffusers-mar demo\nDocumentation: docs/demo.md\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--model",
        nargs="+",
        default=[DEFAULT_MODEL],
        metavar="PATH_OR_HUB_ID",
        help="pipeline folders or Hub ids (default: diffusers_mar.DEFAULT_MODEL, the shipped digits model)",
    )
    demo.add_argument("--port", type=_port, metavar="N", help="the port (default: the first free one from 7860)")
    demo.add_argument(
        "--host", metavar="H", help="the address to listen on (default 127.0.0.1; 0.0.0.0 opens it to the network)"
    )
    demo.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    demo.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda, cuda:N or mps")
    demo.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="float32",
        help=DTYPE_HELP,
    )
    demo.add_argument(
        "--num-threads", type=_num_threads, default="auto", metavar="N", help="CPU threads (as for generate)"
    )
    demo.set_defaults(parser=demo)


def add_evaluate_parser(subparsers, model_help: str) -> None:
    """`diffusers-mar evaluate`: balanced sampling across processes and FID / IS / precision-recall."""
    evaluate = subparsers.add_parser(
        "evaluate",
        help="sample a balanced image set (under accelerate launch or plainly) and compute FID / IS / precision-recall",
        description=(
            "Generate --images-per-class images of every class in class order (image i: seed --seed + i), split\n"
            "across the processes of `accelerate launch` (or one plain process), as numbered PNGs plus an .npz in\n"
            "the ADM evaluator's format; a killed run resumes where it stopped. Then compute FID against\n"
            "--reference statistics, the Inception Score and precision / recall (k = 3), and write a results JSON.\n"
            "With --compute-reference, write reference statistics of --data (an image folder or a `datasets` name)."
        ),
        epilog=EPILOG
        + "\nexamples:\n  diffusers-mar evaluate --model mar-base --output-dir eval/mar-base --reference adm_in256_stats.npz\n"
        "  accelerate launch --num_processes 8 -m diffusers_mar.cli evaluate --model mar-base --output-dir eval/mar-base "
        "--reference adm_in256_stats.npz\n"
        "  diffusers-mar evaluate --compute-reference --data path/to/images --resolution 256 --output ref.npz\n"
        "Documentation: docs/evaluation.md\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH_OR_HUB_ID", help=model_help)
    evaluate.add_argument("--output-dir", metavar="DIR", help="folder for the PNGs, samples.npz and results.json")
    evaluate.add_argument(
        "--reference", metavar="NPZ", help="reference statistics: mu and sigma (ADM or plain), optional features"
    )
    evaluate.add_argument(
        "--images-per-class", type=_positive_int, default=50, metavar="N", help="images of each class (default 50)"
    )
    evaluate.add_argument(
        "--num-classes", type=_positive_int, metavar="N", help="the class count you expect (checked against the model)"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    evaluate.add_argument(
        "--batch-size", type=_positive_int, default=64, metavar="N", help="images per pipeline call (default 64)"
    )
    add_sampling_options(evaluate)
    add_preset_option(evaluate)
    evaluate.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="float32",
        help=DTYPE_HELP,
    )
    evaluate.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    evaluate.add_argument(
        "--num-threads", type=_num_threads, default="auto", metavar="N", help="CPU threads (as for generate)"
    )
    evaluate.add_argument(
        "--feature-extractor",
        default="inception",
        metavar="SPEC",
        help="inception (torch-fidelity's Inception-v3, default) or module:callable, a factory(device) -> extractor",
    )
    evaluate.add_argument(
        "--inception-weights",
        "--inception_weights",
        metavar="PTH",
        help="local weights-inception-2015-12-05-6726825d.pth (default: torch-fidelity's download)",
    )
    evaluate.add_argument(
        "--metrics-batch-size", type=_positive_int, default=100, metavar="N", help="images per feature batch"
    )
    evaluate.add_argument("--skip-metrics", action="store_true", help="only sample (and write samples.npz)")
    evaluate.add_argument("--results", metavar="JSON", help="results file (default: OUTPUT_DIR/results.json)")
    evaluate.add_argument(
        "--update-model-card", action="store_true", help="add one line with the results to the model folder's README"
    )
    evaluate.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    reference = evaluate.add_argument_group("--compute-reference")
    reference.add_argument(
        "--compute-reference", action="store_true", help="write reference statistics of --data to --output"
    )
    reference.add_argument("--data", metavar="FOLDER_OR_DATASET", help="an image folder or a `datasets` name")
    reference.add_argument("--output", metavar="NPZ", help="the statistics file to write")
    reference.add_argument(
        "--resolution", type=_positive_int, metavar="N", help="centre-crop size, as in training (e.g. 256)"
    )
    reference.add_argument("--split", default="train", help="the dataset split (default train)")
    reference.add_argument("--image-column", default="image", help="the dataset's image column (default image)")
    reference.add_argument("--max-images", type=_positive_int, metavar="N", help="use the first N images only")
    evaluate.set_defaults(parser=evaluate)
