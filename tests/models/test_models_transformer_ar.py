"""ARTransformer2DModel: causality in the order, the KV cache, the target-aware embedding, input errors (issue 15).

The generic diffusers checks (outputs, save/load, training, hooks) run on it in test_modeling_common_mar.py.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_mar import ARTransformer2DModel
from tests.testing_utils import TINY_AR_TRANSFORMER_CONFIG, perturb_


def _model(seed: int = 0) -> ARTransformer2DModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return perturb_(ARTransformer2DModel(**TINY_AR_TRANSFORMER_CONFIG), seed).eval()


def _inputs(seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, 16, 4, generator=g)
    orders = torch.stack([torch.randperm(16, generator=g) for _ in range(batch)])
    labels = torch.tensor([1, 10, 4][:batch])
    return tokens, labels, orders


def _in_order(conditions: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Raster-position conditions (B, L, D) -> row j = condition of the token at orders[:, j]."""
    return torch.gather(conditions, 1, orders.unsqueeze(-1).expand(-1, -1, conditions.shape[-1]))


@torch.no_grad()
def test_condition_of_a_position_ignores_the_tokens_at_and_after_it_in_the_order():
    model = _model()
    tokens, labels, orders = _inputs()
    reference = _in_order(model(tokens, labels, orders).sample, orders)
    for cut in (0, 5, 15):
        changed = tokens.clone()
        later = orders[:, cut:]  # positions at and after `cut` in each order
        changed.scatter_(1, later.unsqueeze(-1).expand(-1, -1, 4), torch.randn(3, 16 - cut, 4))
        output = _in_order(model(changed, labels, orders).sample, orders)
        # Rows 0..cut predict positions orders[:, :cut + 1] from the tokens before them: unchanged.
        assert torch.equal(output[:, : cut + 1], reference[:, : cut + 1])
        if cut < 15:
            assert (output[:, cut + 1 :] - reference[:, cut + 1 :]).abs().amax() > 1e-3  # later rows do see them


@torch.no_grad()
def test_kv_cache_steps_equal_the_full_causal_pass():
    model = _model()
    tokens, labels, orders = _inputs()
    full = _in_order(model(tokens, labels, orders).sample, orders)
    cache = model.make_kv_cache(3)
    for step in range(16):
        assert cache.length == step
        row = model(tokens, labels, orders, kv_cache=cache, return_dict=False)[0]
        assert row.shape == (3, 1, 16)
        torch.testing.assert_close(row[:, 0], full[:, step], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="kv_cache"):
        model(tokens, labels, orders, kv_cache=cache)  # full
    with pytest.raises(ValueError, match="kv_cache"):
        model(tokens[:2], labels[:2], orders[:2], kv_cache=model.make_kv_cache(3))  # wrong batch


@torch.no_grad()
def test_default_order_is_raster_and_the_order_changes_the_conditions():
    model = _model()
    tokens, labels, orders = _inputs()
    raster = torch.arange(16).expand(3, -1)
    assert torch.equal(model(tokens, labels).sample, model(tokens, labels, raster).sample)
    assert not torch.allclose(model(tokens, labels).sample, model(tokens, labels, orders).sample)


@torch.no_grad()
def test_target_aware_embedding_tells_the_first_row_which_position_it_predicts():
    # Row 0 sees only the class token; without the target embedding every order would give it the same condition.
    model = _model()
    tokens, labels, _ = _inputs()
    first = torch.zeros(3, dtype=torch.long)
    orders_a = torch.arange(16).expand(3, -1)
    orders_b = torch.roll(torch.arange(16), -1).expand(3, -1)  # starts at position 1
    out_a = model(tokens, labels, orders_a).sample[:, 0]
    out_b = model(tokens, labels, orders_b).sample[torch.arange(3), orders_b[:, 0]]
    assert not torch.allclose(out_a, out_b)
    model.target_pos_embed.data.zero_()
    model.diffusion_pos_embed.data.zero_()
    out_a = model(tokens, labels, orders_a).sample[torch.arange(3), first]
    out_b = model(tokens, labels, orders_b).sample[torch.arange(3), orders_b[:, 0]]
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-6)


def test_input_errors_name_the_argument():
    model = _model()
    tokens, labels, orders = _inputs()
    with pytest.raises(ValueError, match="hidden_states"):
        model(tokens[:, :8], labels, orders)
    with pytest.raises(ValueError, match="class_labels"):
        model(tokens, labels[:2], orders)
    with pytest.raises(ValueError, match="orders"):
        model(tokens, labels, orders[:, :8])
    with pytest.raises(ValueError, match="patch_size"):
        ARTransformer2DModel(sample_size=7, patch_size=2)


def test_patchify_round_trip():
    model = _model()
    grid = torch.randn(2, 1, 8, 8)
    assert torch.equal(model.unpatchify(model.patchify(grid)), grid)


@torch.no_grad()
def test_kv_cache_takes_the_compute_dtype_under_layerwise_casting():
    model = _model().to(torch.bfloat16)
    tokens, labels, orders = _inputs()
    expected = _in_order(model(tokens.bfloat16(), labels, orders).sample, orders)[:, :2].float()
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert model.blocks[0].attn.to_qkv.weight.dtype == torch.float8_e4m3fn
    cache = model.make_kv_cache(3)
    rows = [model(tokens.bfloat16(), labels, orders, kv_cache=cache).sample for _ in range(2)]
    assert all(keys.dtype == torch.bfloat16 for keys in cache.keys)  # not the float8 storage dtype
    # float8 weights move the conditions a little, not beyond the spread of the conditions themselves.
    assert (torch.cat(rows, dim=1).float() - expected).abs().mean() < 0.2 * expected.abs().mean()
