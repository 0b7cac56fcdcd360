"""`diffusers_mar.quantization`: dynamic int8 linear layers (`quantize_int8`, `--dtype int8`) on the tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from diffusers_mar.models.diffusion_head_mar import MARAdaLNModulation
from diffusers_mar.quantization import FLOAT32_LINEARS, Int8AdaLNModulation, quantize_int8, quantize_model_int8
from tests.testing_utils import make_tiny_pipeline, make_tiny_var_pipeline, relative_error, tiny_transformer_inputs

FAMILIES = ["mar", "ar", "var"]


def tiny(family: str):
    return make_tiny_var_pipeline() if family == "var" else make_tiny_pipeline(ar=family == "ar", clip_sample=True)


def plain_linears(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_but_the_projections_becomes_int8(family):
    pipe = tiny(family)
    models = [pipe.transformer] + ([pipe.diffusion_head] if family != "var" else [])
    before = [len(plain_linears(model)) for model in models]
    assert quantize_int8(pipe) is pipe
    for model, count in zip(models, before):
        kept = sorted(plain_linears(model))
        assert kept == sorted(name for name in FLOAT32_LINEARS if hasattr(model, name))
        quantized = [m for m in model.modules() if isinstance(m, DynamicQuantizedLinear)]
        modulation = 1 if family != "var" and model is pipe.diffusion_head else 0
        # Every other linear is int8; the head's AdaLN modulation is one int8 layer per block instead of one layer.
        blocks = len(model.res_blocks) + 1 if modulation else 0
        assert len(quantized) == count - len(kept) - modulation + blocks
        assert model.int8_quantized
    if family == "var":
        assert not any(isinstance(m, DynamicQuantizedLinear) for m in pipe.vqvae.modules())
    else:
        assert isinstance(pipe.diffusion_head.adaln_modulation, Int8AdaLNModulation)


def test_int8_networks_stay_close_to_float32():
    pipe = make_tiny_pipeline(clip_sample=True)
    transformer, head = copy.deepcopy(pipe.transformer), copy.deepcopy(pipe.diffusion_head)
    quantize_int8(pipe)
    inputs = tiny_transformer_inputs()
    with torch.no_grad():
        reference, actual = transformer(*inputs).sample, pipe.transformer(*inputs).sample
        error = relative_error(actual, reference)
        assert 0 < error < 0.06, error  # 16-wide blocks, one int8 scale per tensor: 3.5% here
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(6, head.config.in_channels, generator=generator)
        condition = torch.randn(6, head.config.condition_channels, generator=generator)
        timestep = torch.tensor([0, 10, 200, 500, 800, 999])
        actual, reference = pipe.diffusion_head(sample, timestep, condition), head(sample, timestep, condition)
        error = relative_error(actual.sample, reference.sample)
        assert 0 < error < 0.03, error


def test_int8_modulation_gives_each_block_its_rows():
    torch.manual_seed(0)
    modulation = MARAdaLNModulation(32, 3)
    nn.init.normal_(modulation.weight, std=0.2)
    nn.init.normal_(modulation.bias, std=0.2)
    quantized = Int8AdaLNModulation(modulation)
    y = torch.randn(5, 32)
    with torch.no_grad():
        full, reference = quantized(y), modulation(y)
        assert full.shape == reference.shape == (5, modulation.out_features)
        assert relative_error(full, reference) < 0.02
        for block, rows in enumerate(modulation.block_rows):
            part = quantized(y, block=block)
            assert torch.equal(part, full[:, rows])
            assert relative_error(part, reference[:, rows]) < 0.02


@pytest.mark.parametrize("family", FAMILIES)
def test_a_quantized_pipeline_samples_close_to_float32(family):
    pipe = tiny(family)
    settings = {} if family == "var" else {"num_diffusion_steps": 5, "num_inference_steps": 4}
    if family == "ar":
        settings.pop("num_inference_steps")
    reference = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="np", **settings).images
    quantize_int8(pipe)
    images = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="np", **settings).images
    assert images.shape == reference.shape and (images >= 0).all() and (images <= 1).all()
    again = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="np", **settings).images
    assert (images == again).all()
    if family != "var":  # VAR's tokens are discrete: a changed logit may pick another code
        assert 0 < abs(images - reference).mean() < 0.05


def test_bad_pipelines_are_refused():
    with pytest.raises(TypeError, match="`pipe` must be a MARPipeline, ARPipeline or VARPipeline; got Linear"):
        quantize_int8(nn.Linear(2, 2))
    pipe = make_tiny_pipeline(clip_sample=True).to(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"float32 pipeline on the CPU; `pipe.transformer` is torch.bfloat16 on cpu"):
        quantize_int8(pipe)
    assert not plain_linears(pipe.transformer) == []  # nothing was changed
    pipe = quantize_int8(make_tiny_pipeline(clip_sample=True))
    with pytest.raises(ValueError, match="`pipe.transformer` is already quantized to int8"):
        quantize_int8(pipe)


def test_a_quantized_pipeline_or_model_is_not_saved(tmp_path):
    pipe = quantize_int8(make_tiny_pipeline(clip_sample=True))
    with pytest.raises(ValueError, match="transformer, diffusion_head is quantized to int8"):
        pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="This MARDiffusionHead is quantized to int8"):
        pipe.diffusion_head.save_pretrained(tmp_path / "head")
    assert not (tmp_path / "pipe").exists() and not (tmp_path / "head").exists()
    model = make_tiny_var_pipeline().transformer
    quantize_model_int8(model)
    with pytest.raises(ValueError, match="This VARTransformer2DModel is quantized"):
        model.save_pretrained(tmp_path / "var")
