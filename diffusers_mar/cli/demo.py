"""`diffusers-mar demo`: the Gradio app of `diffusers_mar.demo` on one or more models (docs/demo.md)."""

from __future__ import annotations

import argparse
import importlib.util

from diffusers_mar.cli.errors import EXIT_FAILURE, EXIT_OK, CLIError


def cmd_demo(args: argparse.Namespace) -> int:
    # 1. Checks that need no model
    if importlib.util.find_spec("gradio") is None:
        raise CLIError(
            "the demo needs Gradio, which the base install does not bring: pip install 'diffusers-mar[demo]'",
            exit_code=EXIT_FAILURE,
        )
    # Imported here: the demo's modules use the command line's (a cycle at import time otherwise).
    from diffusers_mar.demo.app import launch_demo
    from diffusers_mar.demo.model import load_model

    # 2. Every model, with the command line's loading and errors, before the server starts
    models = [load_model(model, args.device, args.dtype, args.num_threads) for model in dict.fromkeys(args.model)]

    # 3. Serve until Ctrl-C
    launch_demo(models, args.host, args.port, args.share)
    return EXIT_OK
