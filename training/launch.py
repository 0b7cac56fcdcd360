"""How the training scripts start and stop: launch checks, the command that started a run, errors and Ctrl-C.

Exit codes, as the `diffusers-mar` command line: 0 success, 2 bad input (a flag, a path or data that cannot be used;
found before any training step), 1 a failure while running, 130 interrupted (Ctrl-C). Errors print their message
alone, without a traceback.

Ctrl-C during training (`StopRequest`): the first one asks the loop to stop at the next step boundary, where it saves
a checkpoint and raises `KeyboardInterrupt`; a second one raises `KeyboardInterrupt` at once. Checkpoints are written
under a temporary name and renamed once complete, so stopping at once never leaves a checkpoint half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from accelerate.utils import parse_flag_from_env

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
REPO_ROOT = Path(__file__).resolve().parents[1]


def check_launch(num_processes: int) -> None:
    """Stop when the launcher asked for several processes but this one runs alone (CPU-only launches)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and num_processes == 1:
        raise RuntimeError(
            "Several processes were launched but they do not form a group (no GPU?). On CPU-only machines run "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`."
        )
    launched_alone = not any(name in os.environ for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if (
        num_processes == 1
        and parse_flag_from_env("ACCELERATE_USE_CPU")
        and "MASTER_ADDR" in os.environ
        and launched_alone
    ):
        raise RuntimeError(
            "`accelerate launch --cpu --num_processes N` starts ONE process unless mpirun is used. For N CPU "
            "processes run `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`."
        )


def _parent_command() -> list[str] | None:
    """The parent process's argument list (Linux), where `accelerate launch` started this process."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def accelerate_launch_flags(script_name: str) -> list[str] | None:
    """The flags given to `accelerate launch` before the script, or None when this process was not started by it."""
    command = _parent_command() or []
    for i, part in enumerate(command):
        launcher = part == "accelerate.commands.launch" or (
            part == "launch" and i > 0 and Path(command[i - 1]).name == "accelerate"
        )
        if launcher:
            rest = command[i + 1 :]
            scripts = [j for j, arg in enumerate(rest) if Path(arg).name == script_name]
            return rest[: scripts[0]] if scripts else None
    return None


def launch_command(script: str, argv: list[str]) -> str:
    """The shell command that started this run, as a user would retype it from the repository root: the launcher and
    its flags (`accelerate launch --cpu ...`, or `python`), `ACCELERATE_USE_CPU=1` when set, the script, `argv`."""
    flags = accelerate_launch_flags(Path(script).name)
    launcher = ["python"] if flags is None else ["accelerate", "launch", *flags]
    env = "ACCELERATE_USE_CPU=1 " if parse_flag_from_env("ACCELERATE_USE_CPU") and "--cpu" not in launcher else ""
    return env + shlex.join([*launcher, script, *argv])


def resume_argv(argv: list[str]) -> list[str]:
    """`argv` with `--resume_from_checkpoint latest` (and no `--overwrite_output_dir`): the command that resumes."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume_from_checkpoint":
            skip = True
        elif not arg.startswith(("--resume_from_checkpoint=", "--overwrite_output_dir")):
            kept.append(arg)
    return [*kept, "--resume_from_checkpoint", "latest"]


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class StopRequest:
    """Within the `with` block, SIGINT (Ctrl-C) sets `requested` instead of raising `KeyboardInterrupt`: a training
    loop checks it at each step boundary and stops cleanly there. A second SIGINT raises `KeyboardInterrupt` at once.
    The previous handler is restored when the block ends (the script's `main` may run inside a process that goes on).
    Outside the main thread, where Python cannot install signal handlers, it does nothing."""

    def __init__(self, name: str):
        self.name = name
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            # Python's default from now on. Should this one be lost (raised inside a finalizer, where Python ignores
            # it), the loop still stops at the next step boundary.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        if _is_main_process():
            # os.write, not print: the handler may run while the loop is inside a write to sys.stderr (tqdm).
            message = f"\n{self.name}: Ctrl-C: stopping after this step (Ctrl-C again to stop at once).\n"
            with contextlib.suppress(OSError):
                os.write(2, message.encode())


def run_script(
    name: str,
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    main: Callable[[argparse.Namespace], object],
    on_interrupt: Callable[[argparse.Namespace], str] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Run `main(parse_args(argv))` and return the exit code; errors and Ctrl-C print one message (prefixed with the
    script's `name`), no traceback.

    `ValueError` is bad input (2); `RuntimeError` and `OSError` are failures while running (1); other exceptions are
    bugs and keep their traceback. `on_interrupt(args)` returns what to print on Ctrl-C (e.g. how to resume).
    """
    args = None
    try:
        args = parse_args(argv)
        main(args)
    except KeyboardInterrupt:
        if _is_main_process():
            hint = on_interrupt(args) if on_interrupt is not None and args is not None else ""
            print(f"\n{name}: interrupted.{' ' + hint if hint else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValueError as error:
        if _is_main_process():
            print(f"{name}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as error:
        rank = f" [process {os.environ['RANK']}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{name}{rank}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return 0
