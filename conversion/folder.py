"""Writing the converted pipeline folder atomically, and the rules for replacing an existing `--output_dir`."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import ModelCard

from diffusers_mar import MARPipeline
from diffusers_mar.atomic_files import current_umask


def check_output_dir(
    output_dir: str | os.PathLike, overwrite: bool = False, inputs: tuple[str | os.PathLike | None, ...] = ()
) -> Path:
    """Refuse an existing non-empty output folder (or a file) unless `overwrite`.

    Even with `overwrite`, only a pipeline folder (one with a `model_index.json`) is replaced, and never one that
    holds the current directory or one of the `inputs`: a folder of other files is never deleted.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"`--output_dir` {str(output_dir)!r} exists and is not a folder.")
    if not (output_dir.is_dir() and any(output_dir.iterdir())):
        return output_dir
    if not overwrite:
        raise FileExistsError(
            f"`--output_dir` {str(output_dir)!r} exists and is not empty; pass `--overwrite` to replace it."
        )
    resolved = output_dir.resolve()
    protected = [Path.cwd(), *(Path(path) for path in inputs if path is not None)]
    if any(path.resolve().is_relative_to(resolved) for path in protected):
        raise FileExistsError(
            f"`--output_dir` {str(output_dir)!r} holds the current folder or an input file; `--overwrite` would "
            "delete it. Choose a new folder."
        )
    if not (output_dir / "model_index.json").is_file():
        raise FileExistsError(
            f"`--output_dir` {str(output_dir)!r} is not a pipeline folder (no `model_index.json`); `--overwrite` only "
            "replaces an empty folder or a pipeline folder. Choose a new folder, or empty this one yourself."
        )
    return output_dir


def save_pipeline_folder(
    pipeline: MARPipeline,
    model_card: ModelCard,
    output_dir: str | os.PathLike,
    safe_serialization: bool = True,
    overwrite: bool = False,
    inputs: tuple[str | os.PathLike | None, ...] = (),
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Save `pipeline` and its model card to `output_dir`, atomically.

    Everything is written to a temporary sibling folder (and checked there by `check(folder)`, e.g. the verification,
    if given) and renamed to `output_dir` only at the end, so a failure leaves no half-written folder; with
    `overwrite` the previous folder is replaced only once the new one is complete.
    """
    output_dir = check_output_dir(output_dir, overwrite, inputs).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    old_dir = None
    try:
        os.chmod(tmp_dir, 0o777 & ~current_umask())  # mkdtemp makes the folder private (0700); the output is not
        pipeline.save_pretrained(tmp_dir, safe_serialization=safe_serialization)
        model_card.save(tmp_dir / "README.md")
        if check is not None:
            check(tmp_dir)
        if output_dir.exists():
            old_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, old_dir / "folder")
        os.replace(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if old_dir is not None and not output_dir.exists():
            os.replace(old_dir / "folder", output_dir)
        raise
    finally:
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
    return output_dir
