import pytest
import torch

from diffusers_mar import MARDiffusionHead
from tests.testing_utils import TINY_PIXEL_HEAD_CONFIG, fixture_io, fixture_models, perturb_, requires_fixtures


@requires_fixtures
@pytest.mark.parity
def test_head_output_matches_original():
    io = fixture_io()
    _, head = fixture_models()
    with torch.no_grad():
        out = head(io["mlp.x_t"], io["mlp.t"], io["mlp.c"]).sample
    torch.testing.assert_close(out, io["mlp.out"], rtol=0, atol=1e-5)


@requires_fixtures
@pytest.mark.parity
def test_timestep_features_match_original():
    # [cos, sin] of t * f for t up to 999 rad: float32 sin/cos of such arguments differ by ~1 ulp of the argument
    # between torch builds and CPUs (3e-5 here against the fixture's machine); the head output above stays at 1e-6.
    io = fixture_io()
    _, head = fixture_models()
    torch.testing.assert_close(head.time_proj(io["mlp.t"]), io["mlp.t_freq"], rtol=0, atol=1e-4)


@requires_fixtures
@pytest.mark.parity
def test_guided_output_matches_original_forward_with_cfg():
    io = fixture_io()
    _, head = fixture_models()
    x, t, c = io["mlp_cfg.x_t"], io["mlp_cfg.t"], io["mlp_cfg.c"]
    half = x.shape[0] // 2
    scale = io["mlp_cfg.cfg_scale"]
    with torch.no_grad():
        out = head(torch.cat([x[:half], x[:half]]), t, c).sample
    cond, uncond = out[:half, :16], out[half:, :16]
    guided = uncond + scale * (cond - uncond)
    expected = io["mlp_cfg.out"]
    torch.testing.assert_close(guided, expected[:half, :16], rtol=0, atol=1e-5)
    torch.testing.assert_close(guided, expected[half:, :16], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 16:], expected[:, 16:], rtol=0, atol=1e-5)


def test_shared_timestep_gives_the_same_output():
    head = perturb_(MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG)).eval()
    x, c = torch.randn(5, 4), torch.randn(5, 16)
    with torch.no_grad():
        per_row = head(x, torch.full((5,), 421), c).sample
        shared = head(x, 421, c).sample
        shared_tensor = head(x, torch.tensor(421), c).sample
    torch.testing.assert_close(shared, per_row, rtol=0, atol=1e-6)
    torch.testing.assert_close(shared_tensor, per_row, rtol=0, atol=1e-6)
    assert per_row.shape == (5, 8)


def test_return_dict_false_gives_a_tuple_with_the_same_tensor():
    head = perturb_(MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG)).eval()
    x, t, c = torch.randn(3, 4), torch.tensor([1, 500, 999]), torch.randn(3, 16)
    with torch.no_grad():
        output = head(x, t, c)
        as_tuple = head(x, t, c, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert torch.equal(as_tuple[0], output.sample) and torch.equal(output[0], output.sample)


def test_precomputed_modulation_gives_the_same_output():
    head = perturb_(MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG)).eval()
    x, c = torch.randn(5, 4), torch.randn(5, 16)
    timesteps = torch.tensor([999, 421, 3])
    with torch.no_grad():
        embedding = head.embed_condition(c)
        modulation = head.compute_modulation(timesteps, embedding)
        assert modulation.shape == (3, 5, (3 * 1 + 2) * 16)
        for i, t in enumerate(timesteps.tolist()):
            expected = head(x, t, c).sample
            torch.testing.assert_close(head.forward_with_modulation(x, modulation[i]), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(head.compute_modulation(421, embedding)[0], modulation[1], rtol=0, atol=1e-6)


def test_adaln_modulation_rows_of_each_block():
    head = perturb_(MARDiffusionHead(**{**TINY_PIXEL_HEAD_CONFIG, "num_res_blocks": 3})).eval()
    layer, width = head.adaln_modulation, head.config.model_channels
    y = torch.randn(2, 7, width)
    with torch.no_grad():
        full = layer(y)
        torch.testing.assert_close(full, torch.nn.functional.linear(y, layer.weight, layer.bias), rtol=0, atol=1e-6)
        pieces = [layer(y, block=i) for i in range(4)]
    assert [piece.shape[-1] for piece in pieces] == [3 * width] * 3 + [2 * width]  # (shift, scale, gate), final
    torch.testing.assert_close(torch.cat(pieces, dim=-1), full, rtol=0, atol=0)


def test_condition_embedding_path_gives_the_same_output():
    head = perturb_(MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG)).eval()
    x, c = torch.randn(5, 4), torch.randn(5, 16)
    with torch.no_grad():
        embedding = head.embed_condition(c)
        for t in (999, torch.tensor(421), torch.tensor([3, 4, 5, 6, 7])):
            expected = head(x, t, c).sample
            torch.testing.assert_close(
                head.forward_with_condition_embedding(x, t, embedding), expected, rtol=0, atol=0
            )


def test_modulation_shape_is_checked():
    head = MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG)
    x, c = torch.randn(2, 4), torch.randn(2, 16)
    modulation = head.compute_modulation(5, head.embed_condition(c))[0]
    with pytest.raises(ValueError, match=r"`modulation` must have shape \(2, 80\)"):
        head.forward_with_modulation(x, modulation[:, :16])


def test_original_initialisation_zeroes_the_output():
    head = MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG)
    out = head(torch.randn(3, 4), torch.tensor([1, 2, 3]), torch.randn(3, 16)).sample
    assert torch.count_nonzero(out) == 0
