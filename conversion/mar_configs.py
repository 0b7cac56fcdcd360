"""The configs of a converted MAR: sizes from the tensor shapes of an original state dict, attention head counts
(which the shapes do not show) from the checkpoint's factory, the flags, or the MAR-B/L/H widths."""

from __future__ import annotations

import re

import torch

from diffusers_mar import MAR_PRESETS

# The factories of LTH14/mar models/mar.py that `args.model` of an official checkpoint names, and their presets.
OFFICIAL_FACTORIES = {"mar_base": "mar-base", "mar_large": "mar-large", "mar_huge": "mar-huge"}
# The MAR-B/L/H widths and their head counts: the one guess the converter makes when nothing names the factory.
_WIDTH_HEADS = {
    preset["transformer"]["num_attention_heads"] * preset["transformer"]["attention_head_dim"]: preset["transformer"][
        "num_attention_heads"
    ]
    for preset in MAR_PRESETS.values()
}


def num_blocks(keys, prefix: str) -> int:
    indices = {int(m.group(1)) for key in keys if (m := re.match(rf"^{re.escape(prefix)}(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def attention_heads(
    state_dict: dict[str, torch.Tensor],
    args: dict | None = None,
    model_type: str | None = None,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
) -> tuple[int, int, str]:
    """`(encoder_heads, decoder_heads, source)` of an original state dict, whose shapes do not show head counts.

    In order: `model_type`'s preset, the official factory the checkpoint's `args.model` names (`mar_base`,
    `mar_large`, `mar_huge`), the flags `--num_attention_heads` / `--decoder_num_attention_heads` (the decoder's
    defaults to the encoder's), and only when the checkpoint names no factory at all, the MAR-B/L/H widths (768 /
    1024 / 1280 -> 12 / 16 / 16). `source` is `"model_type"`, `"args.model"`, `"width"` or `"flags"` (flags that equal
    the width rule count as `"width"`). A flag that contradicts a preset or factory, or a head count nothing gives,
    raises `ValueError` naming the flag.
    """
    args = args or {}
    factory = args.get("model") if isinstance(args.get("model"), str) else None
    given = {
        "--num_attention_heads": num_attention_heads,
        "--decoder_num_attention_heads": decoder_num_attention_heads or num_attention_heads,
    }
    preset = model_type if model_type is not None else OFFICIAL_FACTORIES.get(factory)
    if preset is not None:
        source = "model_type" if model_type is not None else "args.model"
        named = (
            f"`--model_type {model_type}`" if model_type is not None else f"the checkpoint's `args.model` {factory}"
        )
        config = MAR_PRESETS[preset]["transformer"]
        heads = [
            config["num_attention_heads"],
            config.get("decoder_num_attention_heads") or config["num_attention_heads"],
        ]
        for (flag, value), expected in zip(given.items(), heads):
            if value is not None and value != expected:
                raise ValueError(f"`{flag}` {value} contradicts {named}, which has {expected} heads.")
        return heads[0], heads[1], source
    widths = [state_dict["class_emb.weight"].shape[1], state_dict["decoder_embed.weight"].shape[0]]
    heads, sources = [], set()
    for (flag, value), width in zip(given.items(), widths):
        guess = _WIDTH_HEADS.get(width) if factory is None else None
        if value is None and guess is None:
            why = (
                f"the checkpoint's `args.model` is `{factory}`, not a factory of LTH14/mar ({', '.join(OFFICIAL_FACTORIES)})"
                if factory is not None
                else f"the width {width} is not one of MAR-B/L/H ({', '.join(map(str, _WIDTH_HEADS))})"
            )
            raise ValueError(
                f"Cannot tell the number of attention heads: {why}, and head counts are not stored in the weights. "
                f"Pass `{flag}`."
            )
        heads.append(value if value is not None else guess)
        sources.add("width" if heads[-1] == guess else "flags")
    return heads[0], heads[1], "flags" if "flags" in sources else "width"


def infer_mar_configs(
    state_dict: dict[str, torch.Tensor],
    in_channels: int | None = None,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    patch_size: int | None = None,
) -> tuple[dict, dict]:
    """Infer `(transformer_config, diffusion_head_config)` from the tensor shapes of an original state dict.

    The head counts are not visible in the shapes: without `num_attention_heads` (and `decoder_num_attention_heads`,
    default: the encoder's) widths 768/1024/1280 use the MAR-B/L/H values (`attention_heads`). `in_channels` (the
    VAE's channels, default 16) or `patch_size` separates the token width into channels and patch size. Works on
    `meta` tensors (only shapes are read).
    """
    try:
        encoder_dim = state_dict["class_emb.weight"].shape[1]
        decoder_dim = state_dict["decoder_embed.weight"].shape[0]
        num_tokens = state_dict["diffusion_pos_embed_learned"].shape[1]
        token_dim = state_dict["z_proj.weight"].shape[1]
        buffer_size = state_dict["encoder_pos_embed_learned"].shape[1] - num_tokens
        mlp_hidden = state_dict["encoder_blocks.0.mlp.fc1.weight"].shape[0]
        head_width, head_in = state_dict["diffloss.net.input_proj.weight"].shape
        condition_channels = state_dict["diffloss.net.cond_embed.weight"].shape[1]
        head_out = state_dict["diffloss.net.final_layer.linear.weight"].shape[0]
        frequency_embedding_size = state_dict["diffloss.net.time_embed.mlp.0.weight"].shape[1]
    except KeyError as error:
        raise KeyError(f"Not a MAR checkpoint: missing {error}.") from None
    if num_attention_heads is None or decoder_num_attention_heads is None:
        encoder_heads, decoder_heads, _ = attention_heads(
            state_dict,
            num_attention_heads=num_attention_heads,
            decoder_num_attention_heads=decoder_num_attention_heads,
        )
    else:
        encoder_heads, decoder_heads = num_attention_heads, decoder_num_attention_heads
    for flag, dim, heads in [
        ("--num_attention_heads", encoder_dim, encoder_heads),
        ("--decoder_num_attention_heads", decoder_dim, decoder_heads),
    ]:
        if dim % heads:
            raise ValueError(f"`{flag}` {heads} does not divide the width {dim}.")
    if in_channels is None:
        in_channels = 16 if patch_size is None else token_dim // patch_size**2
    if patch_size is None:
        patch_size = round((token_dim / in_channels) ** 0.5)
    grid = round(num_tokens**0.5)
    if in_channels * patch_size**2 != token_dim or grid * grid != num_tokens:
        raise ValueError(
            f"Token width {token_dim} and {num_tokens} tokens do not fit {in_channels} channels (the VAE's latent "
            f"channels or `args.vae_embed_dim`) and patch size {patch_size} (`args.patch_size`) on a square grid."
        )
    transformer_config = {
        "sample_size": grid * patch_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "num_layers": num_blocks(state_dict, "encoder_blocks."),
        "num_attention_heads": encoder_heads,
        "attention_head_dim": encoder_dim // encoder_heads,
        "decoder_num_layers": num_blocks(state_dict, "decoder_blocks."),
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
        "num_res_blocks": num_blocks(state_dict, "diffloss.net.res_blocks."),
        "out_channels": head_out,
        "frequency_embedding_size": frequency_embedding_size,
    }
    return transformer_config, head_config


def _architecture(transformer_config: dict, head_config: dict) -> dict:
    """The shape-defining values of a (transformer, head) config pair, decoder defaults resolved."""
    t = transformer_config
    in_channels = head_config["in_channels"]
    return {
        **{key: t[key] for key in ("sample_size", "patch_size", "in_channels", "num_layers", "buffer_size")},
        **{key: t[key] for key in ("num_attention_heads", "attention_head_dim", "num_classes")},
        "decoder_num_layers": t.get("decoder_num_layers") or t["num_layers"],
        "decoder_num_attention_heads": t.get("decoder_num_attention_heads") or t["num_attention_heads"],
        "decoder_attention_head_dim": t.get("decoder_attention_head_dim") or t["attention_head_dim"],
        "mlp_ratio": float(t.get("mlp_ratio", 4.0)),
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
    decoder_num_attention_heads: int | None = None,
) -> tuple[dict, dict, str | None]:
    """`(transformer_config, diffusion_head_config, preset_name | None)` for an original state dict.

    Sizes come from the tensor shapes, head counts from `attention_heads` (`model_type`, the checkpoint's
    `args.model`, `num_attention_heads` / `decoder_num_attention_heads`, the MAR-B/L/H widths). `in_channels` (e.g.
    the VAE's latent channels) and the checkpoint's `args.vae_embed_dim` / `args.patch_size` split the token width into
    channels and patches. With `model_type`, the shapes must match that preset.
    """
    args = args or {}
    if model_type is not None and model_type not in MAR_PRESETS:
        raise ValueError(f"`--model_type` must be one of {sorted(MAR_PRESETS)}; got {model_type!r}.")
    encoder_heads, decoder_heads, _ = attention_heads(
        state_dict, args, model_type, num_attention_heads, decoder_num_attention_heads
    )
    if in_channels is None and isinstance(args.get("vae_embed_dim"), int):
        in_channels = args["vae_embed_dim"]
    patch_size = args.get("patch_size") if isinstance(args.get("patch_size"), int) else None
    transformer_config, head_config = infer_mar_configs(
        state_dict, in_channels, encoder_heads, decoder_heads, patch_size
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
