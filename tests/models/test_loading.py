"""Strict loading (issue 14): weights that do not match config.json fail at `from_pretrained`, naming the keys."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_mar import MARDiffusionHead, MARPipeline, MARTransformer2DModel
from diffusers_mar.models.loading import check_loading_info
from tests.testing_utils import TINY_PIXEL_HEAD_CONFIG, TINY_PIXEL_TRANSFORMER_CONFIG, make_tiny_pipeline

WEIGHTS = "diffusion_pytorch_model.safetensors"


def edit_config(folder, **changes) -> None:
    """Set (value) or delete (None) keys of `folder/config.json`."""
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder, drop: str | None = None, add: str | None = None) -> None:
    state_dict = load_file(folder / WEIGHTS)
    if drop is not None:
        state_dict.pop(drop)
    if add is not None:
        state_dict[add] = torch.zeros(3)
    save_file(state_dict, folder / WEIGHTS)


def test_a_config_without_num_layers_fails_at_load_naming_the_keys(tmp_path):
    MARTransformer2DModel(**TINY_PIXEL_TRANSFORMER_CONFIG).save_pretrained(tmp_path)
    edit_config(tmp_path, num_layers=None)  # the default, 12 encoder and decoder blocks, against 1 in the weights
    with pytest.raises(ValueError, match="do not match its config.json") as error:
        MARTransformer2DModel.from_pretrained(tmp_path)
    message = str(error.value)
    assert "encoder_blocks.1-11.*" in message and "decoder_blocks.1-11.*" in message
    assert "264 key(s)" in message and "missing from the weights" in message and "num_layers" in message


def test_a_config_with_fewer_layers_fails_at_load_naming_the_unused_keys(tmp_path):
    MARTransformer2DModel(**{**TINY_PIXEL_TRANSFORMER_CONFIG, "num_layers": 3}).save_pretrained(tmp_path)
    edit_config(tmp_path, num_layers=1, decoder_num_layers=3)
    with pytest.raises(ValueError, match=r"encoder_blocks\.1-2\.\*\) of the weights are not in the model"):
        MARTransformer2DModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("drop, add", [("proj_out.bias", None), (None, "extra.weight")])
def test_head_weights_with_a_missing_or_extra_key_fail_at_load(tmp_path, drop, add):
    MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG).save_pretrained(tmp_path)
    edit_weights(tmp_path, drop=drop, add=add)
    with pytest.raises(ValueError, match="do not match its config.json") as error:
        MARDiffusionHead.from_pretrained(tmp_path)
    message = str(error.value)
    assert (drop or add) in message
    assert ("missing from the weights" if drop else "of the weights are not in the model") in message


def test_matching_weights_load_with_and_without_loading_info(tmp_path):
    head = MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG)
    head.save_pretrained(tmp_path)
    loaded = MARDiffusionHead.from_pretrained(tmp_path)
    assert isinstance(loaded, MARDiffusionHead)
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    loaded, info = MARDiffusionHead.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, MARDiffusionHead) and info["missing_keys"] == [] and info["unexpected_keys"] == []


def test_a_pipeline_folder_with_a_broken_config_fails_at_load(tmp_path):
    make_tiny_pipeline().save_pretrained(tmp_path)
    edit_config(tmp_path / "transformer", num_layers=None)
    with pytest.raises(ValueError, match=r"encoder_blocks\.1-11\.\*"):
        MARPipeline.from_pretrained(tmp_path)


def test_check_loading_info_lists_plain_keys_and_ranges():
    info = {"missing_keys": ["b.3.w", "b.1.w", "a", "b.2.w"], "unexpected_keys": ["c.0.x", "c.2.x"]}
    with pytest.raises(ValueError) as error:
        check_loading_info("M", "folder", info)
    assert "4 key(s) (a, b.1-3.*) of the model" in str(error.value)
    assert "2 key(s) (c.0,2.*) of the weights" in str(error.value)
    check_loading_info("M", "folder", {"missing_keys": [], "unexpected_keys": []})  # nothing to report
