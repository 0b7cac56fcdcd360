"""`diffusers-mar generate` and `info` on an ARPipeline folder: the class comes from model_index.json (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_mar import ARPipeline, cli
from tests.cli.test_cli import tiny_model  # noqa: F401  (the MAR folder, for the --order error)
from tests.testing_utils import make_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_ar_model(tmp_path_factory):
    pipe = make_tiny_pipeline(ar=True)
    pipe.set_sampling_defaults(num_diffusion_steps=4, guidance_scale=2.0)
    folder = tmp_path_factory.mktemp("tiny_ar_model")
    pipe.save_pretrained(folder)
    return folder


def test_generate_loads_the_ar_pipeline_and_writes_its_images(tiny_ar_model, tmp_path, capsys):
    argv = ["generate", "--model", str(tiny_ar_model), "--class-labels", "1", "2", "--num-images-per-label", "1"]
    assert cli.main([*argv, "--order", "random", "--seed", "3", "--output-dir", str(tmp_path), "--quiet"]) == 0
    assert "order=random" in capsys.readouterr().err
    pipe = ARPipeline.from_pretrained(tiny_ar_model)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    images = pipe([1, 2], generator=generators, order="random").images
    for label, image in zip([1, 2], images):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"label-{label}-0.png")), np.asarray(image))
    assert cli.main(["info", "--model", str(tiny_ar_model)]) == 0
    out = capsys.readouterr().out
    assert "ARPipeline" in out and "ARTransformer2DModel" in out


def test_options_of_the_other_family_are_refused(tiny_ar_model, tiny_model, tmp_path, capsys):  # noqa: F811
    base = ["generate", "--class-labels", "1", "--output", str(tmp_path / "grid.png")]
    assert cli.main([*base, "--model", str(tiny_ar_model), "--num-inference-steps", "4"]) == 2
    assert "--num-inference-steps" in capsys.readouterr().err
    assert cli.main([*base, "--model", str(tiny_ar_model), "--sampling-preset", "fast"]) == 2
    assert "--sampling-preset" in capsys.readouterr().err
    assert cli.main([*base, "--model", str(tiny_model), "--order", "random"]) == 2
    assert "--order" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()
