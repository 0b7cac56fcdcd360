"""The labelled image grid (`diffusers_mar.image_grid`) of the command line, the training samples and the figures."""

from __future__ import annotations

import numpy as np
from PIL import Image

from diffusers_mar.image_grid import auto_scale, make_grid


def test_auto_scale():
    assert [auto_scale(size) for size in (8, 28, 32, 64, 256)] == [8, 3, 2, 1, 1]


def test_make_grid_layout():
    red, blue = Image.new("RGB", (2, 3), "red"), Image.new("L", (2, 3), 0)
    grid = make_grid([[red, red, red], [blue]], ["a", "b"], scale=4)
    cells = np.asarray(grid)
    label_width = grid.width - (3 * (8 + 4) - 4 + 6)
    assert grid.height == 6 + 2 * (12 + 4) - 4 + 6
    np.testing.assert_array_equal(
        cells[6 : 6 + 12, label_width + 24 : label_width + 32], np.full((12, 8, 3), [255, 0, 0])
    )
    np.testing.assert_array_equal(cells[22 : 22 + 12, label_width : label_width + 8], 0)
    assert (cells[22 : 22 + 12, label_width + 12 :] == 255).all()  # the short row leaves white space
    assert (cells[:, :label_width] < 128).any()  # the labels are drawn
