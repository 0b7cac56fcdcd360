"""Files written atomically: the bytes go to a temporary file beside the target, which is renamed into place only
once complete, so a failure or a killed process leaves no partial file and replaces nothing. The file gets the
permissions a plain `open(path, "w")` would give (0666 less the umask), not `mkstemp`'s private 0600.

Used by the command line (images, model cards), evaluation (samples, statistics, results), training (sample grids)
and the benchmarks (docs sections, results); the converter gives its folder the same permissions (`current_umask`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def current_umask() -> int:
    """The process's file-creation mask (files and folders that commands write get the permissions it allows)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_beside(path: str | Path) -> Path:
    """A new empty temporary file in `path`'s folder (`.<name>.<random>.tmp`), for `publish` to rename into place."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    return Path(temporary)


def publish(temporary: str | Path, path: str | Path) -> None:
    """Give the complete `temporary` a plain file's permissions and rename it to `path` (replacing it at once)."""
    os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes the file private (0600); outputs are not
    os.replace(temporary, path)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write(file)` on a binary temporary file beside `path`, then rename it into place (no partial file)."""
    temporary = temporary_beside(path)
    try:
        with open(temporary, "wb") as file:
            write(file)
        publish(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
