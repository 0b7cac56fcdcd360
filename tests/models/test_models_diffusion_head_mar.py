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
        out = head(io["mlp.x_t"], io["mlp.t"], io["mlp.c"])
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
        out = head(torch.cat([x[:half], x[:half]]), t, c)
    cond, uncond = out[:half, :16], out[half:, :16]
    guided = uncond + scale * (cond - uncond)
    expected = io["mlp_cfg.out"]
    torch.testing.assert_close(guided, expected[:half, :16], rtol=0, atol=1e-5)
    torch.testing.assert_close(guided, expected[half:, :16], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 16:], expected[:, 16:], rtol=0, atol=1e-5)


def test_shared_timestep_and_condition_embedding_give_the_same_output():
    head = perturb_(MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG)).eval()
    x, c = torch.randn(5, 4), torch.randn(5, 16)
    with torch.no_grad():
        per_row = head(x, torch.full((5,), 421), c)
        shared = head(x, 421, condition_embedding=head.embed_condition(c))
        shared_tensor = head(x, torch.tensor(421), c)
    torch.testing.assert_close(shared, per_row, rtol=0, atol=1e-6)
    torch.testing.assert_close(shared_tensor, per_row, rtol=0, atol=1e-6)
    assert per_row.shape == (5, 8)


def test_exactly_one_condition_is_required():
    head = MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG)
    with pytest.raises(ValueError, match="exactly one"):
        head(torch.randn(2, 4), 3)
    with pytest.raises(ValueError, match="exactly one"):
        head(torch.randn(2, 4), 3, torch.randn(2, 16), torch.randn(2, 16))


def test_precomputed_modulation_gives_the_same_output():
    head = perturb_(MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG)).eval()
    x, c = torch.randn(5, 4), torch.randn(5, 16)
    timesteps = torch.tensor([999, 421, 3])
    with torch.no_grad():
        embedding = head.embed_condition(c)
        modulation = head.compute_modulation(timesteps, embedding)
        assert modulation.shape == (3, 5, (3 * 1 + 2) * 16)
        for i, t in enumerate(timesteps.tolist()):
            expected = head(x, t, condition_embedding=embedding)
            torch.testing.assert_close(head(x, modulation=modulation[i]), expected, rtol=0, atol=1e-6)
            # The timestep is not used when the modulation is given (a sampler may still pass it).
            torch.testing.assert_close(head(x, 0, modulation=modulation[i]), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(head.compute_modulation(421, embedding)[0], modulation[1], rtol=0, atol=1e-6)


def test_modulation_arguments_are_checked():
    head = MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG)
    x, c = torch.randn(2, 4), torch.randn(2, 16)
    modulation = head.compute_modulation(5, head.embed_condition(c))[0]
    with pytest.raises(ValueError, match="exactly one.*`condition`, `modulation`"):
        head(x, 5, c, modulation=modulation)
    with pytest.raises(ValueError, match="`timestep` is required"):
        head(x, condition=c)
    with pytest.raises(ValueError, match=r"`modulation` must have shape \(2, 80\)"):
        head(x, modulation=modulation[:, :16])


def test_original_initialisation_zeroes_the_output():
    head = MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG)
    out = head(torch.randn(3, 4), torch.tensor([1, 2, 3]), torch.randn(3, 16))
    assert torch.count_nonzero(out) == 0


def test_gradient_checkpointing_gives_the_same_gradients():
    head = perturb_(MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG))
    x, t, c = torch.randn(6, 4), torch.randint(0, 1000, (6,)), torch.randn(6, 16)

    def grads():
        head.zero_grad()
        head(x, t, c).square().sum().backward()
        return {name: p.grad.clone() for name, p in head.named_parameters()}

    plain = grads()
    head.enable_gradient_checkpointing()
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)
