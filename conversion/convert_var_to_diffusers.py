"""Convert the official FoundationVision/VAR checkpoints into diffusers-mar models.

This file holds the VQ-VAE weight mapping: `convert_vae_state_dict` turns the state_dict of VAR's `VQVAE`
(`vae_ch160v4096z32.pth`, a plain `torch.save`d state_dict) into a `VARVQModel` one, and `vae_config_from_state_dict`
reads the sizes from it.

Key mapping (VAR `VQVAE` -> `VARVQModel`; `n` = number of levels, decoder levels are stored in reverse):

| VAR | `VARVQModel` |
|---|---|
| `encoder.down.i.block.j.{norm1,conv1,norm2,conv2}` | `encoder.down_blocks.i.resnets.j.{same}` |
| `encoder.down.i.block.j.nin_shortcut` | `encoder.down_blocks.i.resnets.j.conv_shortcut` |
| `encoder.down.i.attn.j.norm` | `encoder.down_blocks.i.attentions.j.group_norm` |
| `encoder.down.i.attn.j.qkv` (1x1 conv, rows [q; k; v]) | `encoder.down_blocks.i.attentions.j.{to_q,to_k,to_v}` (linear) |
| `encoder.down.i.attn.j.proj_out` (1x1 conv) | `encoder.down_blocks.i.attentions.j.to_out.0` (linear) |
| `encoder.down.i.downsample.conv` | `encoder.down_blocks.i.downsamplers.0.conv` |
| `{en,de}coder.mid.block_1`, `.attn_1`, `.block_2` | `{en,de}coder.mid_block.resnets.0`, `.attentions.0`, `.resnets.1` |
| `{en,de}coder.norm_out`, `conv_in`, `conv_out` | `{en,de}coder.conv_norm_out`, `conv_in`, `conv_out` |
| `decoder.up.i.block.j`, `.attn.j` | `decoder.up_blocks.(n - 1 - i).resnets.j`, `.attentions.j` (as the encoder's) |
| `decoder.up.i.upsample.conv` | `decoder.up_blocks.(n - 1 - i).upsamplers.0.conv` |
| `quant_conv`, `post_quant_conv` | same names |
| `quantize.embedding.weight` | `embedding.weight` |
| `quantize.quant_resi.qresi_ls.k` (share 4), `.qresi` (share 1), `.k` (share 0) | `phi.k` (`phi.0` when shared) |
| `quantize.ema_vocab_hit_SV` (codebook usage statistics of training) | dropped |
"""

from __future__ import annotations

import re

import torch

_PHI_KEY = re.compile(r"quantize\.quant_resi\.(?:qresi_ls\.(\d+)|qresi|(\d+))\.(weight|bias)")
_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_DROPPED = ("quantize.ema_vocab_hit_SV",)


def _num_levels(state_dict: dict[str, torch.Tensor], coder: str) -> int:
    part = "down" if coder == "encoder" else "up"
    levels = {int(m.group(1)) for key in state_dict if (m := re.match(rf"{coder}\.{part}\.(\d+)\.", key))}
    if not levels:
        raise ValueError(f"The state_dict has no `{coder}.{part}.*` keys: it is not a VAR VQVAE state_dict.")
    return max(levels) + 1


def _convert_attention(prefix: str, rest: str, value: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """`norm`, `qkv` (split into q, k, v) or `proj_out` of an LDM `AttnBlock` (1x1 convs) -> diffusers `Attention`."""
    part, param = rest.rsplit(".", 1)
    if part == "norm":
        out[f"{prefix}.group_norm.{param}"] = value
    elif part == "qkv":
        value = value.reshape(value.shape[0], -1) if param == "weight" else value
        for name, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
            out[f"{prefix}.{name}.{param}"] = chunk.contiguous()
    elif part == "proj_out":
        out[f"{prefix}.to_out.0.{param}"] = value.reshape(value.shape[0], -1) if param == "weight" else value
    else:
        raise ValueError(f"Unknown attention key {prefix}.{rest}.")


def _convert_coder_key(key: str, value: torch.Tensor, num_levels: int, out: dict[str, torch.Tensor]) -> bool:
    """Map one `encoder.*` / `decoder.*` key into `out`; False when the key is not an encoder / decoder key."""
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if m is None:
        return False
    coder, rest = m.groups()
    if m2 := re.fullmatch(r"(conv_in|conv_out|norm_out)\.(weight|bias)", rest):
        name = "conv_norm_out" if m2.group(1) == "norm_out" else m2.group(1)
        out[f"{coder}.{name}.{m2.group(2)}"] = value
    elif m2 := re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(.+)", rest):
        block, tail = m2.groups()
        if block == "attn_1":
            _convert_attention(f"{coder}.mid_block.attentions.0", tail, value, out)
        else:
            part, param = tail.rsplit(".", 1)
            out[f"{coder}.mid_block.resnets.{int(block[-1]) - 1}.{_RESNET_PARTS[part]}.{param}"] = value
    elif m2 := re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)", rest):
        _, level, kind, j, tail = m2.groups()
        block = f"{coder}.{_block_name(coder, int(level), num_levels)}"
        if kind == "attn":
            _convert_attention(f"{block}.attentions.{j}", tail, value, out)
        else:
            part, param = tail.rsplit(".", 1)
            out[f"{block}.resnets.{j}.{_RESNET_PARTS[part]}.{param}"] = value
    elif m2 := re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", rest):
        _, level, kind, param = m2.groups()
        sampler = "downsamplers" if kind == "downsample" else "upsamplers"
        out[f"{coder}.{_block_name(coder, int(level), num_levels)}.{sampler}.0.conv.{param}"] = value
    else:
        raise ValueError(f"Unknown VAR VQVAE key {key}.")
    return True


def _block_name(coder: str, level: int, num_levels: int) -> str:
    # The LDM decoder stores its levels from the finest (0) up and runs them in reverse; diffusers runs them in order.
    return f"down_blocks.{level}" if coder == "encoder" else f"up_blocks.{num_levels - 1 - level}"


def convert_vae_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a FoundationVision/VAR `VQVAE` state_dict to `VARVQModel` keys (table in the module docstring).

    The training statistics buffer `quantize.ema_vocab_hit_SV` is dropped; any key the table does not know raises a
    `ValueError`, so that `load_state_dict(..., strict=True)` of the result is the whole check.
    """
    num_levels = _num_levels(state_dict, "decoder")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in _DROPPED or _convert_coder_key(key, value, num_levels, out):
            continue
        if key in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"):
            out[key] = value
        elif key == "quantize.embedding.weight":
            out["embedding.weight"] = value
        elif m := _PHI_KEY.fullmatch(key):
            out[f"phi.{m.group(1) or m.group(2) or 0}.{m.group(3)}"] = value
        else:
            raise ValueError(f"Unknown VAR VQVAE key {key}.")
    return out


def vae_config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
    """The `VARVQModel` sizes a VAR `VQVAE` state_dict fixes: `ch`, `ch_mult`, `num_res_blocks`, `latent_channels`,
    `num_vq_embeddings`, `vq_embed_dim`, `share_quant_resi` and, for per-scale phi, the number of scales. The
    schedule (`patch_nums`, `sample_size`), `quant_resi` and `norm_num_groups` are not in the weights."""
    ch = state_dict["encoder.conv_in.weight"].shape[0]
    num_levels = _num_levels(state_dict, "encoder")
    ch_mult = tuple(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(num_levels))
    num_res_blocks = len({k.split(".")[4] for k in state_dict if k.startswith("encoder.down.0.block.")})
    codebook = state_dict["quantize.embedding.weight"]
    phi = {m.group(0).rsplit(".", 1)[0] for key in state_dict if (m := _PHI_KEY.fullmatch(key))}
    if any(".qresi_ls." in name for name in phi):
        share_quant_resi = len(phi)
    elif any(name.endswith(".qresi") for name in phi):
        share_quant_resi = 1
    else:
        share_quant_resi = 0
    config = {
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks,
        "latent_channels": state_dict["encoder.conv_out.weight"].shape[0],
        "num_vq_embeddings": codebook.shape[0],
        "vq_embed_dim": codebook.shape[1],
        "share_quant_resi": share_quant_resi,
    }
    if share_quant_resi == 0:
        config["num_scales"] = len(phi)
    return config
