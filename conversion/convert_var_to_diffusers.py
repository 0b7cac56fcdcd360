"""Convert the official FoundationVision/VAR transformer weights (`var_d16.pth` ... `var_d36.pth`) to diffusers-mar.

`convert_transformer_state_dict` maps a `VAR` state dict to `VARTransformer2DModel`'s;
`transformer_config_from_state_dict` reads the sizes from the tensor shapes. Only checkpoints with normalised attention
(`attn_l2_norm=True`, the released weights since April 2024, with `scale_mul_1H11` keys) are accepted.

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
