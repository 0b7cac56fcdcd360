"""VARTransformer2DModel: shapes, the block-causal mask, the KV cache against the full forward, the attention scale's
clamp, input errors, saving and loading, the shared AdaLN variant, and parity with FoundationVision/VAR."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from diffusers_mar import VARTransformer2DModel
from diffusers_mar.models.transformer_var import VARKVCache
from tests.testing_utils import REPO_ROOT, TINY_VAR_TRANSFORMER_CONFIG, perturb_

SCALES = [(0, 1), (1, 5), (5, 14)]  # [start, end) of each scale in the sequence


def _model(seed: int = 0, **overrides) -> VARTransformer2DModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return perturb_(VARTransformer2DModel(**{**TINY_VAR_TRANSFORMER_CONFIG, **overrides}), seed, std=0.2).eval()


def _inputs(seed: int = 0, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([1, 10, 4][:batch]), torch.randn(batch, 13, 4, generator=g)


def _cached_logits(model: VARTransformer2DModel, labels: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """The logits of every scale, one call per scale with a KV cache, as the pipeline runs it."""
    cache = model.make_kv_cache(labels.shape[0])
    logits = []
    for scale, (start, end) in enumerate(SCALES):
        assert (cache.scale_index, cache.length) == (scale, start)
        scale_input = None if scale == 0 else hidden_states[:, start - 1 : end - 1]
        logits.append(model(labels, scale_input, kv_cache=cache).sample)
        assert logits[-1].shape == (labels.shape[0], end - start, 32)
    assert (cache.scale_index, cache.length) == (3, 14)
    return torch.cat(logits, dim=1)


@torch.no_grad()
def test_output_shapes_and_tuple_output():
    model = _model()
    labels, hidden_states = _inputs()
    output = model(labels, hidden_states)
    assert output.sample.shape == (3, 14, 32)
    as_tuple = model(labels, hidden_states=hidden_states, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and torch.equal(as_tuple[0], output.sample)
    assert model.num_tokens == 14 and model.block_causal_mask().shape == (14, 14)
    # One scale only: no teacher-forcing input, the start tokens alone.
    single = _model(patch_nums=[2])
    assert single(labels, torch.zeros(3, 0, 4)).sample.shape == (3, 4, 32)


@torch.no_grad()
def test_logits_of_a_scale_depend_only_on_the_inputs_of_that_and_earlier_scales():
    model = _model()
    labels, hidden_states = _inputs()
    reference = model(labels, hidden_states).sample
    for scale in (1, 2):
        start, end = SCALES[scale]
        changed = hidden_states.clone()
        changed[:, start - 1 : end - 1] = torch.randn(3, end - start, 4)  # the input of this scale
        output = model(labels, changed).sample
        assert torch.equal(output[:, :start], reference[:, :start])  # earlier scales: unchanged
        for later_start, later_end in SCALES[scale:]:  # this scale (every token sees all of it) and later ones
            assert (output[:, later_start:later_end] - reference[:, later_start:later_end]).abs().amax(-1).min() > 1e-4
    other_labels = model(torch.tensor([2, 3, 4]), hidden_states).sample
    assert torch.equal(other_labels[2], reference[2])
    assert (other_labels[:2] - reference[:2]).abs().amax(-1).min() > 1e-4  # the class conditions every token


def test_block_causal_mask():
    mask = _model().block_causal_mask()
    levels = torch.tensor([0, 1, 1, 1, 1] + [2] * 9)
    for query in range(14):
        for key in range(14):
            assert bool(mask[query, key]) == bool(levels[key] <= levels[query])


@torch.no_grad()
@pytest.mark.parametrize("shared_adaln", [False, True], ids=["adaln", "shared-adaln"])
def test_kv_cache_scale_by_scale_equals_the_full_forward(shared_adaln):
    model = _model(shared_adaln=shared_adaln)
    labels, hidden_states = _inputs()
    full = model(labels, hidden_states).sample
    torch.testing.assert_close(_cached_logits(model, labels, hidden_states), full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_kv_cache_is_allocated_in_the_compute_dtype_and_refuses_misuse():
    model = _model()
    labels, hidden_states = _inputs()
    cache = model.make_kv_cache(3)
    assert isinstance(cache, VARKVCache) and cache.keys == [None, None]
    with pytest.raises(ValueError, match="hidden_states"):
        model(labels, hidden_states[:, :1], kv_cache=cache)  # scale 0 takes no input
    model(labels, kv_cache=cache)
    assert all(k.shape == (3, 2, 14, 8) and k.dtype == torch.float32 for k in cache.keys)
    with pytest.raises(ValueError, match="hidden_states"):
        model(labels, kv_cache=cache)  # scale 1 needs its input
    with pytest.raises(ValueError, match=r"hidden_states.*\(3, 4, 4\)"):
        model(labels, hidden_states[:, :3], kv_cache=cache)
    model(labels, hidden_states[:, :4], kv_cache=cache)
    model(labels, hidden_states[:, 4:], kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache"):
        model(labels, hidden_states[:, 4:], kv_cache=cache)  # every scale is done
    with pytest.raises(ValueError, match="kv_cache"):
        model(labels[:2], kv_cache=model.make_kv_cache(3))  # wrong batch
    with pytest.raises(ValueError, match="kv_cache"):
        model(labels, kv_cache=_model(patch_nums=[1, 2]).make_kv_cache(3))  # another model's scales


@torch.no_grad()
def test_attention_scale_is_the_clamped_exponential_of_the_learned_log_scale():
    model = _model()
    labels, hidden_states = _inputs()
    for block in model.blocks:
        block.attn.log_scale.data.fill_(math.log(100.0))
    at_the_limit = model(labels, hidden_states).sample
    for block in model.blocks:
        block.attn.log_scale.data.fill_(7.0)  # exp(7) > 100: clamped to 100
    torch.testing.assert_close(model(labels, hidden_states).sample, at_the_limit, rtol=0, atol=1e-6)
    for block in model.blocks:
        block.attn.log_scale.data.fill_(math.log(50.0))
    assert not torch.allclose(model(labels, hidden_states).sample, at_the_limit)


def test_input_errors_name_the_argument():
    model = _model()
    labels, hidden_states = _inputs()
    with pytest.raises(ValueError, match=r"hidden_states.*\(3, 13, 4\)"):
        model(labels, hidden_states[:, :12])
    with pytest.raises(ValueError, match="hidden_states"):
        model(labels, hidden_states[..., :3])
    with pytest.raises(ValueError, match="hidden_states"):
        model(labels)  # teacher forcing needs the input
    with pytest.raises(ValueError, match="hidden_states"):
        model(labels[:2], hidden_states)  # batch differs from the labels'
    with pytest.raises(ValueError, match="class_labels"):
        model(labels.float(), hidden_states)
    with pytest.raises(ValueError, match="class_labels"):
        model(labels[:, None], hidden_states)
    with pytest.raises(ValueError, match="patch_nums"):
        VARTransformer2DModel(**{**TINY_VAR_TRANSFORMER_CONFIG, "patch_nums": []})
    with pytest.raises(ValueError, match="patch_nums"):
        VARTransformer2DModel(**{**TINY_VAR_TRANSFORMER_CONFIG, "patch_nums": [1, 0, 2]})


@pytest.mark.parametrize("shared_adaln", [False, True], ids=["adaln", "shared-adaln"])
def test_save_load_round_trip(tmp_path, shared_adaln):
    model = _model(shared_adaln=shared_adaln)
    labels, hidden_states = _inputs()
    model.save_pretrained(tmp_path)
    loaded = VARTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.patch_nums == [1, 2, 3] and loaded.config.shared_adaln is shared_adaln
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in model.config.items() if not k.startswith("_")
    }
    with torch.no_grad():
        assert torch.equal(loaded(labels, hidden_states).sample, model(labels, hidden_states).sample)
    assert (
        type(VARTransformer2DModel(patch_nums=(1, 2), num_layers=1, num_attention_heads=1).config.patch_nums) is list
    )


@torch.no_grad()
def test_shared_adaln_variant_projects_the_class_once_and_adds_a_table_per_block():
    model = _model(shared_adaln=True)
    assert model.shared_adaln_proj.weight.shape == (6 * 16, 16)
    assert all(block.adaln_proj is None and block.adaln_table.shape == (1, 1, 6, 16) for block in model.blocks)
    assert not any(".adaln_proj." in name for name, _ in model.named_parameters())
    labels, hidden_states = _inputs()
    reference = model(labels, hidden_states).sample
    model.blocks[1].adaln_table.data[:, :, 0] += 0.5  # the second block's attention gate
    assert not torch.allclose(model(labels, hidden_states).sample, reference)
    plain = _model()
    assert plain.shared_adaln_proj is None and all(block.adaln_table is None for block in plain.blocks)


def test_initialization_follows_the_original():
    torch.manual_seed(0)
    wide = {**TINY_VAR_TRANSFORMER_CONFIG, "num_attention_heads": 4, "attention_head_dim": 64}
    model = VARTransformer2DModel(**wide)
    dim, depth, std = 256, 2, math.sqrt(1 / 256 / 3)  # init_std=-1: the original's automatic std
    assert model.class_embedding.weight.std().item() == pytest.approx(std, rel=0.1)
    assert model.pos_embed.std().item() == pytest.approx(std, rel=0.1)
    assert model.proj_out.weight.std().item() == pytest.approx(std * 0.02, rel=0.1)
    assert model.proj_out.bias.abs().max() == 0 and model.norm_out.linear.bias.abs().max() == 0
    block = model.blocks[0]
    assert block.attn.to_out.weight.std().item() == pytest.approx(std / math.sqrt(2 * depth), rel=0.1)
    assert block.adaln_proj.weight[2 * dim :].std().item() == pytest.approx(std * 0.5, rel=0.1)
    assert block.adaln_proj.weight[: 2 * dim].std().item() == pytest.approx(std * 1e-5, rel=0.1)
    assert block.attn.q_bias.abs().max() == 0 and block.attn.v_bias.abs().max() == 0
    assert torch.equal(block.attn.log_scale.data, torch.full((1, 4, 1, 1), 4.0).log())  # the queries times 4

    shared = VARTransformer2DModel(**{**wide, "shared_adaln": True})
    assert shared.shared_adaln_proj.weight.std().item() == pytest.approx(std, rel=0.1)
    table = shared.blocks[0].adaln_table  # N(0, 1 / width), then scales and shifts times 0.5, gates times 1e-5
    assert table[:, :, 2:].std().item() == pytest.approx(0.5 / math.sqrt(dim), rel=0.1)
    assert table[:, :, :2].std().item() == pytest.approx(1e-5 / math.sqrt(dim), rel=0.1)


def test_drop_path_drops_whole_samples_in_training_only():
    model = _model(drop_path_rate=0.3)
    assert [block.drop_path.p for block in model.blocks] == pytest.approx([0.0, 0.3])  # linear from 0 to the rate
    drop_path = model.blocks[1].drop_path.train()
    torch.manual_seed(0)
    out = drop_path(torch.ones(2000, 3, 4))
    kept = out[:, 0, 0] != 0
    assert torch.equal(out, kept[:, None, None] / 0.7 * torch.ones(1, 3, 4))  # a sample is dropped or scaled whole
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.03)
    assert torch.equal(drop_path.eval()(out), out)


def test_converter_refuses_checkpoints_without_normalised_attention_and_unknown_keys():
    from conversion.convert_var_to_diffusers import convert_transformer_state_dict

    old = {"blocks.0.attn.mat_qkv.weight": torch.zeros(48, 16), "blocks.0.attn.q_bias": torch.zeros(16)}
    with pytest.raises(ValueError, match="attn_l2_norm=False"):
        convert_transformer_state_dict(old)
    new = {
        **old,
        "blocks.0.attn.scale_mul_1H11": torch.zeros(1, 2, 1, 1),
        "blocks.0.attn.zero_k_bias": torch.zeros(16),
    }
    assert set(convert_transformer_state_dict(new)) == {
        "blocks.0.attn.to_qkv.weight",
        "blocks.0.attn.q_bias",
        "blocks.0.attn.log_scale",
    }
    with pytest.raises(ValueError, match="blocks.0.attn.rel_pos"):
        convert_transformer_state_dict({**new, "blocks.0.attn.rel_pos": torch.zeros(1)})
    with pytest.raises(ValueError, match="zero_k_bias"):
        convert_transformer_state_dict({**new, "blocks.0.attn.zero_k_bias": torch.ones(16)})


@torch.no_grad()
def test_autocast_embeds_in_float32_and_runs_the_blocks_in_the_autocast_dtype():
    # As the original's forward: the embeddings outside autocast, then the residual stream in the autocast dtype.
    model = _model()
    labels, hidden_states = _inputs()
    seen = {}
    model.proj_in.register_forward_hook(lambda module, args, output: seen.update(proj_in=output.dtype))
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.update(block=(args[0].dtype, args[1].dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(labels, hidden_states).sample
    assert seen == {"proj_in": torch.float32, "block": (torch.bfloat16, torch.bfloat16)}
    reference = model(labels, hidden_states).sample
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max()


# ---------------------------------------------------------------------------------------------------------------------
# Parity with FoundationVision/VAR (78b9539): tensors recorded by tests/fixtures/record_var_fixtures.py from the
# official code on the CPU in float32 (see tests/fixtures/var_tiny/README.md). One block's attention scale is past
# the clamp.

VAR_FIXTURES = REPO_ROOT / "tests/fixtures/var_tiny"
requires_var_fixtures = pytest.mark.skipif(
    not all((VAR_FIXTURES / name).is_file() for name in ("io.safetensors", "config.json", "var_tiny.pth")),
    reason=f"VAR fixtures not found in {VAR_FIXTURES}",
)
NULL_LABEL = 10  # the fixture's num_classes: the unconditional class


@functools.lru_cache
def _fixture_io() -> dict[str, torch.Tensor]:
    return load_file(VAR_FIXTURES / "io.safetensors")


@functools.lru_cache
def _fixture_model(variant: str = "var") -> VARTransformer2DModel:
    """The recorded VAR (`var` or `var_shared_aln`) converted by `convert_transformer_state_dict`, loaded strictly."""
    from conversion.convert_var_to_diffusers import convert_transformer_state_dict, transformer_config_from_state_dict

    kwargs = json.loads((VAR_FIXTURES / "config.json").read_text())["var_kwargs"]
    file = {"var": "var_tiny.pth", "var_shared_aln": "var_tiny_shared_aln.pth"}[variant]
    state_dict = torch.load(VAR_FIXTURES / file, map_location="cpu", weights_only=True)
    config = {
        "patch_nums": kwargs["patch_nums"],
        "vocab_size": 64,  # the VQ-VAE's
        "vq_embed_dim": 8,
        "num_layers": kwargs["depth"],
        "num_attention_heads": kwargs["num_heads"],
        "attention_head_dim": kwargs["embed_dim"] // kwargs["num_heads"],
        "mlp_ratio": kwargs["mlp_ratio"],
        "num_classes": kwargs["num_classes"],
        "norm_eps": kwargs["norm_eps"],
        "drop_path_rate": kwargs["drop_path_rate"],
        "shared_adaln": variant == "var_shared_aln",
    }
    inferred = transformer_config_from_state_dict(state_dict, patch_nums=kwargs["patch_nums"])
    assert {k: v for k, v in inferred.items() if k != "drop_path_rate"} == {
        k: v for k, v in config.items() if k in inferred and k != "drop_path_rate"
    }
    model = VARTransformer2DModel(**config).eval()
    model.load_state_dict(convert_transformer_state_dict(state_dict), strict=True)
    return model


@requires_var_fixtures
@pytest.mark.parity
@pytest.mark.parametrize("case", ["conditional", "unconditional", "labels-dropped", "shared-adaln"])
def test_teacher_forced_logits_match_original(case):
    io = _fixture_io()
    model = _fixture_model("var_shared_aln" if case == "shared-adaln" else "var")
    labels, expected = io["var.labels"], io["var.logits"]  # [3, 10]: a class and the unconditional class
    if case == "shared-adaln":
        expected = io["var_shared_aln.logits"]
    elif case == "unconditional":  # the original's cond_drop_rate=1 replaces every label by the null class
        labels, expected = torch.full_like(io["var.labels_uncond"], NULL_LABEL), io["var.logits_uncond"]
    elif case == "labels-dropped":  # its cond_drop_rate=0.5 with a recorded draw: the caller drops labels
        labels = torch.where(io["var.drop_rand"] < 0.5, NULL_LABEL, io["var.labels_uncond"])
        expected = io["var.logits_drop0.5"]
    with torch.no_grad():
        logits = model(labels, io["vae.var_input"]).sample
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@requires_var_fixtures
@pytest.mark.parity
@pytest.mark.parametrize("case", ["sample_cfg1.5", "sample_cfg4", "sample_shared_aln"])
def test_kv_cache_logits_of_each_scale_match_the_original_sampler(case):
    # The original's autoregressive_infer_cfg: the batch [labels; null labels], scale 0 from the class, scale s + 1
    # from the VQ-VAE's next-scale map of scale s, repeated for both halves.
    io = _fixture_io()
    model = _fixture_model("var_shared_aln" if case == "sample_shared_aln" else "var")
    labels = io[f"{case}.labels"]
    labels = torch.cat([labels, torch.full_like(labels, NULL_LABEL)])
    cache = model.make_kv_cache(labels.shape[0])
    scale_inputs = []
    with torch.no_grad():
        for scale in range(4):
            scale_input = None
            if scale > 0:
                scale_input = io[f"{case}.next.{scale - 1}"].flatten(2).transpose(1, 2).repeat(2, 1, 1)  # (2B, n, C)
                scale_inputs.append(scale_input)
            logits = model(labels, scale_input, kv_cache=cache).sample
            torch.testing.assert_close(logits, io[f"{case}.logits.{scale}"], rtol=0, atol=1e-5)
        if case == "sample_cfg1.5":  # the original's masked forward on the sampled tokens, teacher forced
            full = model(labels, torch.cat(scale_inputs, dim=1)).sample
            torch.testing.assert_close(full, io[f"{case}.teacher_forced_logits"], rtol=0, atol=1e-5)


@requires_var_fixtures
def test_converter_drops_the_rebuilt_buffers_and_refuses_the_old_attention():
    from conversion.convert_var_to_diffusers import convert_transformer_state_dict

    state_dict = torch.load(VAR_FIXTURES / "var_tiny.pth", map_location="cpu", weights_only=True)
    converted = convert_transformer_state_dict(state_dict)
    assert not any("zero_k_bias" in k or k in ("lvl_1L", "attn_bias_for_masking") for k in converted)
    assert converted.keys() == _fixture_model().state_dict().keys()
    old = {k: v for k, v in state_dict.items() if not k.endswith("scale_mul_1H11")}
    with pytest.raises(ValueError, match="scale_mul_1H11"):
        convert_transformer_state_dict(old)
