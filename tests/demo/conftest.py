"""Tiny pipeline folders (MAR with class names, causal AR, MAR with a VAE) and the demo's models of them."""

from __future__ import annotations

import pytest

from diffusers_mar import ARPipeline, MARPipeline
from diffusers_mar.demo.model import load_model
from tests.testing_utils import make_tiny_pipeline, make_tiny_vae, make_tiny_var_pipeline

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Few steps, so that a generation takes a fraction of a second.
SAMPLING = {"guidance_scale": 2.0, "num_inference_steps": 4, "num_diffusion_steps": 5}
AR_SAMPLING = {"guidance_scale": 2.0, "num_diffusion_steps": 5}


@pytest.fixture(scope="session")
def mar_folder(tmp_path_factory):
    pipe = make_tiny_pipeline(clip_sample=True)
    pipe = MARPipeline(**pipe.components, id2label=dict(enumerate(NAMES)), sampling=SAMPLING)
    folder = tmp_path_factory.mktemp("mar")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def ar_folder(tmp_path_factory):
    pipe = make_tiny_pipeline(ar=True, clip_sample=True)
    pipe = ARPipeline(**pipe.components, sampling=AR_SAMPLING)
    folder = tmp_path_factory.mktemp("ar")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def latent_folder(tmp_path_factory):
    pipe = make_tiny_pipeline(vae=make_tiny_vae())
    pipe = MARPipeline(**pipe.components, sampling=SAMPLING)
    folder = tmp_path_factory.mktemp("latent")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def var_folder(tmp_path_factory):
    pipe = make_tiny_var_pipeline(sampling={"guidance_scale": 2.0, "top_k": 0, "top_p": 0.0, "more_smooth": False})
    folder = tmp_path_factory.mktemp("var")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def var_model(var_folder):
    return load_model(str(var_folder))


@pytest.fixture(scope="session")
def mar_model(mar_folder):
    return load_model(str(mar_folder))


@pytest.fixture(scope="session")
def ar_model(ar_folder):
    return load_model(str(ar_folder))


@pytest.fixture(scope="session")
def latent_model(latent_folder):
    return load_model(str(latent_folder))
