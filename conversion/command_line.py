"""The command-line frame the converters share: exit codes and one-line errors."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from conversion.verify import VerificationError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_output_arguments(parser: argparse.ArgumentParser, repo_example: str, original_help: str) -> None:
    """The options every converter takes after its own: the stored dtype and format, trusted loading, class names,
    overwriting, `--verify` / `--original_repo` (`original_help`), and the Hub upload (`repo_example`, e.g.
    `user/mar-base`)."""
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Stored dtype (default fp32).")
    parser.add_argument(
        "--safe_serialization",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Write safetensors (default) or, with --no-safe_serialization, torch .bin files.",
    )
    parser.add_argument(
        "--trust_checkpoint",
        action="store_true",
        help="Allow `torch.load(weights_only=False)` for files that pickle other objects (trusted sources only).",
    )
    parser.add_argument(
        "--id2label_path", default=None, help="JSON class names; default: ImageNet names for 1000-class models."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace a non-empty `--output_dir` that holds a pipeline folder."
    )
    parser.add_argument(
        "--verify", action="store_true", help="Reload the saved folder and compare outputs (see docs/conversion.md)."
    )
    parser.add_argument("--original_repo", default=None, help=original_help)
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the folder to the Hub as `--repo_id`.")
    parser.add_argument("--repo_id", default=None, help=f"Hub repo id, e.g. `{repo_example}`.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in token or HF_TOKEN).")


def check_output_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, repo_example: str) -> None:
    """Usage errors for the shared options that only make sense together."""
    if args.push_to_hub and not args.repo_id:
        parser.error(f"`--push_to_hub` needs `--repo_id` (e.g. `{repo_example}`).")
    if args.original_repo is not None and not args.verify:
        parser.error("`--original_repo` is used by `--verify`; add `--verify`.")


def report(prog: str, message: object) -> None:
    """`prog: error: message` on stderr, on one line."""
    print(f"{prog}: error: " + re.sub(r"\s*\n\s*", " ", str(message).strip()), file=sys.stderr)


def run_converter(
    prog: str,
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    convert: Callable[[argparse.Namespace], Path],
    argv: list[str] | None = None,
) -> int:
    """Parse `argv` and convert; exit codes: 0 done, 2 bad input (nothing written), 1 a failure while running (a
    failed verification, a write error). Errors are one line on stderr, `prog: error: ...`."""
    args = parse_args(argv)
    try:
        convert(args)
    except VerificationError as error:
        report(prog, error)
        return 1
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as error:
        report(prog, error.args[0] if error.args else error)
        return 2
    except OSError as error:
        report(prog, error)
        return 1
    return 0
