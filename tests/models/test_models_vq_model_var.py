"""VARVQModel against FoundationVision/VAR (fixtures in tests/fixtures/var_tiny), the phi mapping, saving, errors."""

from __future__ import annotations

import inspect

import pytest
import torch

from conversion.convert_var_to_diffusers import convert_vae_state_dict, vae_config_from_state_dict
from diffusers_mar import VARVQModel
from diffusers_mar.models.vq_model_var import official_phi_indices
from tests.testing_utils import (
    VAR_FIXTURE_VAE_CONFIG,
    var_fixture_config,
    var_fixture_io,
    var_fixture_vae,
    var_fixture_vae_state_dict,
)

SCALES = range(4)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def tiny_model(**kwargs) -> VARVQModel:
    """A random VQ-VAE small enough for shape and error checks: 8 px, 4 groups per GroupNorm."""
    config = {"sample_size": 8, "ch": 8, "ch_mult": (1, 2), "norm_num_groups": 4, "latent_channels": 4}
    config.update({"num_vq_embeddings": 16, "patch_nums": (1, 2, 4), **kwargs})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return VARVQModel(**config).eval()


@pytest.mark.parity
@torch.no_grad()
def test_encode_gives_the_official_latents_indices_and_partial_sums():
    io, model = var_fixture_io(), var_fixture_vae()
    close(model.encoder(io["vae.images"]), io["vae.h"])
    indices, latents = model.encode(io["vae.images"], return_dict=False)
    close(latents, io["vae.f"])
    for k in SCALES:
        assert indices[k].dtype == torch.int64
        assert torch.equal(indices[k], io[f"vae.idx_Bl.{k}"]), k
    _, partial_sums = model.quantize(latents)
    for k in SCALES:
        close(partial_sums[k], io[f"vae.f_hat.{k}"])


@pytest.mark.parity
@torch.no_grad()
def test_decoding_gives_the_official_partial_sums_and_images():
    io, model = var_fixture_io(), var_fixture_vae()
    indices = [io[f"vae.idx_Bl.{k}"] for k in SCALES]
    partial_sums = model.partial_sums(indices)
    for k in SCALES:
        close(partial_sums[k], io[f"vae.embed_to_fhat.{k}"])
        close(model.decode_latents(partial_sums[k]).sample, io[f"vae.idxBl_to_img.{k}"])
    close(model.decoder(model.post_quant_conv(partial_sums[-1])), io["vae.decoded_unclamped"])  # before the clamp
    close(model.decode(indices).sample, io["vae.idxBl_to_img.last"])
    close(model(io["vae.images"]).sample, io["vae.recon"])
    assert model.decode(indices).sample.abs().max() == 1  # the official clamp to [-1, 1] acts on these images


@pytest.mark.parity
@torch.no_grad()
def test_teacher_forcing_and_next_scale_inputs_are_the_official_ones():
    io, model = var_fixture_io(), var_fixture_vae()
    indices = [io[f"vae.idx_Bl.{k}"] for k in SCALES]
    close(model.teacher_forcing_input(indices), io["vae.var_input"])
    close(model.teacher_forcing_input(indices[:-1]), io["vae.var_input"])  # the last scale is not used
    f_hat = torch.zeros(2, 8, 4, 4)
    for k in SCALES:
        f_hat, next_map = model.next_scale_input(k, f_hat, model.embed(indices[k]))
        close(f_hat, io[f"vae.next_ar.{k}.f_hat"])
        if k < 3:
            close(next_map, io[f"vae.next_ar.{k}.next"])
    assert next_map is None  # after the last scale


@pytest.mark.parity
@pytest.mark.parametrize("share_quant_resi, num_phi", [(0, 4), (1, 1), (4, 4)])
@torch.no_grad()
def test_every_phi_sharing_mode_converts_and_matches(share_quant_resi, num_phi):
    io = var_fixture_io()
    state_dict = var_fixture_vae_state_dict(share_quant_resi)
    config = vae_config_from_state_dict(state_dict)
    assert config["share_quant_resi"] == share_quant_resi
    assert {k: config[k] for k in ("ch", "ch_mult", "num_res_blocks", "latent_channels", "num_vq_embeddings")} == {
        k: VAR_FIXTURE_VAE_CONFIG[k]
        for k in ("ch", "ch_mult", "num_res_blocks", "latent_channels", "num_vq_embeddings")
    }
    model = var_fixture_vae(share_quant_resi)
    assert len(model.phi) == num_phi
    prefix = "vae" if share_quant_resi == 4 else f"vae_qsr{share_quant_resi}"
    indices, latents = model.encode(io["vae.images"], return_dict=False)
    _, partial_sums = model.quantize(latents)
    for k in SCALES:
        assert torch.equal(indices[k], io[f"{prefix}.idx_Bl.{k}"]), k
        close(partial_sums[k], io[f"{prefix}.f_hat.{k}"])
    close(model.teacher_forcing_input(indices), io[f"{prefix}.var_input"])
    close(model(io["vae.images"]).sample, io[f"{prefix}.recon"])


@pytest.mark.parity
def test_phi_mapping_is_the_official_float64_one_with_its_ties():
    recorded = var_fixture_config()["phi_indices"]
    schedules = var_fixture_config()["schedules"]
    for name, by_count in recorded.items():
        for count, mapping in by_count.items():
            assert official_phi_indices(len(schedules[name]), int(count)) == mapping, (name, count)
    # Scales 2 and 7 of the 10-scale schedules lie halfway between two of the 4 ticks; float64 picks the upper one.
    assert recorded["256"]["4"][2] == 1 and recorded["256"]["4"][7] == 3
    for name in ("256", "512"):
        patch_nums = tuple(schedules[name])
        model = tiny_model(sample_size=2 * patch_nums[-1], patch_nums=patch_nums)  # 2x downsampling, not 16x
        assert model.config.phi_indices == recorded[name]["4"]
    assert inspect.signature(VARVQModel.__init__).parameters["patch_nums"].default == tuple(schedules["256"])


@torch.no_grad()
def test_given_phi_indices_are_used_and_saved():
    model = tiny_model(share_quant_resi=2, phi_indices=[1, 1, 0])
    assert model.config.phi_indices == [1, 1, 0]
    h = torch.randn(1, 4, 4, 4)
    expected = 0.5 * h + 0.5 * model.phi[1](h)
    torch.testing.assert_close(model.apply_phi(h, 0), expected, rtol=0, atol=0)
    assert tiny_model(share_quant_resi=2).config.phi_indices == [0, 0, 1]


@pytest.mark.parity
@torch.no_grad()
def test_save_pretrained_round_trip_keeps_config_and_outputs(tmp_path):
    io, model = var_fixture_io(), var_fixture_vae()
    model.save_pretrained(tmp_path)
    loaded = VARVQModel.from_pretrained(tmp_path).eval()
    assert loaded.config.phi_indices == model.config.phi_indices == [0, 1, 2, 3]
    assert '"phi_indices"' in (tmp_path / "config.json").read_text()
    indices = model.encode(io["vae.images"]).indices
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(io["vae.images"]).indices, indices))
    assert torch.equal(loaded.decode(indices).sample, model.decode(indices).sample)


def test_the_converter_drops_training_statistics_and_refuses_unknown_keys():
    state_dict = var_fixture_vae_state_dict()
    converted = convert_vae_state_dict(state_dict)
    assert "quantize.ema_vocab_hit_SV" in state_dict
    assert not any("ema_vocab_hit" in key for key in converted)
    with pytest.raises(ValueError, match="quantize.something"):
        convert_vae_state_dict({**state_dict, "quantize.something": torch.zeros(1)})


@torch.no_grad()
def test_bad_inputs_raise_value_errors_that_name_the_argument():
    model = tiny_model()
    good = [torch.zeros(2, side * side, dtype=torch.long) for side in (1, 2, 4)]
    with pytest.raises(ValueError, match="`images` must be \\(batch_size, 3, 8, 8\\)"):
        model.encode(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="`images`"):
        model.encode(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="`sample`"):
        model(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="`indices` must be a list of 3 tensors"):
        model.decode(good[:2])
    with pytest.raises(ValueError, match="`indices` must be a list of 3 or 2 tensors"):
        model.teacher_forcing_input(good[:1])
    with pytest.raises(ValueError, match="outside \\[0, 16\\)"):
        model.decode(good[:2] + [torch.full((2, 16), 16)])
    with pytest.raises(ValueError, match="outside"):
        model.partial_sums([good[0] - 1] + good[1:])
    with pytest.raises(ValueError, match="`indices\\[1\\]` must be an integer tensor of shape \\(2, 4\\)"):
        model.decode([good[0], torch.zeros(2, 9, dtype=torch.long), good[2]])
    with pytest.raises(ValueError, match="`scale_index`"):
        model.next_scale_input(3, torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="`embeddings` must be \\(batch_size, 4, 2, 2\\)"):
        model.next_scale_input(1, torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="`latents`"):
        model.quantize(torch.zeros(2, 4, 2, 2))


def test_bad_configs_raise_value_errors_that_name_the_argument():
    with pytest.raises(ValueError, match="`sample_size` \\(16\\) must be .* = 8"):
        tiny_model(sample_size=16)
    with pytest.raises(ValueError, match="`patch_nums`"):
        tiny_model(patch_nums=(4,), sample_size=8)
    with pytest.raises(ValueError, match="`phi_indices`"):
        tiny_model(phi_indices=[0, 1])
    with pytest.raises(ValueError, match="`phi_indices`"):
        tiny_model(share_quant_resi=2, phi_indices=[0, 1, 2])
    with pytest.raises(ValueError, match="`quant_resi`"):
        tiny_model(quant_resi=0.0)


@torch.no_grad()
def test_shapes_of_a_random_model():
    model = tiny_model()
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    output = model.encode(images)
    assert [tuple(i.shape) for i in output.indices] == [(3, 1), (3, 4), (3, 16)]
    assert tuple(output.latents.shape) == (3, 4, 4, 4)
    assert tuple(model.teacher_forcing_input(output.indices).shape) == (3, 4 + 16, 4)
    assert tuple(model.embed(output.indices[1]).shape) == (3, 4, 2, 2)
    assert tuple(model.decode(output.indices).sample.shape) == (3, 3, 8, 8)
