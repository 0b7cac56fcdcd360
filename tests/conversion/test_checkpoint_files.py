"""Files mistaken for an original checkpoint (`--checkpoint_path`): the message says what the file is."""

import pytest
from PIL import Image

from conversion.checkpoints import load_checkpoint


def test_an_image_given_as_the_checkpoint_says_what_it_is_and_what_was_expected(tmp_path):
    path = tmp_path / "sample.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(ValueError) as error:
        load_checkpoint(path)
    # Not torch's advice to load it with `weights_only=False`, which cannot help.
    assert str(error.value) == (
        f"`--checkpoint_path` {str(path)!r} is not a readable torch checkpoint: it is a PNG image, not a checkpoint "
        "(expected the `.pth` file of an LTH14/mar training run, e.g. `checkpoint-last.pth`)."
    )
