"""The KL-16 VAE of LTH14/mar (`models/vae.py`, an LDM KL autoencoder) as a diffusers `AutoencoderKL`.

| LTH14/mar `models/vae.py` `AutoencoderKL` (`kl16.ckpt["model"]`) | diffusers `AutoencoderKL` |
|---|---|
| `{en,de}coder.conv_in`, `.conv_out`, `.norm_out` | `{en,de}coder.conv_in`, `.conv_out`, `.conv_norm_out` |
| `encoder.down.i.block.j` (`nin_shortcut`) | `encoder.down_blocks.i.resnets.j` (`conv_shortcut`) |
| `encoder.down.i.attn.j` (`norm`, `q`, `k`, `v`, `proj_out`, 1x1 convs) | `encoder.down_blocks.i.attentions.j` (`group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0`, linears) |
| `encoder.down.i.downsample.conv` | `encoder.down_blocks.i.downsamplers.0.conv` |
| `decoder.up.i.block.j`, `decoder.up.i.upsample.conv` | `decoder.up_blocks.(n-1-i).resnets.j`, `.upsamplers.0.conv` (levels reversed) |
| `{en,de}coder.mid.block_1`, `.block_2`, `.attn_1` | `{en,de}coder.mid_block.resnets.0`, `.resnets.1`, `.attentions.0` |
| `quant_conv`, `post_quant_conv` | same names |
| `loss.*` (LPIPS / discriminator of a training checkpoint, if present) | dropped |
"""

from __future__ import annotations

import os
import re

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    update_vae_attentions_ldm_to_diffusers,
)

from conversion.checkpoints import load_checkpoint, load_state_dict_strict

# The KL-16 VAE's latent scale (LTH14/mar main_mar.py / engine_mar.py multiply latents by 0.2325).
KL16_SCALING_FACTOR = 0.2325
_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def load_original_vae_state_dict(path: str | os.PathLike, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of an original KL VAE file (`kl16.ckpt` = `{"model": state_dict}`; LDM `state_dict` also works).

    Training-only `loss.*` tensors (LPIPS, discriminator) are dropped; any other unknown key is an error.
    """
    state_dict = load_checkpoint(path, trust_checkpoint=trust_checkpoint, argument="vae_path")
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ValueError(f"`--vae_path` {str(path)!r} holds no VAE state dict (expected `{{'model': state_dict}}`).")
    for prefix in ("first_stage_model.", "vae."):  # LDM / combined checkpoints
        if any(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith("loss.")}
    unknown = sorted(key for key in state_dict if not key.startswith(_VAE_PREFIXES))
    if unknown or "encoder.conv_in.weight" not in state_dict:
        raise ValueError(
            f"`--vae_path` {str(path)!r} is not an LDM-style KL VAE (LTH14/mar models/vae.py): "
            f"unknown keys {unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
            + ("" if "encoder.conv_in.weight" in state_dict else ", no `encoder.conv_in.weight`")
            + "."
        )
    return state_dict


def _levels(keys, prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for key in keys if (m := re.match(rf"^{re.escape(prefix)}(\d+)\.", key))})


def infer_vae_config(
    state_dict: dict[str, torch.Tensor],
    norm_num_groups: int = 32,
    sample_size: int = 256,
    scaling_factor: float = KL16_SCALING_FACTOR,
) -> dict:
    """The diffusers `AutoencoderKL` config that reproduces an original KL VAE, from its tensor shapes.

    Widths, depth, latent channels and the levels with attention come from the shapes; the GroupNorm group count
    does not (KL-16 uses 32). An encoder level with `attn` blocks becomes an `AttnDownEncoderBlock2D` (KL-16: the
    last one); the decoder's levels have no attention in KL-16 and are `UpDecoderBlock2D`.
    """
    try:
        levels = _levels(state_dict, "encoder.down.")
        widths = [state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
        layers_per_block = len(_levels(state_dict, "encoder.down.0.block."))
        latent_channels = state_dict["post_quant_conv.weight"].shape[0]
        quant_shape = tuple(state_dict["quant_conv.weight"].shape)
        encoder_out = state_dict["encoder.conv_out.weight"].shape[0]
        in_channels = state_dict["encoder.conv_in.weight"].shape[1]
        out_channels = state_dict["decoder.conv_out.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"`--vae_path` is not an LDM-style KL VAE: missing {error}.") from None
    if levels != list(range(len(levels))) or not levels:
        raise ValueError(f"The VAE encoder levels are not 0..n-1: {levels}.")
    if encoder_out != 2 * latent_channels or quant_shape[:2] != (2 * latent_channels, 2 * latent_channels):
        raise ValueError(
            f"The VAE shapes are inconsistent: `encoder.conv_out` has {encoder_out} channels, `quant_conv` "
            f"{quant_shape[:2]}, `post_quant_conv` {latent_channels} (expected 2C, (2C, 2C), C: a variational VAE)."
        )
    bad_groups = [width for width in widths if width % norm_num_groups]
    if bad_groups:
        raise ValueError(
            f"`--vae_norm_num_groups` {norm_num_groups} does not divide the VAE widths {widths}; the KL-16 VAE uses 32."
        )
    if any(".attn." in key for key in state_dict if key.startswith("decoder.up.")):
        raise ValueError("VAE decoder levels with attention are not supported (the KL-16 VAE has none).")
    down_types = [
        "AttnDownEncoderBlock2D"
        if any(k.startswith(f"encoder.down.{i}.attn.") for k in state_dict)
        else "DownEncoderBlock2D"
        for i in levels
    ]
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": down_types,
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": widths,
        "layers_per_block": layers_per_block,
        "act_fn": "silu",
        "latent_channels": latent_channels,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state_dict,
    }


def convert_vae_state_dict(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Map an original KL VAE state dict to diffusers `AutoencoderKL` keys.

    diffusers' own LDM helper (`convert_ldm_vae_checkpoint`) maps everything but the attention inside encoder levels
    (KL-16 has it in the last level), which goes through diffusers' attention-key helper here.
    """
    level_attention = {key for key in state_dict if re.match(r"^encoder\.down\.\d+\.attn\.", key)}
    converted = convert_ldm_vae_checkpoint(
        {key: value for key, value in state_dict.items() if key not in level_attention}, config
    )
    for level in _levels(level_attention, "encoder.down."):
        keys = sorted(key for key in level_attention if key.startswith(f"encoder.down.{level}.attn."))
        mapping = {"old": f"down.{level}.attn", "new": f"down_blocks.{level}.attentions"}
        update_vae_attentions_ldm_to_diffusers(keys, converted, state_dict, mapping)
    if len(converted) != len(state_dict):
        raise ValueError(f"VAE conversion mapped {len(state_dict)} tensors to {len(converted)} keys.")
    return converted


def build_vae(state_dict: dict[str, torch.Tensor], config: dict, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """A diffusers `AutoencoderKL` with the original VAE's weights (strict, cast to `dtype` if given), in eval mode."""
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    converted = convert_vae_state_dict(state_dict, config)
    if dtype is not None:
        converted = {key: value.to(dtype) for key, value in converted.items()}
    load_state_dict_strict(vae, converted, "VAE")
    return vae.eval()
