"""What a person types or uploads is checked before anything runs, with the command line's messages: labels, settings,
limits, image sizes, upload types and pixel counts, the drawn mask."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest

from diffusers_mar.cli.errors import CLIError
from diffusers_mar.demo.inputs import (
    MAX_IMAGES,
    MAX_UPLOAD_PIXELS,
    check_upload,
    drawn_mask,
    fit_to_model,
    generation_request,
    parse_labels,
    user_message,
)


def refusal(function, *args, **kwargs) -> str:
    with pytest.raises((CLIError, ValueError)) as error:
        function(*args, **kwargs)
    return user_message(error.value)


def test_labels_are_ids_or_names_separated_by_spaces_or_commas(mar_model):
    assert parse_labels(mar_model.pipe, "3, seven 10 'nine'") == [3, 7, 10, 9]
    assert refusal(parse_labels, mar_model.pipe, "0 banana").startswith(
        "class labels: unknown class name 'banana'; known names: 'eight', 'five'"
    )
    assert refusal(parse_labels, mar_model.pipe, "11") == (
        "class labels: class id 11 is out of range: this model has classes 0..9 (10 = unconditional)"
    )
    assert refusal(parse_labels, mar_model.pipe, " , ") == "class labels: give at least one class id or name"
    assert refusal(parse_labels, mar_model.pipe, "'seven").startswith("class labels: cannot read")


def test_settings_are_checked_as_the_command_line_checks_them(mar_model, ar_model):
    pipe = mar_model.pipe
    assert refusal(generation_request, pipe, "1", 1, 0, {"num_inference_steps": 0}) == (
        "num_inference_steps: must be an integer in [1, 16] for this model (16 tokens, a step predicts at least one); "
        "got 0"
    )
    assert refusal(generation_request, pipe, "1", 1, 0, {"num_diffusion_steps": 2.5}) == (
        "num_diffusion_steps: must be an integer in [1, 1000] for this model; got 2.5"
    )
    assert refusal(generation_request, pipe, "1", 1, 0, {"guidance_scale": -1}) == (
        "`guidance_scale` must be a finite number >= 0; got -1.0."
    )
    assert "must be a whole number in [1, 64]" in refusal(generation_request, pipe, "1", 0, 0, {})
    assert "must be a whole number in [0, " in refusal(generation_request, pipe, "1", 1, -1, {})
    too_many = refusal(generation_request, pipe, "1 2 3", MAX_IMAGES // 2, 0, {})
    assert too_many == f"3 labels x 32 images per label = 96 images; the demo makes at most {MAX_IMAGES} per run"
    assert refusal(generation_request, ar_model.pipe, "1", 1, 0, {}, "fast") == (
        "sampling preset: does not apply to an ARPipeline folder: it applies to MARPipeline folders only"
    )
    assert refusal(generation_request, pipe, "1", 1, 0, {}, order="raster") == (
        "order: does not apply to a MARPipeline folder: it applies to ARPipeline folders only (MAR draws a random "
        "order per image, VAR has none)"
    )


def test_a_request_holds_the_options_given_and_the_call_they_resolve_to(mar_model):
    pipe = mar_model.pipe
    request = generation_request(pipe, "seven 2", 3.0, 4.0, {"num_inference_steps": 2.0, "temperature": 1})
    assert (request.labels, request.num_images_per_label, request.seed, request.num_images) == ((7, 2), 3, 4, 6)
    assert request.options == {"num_inference_steps": 2, "temperature": 1.0}  # types as the command line parses
    assert [type(value) for value in request.options.values()] == [int, float]
    assert request.call == {**pipe.sampling_defaults, "num_inference_steps": 2, "temperature": 1.0}
    fast = generation_request(pipe, "1", 1, 0, {"num_inference_steps": None, "guidance_scale": 1.0}, "fast")
    assert fast.options == {"guidance_scale": 1.0, "sampling_preset": "fast"}
    assert fast.call["sampling_preset"] == "fast" and fast.call["num_inference_steps"] == 4  # 16 tokens / 4 per step
    assert fast.call["num_diffusion_steps"] == 8


def png_bytes(image: PIL.Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def test_uploads_must_be_readable_images_of_an_allowed_type_and_size(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(PIL.Image.new("RGB", (8, 8))))
    check_upload(good)
    cases = {
        "text.png": (b"not an image at all", "the upload is not a readable image (PNG, JPEG, WebP, BMP or GIF)"),
        "cut.png": (png_bytes(PIL.Image.new("RGB", (64, 64), "red"))[:60], "the upload is not a readable image"),
        "image.tiff": (png_bytes(PIL.Image.new("RGB", (8, 8)), "TIFF"), "the upload is a TIFF image; give one of"),
        "huge.png": (
            png_bytes(PIL.Image.new("1", (4097, 4096))),
            f"the upload is 4097x4096 pixels; the demo takes at most {MAX_UPLOAD_PIXELS:,} pixels",
        ),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert refusal(check_upload, path).startswith(message), name


def test_images_of_the_model_size_or_a_whole_multiple_fit_exactly(mar_model):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    mask = np.zeros((8, 8), dtype=bool)
    mask[5, 2] = True
    image, fitted = fit_to_model(PIL.Image.fromarray(pixels), mask, 8, "L", resize=False)
    assert np.array_equal(np.asarray(image), pixels) and np.array_equal(fitted, mask)
    shown = PIL.Image.fromarray(np.kron(pixels, np.ones((32, 32), dtype=np.uint8))).convert("RGBA")
    drawn = np.zeros((256, 256), dtype=bool)
    drawn[5 * 32 + 31, 2 * 32] = True  # one painted pixel marks its box
    image, fitted = fit_to_model(shown, drawn, 8, "L", resize=False)
    assert np.array_equal(np.asarray(image), pixels) and np.array_equal(fitted, mask)
    message = refusal(fit_to_model, PIL.Image.new("RGB", (100, 80)), np.zeros((80, 100), bool), 8, "L", False)
    assert message == (
        "the image is 100x80 pixels but this model makes 8x8 images: give an image of that size or a whole multiple "
        "of it (such as 256x256), or tick 'resize'"
    )
    wide = np.zeros((80, 100), dtype=bool)
    wide[79, 99] = True
    image, fitted = fit_to_model(PIL.Image.new("RGB", (100, 80)), wide, 8, "RGB", resize=True)
    assert image.size == (8, 8) and image.mode == "RGB" and fitted.sum() == 1 and fitted[7, 7]


def test_transparent_uploads_are_put_on_white():
    image = PIL.Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    fitted, _ = fit_to_model(image, np.zeros((8, 8), bool), 8, "L", resize=False)
    assert (np.asarray(fitted) == 255).all()


def test_the_mask_is_every_painted_pixel_of_every_layer():
    first = PIL.Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    first.putpixel((1, 2), (255, 0, 0, 90))
    second = PIL.Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # another size: scaled onto the image
    second.putpixel((7, 0), (0, 0, 0, 255))
    mask = drawn_mask([first, None, second], (4, 4))
    expected = np.zeros((4, 4), dtype=bool)
    expected[2, 1] = expected[0, 3] = True
    assert np.array_equal(mask, expected)
