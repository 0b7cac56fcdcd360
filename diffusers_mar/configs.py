"""The MAR-B/L/H, AR-B/L/H and VAR-d16...d36 presets: component configs, recommended sampling settings and the paper's numbers.

Sizes are those of LTH14/mar `models/mar.py` (`mar_base`, `mar_large`, `mar_huge`) with the DiffLoss MLP of the
released checkpoints (README: B 6x1024, L 8x1280, H 12x1536). ImageNet 256x256, KL-16 VAE (16x16x16 latents).

The AR-B/L/H presets (`ARTransformer2DModel`, issue 15) are the paper's causal AR at each MAR size: one causal stack
of the MAR encoder's plus decoder's depth at the same width (LTH14/mar issue #72), the same head. They have no
released weights; their guidance scale is MAR's, not tuned.
"""

from __future__ import annotations

import copy

_COMMON_TRANSFORMER = {
    "sample_size": 16,
    "patch_size": 1,
    "in_channels": 16,
    "mlp_ratio": 4.0,
    "buffer_size": 64,
    "num_classes": 1000,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "norm_eps": 1e-6,
}

MAR_PRESETS: dict[str, dict] = {
    "mar-base": {
        "transformer": {**_COMMON_TRANSFORMER, "num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64},
        "diffusion_head": {"in_channels": 16, "model_channels": 1024, "condition_channels": 768, "num_res_blocks": 6},
        "sampling": {"guidance_scale": 2.9, "guidance_schedule": "linear", "temperature": 1.0},
        "paper": {
            "num_parameters": 207_924_768,
            "fid_no_guidance": 3.48,
            "is_no_guidance": 192.4,
            "fid": 2.31,
            "is": 281.7,
        },
    },
    "mar-large": {
        "transformer": {**_COMMON_TRANSFORMER, "num_layers": 16, "num_attention_heads": 16, "attention_head_dim": 64},
        "diffusion_head": {"in_channels": 16, "model_channels": 1280, "condition_channels": 1024, "num_res_blocks": 8},
        "sampling": {"guidance_scale": 3.0, "guidance_schedule": "linear", "temperature": 1.0},
        "paper": {
            "num_parameters": 478_326_304,
            "fid_no_guidance": 2.60,
            "is_no_guidance": 221.4,
            "fid": 1.78,
            "is": 296.0,
        },
    },
    "mar-huge": {
        "transformer": {**_COMMON_TRANSFORMER, "num_layers": 20, "num_attention_heads": 16, "attention_head_dim": 80},
        "diffusion_head": {
            "in_channels": 16,
            "model_channels": 1536,
            "condition_channels": 1280,
            "num_res_blocks": 12,
        },
        "sampling": {"guidance_scale": 3.2, "guidance_schedule": "linear", "temperature": 1.0},
        "paper": {
            "num_parameters": 942_403_104,
            "fid_no_guidance": 2.35,
            "is_no_guidance": 227.8,
            "fid": 1.55,
            "is": 303.7,
        },
    },
}


_AR_TRANSFORMER_KEYS = ("sample_size", "patch_size", "in_channels", "mlp_ratio", "num_classes", "dropout")
_AR_TRANSFORMER_KEYS += ("attention_dropout", "norm_eps", "num_attention_heads", "attention_head_dim")

AR_PRESETS: dict[str, dict] = {
    name.replace("mar-", "ar-"): {
        "transformer": {
            **{key: preset["transformer"][key] for key in _AR_TRANSFORMER_KEYS},
            "num_layers": 2 * preset["transformer"]["num_layers"],  # encoder + decoder depth in one causal stack
        },
        "diffusion_head": dict(preset["diffusion_head"]),
        "sampling": dict(preset["sampling"]),
    }
    for name, preset in MAR_PRESETS.items()
}


# VAR (FoundationVision/VAR, the released checkpoints): depth d gives width 64 d and d heads; the d36 model is the
# 512 px one, with the shared AdaLN (`--saln=1` in the official training command). Every model uses the same tokenizer
# (`vae_ch160v4096z32.pth`, the `VARVQModel` defaults) at its schedule. The sampling settings are the official
# README's FID setting, cfg 1.5, top-p 0.96, top-k 900 (`guidance_scale = 1 + cfg`, see docs/var.md). The paper's
# numbers are the official README's model zoo (ImageNet, FID-50K).
VAR_PATCH_NUMS = {256: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], 512: [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]}
_VAR_SIZES = {
    "var-d16": (16, 256, 3.55, "310M"),
    "var-d20": (20, 256, 2.95, "600M"),
    "var-d24": (24, 256, 2.33, "1.0B"),
}
_VAR_SIZES |= {"var-d30": (30, 256, 1.97, "2.0B"), "var-d36": (36, 512, 2.63, "2.3B")}

VAR_PRESETS: dict[str, dict] = {
    name: {
        "transformer": {
            "patch_nums": list(VAR_PATCH_NUMS[resolution]),
            "vocab_size": 4096,
            "vq_embed_dim": 32,
            "num_layers": depth,
            "num_attention_heads": depth,
            "attention_head_dim": 64,
            "mlp_ratio": 4.0,
            "num_classes": 1000,
            "drop_path_rate": 0.1 * depth / 24,
            "shared_adaln": depth == 36,
        },
        "vqvae": {"sample_size": resolution, "patch_nums": list(VAR_PATCH_NUMS[resolution])},
        "sampling": {"guidance_scale": 2.5, "top_k": 900, "top_p": 0.96, "more_smooth": False},
        "paper": {"resolution": resolution, "fid": fid, "num_parameters": parameters},
    }
    for name, (depth, resolution, fid, parameters) in _VAR_SIZES.items()
}


def get_preset_config(name: str) -> dict:
    """A deep copy of a preset: `{"transformer": ..., "diffusion_head": ..., "sampling": ..., "paper": ...}` (the AR
    presets have no "paper"; the VAR presets have "vqvae" instead of "diffusion_head").

    Build the models with `MARTransformer2DModel.from_config(config["transformer"])` (`ARTransformer2DModel` for the
    `ar-*` presets) and `MARDiffusionHead.from_config(config["diffusion_head"])`; for `var-*`,
    `VARTransformer2DModel.from_config(config["transformer"])` and `VARVQModel.from_config(config["vqvae"])`.
    """
    presets = {**MAR_PRESETS, **AR_PRESETS, **VAR_PRESETS}
    if name not in presets:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(presets)}.")
    return copy.deepcopy(presets[name])
