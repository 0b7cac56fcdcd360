"""Convert the official FoundationVision/VAR checkpoints into diffusers-mar models.

- `convert_vae_state_dict` turns the state_dict of VAR's `VQVAE` (`vae_ch160v4096z32.pth`, a plain `torch.save`d
  state_dict) into a `VARVQModel` one; `vae_config_from_state_dict` reads the sizes from it.
- `convert_transformer_state_dict` maps a `VAR` state dict (`var_d16.pth` ... `var_d36.pth`) to
  `VARTransformer2DModel`'s; `transformer_config_from_state_dict` reads the sizes from the tensor shapes. Only
  checkpoints with normalised attention (`attn_l2_norm=True`, the released weights since April 2024, with
  `scale_mul_1H11` keys) are accepted.

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

Key mapping (original -> diffusers-mar):

| FoundationVision/VAR `VAR` | `VARTransformer2DModel` |
|---|---|
| `class_emb.weight` (`num_classes + 1` rows, the last unconditional) | `class_embedding.weight` |
| `pos_start`, `pos_1LC`, `lvl_embed.weight` | `start_pos_embed`, `pos_embed`, `level_embedding.weight` |
| `word_embed` | `proj_in` |
| `shared_ada_lin.1` (`shared_aln=True`) | `shared_adaln_proj` |
| `blocks.i.ada_lin.1`, `blocks.i.ada_gss` | `blocks.i.adaln_proj`, `blocks.i.adaln_table` |
| `blocks.i.attn.mat_qkv.weight`, `.q_bias`, `.v_bias` | `blocks.i.attn.to_qkv.weight`, `.q_bias`, `.v_bias` |
| `blocks.i.attn.scale_mul_1H11`, `blocks.i.attn.proj` | `blocks.i.attn.log_scale`, `blocks.i.attn.to_out` |
| `blocks.i.ffn.fc1`, `blocks.i.ffn.fc2` | `blocks.i.ff.fc1`, `blocks.i.ff.fc2` |
| `head_nm.ada_lin.1`, `head` | `norm_out.linear`, `proj_out` |
| buffers `lvl_1L`, `attn_bias_for_masking`, `blocks.i.attn.zero_k_bias` | dropped (rebuilt by the model) |
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


# (original, diffusers-mar) key pairs; a pair ending in "." maps every key under that prefix, `{i}` is a block index.
TRANSFORMER_KEYS = [
    ("class_emb.weight", "class_embedding.weight"),
    ("pos_start", "start_pos_embed"),
    ("pos_1LC", "pos_embed"),
    ("lvl_embed.weight", "level_embedding.weight"),
    ("word_embed.", "proj_in."),
    ("shared_ada_lin.1.", "shared_adaln_proj."),
    ("blocks.{i}.ada_lin.1.", "blocks.{i}.adaln_proj."),
    ("blocks.{i}.ada_gss", "blocks.{i}.adaln_table"),
    ("blocks.{i}.attn.mat_qkv.weight", "blocks.{i}.attn.to_qkv.weight"),
    ("blocks.{i}.attn.q_bias", "blocks.{i}.attn.q_bias"),
    ("blocks.{i}.attn.v_bias", "blocks.{i}.attn.v_bias"),
    ("blocks.{i}.attn.scale_mul_1H11", "blocks.{i}.attn.log_scale"),
    ("blocks.{i}.attn.proj.", "blocks.{i}.attn.to_out."),
    ("blocks.{i}.ffn.fc1.", "blocks.{i}.ff.fc1."),
    ("blocks.{i}.ffn.fc2.", "blocks.{i}.ff.fc2."),
    ("head_nm.ada_lin.1.", "norm_out.linear."),
    ("head.", "proj_out."),
]
# Buffers of the original that the model computes itself.
DROPPED_KEYS = [
    re.compile(r"^lvl_1L$"),
    re.compile(r"^attn_bias_for_masking$"),
    re.compile(r"^blocks\.\d+\.attn\.zero_k_bias$"),
]


def _pattern(template: str) -> re.Pattern:
    return re.compile(
        "^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + ("" if template.endswith(".") else "$")
    )


_PATTERNS = [(_pattern(old), new) for old, new in TRANSFORMER_KEYS]


def convert_transformer_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an original `VAR` state dict to a `VARTransformer2DModel` state dict (see the module docstring).

    Raises a `ValueError` for a checkpoint without normalised attention (no `scale_mul_1H11`: trained with
    `attn_l2_norm=False`, before April 2024), for a nonzero `zero_k_bias`, and for keys that cannot be mapped.
    """
    if not any(key.endswith("attn.scale_mul_1H11") for key in state_dict):
        raise ValueError(
            "This VAR checkpoint has no `blocks.*.attn.scale_mul_1H11`: it was trained without normalised attention "
            "(`attn_l2_norm=False`, the weights released before April 2024). VARTransformer2DModel implements only "
            "`attn_l2_norm=True`; download the current weights (FoundationVision/var on the Hugging Face Hub)."
        )
    converted, unmapped = {}, []
    for key, value in state_dict.items():
        if any(pattern.match(key) for pattern in DROPPED_KEYS):
            if key.endswith("zero_k_bias") and torch.count_nonzero(value) > 0:
                raise ValueError(f"`{key}` is not zero: the model has no key bias.")
            continue
        for pattern, target in _PATTERNS:
            if match := pattern.match(key):
                index = match.groupdict().get("i")
                converted[(target if index is None else target.replace("{i}", index)) + key[match.end() :]] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"Not a VAR transformer checkpoint, or an unknown layout; keys that cannot be mapped: {unmapped}"
        )
    return converted


def transformer_config_from_state_dict(
    state_dict: dict[str, torch.Tensor], patch_nums: list[int] | tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
) -> dict:
    """The `VARTransformer2DModel` config of an original `VAR` state dict; `patch_nums` is not in the weights."""
    num_layers = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    num_heads = state_dict["blocks.0.attn.scale_mul_1H11"].shape[1]
    num_classes_plus_one, dim = state_dict["class_emb.weight"].shape
    num_tokens = state_dict["pos_1LC"].shape[1]
    if num_tokens != sum(p * p for p in patch_nums):
        raise ValueError(
            f"`patch_nums` {list(patch_nums)} make {sum(p * p for p in patch_nums)} tokens; the checkpoint's "
            f"`pos_1LC` has {num_tokens}."
        )
    return {
        "patch_nums": list(patch_nums),
        "vocab_size": state_dict["head.weight"].shape[0],
        "vq_embed_dim": state_dict["word_embed.weight"].shape[1],
        "num_layers": num_layers,
        "num_attention_heads": num_heads,
        "attention_head_dim": dim // num_heads,
        "mlp_ratio": state_dict["blocks.0.ffn.fc1.weight"].shape[0] / dim,
        "num_classes": num_classes_plus_one - 1,
        "drop_path_rate": 0.1 * num_layers / 24,
        "shared_adaln": "shared_ada_lin.1.weight" in state_dict,
    }
