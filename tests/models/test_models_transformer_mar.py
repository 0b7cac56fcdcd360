import pytest
import torch

from diffusers_mar import MARDiffusionHead, MARTransformer2DModel, get_preset_config
from tests.testing_utils import (
    TINY_PIXEL_TRANSFORMER_CONFIG,
    fixture_io,
    fixture_models,
    perturb_,
    requires_fixtures,
)


@requires_fixtures
@pytest.mark.parity
@pytest.mark.parametrize("case", ["cond", "mixed", "allmasked"])
def test_conditions_match_original(case):
    io = fixture_io()
    transformer, _ = fixture_models()
    tokens = io["transformer.x"]
    mask = io["transformer.mask"]
    if case == "allmasked":
        tokens, mask = torch.zeros_like(tokens), torch.ones_like(mask)
    with torch.no_grad():
        z = transformer(tokens, mask, io[f"transformer.{case}.labels"]).sample
    torch.testing.assert_close(z, io[f"transformer.{case}.z"], rtol=0, atol=1e-5)


@requires_fixtures
@pytest.mark.parity
def test_patchify_matches_original_and_unpatchify_inverts():
    io = fixture_io()
    transformer, _ = fixture_models()
    tokens = transformer.patchify(io["transformer.latents"])
    assert torch.equal(tokens, io["transformer.x"])
    assert torch.equal(transformer.unpatchify(tokens), io["transformer.latents"])


def test_patchify_with_patches_is_channel_major_raster():
    model = MARTransformer2DModel(**TINY_PIXEL_TRANSFORMER_CONFIG)
    image = torch.arange(64.0).reshape(1, 1, 8, 8)
    tokens = model.patchify(image)
    assert tokens.shape == (1, 16, 4)
    assert tokens[0, 1].tolist() == [2.0, 3.0, 10.0, 11.0]  # second patch of the first row
    assert tokens[0, 4].tolist() == [16.0, 17.0, 24.0, 25.0]  # first patch of the second row
    assert torch.equal(model.unpatchify(tokens), image)


@requires_fixtures
def test_predict_indices_equal_rows_of_full_output():
    io = fixture_io()
    transformer, _ = fixture_models()
    indices = torch.tensor([[0, 3, 9], [2, 14, 15]])
    with torch.no_grad():
        full = transformer(io["transformer.x"], io["transformer.mask"], io["transformer.mixed.labels"]).sample
        part = transformer(
            io["transformer.x"], io["transformer.mask"], io["transformer.mixed.labels"], predict_indices=indices
        ).sample
    expected = torch.gather(full, 1, indices.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(part, expected, rtol=0, atol=1e-6)


def test_unknown_tokens_do_not_influence_conditions():
    model = perturb_(MARTransformer2DModel(**TINY_PIXEL_TRANSFORMER_CONFIG)).eval()
    tokens = torch.randn(2, 16, 4)
    mask = torch.zeros(2, 16)
    mask[0, :5] = 1
    mask[1, 3:8] = 1
    changed = tokens + 10 * mask.unsqueeze(-1)
    labels = torch.tensor([1, 10])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, mask, labels)[0], model(changed, mask, labels)[0], rtol=0, atol=0)


def test_unequal_known_counts_raise():
    model = MARTransformer2DModel(**TINY_PIXEL_TRANSFORMER_CONFIG)
    mask = torch.zeros(2, 16)
    mask[0, :3] = 1
    with pytest.raises(ValueError, match="same number of known"):
        model(torch.zeros(2, 16, 4), mask, torch.tensor([0, 1]))


def test_shape_errors_name_the_argument():
    model = MARTransformer2DModel(**TINY_PIXEL_TRANSFORMER_CONFIG)
    with pytest.raises(ValueError, match="hidden_states"):
        model(torch.zeros(2, 15, 4), torch.zeros(2, 15), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.zeros(2, 16, 4), torch.zeros(2, 16), torch.tensor([0]))


@pytest.mark.parametrize(
    "preset, expected", [("mar-base", 207_924_768), ("mar-large", 478_326_304), ("mar-huge", 942_403_104)]
)
def test_preset_parameter_counts_equal_the_original(preset, expected):
    # The original prints sum(p.numel() for p in model.parameters() if p.requires_grad): every MAR parameter is
    # trainable, the learned position embeddings and fake_latent (our last class-embedding row) included.
    config = get_preset_config(preset)
    with torch.device("meta"):
        transformer = MARTransformer2DModel.from_config(config["transformer"])
        head = MARDiffusionHead.from_config(config["diffusion_head"])
    count = sum(p.numel() for p in transformer.parameters()) + sum(p.numel() for p in head.parameters())
    assert count == expected == config["paper"]["num_parameters"]


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="mar-base"):
        get_preset_config("mar-tiny")
