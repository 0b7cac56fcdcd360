"""The family adapters: MAR and AR are known, a folder of a family without an adapter is refused with a clear message
before its weights load, and registering one adapter is all a new family needs."""

from __future__ import annotations

import json
import shutil

import pytest

from diffusers_mar.cli.errors import EXIT_USAGE, CLIError
from diffusers_mar.demo import FAMILIES, DecodedFrames, FamilyAdapter, TokenFrames, family_for, register_family
from diffusers_mar.demo import model as demo_model
from diffusers_mar.pipelines.sampling_settings import SAMPLING_PRESETS


def test_the_demo_knows_mar_ar_and_var():
    assert FAMILIES["MARPipeline"] is FAMILIES["MARInpaintPipeline"]
    mar, ar = FAMILIES["MARPipeline"], FAMILIES["ARPipeline"]
    assert (mar.name, mar.frames, mar.presets, mar.orders) == ("MAR", TokenFrames, tuple(SAMPLING_PRESETS), ())
    assert (ar.name, ar.frames, ar.presets, ar.orders, ar.inpaint) == (
        "AR",
        TokenFrames,
        (),
        ("raster", "random"),
        None,
    )
    var = FAMILIES["VARPipeline"]
    assert FAMILIES["VARInpaintPipeline"] is var and (var.name, var.frames, var.presets) == ("VAR", DecodedFrames, ())


def test_an_unknown_family_is_refused_with_the_known_ones_and_how_to_add_it():
    with pytest.raises(CLIError) as error:
        family_for("XYZPipeline", "some/xyz-model")
    assert error.value.exit_code == EXIT_USAGE and error.value.argument == "--model"
    assert error.value.args[0] == (
        "'some/xyz-model' holds a XYZPipeline, which the demo does not know: it shows ARPipeline, MARInpaintPipeline, "
        "MARPipeline, VARInpaintPipeline, VARPipeline. A family joins the demo with one adapter, "
        "diffusers_mar.demo.register_family(FamilyAdapter(...)) (docs/demo.md, 'Adding a family')"
    )


@pytest.fixture
def xyz_folder(mar_folder, tmp_path):
    """A pipeline folder whose model_index.json names a family the demo does not know (MAR weights inside)."""
    folder = tmp_path / "xyz"
    shutil.copytree(mar_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "XYZPipeline"}))
    return folder


def test_a_folder_of_an_unknown_family_is_refused_before_loading(xyz_folder, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(demo_model, "load_pipeline", no_loading)
    with pytest.raises(CLIError, match="holds a XYZPipeline, which the demo does not know"):
        demo_model.load_model(str(xyz_folder))


def test_registering_one_adapter_adds_a_family(var_folder, monkeypatch):
    monkeypatch.setitem(FAMILIES, "VARPipeline", None)  # restored after the test
    adapter = register_family(FamilyAdapter("VAR-test", ("VARPipeline",), frames=DecodedFrames))
    model = demo_model.load_model(str(var_folder))
    assert model.adapter is adapter and model.inpaint_pipe is None
    assert model.adapter.frames is DecodedFrames


def test_a_var_folder_is_served_with_its_inpainting(var_model):
    assert var_model.adapter is FAMILIES["VARPipeline"]
    assert type(var_model.inpaint_pipe).__name__ == "VARInpaintPipeline"
    assert var_model.inpaint_pipe.transformer is var_model.pipe.transformer


def test_a_model_knows_its_family_inpainting_and_card(mar_model, ar_model):
    assert (
        mar_model.adapter is FAMILIES["MARPipeline"] and type(mar_model.inpaint_pipe).__name__ == "MARInpaintPipeline"
    )
    assert mar_model.inpaint_pipe.transformer is mar_model.pipe.transformer  # from_pipe: the same modules
    assert ar_model.adapter is FAMILIES["ARPipeline"] and ar_model.inpaint_pipe is None
    assert mar_model.card == "This model folder has no model card (README.md)."
    assert not mar_model.is_default and mar_model.name == mar_model.source


def test_without_a_readable_model_index_the_loaded_pipeline_names_the_family(ar_folder, monkeypatch):
    monkeypatch.setattr(demo_model, "pipeline_class_name", lambda model: None)  # e.g. a Hub id not reachable yet
    model = demo_model.load_model(str(ar_folder))
    assert model.adapter is FAMILIES["ARPipeline"]
