"""The Python code and the command line that the Generate tab prints make the demo's images: the command parses with
the command line's parser and writes the same PNG; the Python code runs and makes the same images."""

from __future__ import annotations

import shlex

import numpy as np
import pytest
from PIL import Image

from diffusers_mar import DEFAULT_MODEL, cli
from diffusers_mar.cli.parser import build_parser
from diffusers_mar.demo import actions
from diffusers_mar.demo.commands import cli_command, python_command
from diffusers_mar.demo.frames import grid_layout
from diffusers_mar.demo.inputs import generation_request
from diffusers_mar.demo.model import load_model
from diffusers_mar.demo.runner import RunRegistry


def generate(model, request, folder):
    """The demo's generation: its last update (the grid, the PNG path, the commands from the first update)."""
    updates = list(actions.generate(model, request, RunRegistry(), "session", folder))
    return {**updates[0], **updates[-1]}


def python_images(code: str) -> list[Image.Image]:
    namespace = {}
    exec(code, namespace)
    return namespace["images"]


def test_the_command_line_parses_to_the_demos_settings_and_writes_the_demos_png(mar_model, tmp_path):
    request = generation_request(mar_model.pipe, "3, seven", 2, 5, {"num_inference_steps": 3, "guidance_scale": 1.5})
    result = generate(mar_model, request, tmp_path)
    output = tmp_path / "cli.png"
    argv = shlex.split(cli_command(mar_model.source, request, str(output)))
    assert argv[:2] == ["diffusers-mar", "generate"]
    args = build_parser().parse_args(argv[1:])
    assert (args.model, args.class_labels, args.num_images_per_label, args.seed) == (
        mar_model.source,
        ["3", "7"],
        2,
        5,
    )
    assert (args.num_inference_steps, args.guidance_scale, args.num_diffusion_steps) == (3, 1.5, None)
    assert result["cli"] == cli_command(mar_model.source, request)  # the tab shows this command (grid.png)
    assert cli.main(argv[1:]) == 0
    assert np.array_equal(np.asarray(Image.open(output)), np.asarray(Image.open(result["png"])))


def test_the_python_code_runs_and_makes_the_demos_images(mar_model, tmp_path):
    request = generation_request(mar_model.pipe, "1 2", 2, 11, {"temperature": 0.9, "guidance_schedule": "constant"})
    result = generate(mar_model, request, tmp_path)
    code = python_command(mar_model.source, "MARPipeline", request)
    assert result["python"] == code
    images = python_images(code)
    layout = grid_layout(mar_model.pipe, ["1 one", "2 two"], 2)
    assert np.array_equal(np.asarray(layout.grid(images)), np.asarray(result["grid"]))


def test_the_shipped_model_with_a_preset(tmp_path):
    model = load_model(DEFAULT_MODEL)
    request = generation_request(model.pipe, "0 9", 1, 3, {"guidance_scale": 2.0}, "fast")
    result = generate(model, request, tmp_path)
    command = cli_command(model.source, request, str(tmp_path / "cli.png"))
    assert "--model" not in command and "--sampling-preset fast" in command and "--num-inference-steps" not in command
    assert cli.main(shlex.split(command)[1:]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli.png")), np.asarray(Image.open(result["png"])))
    code = python_command(model.source, "MARPipeline", request)
    assert "from diffusers_mar import MARPipeline, DEFAULT_MODEL" in code and "sampling_preset='fast'" in code
    layout = grid_layout(model.pipe, ["0", "9"], 1)
    assert np.array_equal(np.asarray(layout.grid(python_images(code))), np.asarray(result["grid"]))


def test_an_ar_model_with_an_order(ar_model, tmp_path):
    request = generation_request(ar_model.pipe, "4", 2, 0, {}, order="random")
    result = generate(ar_model, request, tmp_path)
    command = cli_command(ar_model.source, request, str(tmp_path / "cli.png"))
    assert "--order random" in command
    assert cli.main(shlex.split(command)[1:]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli.png")), np.asarray(Image.open(result["png"])))
    code = python_command(ar_model.source, "ARPipeline", request)
    assert "order='random'" in code and "num_inference_steps" not in code
    layout = grid_layout(ar_model.pipe, ["4"], 2)
    assert np.array_equal(np.asarray(layout.grid(python_images(code))), np.asarray(result["grid"]))


@pytest.mark.parametrize("model", ["my models/mar digits", "user/mar-base"])
def test_paths_and_hub_ids_are_quoted(mar_model, model):
    request = generation_request(mar_model.pipe, "0", 1, 0, {})
    args = build_parser().parse_args(shlex.split(cli_command(model, request))[1:])
    assert args.model == model
    assert f"MARPipeline.from_pretrained({model!r})" in python_command(model, "MARPipeline", request)


def test_device_and_dtype_are_part_of_both_commands(mar_model):
    request = generation_request(mar_model.pipe, "0", 1, 0, {})
    assert shlex.split(cli_command("m", request, device="cuda", dtype="bfloat16"))[-6:-2] == [
        "--device",
        "cuda",
        "--dtype",
        "bfloat16",
    ]
    code = python_command("m", "MARPipeline", request, device="cuda", dtype="bfloat16")
    assert "pipe = MARPipeline.from_pretrained('m').to(device='cuda', dtype=torch.bfloat16)" in code
    assert ".to(" not in python_command("m", "MARPipeline", request)
