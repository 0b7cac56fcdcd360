"""The command-line frame the converters share: exit codes and one-line errors."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from conversion.verify import VerificationError


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
