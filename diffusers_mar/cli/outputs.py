"""Output paths and images of `diffusers-mar generate`: checked before the model loads, never replaced unless
`--overwrite` is given, written atomically (`diffusers_mar.atomic_files`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image

from diffusers_mar.atomic_files import atomic_write
from diffusers_mar.cli.errors import CLIError


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


def check_output_paths(output: str | None, output_dir: str | None, overwrite: bool = False) -> None:
    """Validate `--output` and `--output-dir` before anything is loaded or generated; an existing `--output` file
    is refused unless `overwrite`."""
    if output is None and output_dir is None:
        raise CLIError("give --output (a grid image) and/or --output-dir (one file per image)", "--output")
    if output is not None:
        path = Path(output).expanduser()
        if path.is_dir():
            raise CLIError(f"{output!r} is a folder; give a file name such as grid.png", "--output")
        _image_format(path, "--output")
        _check_writable_folder(path.parent, "--output")
        if path.exists() and not overwrite:
            raise CLIError(f"{output!r} exists; pass --overwrite to replace it, or give another file name", "--output")
    if output_dir is not None:
        path = Path(output_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise CLIError(f"{output_dir!r} exists and is not a folder", "--output-dir")
        _check_writable_folder(path, "--output-dir")


def single_file_paths(output_dir: str, labels: list[int], num_images_per_label: int) -> list[list[Path]]:
    """`--output-dir` file names, one row per label: `label-<id>-<k>.png`, `k` counting within the label (a label
    given twice continues its count, so no file is written twice)."""
    folder = Path(output_dir).expanduser()
    counts: dict[int, int] = {}
    rows = []
    for label in labels:
        first = counts.get(label, 0)
        rows.append([folder / f"label-{label}-{k}.png" for k in range(first, first + num_images_per_label)])
        counts[label] = first + num_images_per_label
    return rows


def check_not_replacing(paths: list[Path], argument: str) -> None:
    """Refuse (exit 2) to replace files that exist; the message names them and `--overwrite`."""
    existing = [path for path in paths if path.exists()]
    if existing:
        shown = ", ".join(path.name for path in existing[:5]) + (", ..." if len(existing) > 5 else "")
        raise CLIError(
            f"{len(existing)} of the {len(paths)} files to write exist in {str(existing[0].parent)!r} ({shown}); "
            "pass --overwrite to replace them, or give another folder",
            argument,
        )


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save `image` to `path` (format from the extension), creating folders; no partial file on failure."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    image_format = _image_format(path, "--output")
    if image_format == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    atomic_write(path, lambda file: image.save(file, format=image_format))
    return path
