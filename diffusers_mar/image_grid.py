"""The labelled image grid of `diffusers-mar generate`, the training samples and the benchmark figures: rows of
images, each with its label on the left, upscaled with NEAREST so that small images stay readable."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

GRID_MIN_CELL = 64  # the automatic `--scale` upscales images smaller than this (pixels) to at least this size


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
