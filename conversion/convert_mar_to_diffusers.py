"""Convert the official LTH14/mar checkpoints (and the KL-16 VAE) into a diffusers-mar `MARPipeline` folder.

```
python conversion/convert_mar_to_diffusers.py --checkpoint_path mar_base/checkpoint-last.pth --vae_path kl16.ckpt \
    --output_dir mar-base [--verify] [--push_to_hub --repo_id user/mar-base]
```

The importable `convert_*`, `infer_*`, `build_*` and `load_*` functions are used by the tests and benchmarks; `main()` is
the command line. `docs/conversion.md` explains the choices (EMA weights, VAE, model card, checks).

Key mapping (original -> diffusers-mar):

| LTH14/mar `MAR` | `MARTransformer2DModel` |
|---|---|
| `class_emb.weight` + `fake_latent` | `class_embedding.weight` (`fake_latent` is the last row, label `num_classes`) |
| `z_proj`, `z_proj_ln` | `proj_in`, `proj_in_norm` |
| `encoder_pos_embed_learned`, `decoder_pos_embed_learned` | `encoder_pos_embed`, `decoder_pos_embed` |
| `diffusion_pos_embed_learned` | `diffusion_pos_embed` |
| `{en,de}coder_blocks.i.attn.qkv`, `.attn.proj` | `{en,de}coder_blocks.i.attn.to_qkv` (kept fused, rows [q; k; v]), `.attn.to_out` |
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

import argparse
import copy
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    update_vae_attentions_ldm_to_diffusers,
)
from huggingface_hub import HfApi, ModelCard, ModelCardData
from safetensors import safe_open

from diffusers_mar import (
    MAR_PRESETS,
    MARDDPMScheduler,
    MARDiffusionHead,
    MARPipeline,
    MARTransformer2DModel,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# The KL-16 VAE's latent scale (LTH14/mar main_mar.py / engine_mar.py multiply latents by 0.2325).
KL16_SCALING_FACTOR = 0.2325
IMAGENET_ID2LABEL_PATH = Path(__file__).resolve().parent / "imagenet_id2label.json"
# `args.model` of the official checkpoints names one of these factories of LTH14/mar models/mar.py.
_ORIGINAL_MODEL_NAMES = {"mar_base": "mar-base", "mar_large": "mar-large", "mar_huge": "mar-huge"}
_PRESET_TITLES = {"mar-base": "MAR-B", "mar-large": "MAR-L", "mar-huge": "MAR-H"}

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
    patch_size: int | None = None,
) -> tuple[dict, dict]:
    """Infer `(transformer_config, diffusion_head_config)` from the tensor shapes of an original state dict.

    The number of attention heads is not visible in the shapes: widths 768/1024/1280 use the MAR-B/L/H values,
    any other width needs `num_attention_heads`. `in_channels` (the VAE's channels, default 16) or `patch_size`
    separates the token width into channels and patch size. Works on `meta` tensors (only shapes are read).
    """
    try:
        encoder_dim = state_dict["class_emb.weight"].shape[1]
        decoder_dim = state_dict["decoder_embed.weight"].shape[0]
        num_tokens = state_dict["diffusion_pos_embed_learned"].shape[1]
        token_dim = state_dict["z_proj.weight"].shape[1]
        buffer_size = state_dict["encoder_pos_embed_learned"].shape[1] - num_tokens
        mlp_hidden = state_dict["encoder_blocks.0.mlp.fc1.weight"].shape[0]
        head_width, head_in = state_dict[_HEAD_PREFIX + "input_proj.weight"].shape
        condition_channels = state_dict[_HEAD_PREFIX + "cond_embed.weight"].shape[1]
        head_out = state_dict[_HEAD_PREFIX + "final_layer.linear.weight"].shape[0]
        frequency_embedding_size = state_dict[_HEAD_PREFIX + "time_embed.mlp.0.weight"].shape[1]
    except KeyError as error:
        raise KeyError(f"Not a MAR checkpoint: missing {error}.") from None

    def heads(dim: int, given: int | None, name: str) -> int:
        if given is not None:
            return given
        if dim not in _KNOWN_HEADS:
            raise ValueError(f"Width {dim} is not MAR-B/L/H; pass `{name}` (the number of attention heads).")
        return _KNOWN_HEADS[dim]

    def check_divides(dim: int, num_heads: int, name: str) -> int:
        if dim % num_heads:
            raise ValueError(f"`{name}` {num_heads} does not divide the width {dim}.")
        return num_heads

    if in_channels is None:
        in_channels = 16 if patch_size is None else token_dim // patch_size**2
    if patch_size is None:
        patch_size = round((token_dim / in_channels) ** 0.5)
    grid = round(num_tokens**0.5)
    if in_channels * patch_size**2 != token_dim or grid * grid != num_tokens:
        raise ValueError(
            f"Token width {token_dim} and {num_tokens} tokens do not fit `in_channels`={in_channels} and "
            f"`patch_size`={patch_size} on a square grid."
        )
    encoder_heads = check_divides(
        encoder_dim, heads(encoder_dim, num_attention_heads, "num_attention_heads"), "num_attention_heads"
    )
    decoder_heads = check_divides(
        decoder_dim,
        heads(decoder_dim, decoder_num_attention_heads or num_attention_heads, "decoder_num_attention_heads"),
        "decoder_num_attention_heads",
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
        "condition_channels": condition_channels,
        "num_res_blocks": _num_blocks(state_dict, _HEAD_PREFIX + "res_blocks."),
        "out_channels": head_out,
        "frequency_embedding_size": frequency_embedding_size,
    }
    return transformer_config, head_config


# ----------------------------------------------------------------------------------------------------------------------
# Loading the original files
# ----------------------------------------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike, trust_checkpoint: bool = False, argument: str = "checkpoint_path"
) -> dict:
    """Load an original `.pth` / `.ckpt` file with `torch.load(weights_only=True)`.

    The training checkpoints pickle `args` (an `argparse.Namespace`), which is allowed explicitly. Anything else that is
    not a tensor or a plain container is refused unless `trust_checkpoint=True` (which unpickles arbitrary objects:
    only for files from a source you trust). Files in torch's zip format are memory-mapped, so only the tensors that
    are used are read from disk.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`--{argument}` {str(path)!r} does not exist or is not a file.")
    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # `weights_only` refuses a class it does not know ("Unsupported global: GLOBAL module.Class").
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused is None:
            raise ValueError(
                f"`--{argument}` {str(path)!r} is not a readable torch checkpoint (truncated or corrupted?)."
            ) from None
        if not trust_checkpoint:
            raise ValueError(
                f"`--{argument}` {str(path)!r} pickles `{refused.group(1)}`, which `torch.load(weights_only=True)` "
                "refuses (only tensors, containers and `argparse.Namespace` are allowed). If you trust the file's "
                "source, pass `--trust_checkpoint` to load it with `weights_only=False` (this can run arbitrary code)."
            ) from None
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"`--{argument}` {str(path)!r} is not a readable torch checkpoint (truncated or corrupted?): {first_line}"
        ) from None
    return checkpoint


def checkpoint_args(checkpoint: dict) -> dict:
    """The training arguments stored in an original checkpoint (`args`, an `argparse.Namespace`), or `{}`."""
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


_MAR_KEYS = ("class_emb.weight", "z_proj.weight", _HEAD_PREFIX + "input_proj.weight")


def select_mar_weights(checkpoint: dict, use_non_ema: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the weights to convert from an original training checkpoint: `(state_dict, "model_ema" | "model")`.

    The EMA weights (`model_ema`) are the ones the paper's FIDs use and the default. `use_non_ema=True` takes `model`
    (and warns if the checkpoint has no EMA weights at all). A checkpoint without `model_ema` is refused otherwise.
    """
    if not isinstance(checkpoint, dict) or not ({"model", "model_ema"} & set(checkpoint)):
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            "Not a MAR training checkpoint: expected a dict with `model` and `model_ema` state dicts (LTH14/mar "
            f"`checkpoint-last.pth`); found {found}."
        )
    for name in ("model_ema", "model"):
        weights = checkpoint.get(name)
        if weights is None:
            continue
        if not isinstance(weights, dict) or not all(key in weights for key in _MAR_KEYS):
            sample = sorted(weights)[:5] if isinstance(weights, dict) else type(weights).__name__
            raise ValueError(
                f"Not a MAR checkpoint: `{name}` lacks the MAR keys {list(_MAR_KEYS)} (found e.g. {sample}). "
                "Is this the VAE file or another model's checkpoint?"
            )
    has_ema = checkpoint.get("model_ema") is not None
    if not use_non_ema:
        if not has_ema:
            raise ValueError(
                "The checkpoint has no EMA weights (`model_ema`), which the paper's results use. Pass "
                "`--use_non_ema` to convert the training weights (`model`) instead; they sample much worse."
            )
        return checkpoint["model_ema"], "model_ema"
    if checkpoint.get("model") is None:
        raise ValueError("`--use_non_ema` asks for the training weights `model`, which this checkpoint lacks.")
    if not has_ema:
        warnings.warn(
            "The checkpoint has no EMA weights (`model_ema`); converting the training weights `model`.", stacklevel=2
        )
    return checkpoint["model"], "model"


# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------


def _architecture(transformer_config: dict, head_config: dict) -> dict:
    """The shape-defining values of a (transformer, head) config pair, decoder defaults resolved."""
    t = transformer_config
    decoder_heads = t.get("decoder_num_attention_heads") or t["num_attention_heads"]
    decoder_head_dim = t.get("decoder_attention_head_dim") or t["attention_head_dim"]
    in_channels = head_config["in_channels"]
    return {
        "sample_size": t["sample_size"],
        "patch_size": t["patch_size"],
        "in_channels": t["in_channels"],
        "num_layers": t["num_layers"],
        "num_attention_heads": t["num_attention_heads"],
        "attention_head_dim": t["attention_head_dim"],
        "decoder_num_layers": t.get("decoder_num_layers") or t["num_layers"],
        "decoder_num_attention_heads": decoder_heads,
        "decoder_attention_head_dim": decoder_head_dim,
        "mlp_ratio": float(t.get("mlp_ratio", 4.0)),
        "buffer_size": t["buffer_size"],
        "num_classes": t["num_classes"],
        "head.in_channels": in_channels,
        "head.model_channels": head_config["model_channels"],
        "head.condition_channels": head_config["condition_channels"],
        "head.num_res_blocks": head_config["num_res_blocks"],
        "head.out_channels": head_config.get("out_channels") or 2 * in_channels,
    }


def match_preset(transformer_config: dict, head_config: dict) -> str | None:
    """The name of the MAR preset (`mar-base`, `mar-large`, `mar-huge`) with this architecture, or `None`."""
    architecture = _architecture(transformer_config, head_config)
    for name, preset in MAR_PRESETS.items():
        if _architecture(preset["transformer"], preset["diffusion_head"]) == architecture:
            return name
    return None


def infer_configs_from_checkpoint(
    state_dict: dict[str, torch.Tensor],
    args: dict | None = None,
    model_type: str | None = None,
    num_attention_heads: int | None = None,
    in_channels: int | None = None,
) -> tuple[dict, dict, str | None]:
    """`(transformer_config, diffusion_head_config, preset_name | None)` for an original state dict.

    Sizes come from the tensor shapes. The head count comes from `num_attention_heads`, else `model_type`, else the
    checkpoint's `args.model` (`mar_base` / `mar_large` / `mar_huge`), else the width (768/1024/1280 -> 12/16/16).
    `in_channels` (e.g. the VAE's latent channels) and the checkpoint's `args.vae_embed_dim` / `args.patch_size`
    split the token width into channels and patches. With `model_type`, the shapes must match that preset.
    """
    args = args or {}
    if model_type is not None and model_type not in MAR_PRESETS:
        raise ValueError(f"`--model_type` must be one of {sorted(MAR_PRESETS)}; got {model_type!r}.")
    preset_name = model_type or _ORIGINAL_MODEL_NAMES.get(str(args.get("model")))
    if num_attention_heads is None and preset_name is not None:
        num_attention_heads = MAR_PRESETS[preset_name]["transformer"]["num_attention_heads"]
    if in_channels is None and isinstance(args.get("vae_embed_dim"), int):
        in_channels = args["vae_embed_dim"]
    patch_size = args.get("patch_size") if isinstance(args.get("patch_size"), int) else None
    transformer_config, head_config = infer_mar_configs(
        state_dict, in_channels=in_channels, num_attention_heads=num_attention_heads, patch_size=patch_size
    )
    # Dropout only matters for fine-tuning; keep the values the checkpoint was trained with.
    if isinstance(args.get("proj_dropout"), float):
        transformer_config["dropout"] = args["proj_dropout"]
    if isinstance(args.get("attn_dropout"), float):
        transformer_config["attention_dropout"] = args["attn_dropout"]
    if model_type is not None:
        preset = MAR_PRESETS[model_type]
        expected = _architecture(preset["transformer"], preset["diffusion_head"])
        found = _architecture(transformer_config, head_config)
        diff = {key: (found[key], expected[key]) for key in expected if found[key] != expected[key]}
        if diff:
            details = ", ".join(f"{key} {got} (checkpoint) vs {want} (preset)" for key, (got, want) in diff.items())
            raise ValueError(f"`--model_type {model_type}` does not match the checkpoint: {details}.")
    return transformer_config, head_config, match_preset(transformer_config, head_config)


# ----------------------------------------------------------------------------------------------------------------------
# Building the models
# ----------------------------------------------------------------------------------------------------------------------


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], name: str) -> None:
    """`load_state_dict(strict=True, assign=True)` that first reports every missing, unexpected or misshapen key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"The converted {name} weights do not fit {type(model).__name__}: missing keys {missing}, unexpected keys "
            f"{unexpected}, shape mismatches (converted vs model) {mismatched}."
        )
    model.load_state_dict(state_dict, strict=True, assign=True)


def build_mar_models(
    state_dict: dict[str, torch.Tensor],
    transformer_config: dict,
    head_config: dict,
    dtype: torch.dtype | None = None,
) -> tuple[MARTransformer2DModel, MARDiffusionHead]:
    """Map an original `MAR` state dict and load it, strictly, into `(transformer, diffusion_head)` in eval mode.

    The models are created without allocating weights (`accelerate.init_empty_weights`) and take the converted
    tensors as they are (`assign=True`, cast to `dtype` if given), so nothing is initialised or copied twice; `meta`
    tensors give `meta` models.
    """
    transformer_state_dict, head_state_dict = convert_mar_state_dict(state_dict)
    if dtype is not None:
        transformer_state_dict = {key: value.to(dtype) for key, value in transformer_state_dict.items()}
        head_state_dict = {key: value.to(dtype) for key, value in head_state_dict.items()}
    with init_empty_weights():
        transformer = MARTransformer2DModel.from_config(transformer_config)
        head = MARDiffusionHead.from_config(head_config)
    load_state_dict_strict(transformer, transformer_state_dict, "transformer")
    load_state_dict_strict(head, head_state_dict, "diffusion head")
    return transformer.eval(), head.eval()


# ----------------------------------------------------------------------------------------------------------------------
# The KL-16 VAE
# ----------------------------------------------------------------------------------------------------------------------

_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def load_original_vae_state_dict(path: str | os.PathLike, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of an original KL VAE file (`kl16.ckpt` = `{"model": state_dict}`; LDM `state_dict` also works).

    Training-only `loss.*` tensors (LPIPS, discriminator) are dropped; any other unknown key is an error.
    """
    checkpoint = load_checkpoint(path, trust_checkpoint=trust_checkpoint, argument="vae_path")
    state_dict = checkpoint
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


def _levels(state_dict: dict[str, torch.Tensor], prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for key in state_dict if (m := re.match(rf"^{re.escape(prefix)}(\d+)\.", key))})


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
        raise ValueError(f"Not an LDM-style KL VAE: missing {error}.") from None
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
    for level in _levels({key: None for key in level_attention}, "encoder.down."):
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


# ----------------------------------------------------------------------------------------------------------------------
# Labels, sampling settings and the model card
# ----------------------------------------------------------------------------------------------------------------------


def load_id2label(path: str | os.PathLike | None, num_classes: int) -> dict[int, str] | None:
    """Class names for the pipeline's `get_label_ids`.

    From `path` (a JSON object `{"0": "name", ...}`, or one with that object under `"id2label"`), else the bundled
    ImageNet-1k names (`conversion/imagenet_id2label.json`) for 1000-class models, else `None`.
    """
    if path is None:
        if num_classes != 1000:
            return None
        path = IMAGENET_ID2LABEL_PATH
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"`--id2label_path` {str(path)!r} is not a readable JSON file: {error}") from None
    data = data.get("id2label", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or sorted(data, key=str) != sorted(map(str, range(num_classes)), key=str):
        raise ValueError(
            f"`--id2label_path` {str(path)!r} must map every class id 0..{num_classes - 1} to a name "
            f"(a JSON object with {num_classes} entries)."
        )
    return {int(key): str(value) for key, value in data.items()}


def sampling_settings(preset_name: str | None, args: dict, num_tokens: int) -> dict:
    """The `mar_sampling` model-card entry: `MARPipeline.__call__` defaults recommended for this model.

    Presets use the original README's evaluation settings (cfg 2.9 / 3.0 / 3.2, linear, temperature 1.0) with 64
    steps; other models take the `cfg`, `cfg_schedule`, `temperature` and `num_iter` their checkpoint was trained with.
    """
    steps = str(args.get("num_sampling_steps", "100"))
    num_diffusion_steps = int(steps) if steps.isdigit() and 1 <= int(steps) <= 1000 else 100
    if preset_name is not None:
        sampling = dict(MAR_PRESETS[preset_name]["sampling"])
        num_inference_steps = 64
    else:
        sampling = {
            "guidance_scale": float(args.get("cfg", 3.0)),
            "guidance_schedule": args.get("cfg_schedule") if args.get("cfg_schedule") == "constant" else "linear",
            "temperature": float(args.get("temperature", 1.0)),
        }
        num_inference_steps = int(args.get("num_iter", 64))
    sampling["num_inference_steps"] = max(1, min(num_inference_steps, num_tokens))
    sampling["num_diffusion_steps"] = num_diffusion_steps
    return sampling


_CITATION = """@article{li2024autoregressive,
  title={Autoregressive Image Generation without Vector Quantization},
  author={Li, Tianhong and Tian, Yonglong and Li, He and Deng, Mingyang and He, Kaiming},
  journal={arXiv preprint arXiv:2406.11838},
  year={2024}
}"""


def make_model_card(
    transformer: MARTransformer2DModel,
    diffusion_head: MARDiffusionHead,
    preset_name: str | None,
    sampling: dict,
    weights: str,
    checkpoint_name: str,
    vae_name: str | None,
    dtype: str = "fp32",
    repo_id: str | None = None,
    epoch: int | None = None,
    has_id2label: bool = False,
) -> ModelCard:
    """The `README.md` of a converted folder: YAML metadata (with `mar_sampling`) and a description.

    `weights` is `"model_ema"` or `"model"`; `checkpoint_name` / `vae_name` name the source files.
    """
    config = transformer.config
    num_parameters = sum(p.numel() for p in transformer.parameters()) + sum(
        p.numel() for p in diffusion_head.parameters()
    )
    imagenet = config.num_classes == 1000
    card_data = ModelCardData(
        license="mit",
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        tags=["mar", "class-conditional", *(["imagenet"] if imagenet else []), "image-generation", "diffusers-mar"],
        datasets=["imagenet-1k"] if imagenet else None,
        mar_sampling=sampling,
        mar_conversion={
            "source": "LTH14/mar",
            "checkpoint": checkpoint_name,
            "weights": weights,
            "epoch": epoch,
            "vae": vae_name,
            "dtype": dtype,
        },
    )
    title = _PRESET_TITLES.get(preset_name, "MAR (custom size)")
    ema_text = (
        "the **EMA weights** (`model_ema`), the ones the paper's results are measured with"
        if weights == "model_ema"
        else "the **training (non-EMA) weights** (`model`); the paper's results use the EMA weights, which sample "
        "much better"
    )
    size = (
        f"{config.num_layers}+{transformer.config.decoder_num_layers or config.num_layers} transformer blocks "
        f"({transformer.encoder_dim} / {transformer.decoder_dim} wide), a {diffusion_head.config.num_res_blocks}x"
        f"{diffusion_head.config.model_channels} diffusion MLP, {transformer.num_tokens} tokens of "
        f"{transformer.token_dim} values, {config.num_classes} classes"
    )
    if preset_name is not None:
        paper = MAR_PRESETS[preset_name]["paper"]
        results = (
            "## Results in the paper\n\n"
            "ImageNet 256x256, FID-50K and Inception Score, `num_inference_steps=256`, EMA weights (the paper and "
            "the original README):\n\n"
            "| model | params | FID (no guidance) | IS (no guidance) | FID (guidance) | IS (guidance) |\n"
            "|---|---:|---:|---:|---:|---:|\n"
            f"| {title} | {paper['num_parameters'] / 1e6:.1f}M | {paper['fid_no_guidance']} | "
            f"{paper['is_no_guidance']} | {paper['fid']} | {paper['is']} |\n\n"
            "These numbers are the paper's, not measured on this conversion.\n"
        )
    else:
        results = (
            "## Results\n\nThis is not one of the paper's MAR-B/L/H sizes, so there are no published numbers for it.\n"
        )
    settings = "\n".join(f"| `{key}` | `{value}` |" for key, value in sampling.items())
    labels = 'class_labels = pipe.get_label_ids(["golden retriever"])' if has_id2label else "class_labels = [1]"
    body = f"""
# {title} for diffusers

{title}, a model of *Autoregressive Image Generation without Vector Quantization* (Li, Tian, Li, Deng, He,
NeurIPS 2024): class-conditional image generation by masked autoregression over continuous VAE latent tokens, each
token sampled by a small per-token diffusion MLP. Converted from the [LTH14/mar](https://github.com/LTH14/mar)
checkpoint `{checkpoint_name}` into a diffusers-mar `MARPipeline` folder.

- Architecture: {size}; {num_parameters:,} parameters (transformer + diffusion head).
- Weights: {ema_text}{f", epoch {epoch}" if epoch is not None else ""}; stored in {dtype}.
- VAE: {f"`{vae_name}` (the original LDM-style KL VAE as a diffusers `AutoencoderKL`, `scaling_factor` {KL16_SCALING_FACTOR})" if vae_name else "none: this folder samples tokens only (`output_type='latent'`); add an `AutoencoderKL` to decode images"}.

{results}
## Usage

With the `diffusers-mar` package installed:

```python
import torch
from diffusers_mar import MARPipeline

pipe = MARPipeline.from_pretrained("{repo_id or "path/to/this/folder"}")
{labels}
images = pipe(
    class_labels=class_labels,
    guidance_scale={sampling["guidance_scale"]},
    guidance_schedule="{sampling["guidance_schedule"]}",
    temperature={sampling["temperature"]},
    num_inference_steps={sampling["num_inference_steps"]},
    generator=torch.Generator().manual_seed(0),
).images
```

## Recommended sampling settings

Stored in this card's metadata as `mar_sampling` (the diffusers-mar command line reads its defaults from it):

| argument | value |
|---|---|
{settings}

The paper's FIDs use `num_inference_steps=256`; 64 is much faster. Without guidance the original uses
`guidance_scale=1.0, temperature=0.95`.

## Citation

```bibtex
{_CITATION}
```

License: MIT, as the original code and weights.
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


# ----------------------------------------------------------------------------------------------------------------------
# Saving, checking, uploading
# ----------------------------------------------------------------------------------------------------------------------


def check_output_dir(
    output_dir: str | os.PathLike, overwrite: bool = False, inputs: tuple[str | os.PathLike | None, ...] = ()
) -> Path:
    """Refuse an existing non-empty output folder (or a file) unless `overwrite`.

    Even with `overwrite`, a folder that holds the current directory or one of the `inputs` is never replaced.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"`--output_dir` {str(output_dir)!r} exists and is not a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"`--output_dir` {str(output_dir)!r} exists and is not empty; pass `--overwrite` to replace it."
            )
        resolved = output_dir.resolve()
        protected = [Path.cwd(), *(Path(path) for path in inputs if path is not None)]
        if any(path.resolve().is_relative_to(resolved) for path in protected):
            raise FileExistsError(
                f"`--output_dir` {str(output_dir)!r} holds the current folder or an input file; `--overwrite` would "
                "delete it. Choose a new folder."
            )
    return output_dir


def _stored_dtypes(folder: str | os.PathLike) -> set[torch.dtype]:
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


def verify_pipeline_folder(
    folder: str | os.PathLike, pipeline: MARPipeline, dtype: torch.dtype = torch.float32, atol: float = 1e-5
) -> dict[str, float]:
    """Reload `folder` with `MARPipeline.from_pretrained` and compare it with the in-memory `pipeline`.

    Checks the stored dtype and the tensors, then runs the transformer, the diffusion head (and the VAE's encoder and
    decoder, if any) of both on the same random inputs in float32. Returns the max abs output differences; raises
    `ValueError` if a tensor differs or an output differs by more than `atol`.
    """
    stored = _stored_dtypes(folder)
    if stored != {dtype}:
        raise ValueError(f"Verification failed: the folder stores {sorted(map(str, stored))}, asked for {dtype}.")
    reloaded = MARPipeline.from_pretrained(folder)  # float32 copies of the stored weights
    if (pipeline.vae is None) != (reloaded.vae is None):
        raise ValueError("Verification failed: the VAE was not saved or not reloaded.")
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
        raise ValueError(f"Verification failed: reloaded tensors differ from the converted weights: {changed[:10]}.")

    generator = torch.Generator().manual_seed(0)
    transformer, head = expected["transformer"], expected["diffusion_head"]
    batch, num_tokens, rows = 2, transformer.num_tokens, 8
    order = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)
    inputs = {
        "transformer": (
            torch.randn(batch, num_tokens, transformer.token_dim, generator=generator),
            torch.zeros(batch, num_tokens).scatter(1, order[:, : max(1, num_tokens // 2)], 1.0),  # half unknown
            torch.tensor([0, transformer.config.num_classes]),  # a class and the unconditional row
        ),
        "diffusion_head": (
            torch.randn(rows, head.config.in_channels, generator=generator),
            torch.randint(0, 1000, (rows,), generator=generator),
            torch.randn(rows, head.config.condition_channels, generator=generator),
        ),
    }
    calls = {name: lambda model, args: model(*args, return_dict=False)[0] for name in inputs}
    if "vae" in names:
        config = expected["vae"].config
        side = 2 ** len(config.block_out_channels)
        image = torch.rand(1, config.in_channels, side, side, generator=generator) * 2 - 1
        inputs["vae.encode"], inputs["vae.decode"] = (
            image,
            torch.randn(1, config.latent_channels, 2, 2, generator=generator),
        )
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
        raise ValueError(f"Verification failed: reloaded outputs differ from the converted weights by {bad}.")
    return diffs


def save_pipeline_folder(
    pipeline: MARPipeline,
    model_card: ModelCard,
    output_dir: str | os.PathLike,
    safe_serialization: bool = True,
    overwrite: bool = False,
    verify_dtype: torch.dtype | None = None,
    inputs: tuple[str | os.PathLike | None, ...] = (),
) -> Path:
    """Save `pipeline` and its model card to `output_dir`, atomically.

    Everything is written to a temporary sibling folder (and verified there if `verify_dtype` is given) and renamed
    to `output_dir` only at the end, so a failure leaves no half-written folder; with `overwrite` the previous folder
    is replaced only once the new one is complete.
    """
    output_dir = check_output_dir(output_dir, overwrite, inputs).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    old_dir = None
    try:
        os.chmod(tmp_dir, 0o777 & ~_current_umask())  # mkdtemp makes the folder private (0700); the output is not
        pipeline.save_pretrained(tmp_dir, safe_serialization=safe_serialization)
        model_card.save(tmp_dir / "README.md")
        if verify_dtype is not None:
            verify_pipeline_folder(tmp_dir, pipeline, verify_dtype)
        if output_dir.exists():
            old_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, old_dir / "folder")
        os.replace(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if old_dir is not None and not output_dir.exists():
            os.replace(old_dir / "folder", output_dir)
        raise
    finally:
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
    return output_dir


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def push_folder_to_hub(
    folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None
) -> str:
    """Create (or reuse) the Hub model repo `repo_id` and upload `folder` to it; returns the repo URL."""
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message="Add MAR pipeline converted from LTH14/mar with diffusers-mar",
    )
    return str(repo_url)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert an official LTH14/mar checkpoint (and the KL-16 VAE) into a diffusers-mar MARPipeline folder."
    )
    parser.add_argument("--checkpoint_path", required=True, help="LTH14/mar `checkpoint-last.pth` (MAR-B/L/H or own).")
    parser.add_argument("--vae_path", default=None, help="LTH14/mar `kl16.ckpt`; without it no VAE is saved.")
    parser.add_argument("--output_dir", required=True, help="Folder to write (must not exist or be empty).")
    parser.add_argument(
        "--model_type", choices=sorted(MAR_PRESETS), default=None, help="Preset to check against (default: inferred)."
    )
    parser.add_argument(
        "--num_attention_heads", type=int, default=None, help="Heads, needed for widths other than 768/1024/1280."
    )
    parser.add_argument("--use_non_ema", action="store_true", help="Convert `model` instead of `model_ema`.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Stored dtype (default fp32).")
    parser.add_argument(
        "--safe_serialization",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Write safetensors (default) or, with --no-safe_serialization, torch .bin files.",
    )
    parser.add_argument(
        "--trust_checkpoint",
        action="store_true",
        help="Allow `torch.load(weights_only=False)` for files that pickle other objects (trusted sources only).",
    )
    parser.add_argument("--vae_norm_num_groups", type=int, default=32, help="GroupNorm groups of the VAE (KL-16: 32).")
    parser.add_argument(
        "--id2label_path", default=None, help="JSON class names; default: ImageNet names for 1000-class models."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty `--output_dir`.")
    parser.add_argument("--verify", action="store_true", help="Reload the saved folder and compare outputs.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the folder to the Hub as `--repo_id`.")
    parser.add_argument("--repo_id", default=None, help="Hub repo id, e.g. `user/mar-base`.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in token or HF_TOKEN).")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.repo_id:
        parser.error("`--push_to_hub` needs `--repo_id` (e.g. `user/mar-base`).")
    if args.num_attention_heads is not None and args.num_attention_heads < 1:
        parser.error("`--num_attention_heads` must be >= 1.")
    if args.vae_norm_num_groups < 1:
        parser.error("`--vae_norm_num_groups` must be >= 1.")
    return args


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion described by the parsed command-line `args`; returns the output folder."""
    # 1. Check the output folder before any heavy work
    inputs = (args.checkpoint_path, args.vae_path, args.id2label_path)
    check_output_dir(args.output_dir, args.overwrite, inputs)
    dtype = DTYPES[args.dtype]

    # 2. Load the original checkpoint and choose the weights
    checkpoint = load_checkpoint(args.checkpoint_path, trust_checkpoint=args.trust_checkpoint)
    state_dict, weights = select_mar_weights(checkpoint, use_non_ema=args.use_non_ema)
    train_args = checkpoint_args(checkpoint)

    # 3. The VAE (its latent channels split the token width when the checkpoint has no `args`)
    vae_state_dict = None
    if args.vae_path is not None:
        vae_state_dict = load_original_vae_state_dict(args.vae_path, trust_checkpoint=args.trust_checkpoint)
        vae_config = infer_vae_config(vae_state_dict, norm_num_groups=args.vae_norm_num_groups)
    in_channels = vae_config["latent_channels"] if vae_state_dict is not None else None
    if in_channels is not None and isinstance(train_args.get("vae_embed_dim"), int):
        if train_args["vae_embed_dim"] != in_channels:
            raise ValueError(
                f"The VAE has {in_channels} latent channels but the MAR checkpoint was trained on "
                f"{train_args['vae_embed_dim']} (`args.vae_embed_dim`); is `--vae_path` the right VAE?"
            )

    # 4. Configs and models
    transformer_config, head_config, preset_name = infer_configs_from_checkpoint(
        state_dict, train_args, args.model_type, args.num_attention_heads, in_channels
    )
    transformer, head = build_mar_models(state_dict, transformer_config, head_config, dtype=dtype)
    vae = None
    if vae_state_dict is not None:
        if vae_config["latent_channels"] != transformer.config.in_channels:
            raise ValueError(
                f"The VAE has {vae_config['latent_channels']} latent channels but the MAR tokens have "
                f"{transformer.config.in_channels}; is `--vae_path` the right VAE?"
            )
        vae_config["sample_size"] = transformer.config.sample_size * 2 ** (len(vae_config["block_out_channels"]) - 1)
        vae = build_vae(vae_state_dict, vae_config, dtype=dtype)
    else:
        warnings.warn("No `--vae_path`: the folder gets no VAE and can only return latents.", stacklevel=2)

    # 5. The pipeline and its model card
    id2label = load_id2label(args.id2label_path, transformer.config.num_classes)
    pipeline = MARPipeline(transformer, head, MARDDPMScheduler(), vae=vae, id2label=id2label)
    epoch = checkpoint.get("epoch") if isinstance(checkpoint.get("epoch"), int) else None
    card = make_model_card(
        transformer,
        head,
        preset_name,
        sampling_settings(preset_name, train_args, transformer.num_tokens),
        weights,
        checkpoint_name=Path(args.checkpoint_path).name,
        vae_name=Path(args.vae_path).name if args.vae_path else None,
        dtype=args.dtype,
        repo_id=args.repo_id,
        epoch=epoch,
        has_id2label=id2label is not None,
    )

    # 6. Save (and verify) atomically, then upload
    output_dir = save_pipeline_folder(
        pipeline,
        card,
        args.output_dir,
        safe_serialization=args.safe_serialization,
        overwrite=args.overwrite,
        verify_dtype=dtype if args.verify else None,
        inputs=inputs,
    )
    num_parameters = sum(p.numel() for p in transformer.parameters()) + sum(p.numel() for p in head.parameters())
    print(
        f"Converted `{weights}` of {args.checkpoint_path} ({_PRESET_TITLES.get(preset_name, 'custom size')}, "
        f"{num_parameters:,} parameters, {args.dtype}{', with VAE' if vae is not None else ', no VAE'}) "
        f"to {output_dir}{' (verified)' if args.verify else ''}."
    )
    if args.push_to_hub:
        url = push_folder_to_hub(output_dir, args.repo_id, private=args.private, token=args.hub_token)
        print(f"Uploaded to {url}")
    return output_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        convert(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as error:
        message = error.args[0] if error.args else str(error)
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
