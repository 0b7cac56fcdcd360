"""What the buttons do, without a browser: generation updates, inpainting keeps the unpainted tokens, the comparison,
the digits samples and the model description."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
from sklearn.datasets import load_digits

from diffusers_mar import DEFAULT_MODEL
from diffusers_mar.cli.errors import CLIError
from diffusers_mar.demo import actions
from diffusers_mar.demo.frames import UNKNOWN_GREY
from diffusers_mar.demo.inputs import generation_request, user_message
from diffusers_mar.demo.model import load_model
from diffusers_mar.demo.quality import QUOTED
from diffusers_mar.demo.runner import RunRegistry


def inpaint(model, background, mask, **kwargs):
    layer = PIL.Image.fromarray(np.where(mask[..., None], [255, 0, 0, 150], 0).astype(np.uint8), "RGBA")
    arguments = {"label": 3, "seed": 0, "guidance_scale": 1.5, "mask_dilation": 0, "resize": False, **kwargs}
    return actions.inpaint(model, background, [layer], runs=RunRegistry(), session="s", **arguments)


def test_generate_yields_the_commands_then_a_frame_per_step_then_the_grid_and_its_png(mar_model, tmp_path):
    request = generation_request(mar_model.pipe, "1 2", 3, 0, {})
    updates = list(actions.generate(mar_model, request, RunRegistry(), "s", tmp_path))
    assert set(updates[0]) == {"status", "python", "cli"}
    frames = [update["live"] for update in updates[1:-1]]
    assert len(frames) == 4 + 1  # the folder recommends 4 steps; the last canvas
    assert all(set(update) == {"live", "status"} for update in updates[1:-1])
    last = updates[-1]
    assert np.array_equal(np.asarray(last["grid"]), np.asarray(frames[-1]))
    assert np.array_equal(np.asarray(PIL.Image.open(last["png"]).convert("RGB")), np.asarray(last["grid"]))
    assert last["png"].startswith(str(tmp_path))
    assert last["status"].startswith("6 image(s) in ") and "img/s" in last["status"]


def test_inpainting_regenerates_the_painted_tokens_and_keeps_the_others(mar_model):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    shown = PIL.Image.fromarray(np.kron(pixels, np.ones((32, 32), dtype=np.uint8))).convert("RGBA")
    painted = np.zeros((256, 256), dtype=bool)
    painted[200:210, 10:250] = True  # pixel row 6: token row 3
    outputs = inpaint(mar_model, shown, painted)
    result = np.asarray(outputs["result"])[::32, ::32, 0]  # back to 8x8
    assert outputs["result"].size == (256, 256)
    assert np.array_equal(result[:6], pixels[:6])  # the kept tokens, exactly
    assert not np.array_equal(result[6:], pixels[6:])
    kept = np.asarray(outputs["kept"])
    assert (kept[192:] == UNKNOWN_GREY).all() and np.array_equal(kept[:192, :, 0], np.asarray(shown)[:192, :, 0])
    assert outputs["status"].startswith("Regenerated 4 of 16 tokens (grey in the input) as 3 three in ")


def test_inpainting_refusals(mar_model, ar_model):
    image = PIL.Image.new("RGB", (8, 8))
    nothing, something = np.zeros((8, 8), dtype=bool), np.ones((8, 8), dtype=bool)
    cases = [
        (ar_model, image, something, {}, "AR models have no inpainting pipeline; load a MAR or VAR model to inpaint"),
        (mar_model, None, something, {}, "upload an image or load a digits sample first"),
        (mar_model, image, nothing, {}, "paint the part to regenerate on the image first (the brush of the editor)"),
        (mar_model, image, something, {"label": 12}, "class labels: class id 12 is out of range"),
        (mar_model, image, something, {"mask_dilation": -1}, "mask dilation must be in [0, 4] tokens; got -1"),
        (mar_model, PIL.Image.new("RGB", (9, 9)), np.ones((9, 9), bool), {}, "the image is 9x9 pixels"),
    ]
    for model, background, mask, kwargs, message in cases:
        with pytest.raises(CLIError) as error:
            if background is None:
                actions.inpaint(model, None, [], 3, 0, 1.5, 0, False, RunRegistry(), "s")
            else:
                inpaint(model, background, mask, **kwargs)
        assert user_message(error.value).startswith(message)


def test_a_digits_sample_is_the_data_upscaled_with_its_class(mar_model, latent_model):
    digits = load_digits()
    image, label = actions.digits_sample(load_model(DEFAULT_MODEL), 10)
    assert image.size == (256, 256) and label == digits.target[10]  # a class named "0"
    assert np.array_equal(np.asarray(image)[::32, ::32, 0], np.round(digits.images[10] * 255 / 16).astype(np.uint8))
    assert actions.digits_sample(mar_model, 10)[1] is None  # classes named "zero", ...
    image, label = actions.digits_sample(latent_model, 10)  # 16x16 RGB images
    assert image.size == (256, 256) and label is None
    with pytest.raises(CLIError, match=r"the digits sample must be a whole number in \[0, 1796\]; got 1797"):
        actions.digits_sample(mar_model, 1797)


def test_compare_runs_the_exact_settings_and_the_preset_on_the_same_seed(mar_model, ar_model):
    outputs = actions.compare(mar_model, "1 2", 2, 0, "fast", RunRegistry(), "s")
    assert outputs["exact"].size == outputs["preset"].size
    assert outputs["exact_text"].endswith("temperature=1.0") and "sampling_preset=fast" in outputs["preset_text"]
    assert outputs["exact_cli"].endswith("--seed 0 --output exact.png")
    assert outputs["preset_cli"].endswith("--seed 0 --sampling-preset fast --output preset.png")
    assert outputs["status"].startswith("The preset 'fast' took ")
    assert all(f"`{setting}`" in outputs["quality"] for setting in QUOTED)
    assert "not on this one" in outputs["quality"]
    with pytest.raises(CLIError, match="sampling presets apply to MAR models"):
        actions.compare(ar_model, "1", 1, 0, "fast", RunRegistry(), "s")


def test_the_model_tab_describes_the_shipped_model():
    model = load_model(DEFAULT_MODEL)
    info = actions.model_info(model)
    assert info["card"].startswith("# MAR trained on digits")
    assert "| **total** | | **550,024** |" in info["summary"] and "| `guidance_scale` | `1.5` |" in info["summary"]
    assert json.loads(json.dumps(info["config"]))["model_index.json"]["id2label"]["3"] == "3"
    assert info["config"]["transformer"]["num_classes"] == 10
    assert model.is_default and model.name == "shipped digits model"
    assert "not on this one" not in actions.quality_table(model.is_default)


def test_generate_shows_a_var_folder_scale_by_scale(var_model, tmp_path):
    request = generation_request(var_model.pipe, "1 2", 1, 0, {})
    updates = list(actions.generate(var_model, request, RunRegistry(), "s", tmp_path))
    frames = [update["live"] for update in updates[1:-1]]
    assert len(frames) == len(var_model.pipe.transformer.config.patch_nums)  # one decoded frame per scale
    assert np.array_equal(np.asarray(updates[-1]["grid"]), np.asarray(frames[-1]))
    assert "VARPipeline" in updates[0]["python"] and updates[0]["cli"].startswith("diffusers-mar generate --model ")


def test_inpainting_a_var_folder_keeps_the_unpainted_tokens_of_the_last_scale(var_model):
    pipe = var_model.inpaint_pipe
    side = pipe.resolution
    rng = np.random.default_rng(0)
    shown = PIL.Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8))
    painted = np.zeros((side, side), dtype=bool)
    painted[side - pipe.token_size :, :] = True  # the last row of tokens
    outputs = inpaint(var_model, shown, painted, guidance_scale=2.0)
    grid = side // pipe.token_size
    assert outputs["status"].startswith(f"Regenerated {grid} of {grid * grid} tokens")
    assert outputs["result"].size[0] == outputs["result"].size[1] >= side
