"""Output paths and images of `diffusers-mar generate`: checked before the model loads, never replaced unless
`--overwrite` is given, written atomically (a temporary file renamed into place), and the labelled grid."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from diffusers_mar.cli.errors import CLIError

GRID_MIN_CELL = 64  # the automatic `--scale` upscales images smaller than this (pixels) to at least this size


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


def current_umask() -> int:
    """The process's file-creation mask (files and folders that commands write get the permissions it allows)."""
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
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes the file private (0600); a PNG is not
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


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
