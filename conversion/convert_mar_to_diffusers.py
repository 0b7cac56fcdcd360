"""Convert official LTH14/mar checkpoints into diffusers-mar components.

Importable functions (used by tests and benchmarks) plus, below, the command line.

Key mapping (original -> diffusers-mar):

| LTH14/mar `MAR` | `MARTransformer2DModel` |
|---|---|
| `class_emb.weight` + `fake_latent` | `class_embedding.weight` (`fake_latent` is the last row, label `num_classes`) |
| `z_proj`, `z_proj_ln` | `proj_in`, `proj_in_norm` |
| `encoder_pos_embed_learned`, `decoder_pos_embed_learned` | `encoder_pos_embed`, `decoder_pos_embed` |
| `diffusion_pos_embed_learned` | `diffusion_pos_embed` |
| `{en,de}coder_blocks.i.attn.qkv`, `.attn.proj` | `{en,de}coder_blocks.i.attn.to_qkv`, `.attn.to_out` |
| `{en,de}coder_blocks.i.mlp.fc1`, `.mlp.fc2` | `{en,de}coder_blocks.i.ff.fc1`, `.ff.fc2` |
| `norm1`, `norm2`, `encoder_norm`, `decoder_embed`, `mask_token`, `decoder_norm` | same names |

| LTH14/mar `diffloss.net` (`SimpleMLPAdaLN`) | `MARDiffusionHead` |
|---|---|
| `time_embed.mlp.0`, `time_embed.mlp.2` | `time_embedding.linear_1`, `time_embedding.linear_2` |
| `cond_embed`, `input_proj` | `cond_proj`, `proj_in` |
| `res_blocks.i.in_ln`, `.mlp.0`, `.mlp.2` | `res_blocks.i.norm`, `.linear_1`, `.linear_2` |
| `res_blocks.i.adaLN_modulation.1` (3W rows each) | rows `[3Wi, 3W(i+1))` of `adaln_modulation` |
| `final_layer.adaLN_modulation.1` (2W rows) | the last 2W rows of `adaln_modulation` |
| `final_layer.linear` | `proj_out` |
"""

from __future__ import annotations

import re

import torch

_TRANSFORMER_RENAMES = [
    (r"^z_proj\.", "proj_in."),
    (r"^z_proj_ln\.", "proj_in_norm."),
    (r"^encoder_pos_embed_learned$", "encoder_pos_embed"),
    (r"^decoder_pos_embed_learned$", "decoder_pos_embed"),
    (r"^diffusion_pos_embed_learned$", "diffusion_pos_embed"),
    (r"^(encoder|decoder)_blocks\.(\d+)\.attn\.qkv\.", r"\1_blocks.\2.attn.to_qkv."),
    (r"^(encoder|decoder)_blocks\.(\d+)\.attn\.proj\.", r"\1_blocks.\2.attn.to_out."),
    (r"^(encoder|decoder)_blocks\.(\d+)\.mlp\.(fc1|fc2)\.", r"\1_blocks.\2.ff.\3."),
    (r"^(encoder|decoder)_blocks\.(\d+)\.(norm1|norm2)\.", r"\1_blocks.\2.\3."),
    (r"^(encoder_norm|decoder_embed|decoder_norm)\.", r"\1."),
    (r"^mask_token$", "mask_token"),
]
_HEAD_RENAMES = [
    (r"^time_embed\.mlp\.0\.", "time_embedding.linear_1."),
    (r"^time_embed\.mlp\.2\.", "time_embedding.linear_2."),
    (r"^cond_embed\.", "cond_proj."),
    (r"^input_proj\.", "proj_in."),
    (r"^res_blocks\.(\d+)\.in_ln\.", r"res_blocks.\1.norm."),
    (r"^res_blocks\.(\d+)\.mlp\.0\.", r"res_blocks.\1.linear_1."),
    (r"^res_blocks\.(\d+)\.mlp\.2\.", r"res_blocks.\1.linear_2."),
    (r"^final_layer\.linear\.", "proj_out."),
]
_TRANSFORMER_INVERSE = [
    (r"^proj_in\.", "z_proj."),
    (r"^proj_in_norm\.", "z_proj_ln."),
    (r"^(encoder|decoder|diffusion)_pos_embed$", r"\1_pos_embed_learned"),
    (r"\.attn\.to_qkv\.", ".attn.qkv."),
    (r"\.attn\.to_out\.", ".attn.proj."),
    (r"\.ff\.", ".mlp."),
]
_HEAD_PREFIX = "diffloss.net."


def _rename(key: str, renames: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in renames:
        new_key, count = re.subn(pattern, replacement, key)
        if count:
            return new_key
    return None


def _num_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.match(rf"^{re.escape(prefix)}(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def convert_mar_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map an original `MAR` state dict to `(transformer_state_dict, diffusion_head_state_dict)`.

    Every key must be mapped; an unknown key raises `KeyError` listing all of them.
    """
    transformer, head, unexpected = {}, {}, []
    modulation_weights, modulation_biases = {}, {}
    for key, value in state_dict.items():
        if key == "class_emb.weight" or key == "fake_latent":
            continue
        if key.startswith(_HEAD_PREFIX):
            sub = key[len(_HEAD_PREFIX) :]
            m = re.match(r"^(res_blocks\.(\d+)|final_layer)\.adaLN_modulation\.1\.(weight|bias)$", sub)
            if m:
                slot = int(m.group(2)) if m.group(2) is not None else -1
                (modulation_weights if m.group(3) == "weight" else modulation_biases)[slot] = value
                continue
            new_key = _rename(sub, _HEAD_RENAMES)
            (head.__setitem__(new_key, value) if new_key else unexpected.append(key))
            continue
        new_key = _rename(key, _TRANSFORMER_RENAMES)
        (transformer.__setitem__(new_key, value) if new_key else unexpected.append(key))

    if "class_emb.weight" not in state_dict or "fake_latent" not in state_dict:
        unexpected.append("<missing class_emb.weight or fake_latent>")
    if unexpected:
        raise KeyError(f"Not a MAR checkpoint, or an unknown layout; keys that cannot be mapped: {unexpected}")
    transformer["class_embedding.weight"] = torch.cat([state_dict["class_emb.weight"], state_dict["fake_latent"]])
    order = sorted(k for k in modulation_weights if k >= 0) + [-1]
    if set(modulation_weights) != set(order) or set(modulation_biases) != set(order):
        raise KeyError("The diffusion head's adaLN_modulation weights are incomplete.")
    head["adaln_modulation.weight"] = torch.cat([modulation_weights[k] for k in order])
    head["adaln_modulation.bias"] = torch.cat([modulation_biases[k] for k in order])
    return transformer, head


def convert_diffusers_to_mar_state_dict(
    transformer_state_dict: dict[str, torch.Tensor], head_state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inverse of `convert_mar_state_dict`: diffusers-mar weights in the original `MAR` layout."""
    original = {}
    for key, value in transformer_state_dict.items():
        if key == "class_embedding.weight":
            original["class_emb.weight"], original["fake_latent"] = value[:-1], value[-1:]
            continue
        original[_rename(key, _TRANSFORMER_INVERSE) or key] = value

    inverse_head = [
        ("time_embedding.linear_1.", "time_embed.mlp.0."),
        ("time_embedding.linear_2.", "time_embed.mlp.2."),
        ("cond_proj.", "cond_embed."),
        ("proj_in.", "input_proj."),
        ("proj_out.", "final_layer.linear."),
    ]
    num_blocks = _num_blocks(head_state_dict, "res_blocks.")
    for key, value in head_state_dict.items():
        if key.startswith("adaln_modulation."):
            kind = key.split(".")[-1]
            width = value.shape[0] // (3 * num_blocks + 2)
            for i in range(num_blocks):
                original[f"{_HEAD_PREFIX}res_blocks.{i}.adaLN_modulation.1.{kind}"] = value[
                    3 * width * i : 3 * width * (i + 1)
                ]
            original[f"{_HEAD_PREFIX}final_layer.adaLN_modulation.1.{kind}"] = value[3 * width * num_blocks :]
            continue
        m = re.match(r"^res_blocks\.(\d+)\.(norm|linear_1|linear_2)\.(.*)$", key)
        if m:
            sub = {"norm": "in_ln", "linear_1": "mlp.0", "linear_2": "mlp.2"}[m.group(2)]
            original[f"{_HEAD_PREFIX}res_blocks.{m.group(1)}.{sub}.{m.group(3)}"] = value
            continue
        for old, new in inverse_head:
            if key.startswith(old):
                original[_HEAD_PREFIX + new + key[len(old) :]] = value
                break
        else:
            raise KeyError(f"Unknown diffusion head key {key!r}.")
    return original


_KNOWN_HEADS = {768: 12, 1024: 16, 1280: 16}


def infer_mar_configs(
    state_dict: dict[str, torch.Tensor],
    in_channels: int | None = None,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
) -> tuple[dict, dict]:
    """Infer `(transformer_config, diffusion_head_config)` from the tensor shapes of an original state dict.

    The number of attention heads is not visible in the shapes: widths 768/1024/1280 use the MAR-B/L/H values,
    any other width needs `num_attention_heads`. `in_channels` (the VAE's channels, default 16) separates the token
    width into channels and patch size.
    """
    try:
        encoder_dim = state_dict["class_emb.weight"].shape[1]
        decoder_dim = state_dict["decoder_embed.weight"].shape[0]
        num_tokens = state_dict["diffusion_pos_embed_learned"].shape[1]
        token_dim = state_dict["z_proj.weight"].shape[1]
        buffer_size = state_dict["encoder_pos_embed_learned"].shape[1] - num_tokens
        mlp_hidden = state_dict["encoder_blocks.0.mlp.fc1.weight"].shape[0]
        head_width, head_in = state_dict[_HEAD_PREFIX + "input_proj.weight"].shape
    except KeyError as error:
        raise KeyError(f"Not a MAR checkpoint: missing {error}.") from None

    def heads(dim: int, given: int | None, name: str) -> int:
        if given is not None:
            return given
        if dim not in _KNOWN_HEADS:
            raise ValueError(f"Width {dim} is not MAR-B/L/H; pass `{name}` (the number of attention heads).")
        return _KNOWN_HEADS[dim]

    in_channels = 16 if in_channels is None else in_channels
    patch_size = round((token_dim / in_channels) ** 0.5)
    grid = round(num_tokens**0.5)
    if in_channels * patch_size**2 != token_dim or grid * grid != num_tokens:
        raise ValueError(
            f"Token width {token_dim} and {num_tokens} tokens do not fit `in_channels`={in_channels} on a square grid."
        )
    encoder_heads = heads(encoder_dim, num_attention_heads, "num_attention_heads")
    decoder_heads = heads(
        decoder_dim, decoder_num_attention_heads or num_attention_heads, "decoder_num_attention_heads"
    )
    transformer_config = {
        "sample_size": grid * patch_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "num_layers": _num_blocks(state_dict, "encoder_blocks."),
        "num_attention_heads": encoder_heads,
        "attention_head_dim": encoder_dim // encoder_heads,
        "decoder_num_layers": _num_blocks(state_dict, "decoder_blocks."),
        "decoder_num_attention_heads": decoder_heads,
        "decoder_attention_head_dim": decoder_dim // decoder_heads,
        "mlp_ratio": mlp_hidden / encoder_dim,
        "buffer_size": buffer_size,
        "num_classes": state_dict["class_emb.weight"].shape[0],
    }
    head_config = {
        "in_channels": head_in,
        "model_channels": head_width,
        "condition_channels": state_dict[_HEAD_PREFIX + "cond_embed.weight"].shape[1],
        "num_res_blocks": _num_blocks(state_dict, _HEAD_PREFIX + "res_blocks."),
        "out_channels": state_dict[_HEAD_PREFIX + "final_layer.linear.weight"].shape[0],
    }
    return transformer_config, head_config
