"""Tiny configs and fixture loaders shared by the tests."""

from __future__ import annotations

import argparse
import functools
import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from diffusers_mar import (
    ARPipeline,
    ARTransformer2DModel,
    MARDDPMScheduler,
    MARDiffusionHead,
    MARPipeline,
    MARTransformer2DModel,
    VARPipeline,
    VARTransformer2DModel,
    VARVQModel,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = Path(os.environ.get("MAR_FIXTURES_DIR", REPO_ROOT.parent / "shared" / "fixtures" / "mar_tiny"))

# Every file of the fixture folder that the tests read (`original_config.json` and README.md are documentation).
FIXTURE_FILES = ("io.safetensors", "checkpoint-last.pth", "vae_tiny.ckpt")


def missing_fixture_files(folder: Path) -> list[str]:
    return [name for name in FIXTURE_FILES if not (folder / name).is_file()]


MISSING_FIXTURES = missing_fixture_files(FIXTURES_DIR)
FIXTURES_FOUND = not MISSING_FIXTURES
# GitHub Actions, GitLab CI and most other CI services set CI=true; there a missing fixture folder is an error, so a CI
# run without the fixtures cannot pass without checking numerics (issue 12).
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
NOT_FOUND = f"LTH14/mar fixtures not found in {FIXTURES_DIR} (missing: {', '.join(MISSING_FIXTURES)})"


def requires_fixtures(test):
    """Decorate a test that reads the LTH14/mar fixtures: marked `parity`; skipped when they are missing, failed when
    `CI` is set. A pytest fixture that reads them starts with `if not fixtures_or_skip(): return None`."""
    test = pytest.mark.parity(test)
    if FIXTURES_FOUND:
        return test
    if not IN_CI:
        return pytest.mark.skip(reason=NOT_FOUND)(test)

    @functools.wraps(test)  # keeps the signature, so pytest still passes fixtures and parameters
    def fail(*args, **kwargs):
        pytest.fail(
            f"{NOT_FOUND} and CI is set: parity tests must not skip in CI. Put the fixtures in "
            "../shared/fixtures/mar_tiny or point MAR_FIXTURES_DIR at them (unset CI to skip).",
            pytrace=False,
        )

    return fail


def fixtures_or_skip() -> bool:
    """For a pytest fixture that reads the fixture files: True when they are there. Without them it skips the test,
    except under CI: it returns False, the fixture returns None and the test, decorated `requires_fixtures`, fails
    with the message above (a skip here would come before that decorator's check, issue 29)."""
    if FIXTURES_FOUND:
        return True
    if not IN_CI:
        pytest.skip(NOT_FOUND)
    return False


# The fixture model: LTH14/mar MAR(img_size=64, vae_stride=16, 64 wide, 2+2 blocks, 4 heads, buffer 4, 10 classes).
FIXTURE_TRANSFORMER_CONFIG = {
    "sample_size": 4,
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "buffer_size": 4,
    "num_classes": 10,
}
FIXTURE_HEAD_CONFIG = {"in_channels": 16, "model_channels": 64, "condition_channels": 64, "num_res_blocks": 2}

# A tiny pixel-space model: 8x8 single-channel images cut into 2x2 patches (16 tokens of 4 values).
TINY_PIXEL_TRANSFORMER_CONFIG = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 1,
    "num_layers": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "buffer_size": 2,
    "num_classes": 10,
}
TINY_PIXEL_HEAD_CONFIG = {"in_channels": 4, "model_channels": 16, "condition_channels": 16, "num_res_blocks": 1}
# The causal AR transformer for the same tokens: two blocks of width 16 (the MAR one's encoder + decoder depth).
TINY_AR_TRANSFORMER_CONFIG = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 1,
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "num_classes": 10,
}
# A VAR transformer over three scales of 1, 4 and 9 tokens (14 in all) of a 32-code, 4-channel VQ codebook.
TINY_VAR_TRANSFORMER_CONFIG = {
    "patch_nums": [1, 2, 3],
    "vocab_size": 32,
    "vq_embed_dim": 4,
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "num_classes": 10,
}

# Its VQ-VAE: 6x6 RGB images, 2x downsampling to the last 3x3 scale, the same codebook (32 codes of 4 channels).
TINY_VAR_VQ_CONFIG = {
    "sample_size": 6,
    "ch": 8,
    "ch_mult": (1, 1),
    "num_res_blocks": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "num_vq_embeddings": 32,
    "patch_nums": (1, 2, 3),
}


def perturb_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (the original zero-inits the head's AdaLN and output, which hides code paths)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)
    return module


def make_tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A random KL VAE for the tiny configs: 16x16 RGB images <-> 8x8 one-channel latents, scaling factor 0.5."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),
            latent_channels=1,
            norm_num_groups=4,
            scaling_factor=0.5,
        )
    return vae.eval()


def make_tiny_pipeline(seed: int = 0, vae=None, ar: bool = False, **scheduler_kwargs) -> MARPipeline | ARPipeline:
    """A random tiny pixel-space pipeline (or latent-space if a `vae` is given with matching configs); `ar=True`:
    an `ARPipeline` with the causal transformer."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the initialisation draws from the global RNG
        if ar:
            transformer = perturb_(ARTransformer2DModel(**TINY_AR_TRANSFORMER_CONFIG), seed).eval()
        else:
            transformer = perturb_(MARTransformer2DModel(**TINY_PIXEL_TRANSFORMER_CONFIG), seed).eval()
        head = perturb_(MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG), seed + 1).eval()
    pipeline_class = ARPipeline if ar else MARPipeline
    pipe = pipeline_class(transformer, head, MARDDPMScheduler(**scheduler_kwargs), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_var_pipeline(seed: int = 0, **kwargs) -> VARPipeline:
    """A random tiny `VARPipeline` (`TINY_VAR_TRANSFORMER_CONFIG`, `TINY_VAR_VQ_CONFIG`); `kwargs` go to the
    constructor (`id2label`, `sampling`)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the initialisation draws from the global RNG
        # Perturbed: the original's initialisation scales the head by 0.02, which leaves nearly uniform logits.
        transformer = perturb_(VARTransformer2DModel(**TINY_VAR_TRANSFORMER_CONFIG), seed, std=0.2).eval()
        vqvae = VARVQModel(**TINY_VAR_VQ_CONFIG).eval()
    pipe = VARPipeline(transformer, vqvae, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@lru_cache
def fixture_io() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES_DIR / "io.safetensors")


@lru_cache
def fixture_checkpoint() -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(FIXTURES_DIR / "checkpoint-last.pth", map_location="cpu", weights_only=True)


def fixture_models(weights: str = "model_ema") -> tuple[MARTransformer2DModel, MARDiffusionHead]:
    """The fixture MAR mapped by the converter's state-dict functions (EMA weights, as the fixtures use)."""
    from conversion.convert_mar_to_diffusers import convert_mar_state_dict

    transformer_sd, head_sd = convert_mar_state_dict(fixture_checkpoint()[weights])
    transformer = MARTransformer2DModel(**FIXTURE_TRANSFORMER_CONFIG).eval()
    head = MARDiffusionHead(**FIXTURE_HEAD_CONFIG).eval()
    transformer.load_state_dict(transformer_sd, strict=True)
    head.load_state_dict(head_sd, strict=True)
    return transformer, head


def fixture_pipeline() -> MARPipeline:
    transformer, head = fixture_models()
    pipe = MARPipeline(transformer, head, MARDDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fixture_trace_noise(case: str, num_steps: int) -> list[torch.Tensor]:
    """Recorded x_T and step noises of a `sample_tokens` trace, in the pipeline's `noise` layout."""
    io = fixture_io()
    batch_size = io[f"{case}.labels"].shape[0]
    noise = []
    for step in range(num_steps):
        x_t = io[f"{case}.step{step}.x_T"]  # (B * n, C), batch-major rows
        n = x_t.shape[0] // batch_size
        step_noise = io[f"{case}.step{step}.noise"][:, : batch_size * n]  # conditional rows only
        noise.append(torch.cat([x_t[None], step_noise]).reshape(-1, batch_size, n, x_t.shape[1]))
    return noise


# The VAR fixtures (recorded from FoundationVision/VAR by tests/fixtures/record_var_fixtures.py) live in the repository.
VAR_FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures" / "var_tiny"
# The fixture VQ-VAE: official `VQVAE(vocab_size=64, z_channels=8, ch=32)` with an (ch_mult=(2, 1)) encoder/decoder,
# 8 px images, scales 1, 2, 3, 4.
VAR_FIXTURE_VAE_CONFIG = {
    "sample_size": 8,
    "ch": 32,
    "ch_mult": (2, 1),
    "num_res_blocks": 2,
    "latent_channels": 8,
    "num_vq_embeddings": 64,
    "patch_nums": (1, 2, 3, 4),
}


@lru_cache
def var_sample_atol(case: str) -> float:
    """The absolute tolerance of a recorded VAR sampling case's latents and images. 1e-5, except `more_smooth`:
    its Gumbel softmax at temperatures down to ~0.014 multiplies float32 rounding of the logits by ~50, so the
    original itself, recorded again on an AVX2 CPU (the fixtures come from an AVX-512 one), differs from its own
    recording by 4.5e-5 in the last scale's `f_hat` (and ours equals that AVX2 recording within 1e-5). The logits
    and indices of every case keep 1e-5 and exact equality. See tests/fixtures/var_tiny/README.md."""
    return 1e-4 if case == "sample_smooth" else 1e-5


def var_fixture_io() -> dict[str, torch.Tensor]:
    return load_file(VAR_FIXTURES_DIR / "io.safetensors")


@lru_cache
def var_fixture_config() -> dict:
    return json.loads((VAR_FIXTURES_DIR / "config.json").read_text())


def var_fixture_vae_state_dict(share_quant_resi: int = 4) -> dict[str, torch.Tensor]:
    """The official state_dict of the fixture VQ-VAE with 4 (`vae_tiny.pth`), 0 or 1 phi-sharing mode: the 0 and 1
    variants are `vae_tiny.pth` with its phi replaced by `vae_tiny_qsr<k>_phi.pth`."""
    state_dict = torch.load(VAR_FIXTURES_DIR / "vae_tiny.pth", map_location="cpu", weights_only=True)
    if share_quant_resi == 4:
        return state_dict
    phi = torch.load(
        VAR_FIXTURES_DIR / f"vae_tiny_qsr{share_quant_resi}_phi.pth", map_location="cpu", weights_only=True
    )
    shared = {k: v for k, v in state_dict.items() if not k.startswith("quantize.quant_resi.")}
    return {**shared, **phi}


def var_fixture_vae(share_quant_resi: int = 4) -> VARVQModel:
    """The fixture VQ-VAE mapped by the converter's `convert_vae_state_dict` and loaded strictly."""
    from conversion.convert_var_to_diffusers import convert_vae_state_dict

    model = VARVQModel(**VAR_FIXTURE_VAE_CONFIG, share_quant_resi=share_quant_resi).eval()
    model.load_state_dict(convert_vae_state_dict(var_fixture_vae_state_dict(share_quant_resi)), strict=True)
    return model


@lru_cache
def var_fixture_transformer(variant: str = "var") -> VARTransformer2DModel:
    """The recorded VAR (`var` or `var_shared_aln`) with the config the converter infers, mapped by
    `convert_transformer_state_dict` and loaded strictly."""
    from conversion.convert_var_to_diffusers import convert_transformer_state_dict, transformer_config_from_state_dict

    file = {"var": "var_tiny.pth", "var_shared_aln": "var_tiny_shared_aln.pth"}[variant]
    state_dict = torch.load(VAR_FIXTURES_DIR / file, map_location="cpu", weights_only=True)
    config = transformer_config_from_state_dict(state_dict, patch_nums=var_fixture_config()["patch_nums"])
    model = VARTransformer2DModel(**config).eval()
    model.load_state_dict(convert_transformer_state_dict(state_dict), strict=True)
    return model


def var_fixture_pipeline(variant: str = "var") -> VARPipeline:
    """A `VARPipeline` of the recorded VAR and VQ-VAE (no sampling settings stored: each call passes its own)."""
    pipe = VARPipeline(var_fixture_transformer(variant), var_fixture_vae())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def tiny_transformer_inputs(batch: int = 3, known: int = 5, seed: int = 0):
    """(tokens, mask, labels, predict_indices) for the tiny pixel transformer: `known` known tokens per row."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, 16, 4, generator=generator)
    orders = torch.stack([torch.randperm(16, generator=generator) for _ in range(batch)])
    mask = torch.ones(batch, 16).scatter(1, orders[:, :known], 0.0)
    predict = orders[:, known : known + 4].sort(dim=1).values
    labels = torch.tensor([1, 10, 4][:batch])
    return tokens, mask, labels, predict
