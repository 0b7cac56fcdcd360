"""`--verify`: check a converted folder against the in-memory conversion and, given a checkout, the original code.

What it proves:
1. `verify_pipeline_folder`: the written folder reloads (`MARPipeline.from_pretrained`) to exactly the converted tensors
   in the asked dtype, and its transformer, diffusion head and VAE give the same outputs as the in-memory models (so
   the saved configs are right too).
2. `verify_against_original`: the converted transformer and diffusion head reproduce the ORIGINAL `MAR` on the same
   random inputs. The original is built by the LTH14/mar checkout's own factory (`args.model`, as its `main_mar.py`
   builds it), so the sizes the weights do not show (the attention head counts) come from the original code, not from
   the converter's inference.
Without a checkout only (1) runs; the head counts are then those of the original's factory named in the checkpoint, of
the width of MAR-B/L/H, or of `--num_attention_heads` (which the CLI refuses to call verified).
"""

from __future__ import annotations

import copy
import os
import sys
import types
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open

from diffusers_mar import MARPipeline
from diffusers_mar.pipelines.pipeline_autoregressive import vae_scale_factor

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# Top-level packages of a LTH14/mar checkout, dropped from `sys.modules` so that another checkout can be loaded.
_CHECKOUT_PACKAGES = ("models", "diffusion", "util")


class VerificationError(Exception):
    """`--verify` found a difference, or cannot check what it was asked to (the CLI exits with 1)."""


def stored_dtypes(folder: str | os.PathLike) -> set[torch.dtype]:
    """The dtypes of the weight files of a pipeline folder, read without loading the tensors where possible."""
    dtypes = set()
    for path in Path(folder).glob("*/*.safetensors"):
        with safe_open(path, framework="pt") as weights:
            dtypes |= {_SAFETENSORS_DTYPES[weights.get_slice(key).get_dtype()] for key in weights.keys()}
    for path in Path(folder).glob("*/*.bin"):
        dtypes |= {
            value.dtype for value in torch.load(path, map_location="cpu", weights_only=True, mmap=True).values()
        }
    return dtypes


def _float_copy(module: torch.nn.Module) -> torch.nn.Module:
    return module if next(module.parameters()).dtype == torch.float32 else copy.deepcopy(module).float()


def _random_inputs(transformer, head, generator: torch.Generator) -> dict[str, tuple[torch.Tensor, ...]]:
    """Inputs for the transformer (half the tokens unknown; a class and the unconditional row) and the head."""
    batch, num_tokens, rows = 2, transformer.num_tokens, 8
    order = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)
    return {
        "transformer": (
            torch.randn(batch, num_tokens, transformer.token_dim, generator=generator),
            torch.zeros(batch, num_tokens).scatter(1, order[:, : max(1, num_tokens // 2)], 1.0),  # (B, L), 1 = unknown
            torch.tensor([0, transformer.config.num_classes]),
        ),
        "diffusion_head": (
            torch.randn(rows, head.config.in_channels, generator=generator),
            torch.randint(0, 1000, (rows,), generator=generator),
            torch.randn(rows, head.config.condition_channels, generator=generator),
        ),
    }


def verify_pipeline_folder(
    folder: str | os.PathLike,
    pipeline: MARPipeline,
    dtype: torch.dtype = torch.float32,
    atol: float = 1e-5,
    use_safetensors: bool | None = None,
) -> dict[str, float]:
    """Reload `folder` with `MARPipeline.from_pretrained` and compare it with the in-memory `pipeline`.

    Checks the stored dtype and the tensors, then runs the transformer, the diffusion head (and the VAE's encoder and
    decoder, if any) of both on the same random inputs in float32. Returns the max abs output differences; raises
    `VerificationError` if a tensor differs or an output differs by more than `atol`. `use_safetensors` (the format
    the folder was written in) keeps diffusers from looking for the other format.
    """
    stored = stored_dtypes(folder)
    if stored != {dtype}:
        raise VerificationError(
            f"Verification failed: the folder stores {sorted(map(str, stored))}, asked for {dtype}."
        )
    diffusers_logging.disable_progress_bar()
    try:
        reloaded = MARPipeline.from_pretrained(folder, use_safetensors=use_safetensors)  # float32 copies
    finally:
        diffusers_logging.enable_progress_bar()
    if (pipeline.vae is None) != (reloaded.vae is None):
        raise VerificationError("Verification failed: the VAE was not saved or not reloaded.")
    names = ["transformer", "diffusion_head"] + (["vae"] if pipeline.vae is not None else [])
    expected = {name: _float_copy(getattr(pipeline, name)) for name in names}
    actual = {name: _float_copy(getattr(reloaded, name)) for name in names}
    changed = [
        f"{name}.{key}"
        for name in names
        for key, value in expected[name].state_dict().items()
        if not torch.equal(actual[name].state_dict()[key], value)
    ]
    if changed:
        raise VerificationError(
            f"Verification failed: reloaded tensors differ from the converted weights: {changed[:10]}."
        )

    generator = torch.Generator().manual_seed(0)
    inputs = _random_inputs(expected["transformer"], expected["diffusion_head"], generator)
    calls = {name: lambda model, args: model(*args, return_dict=False)[0] for name in inputs}
    if "vae" in names:
        config = expected["vae"].config
        side = 2 * vae_scale_factor(config)  # an image of 2 x 2 latent cells
        image = torch.rand(1, config.in_channels, side, side, generator=generator) * 2 - 1
        latents = torch.randn(1, config.latent_channels, 2, 2, generator=generator)
        inputs["vae.encode"], inputs["vae.decode"] = image, latents
        calls["vae.encode"] = lambda model, x: model.encode(x).latent_dist.parameters
        calls["vae.decode"] = lambda model, z: model.decode(z).sample
    diffs = {}
    with torch.no_grad():
        for name, call in calls.items():
            component = name.split(".")[0]
            output = call(actual[component], inputs[name])
            diffs[name] = (output - call(expected[component], inputs[name])).abs().max().item()
    bad = {name: diff for name, diff in diffs.items() if not diff <= atol}
    if bad:
        raise VerificationError(f"Verification failed: reloaded outputs differ from the converted weights by {bad}.")
    return diffs


def load_original_mar_module(original_repo: str | os.PathLike) -> types.ModuleType:
    """The `models.mar` module of a LTH14/mar checkout (through `conversion/original_mar.py`, which lets the official
    code import timm without torchvision), loaded afresh and without leaving the checkout on `sys.path`."""
    from conversion.original_mar import load_original_mar

    def forget_checkout() -> None:
        for name in [name for name in sys.modules if name.split(".")[0] in _CHECKOUT_PACKAGES]:
            del sys.modules[name]

    repo = str(Path(original_repo).resolve())
    forget_checkout()
    try:
        return load_original_mar(repo)
    finally:
        forget_checkout()
        while repo in sys.path:
            sys.path.remove(repo)


def build_original_mar(
    original_repo: str | os.PathLike,
    factory: str,
    state_dict: dict[str, torch.Tensor],
    transformer_config: dict,
    head_config: dict,
    vae_stride: int = 16,
) -> torch.nn.Module:
    """The original `MAR` built by the checkout's `models.mar.<factory>` (as its `main_mar.py` does, with the sizes the
    weights show) and loaded strictly with `state_dict`, in eval mode."""
    module = load_original_mar_module(original_repo)
    build = getattr(module, factory, None)
    if not callable(build):
        raise VerificationError(
            f"`--original_repo` {str(original_repo)!r}: models/mar.py has no factory `{factory}` (the checkpoint's "
            "`args.model`), so the original model cannot be rebuilt. Point it at the checkout that trained the model."
        )
    with torch.device("meta"):
        original = build(
            img_size=transformer_config["sample_size"] * vae_stride,
            vae_stride=vae_stride,
            patch_size=transformer_config["patch_size"],
            vae_embed_dim=transformer_config["in_channels"],
            class_num=transformer_config["num_classes"],
            buffer_size=transformer_config["buffer_size"],
            diffloss_d=head_config["num_res_blocks"],
            diffloss_w=head_config["model_channels"],
        )
    try:
        original.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise VerificationError(
            f"Verification failed: the original `{factory}` of `--original_repo` does not take this checkpoint's "
            f"weights: {str(error).splitlines()[0]}"
        ) from None
    return original.eval()


def _original_conditions(original: torch.nn.Module, tokens, mask, class_labels, num_classes: int) -> torch.Tensor:
    # As in LTH14/mar models/mar.py sample_tokens: `fake_latent` is the unconditional row (our label `num_classes`).
    class_embedding = original.class_emb(class_labels.clamp(max=num_classes - 1))
    unconditional = (class_labels == num_classes)[:, None]
    class_embedding = torch.where(unconditional, original.fake_latent.expand_as(class_embedding), class_embedding)
    return original.forward_mae_decoder(original.forward_mae_encoder(tokens.clone(), mask, class_embedding), mask)


def verify_against_original(pipeline: MARPipeline, original: torch.nn.Module, rtol: float = 1e-4) -> dict[str, float]:
    """Run the converted transformer and diffusion head and the `original` MAR on the same random inputs in float32.

    Returns the max abs differences; raises `VerificationError` if one exceeds `rtol` times the output's scale
    (at least 1). Give `original` the converted weights as stored (rounded to the stored dtype) to compare like with
    like.
    """
    transformer, head = _float_copy(pipeline.transformer), _float_copy(pipeline.diffusion_head)
    inputs = _random_inputs(transformer, head, torch.Generator().manual_seed(0))
    num_classes = transformer.config.num_classes
    with torch.no_grad():
        outputs = {
            "transformer": (
                transformer(*inputs["transformer"], return_dict=False)[0],
                _original_conditions(original.float(), *inputs["transformer"], num_classes),
            ),
            "diffusion_head": (
                head(*inputs["diffusion_head"], return_dict=False)[0],
                original.diffloss.net(*inputs["diffusion_head"]),
            ),
        }
    diffs = {name: (ours - theirs).abs().max().item() for name, (ours, theirs) in outputs.items()}
    scales = {name: max(1.0, theirs.abs().max().item()) for name, (_, theirs) in outputs.items()}
    bad = {name: diff for name, diff in diffs.items() if not diff <= rtol * scales[name]}
    if bad:
        heads = [
            getattr(blocks[0].attn, "num_heads", "?") for blocks in (original.encoder_blocks, original.decoder_blocks)
        ]
        config = transformer.config
        ours = [config.num_attention_heads, config.decoder_num_attention_heads or config.num_attention_heads]
        if heads == ours:
            cause = (
                f"The head counts agree ({ours[0]} / {ours[1]}), so the weight mapping of the converter or the "
                "model code differs from the original: please report it with this message."
            )
        else:
            cause = (
                f"The original has {heads[0]} encoder / {heads[1]} decoder attention heads, the conversion "
                f"{ours[0]} / {ours[1]}: check `--num_attention_heads` and `--decoder_num_attention_heads` (head "
                "counts are not in the weights)."
            )
        raise VerificationError(
            f"Verification failed: the converted model differs from the original LTH14/mar model by {bad}. {cause}"
        )
    return diffs
