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

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import torch
from huggingface_hub import ModelCard

from conversion.checkpoints import load_checkpoint, load_id2label, load_state_dict_strict
from conversion.command_line import DTYPES, add_output_arguments, check_output_arguments, run_converter
from conversion.folder import check_output_dir, save_pipeline_folder
from conversion.hub import push_folder_to_hub
from conversion.original_var import build_original_var, is_var_checkout
from conversion.verify import VerificationError, stored_dtypes
from diffusers_mar import VAR_PRESETS, VARTransformer2DModel, VARVQModel
from diffusers_mar.configs import VAR_PATCH_NUMS
from diffusers_mar.pipelines.model_card import VAR_CITATION, make_model_card

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


# ---------------------------------------------------------------------------------------------------------------------
# The command line: the official tokenizer and transformer checkpoints -> a VARPipeline folder

PROG = "convert_var_to_diffusers.py"
PRESET_TITLES = {name: "VAR-" + name.split("-")[1] for name in VAR_PRESETS}


def infer_patch_nums(num_tokens: int, patch_nums: list[int] | None = None) -> list[int]:
    """The scale schedule of a transformer with `num_tokens` tokens: `patch_nums` if given (checked), else the
    official 256 or 512 px schedule that has that many tokens."""
    if patch_nums is not None:
        if sum(p * p for p in patch_nums) != num_tokens:
            raise ValueError(
                f"`--patch_nums` {list(patch_nums)} make {sum(p * p for p in patch_nums)} tokens; the checkpoint's "
                f"`pos_1LC` has {num_tokens}."
            )
        return list(patch_nums)
    for schedule in VAR_PATCH_NUMS.values():
        if sum(p * p for p in schedule) == num_tokens:
            return list(schedule)
    raise ValueError(
        f"The checkpoint has {num_tokens} tokens, which is neither official schedule "
        f"({', '.join(f'{r} px: {sum(p * p for p in s)}' for r, s in VAR_PATCH_NUMS.items())}); pass `--patch_nums`."
    )


def preset_of(transformer_config: dict) -> str | None:
    """The `var-d*` preset with this transformer config, if any."""
    keys = ("patch_nums", "vocab_size", "vq_embed_dim", "num_layers", "num_attention_heads", "attention_head_dim")
    keys += ("num_classes", "shared_adaln")
    for name, preset in VAR_PRESETS.items():
        if all(preset["transformer"][key] == transformer_config[key] for key in keys):
            return name
    return None


def build_var_models(
    vae_state_dict: dict[str, torch.Tensor],
    var_state_dict: dict[str, torch.Tensor],
    patch_nums: list[int] | None = None,
    norm_num_groups: int = 32,
    dtype: torch.dtype = torch.float32,
) -> tuple[VARVQModel, VARTransformer2DModel]:
    """The converted `VARVQModel` and `VARTransformer2DModel`, loaded strictly, in `dtype`."""
    converted = convert_transformer_state_dict(var_state_dict)  # first: it names what an old checkpoint lacks
    transformer_config = transformer_config_from_state_dict(
        var_state_dict, infer_patch_nums(var_state_dict["pos_1LC"].shape[1], patch_nums)
    )
    vqvae_config = vae_config_from_state_dict(vae_state_dict)
    if vqvae_config["vq_embed_dim"] != transformer_config["vq_embed_dim"] or (
        vqvae_config["num_vq_embeddings"] != transformer_config["vocab_size"]
    ):
        raise ValueError(
            f"The tokenizer has {vqvae_config['num_vq_embeddings']} codes of {vqvae_config['vq_embed_dim']} values, "
            f"the transformer predicts {transformer_config['vocab_size']} codes of {transformer_config['vq_embed_dim']}"
            "; is `--vae_path` the tokenizer this transformer was trained with?"
        )
    num_scales = vqvae_config.pop("num_scales", None)
    if num_scales is not None and num_scales != len(transformer_config["patch_nums"]):
        raise ValueError(
            f"The tokenizer has one phi per scale for {num_scales} scales; the transformer has "
            f"{len(transformer_config['patch_nums'])}."
        )
    downsample = 2 ** (len(vqvae_config["ch_mult"]) - 1)
    vqvae_config |= {
        "patch_nums": transformer_config["patch_nums"],
        "sample_size": downsample * transformer_config["patch_nums"][-1],
        "norm_num_groups": norm_num_groups,
    }
    vqvae = VARVQModel(**vqvae_config)
    load_state_dict_strict(vqvae, convert_vae_state_dict(vae_state_dict), "VARVQModel")
    transformer = VARTransformer2DModel(**transformer_config)
    load_state_dict_strict(transformer, converted, "VARTransformer2DModel")
    return vqvae.to(dtype).eval(), transformer.to(dtype).eval()


def var_model_card(
    vqvae: VARVQModel,
    transformer: VARTransformer2DModel,
    preset_name: str | None,
    sampling: dict,
    vae_name: str,
    var_name: str,
    dtype: str = "fp32",
    repo_id: str | None = None,
) -> ModelCard:
    """The `README.md` of a converted VAR folder, from the package's model-card template."""
    config = transformer.config
    title = PRESET_TITLES.get(preset_name, "VAR (custom size)")
    side = vqvae.config.sample_size
    num_parameters = sum(p.numel() for p in transformer.parameters())
    description = (
        f"{title}, a model of *Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction* "
        "(Tian, Jiang, Yuan, Peng, Wang, NeurIPS 2024): class-conditional image generation by predicting a whole "
        "token map per step, coarse to fine, over the scales of a multi-scale residual VQ-VAE. Converted from the "
        f"[FoundationVision/VAR](https://github.com/FoundationVision/VAR) checkpoints `{var_name}` and `{vae_name}` "
        "into a diffusers-mar `VARPipeline` folder. `guidance_scale` is `1 + cfg` of the official code (docs/var.md)."
    )
    details = {
        "Source": f"FoundationVision/VAR `{var_name}` (transformer), `{vae_name}` (tokenizer)",
        "Architecture": (
            f"{config.num_layers} AdaLN transformer blocks ({transformer.inner_dim} wide, "
            f"{config.num_attention_heads} heads{', shared AdaLN' if config.shared_adaln else ''})"
        ),
        "Parameters": f"{num_parameters:,} (transformer); tokenizer {sum(p.numel() for p in vqvae.parameters()):,}",
        "Scales": f"{len(config.patch_nums)} token maps, sides {', '.join(map(str, config.patch_nums))} "
        f"({transformer.num_tokens} tokens), {side}x{side} px images",
        "Tokenizer": f"{vqvae.config.num_vq_embeddings} codes of {vqvae.config.vq_embed_dim} values",
        "Stored dtype": dtype,
    }
    if preset_name is not None:
        paper = VAR_PRESETS[preset_name]["paper"]
        sections = (
            "## Results in the paper\n\n"
            f"ImageNet {paper['resolution']}x{paper['resolution']}, FID-50K with the official FID setting "
            "(cfg 1.5, top-p 0.96, top-k 900, the folder's recommended settings), from the official README:\n\n"
            "| model | params | FID |\n|---|---:|---:|\n"
            f"| {title} | {paper['num_parameters']} | {paper['fid']} |\n\n"
            "These numbers are the paper's, not measured on this conversion (docs/evaluation.md says how to)."
        )
    else:
        sections = "## Results\n\nThis is not one of the released VAR sizes, so there are no published numbers for it."
    return make_model_card(
        title=f"{title} for diffusers",
        description=description,
        details=details,
        sampling=sampling,
        repo_id=repo_id or "path/to/this-folder",
        sections=sections,
        example_label=207 if config.num_classes == 1000 else 0,
        datasets=["imagenet-1k"] if config.num_classes == 1000 else None,
        pipeline_class="VARPipeline",
        citation=VAR_CITATION,
        tags=["diffusers", "diffusers-mar", "var", "image-generation", "class-conditional", "autoregressive"],
    )


def recommended_var_sampling(preset_name: str | None, vocab_size: int) -> dict:
    """The folder's recommended `VARPipeline.__call__` settings: the official FID setting, `top_k` at most the
    vocabulary."""
    sampling = dict(VAR_PRESETS[preset_name or "var-d16"]["sampling"])
    sampling["top_k"] = min(sampling["top_k"], vocab_size)
    return sampling


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert the official FoundationVision/VAR checkpoints (tokenizer + transformer) into a "
        "diffusers-mar VARPipeline folder.",
    )
    parser.add_argument("--vae_path", required=True, help="The official tokenizer, `vae_ch160v4096z32.pth`.")
    parser.add_argument("--var_path", required=True, help="The official transformer, `var_d16.pth` ... `var_d36.pth`.")
    parser.add_argument("--output_dir", required=True, help="Folder to write (must not exist or be empty).")
    parser.add_argument(
        "--model_type", choices=sorted(VAR_PRESETS), default=None, help="Preset to check against (default: inferred)."
    )
    parser.add_argument(
        "--patch_nums",
        type=int,
        nargs="+",
        default=None,
        help="Scale sides (default: the official 256 or 512 px schedule with the checkpoint's token count).",
    )
    parser.add_argument("--vae_norm_num_groups", type=int, default=32, help="GroupNorm groups of the tokenizer (32).")
    add_output_arguments(
        parser,
        "user/var-d16",
        "With --verify: a FoundationVision/VAR checkout; the folder must reproduce the official models and sampler "
        "(`autoregressive_infer_cfg`).",
    )
    args = parser.parse_args(argv)
    check_output_arguments(parser, args, "user/var-d16")
    if args.vae_norm_num_groups < 1:
        parser.error(f"`--vae_norm_num_groups` must be >= 1; got {args.vae_norm_num_groups}.")
    if args.patch_nums is not None and (
        min(args.patch_nums) < 1 or any(b <= a for a, b in zip(args.patch_nums, args.patch_nums[1:]))
    ):
        parser.error(f"`--patch_nums` must be increasing sides >= 1; got {args.patch_nums}.")
    if args.original_repo is not None and not is_var_checkout(args.original_repo):
        parser.error(
            f"`--original_repo` {args.original_repo!r} is not a FoundationVision/VAR checkout (no models/var.py)."
        )
    return args


def _load_state_dict(path: str, argument: str, trust_checkpoint: bool) -> dict[str, torch.Tensor]:
    state_dict = load_checkpoint(path, argument=argument, trust_checkpoint=trust_checkpoint)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"`--{argument}` {path!r} is not a state dict of tensors (the official files are).")
    return state_dict


def _plain_config(model: torch.nn.Module) -> dict:
    """A model's config as JSON would store it (tuples as lists), without diffusers' bookkeeping keys."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def verify_var_folder(folder: Path, pipeline, dtype: torch.dtype, use_safetensors: bool) -> None:
    """The written folder reloads to exactly the converted tensors, in the asked dtype."""
    from diffusers_mar import VARPipeline

    reloaded = VARPipeline.from_pretrained(folder, use_safetensors=use_safetensors)
    for name in ("vqvae", "transformer"):
        expected, actual = getattr(pipeline, name).state_dict(), getattr(reloaded, name).state_dict()
        changed = [key for key, value in expected.items() if not torch.equal(actual[key].to(value.dtype), value)]
        if changed or set(actual) != set(expected):
            raise VerificationError(f"Verification failed: reloaded `{name}` tensors differ: {changed[:10]}.")
        if _plain_config(reloaded.components[name]) != _plain_config(pipeline.components[name]):
            raise VerificationError(f"Verification failed: the saved `{name}` config differs from the converted one.")
    folder_dtypes = stored_dtypes(folder)
    if folder_dtypes != {dtype}:
        raise VerificationError(
            f"Verification failed: the folder stores {sorted(map(str, folder_dtypes))}, asked for {dtype}."
        )


def verify_against_original_var(
    pipeline, original_vqvae: torch.nn.Module, original_var: torch.nn.Module, sampling: dict, seed: int = 0
) -> dict[str, float]:
    """The converted models against the official ones: tokenizer indices on a random image, teacher-forced logits,
    and a sampled batch of two images (`autoregressive_infer_cfg(g_seed=seed)` against the pipeline with
    `generator=torch.Generator().manual_seed(seed)`). Returns the max differences; raises `VerificationError`."""
    generator = torch.Generator().manual_seed(seed)
    vqvae, transformer = pipeline.vqvae.float(), pipeline.transformer.float()
    side = vqvae.config.sample_size
    image = torch.rand(1, 3, side, side, generator=generator) * 2 - 1
    labels = torch.tensor([0, transformer.config.num_classes])
    diffs = {}
    with torch.no_grad():
        expected_indices = original_vqvae.img_to_idxBl(image)
        indices = vqvae.encode(image).indices
        if not all(torch.equal(a.reshape(-1), b.reshape(-1)) for a, b in zip(indices, expected_indices)):
            raise VerificationError("Verification failed: the tokenizer's indices differ from the official VQVAE's.")
        tokens = [
            torch.randint(0, transformer.config.vocab_size, (2, p * p), generator=generator)
            for p in vqvae.config.patch_nums
        ]
        inputs = original_vqvae.quantize.idxBl_to_var_input(tokens)
        expected_logits = original_var(labels, inputs)
        logits = transformer(labels, vqvae.teacher_forcing_input(tokens), return_dict=False)[0]
        diffs["logits"] = (logits - expected_logits).abs().max().item()
        cfg = sampling["guidance_scale"] - 1.0
        expected_images = original_var.autoregressive_infer_cfg(
            B=2,
            label_B=torch.tensor([0, 1]),
            g_seed=seed,
            cfg=cfg,
            top_k=sampling["top_k"],
            top_p=sampling["top_p"],
            more_smooth=sampling["more_smooth"],
        )  # (B, 3, H, W) in [0, 1]
        images = pipeline(
            class_labels=[0, 1],
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
            **sampling,
        ).images
        diffs["images"] = (images - expected_images).abs().max().item()
    if not diffs["logits"] <= 1e-4 * max(1.0, expected_logits.abs().max().item()) or not diffs["images"] <= 1e-4:
        raise VerificationError(f"Verification failed: the converted models differ from the official ones: {diffs}.")
    return diffs


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion described by the parsed command-line `args`; returns the output folder."""
    from diffusers_mar import VARPipeline

    # 1. Check the output folder before any heavy work
    inputs = (args.vae_path, args.var_path, args.id2label_path)
    check_output_dir(args.output_dir, args.overwrite, inputs)
    dtype = DTYPES[args.dtype]

    # 2. Load the official files and build the models
    vae_state_dict = _load_state_dict(args.vae_path, "vae_path", args.trust_checkpoint)
    var_state_dict = _load_state_dict(args.var_path, "var_path", args.trust_checkpoint)
    if "quantize.embedding.weight" not in vae_state_dict:
        raise ValueError(f"`--vae_path` {args.vae_path!r} is not a VAR tokenizer (no `quantize.embedding.weight`).")
    if "pos_1LC" not in var_state_dict:
        raise ValueError(f"`--var_path` {args.var_path!r} is not a VAR transformer (no `pos_1LC`).")
    vqvae, transformer = build_var_models(
        vae_state_dict, var_state_dict, args.patch_nums, args.vae_norm_num_groups, dtype
    )
    preset_name = preset_of(transformer.config)
    if args.model_type is not None and preset_name != args.model_type:
        raise ValueError(
            f"`--model_type {args.model_type}` does not match the checkpoint ({PRESET_TITLES.get(preset_name, 'a custom size')})."
        )

    # 3. The pipeline (recommended sampling settings in its config) and its card
    sampling = recommended_var_sampling(preset_name, transformer.config.vocab_size)
    id2label = load_id2label(args.id2label_path, transformer.config.num_classes)
    pipeline = VARPipeline(transformer, vqvae, id2label=id2label, sampling=sampling)
    card = var_model_card(
        vqvae,
        transformer,
        preset_name,
        sampling,
        vae_name=Path(args.vae_path).name,
        var_name=Path(args.var_path).name,
        dtype=args.dtype,
        repo_id=args.repo_id,
    )

    # 4. Save atomically, verifying the written folder (and the official outputs) before it gets its name
    verified = []

    def verify(folder: Path) -> None:
        verify_var_folder(folder, pipeline, dtype, use_safetensors=args.safe_serialization)
        verified.append("the folder reloads to the converted weights")
        if args.original_repo is not None:
            stored = {
                name: {k: v.to(dtype).float() for k, v in sd.items()}
                for name, sd in (("vae", vae_state_dict), ("var", var_state_dict))
            }
            original_vqvae, original_var = build_original_var(
                args.original_repo, stored["vae"], stored["var"], dict(vqvae.config), dict(transformer.config)
            )
            reference = VARPipeline(copy.deepcopy(transformer).float(), copy.deepcopy(vqvae).float())
            reference.set_progress_bar_config(disable=True)
            diffs = verify_against_original_var(reference, original_vqvae, original_var, sampling)
            verified.append(
                f"the tokenizer, the transformer and the sampler reproduce the official code of {args.original_repo} "
                f"(max differences {', '.join(f'{name} {diff:.1e}' for name, diff in diffs.items())})"
            )

    output_dir = save_pipeline_folder(
        pipeline,
        card,
        args.output_dir,
        safe_serialization=args.safe_serialization,
        overwrite=args.overwrite,
        inputs=inputs,
        check=verify if args.verify else None,
    )
    print(
        f"Converted {args.var_path} and {args.vae_path} ({PRESET_TITLES.get(preset_name, 'custom size')}, "
        f"{sum(p.numel() for p in transformer.parameters()):,} transformer parameters, {args.dtype}) to "
        f"{output_dir}{' (verified)' if args.verify else ''}."
    )
    if verified:
        print("Verified: " + "; ".join(verified) + ".")
    if args.push_to_hub:
        url = push_folder_to_hub(
            output_dir,
            args.repo_id,
            private=args.private,
            token=args.hub_token,
            commit_message="Add VAR pipeline converted from FoundationVision/VAR with diffusers-mar",
        )
        print(f"Uploaded to {url}")
    return output_dir


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes: 0 done, 2 bad input (nothing written), 1 a failure while running. Errors are one
    line on stderr, `convert_var_to_diffusers.py: error: ...` (`conversion/command_line.py`)."""
    return run_converter(PROG, parse_args, convert, argv)


if __name__ == "__main__":
    sys.exit(main())
