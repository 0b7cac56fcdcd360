"""`diffusers-mar generate`, `info` and `evaluate` on a VARPipeline folder: the class comes from model_index.json,
VAR's options (`--top-k`, `--top-p`, `--more-smooth`) apply to it and the other families' options are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_mar import VARPipeline, cli
from tests.cli.test_cli import tiny_model  # noqa: F401  (the MAR folder, for VAR's options refused there)
from tests.cli.test_evaluate import STUB
from tests.testing_utils import make_tiny_var_pipeline

SAMPLING = {"guidance_scale": 3.0, "top_k": 16}


@pytest.fixture(scope="module")
def tiny_var_model(tmp_path_factory):
    pipe = make_tiny_var_pipeline(id2label={1: "one", 2: "two"}, sampling=SAMPLING)
    folder = tmp_path_factory.mktemp("tiny_var_model")
    pipe.save_pretrained(folder)
    (folder / "README.md").write_text("# tiny VAR\n")
    return folder


@pytest.mark.parametrize("options", [[], ["--top-p", "0.5", "--more-smooth"]], ids=["folder-settings", "options"])
def test_generate_loads_the_var_pipeline_and_writes_its_images(tiny_var_model, tmp_path, capsys, options):
    argv = ["generate", "--model", str(tiny_var_model), "--class-labels", "1", "two", "--num-images-per-label", "2"]
    assert cli.main([*argv, "--seed", "3", "--output-dir", str(tmp_path), "--output", str(tmp_path / "grid.png"),
                     "--quiet", *options]) == 0  # fmt: skip
    err = capsys.readouterr().err
    settings = {**SAMPLING, "top_p": 0.96, "more_smooth": False}  # top_p and more_smooth: the original's FID setting
    if options:
        settings.update(top_p=0.5, more_smooth=True)
    assert f"guidance_scale=3.0, top_k=16, top_p={settings['top_p']}, more_smooth={settings['more_smooth']}" in err
    pipe = VARPipeline.from_pretrained(tiny_var_model)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(3 + i) for i in range(4)]
    images = pipe([1, 1, 2, 2], generator=generators, **settings).images
    names = ["label-1-0.png", "label-1-1.png", "label-2-0.png", "label-2-1.png"]
    for name, image in zip(names, images):
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), np.asarray(image))
    assert Image.open(tmp_path / "grid.png").mode == "RGB"


def test_info_describes_the_scales_and_the_codebook(tiny_var_model, capsys):
    assert cli.main(["info", "--model", str(tiny_var_model)]) == 0
    out = capsys.readouterr().out
    assert "pipeline:     VARPipeline, next-scale prediction over a codebook of 32, decoded by VARVQModel" in out
    assert "scales 1x2x3 = 14 codebook indices (4-d codes)" in out and "images:       6x6, 3 channel(s)" in out
    assert "VARTransformer2DModel" in out and "top_k: 16" in out and "more_smooth: False" in out and "1: one" in out
    assert cli.main(["info", "--model", str(tiny_var_model), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pipeline"] == "VARPipeline" and summary["patch_nums"] == [1, 2, 3]
    assert summary["recommended_sampling"] == {**SAMPLING, "top_p": 0.96, "more_smooth": False}
    assert set(summary["components"]) == {"transformer", "vqvae"}


@pytest.mark.parametrize(
    "option",
    [
        ["--num-inference-steps", "4"],
        ["--num-diffusion-steps", "4"],
        ["--temperature", "1.0"],
        ["--guidance-schedule", "linear"],
        ["--order", "random"],
        ["--sampling-preset", "fast"],
    ],
)
def test_options_of_the_other_families_are_refused(tiny_var_model, tmp_path, capsys, option):
    base = ["generate", "--class-labels", "1", "--output", str(tmp_path / "grid.png"), "--model", str(tiny_var_model)]
    assert cli.main([*base, *option]) == 2
    assert f"argument {option[0]}: does not apply to a VARPipeline folder" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


def test_var_options_are_refused_elsewhere_and_checked(tiny_var_model, tiny_model, tmp_path, capsys):  # noqa: F811
    base = ["generate", "--class-labels", "1", "--output", str(tmp_path / "grid.png")]
    for option in (["--top-k", "4"], ["--top-p", "0.5"], ["--more-smooth"], ["--no-more-smooth"]):
        assert cli.main([*base, "--model", str(tiny_model), *option]) == 2
        name = option[0].replace("--no-", "--")  # argparse's negative flag sets the same option
        assert f"argument {name}: does not apply to a MARPipeline folder" in capsys.readouterr().err
    assert cli.main([*base, "--model", str(tiny_var_model), "--top-k", "33"]) == 2
    assert "argument --top-k: must be in [0, 32] for this model (its codebook size); got 33" in capsys.readouterr().err
    assert cli.main([*base, "--model", str(tiny_var_model), "--top-p", "1.5"]) == 2
    assert "argument --top-p: must be a number in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


def test_evaluate_a_var_folder(tiny_var_model, tmp_path, capsys):
    args = [
        "evaluate",
        "--model",
        str(tiny_var_model),
        "--output-dir",
        str(tmp_path / "run"),
        "--images-per-class",
        "1",
    ]
    common = ["--batch-size", "4", "--feature-extractor", STUB, "--cpu", "-q"]
    assert cli.main([*args, *common, "--top-p", "0.5"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (
        results["num_images"] == 10
        and results["settings"]["top_p"] == 0.5
        and "temperature" not in results["settings"]
    )
    reference = tmp_path / "ref.npz"
    argv = ["evaluate", "--compute-reference", "--data", str(tmp_path / "run"), "--resolution", "6"]
    assert cli.main([*argv, "--output", str(reference), "--feature-extractor", STUB]) == 0
    assert cli.main([*args, *common, "--top-p", "0.5", "--reference", str(reference), "--update-model-card"]) == 0
    card = (tiny_var_model / "README.md").read_text()
    assert "guidance 3 (cfg 2), top-k 16, top-p 0.5, seed 0" in card
    pipe = VARPipeline.from_pretrained(tiny_var_model)
    pipe.set_progress_bar_config(disable=True)
    image = pipe([3], generator=torch.Generator().manual_seed(3), top_p=0.5, output_type="np").images[0]
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "run" / "000003.png")), np.round(image * 255).astype(np.uint8)
    )
