"""The `diffusers-mar` command line: `generate` a labelled image grid with a MARPipeline, `info` about a model,
`evaluate` a model (FID / IS / precision-recall, docs/evaluation.md), `demo` (the Gradio app, docs/demo.md).

Exit codes: 0 success; 2 bad input (a wrong argument, a model, label or output path that cannot be used, as
argparse does); 1 a failure while loading or running the model, or a model missing from the installation.
Every check that does not need the model (output paths, device, dtype, numbers) runs before the model loads, and
all checks run before anything is generated, so a failing command leaves no output file behind and replaces none.

Modules: `parser` (options and their types), `model` (loading, labels, settings, the summary of `info`), `outputs`
(paths, atomic saving), `commands` (the subcommands), `evaluate` (evaluation), `demo` (the Gradio app), `errors`
(exit codes, `CLIError`).
"""

from __future__ import annotations

import sys
import traceback

import torch

from diffusers_mar.cli.commands import cmd_generate, cmd_info
from diffusers_mar.cli.demo import cmd_demo
from diffusers_mar.cli.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CLIError
from diffusers_mar.cli.evaluate import cmd_evaluate
from diffusers_mar.cli.model import (
    auto_dtype,
    label_text,
    load_pipeline,
    model_summary,
    parse_class_labels,
    recommended_sampling,
)
from diffusers_mar.cli.outputs import save_image
from diffusers_mar.cli.parser import build_parser

COMMANDS = {"generate": cmd_generate, "info": cmd_info, "evaluate": cmd_evaluate, "demo": cmd_demo}

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "CLIError",
    "build_parser",
    "label_text",
    "load_pipeline",
    "main",
    "model_summary",
    "parse_class_labels",
    "recommended_sampling",
    "save_image",
]


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
        if getattr(args, "dtype", None) in ("auto", "int8"):  # resolved and checked before the model loads
            device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
            if args.dtype == "auto":  # said once
                args.dtype, why = auto_dtype(device)
                print(f"{args.parser.prog}: --dtype auto: {args.dtype} on {device} ({why})", file=sys.stderr)
            if args.dtype == "int8" and device != "cpu":
                raise CLIError(
                    f"--dtype int8 runs on the CPU only (got device {device}); use float32 or bfloat16 there",
                    "--dtype",
                )
        return COMMANDS[args.command](args)
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
