"""Import and build the official FoundationVision/VAR models from a checkout, for `--verify --original_repo` and
side-by-side benchmarks (never used by the package).

The official code is plain PyTorch. Its `dist.get_device()` answers `cuda` whenever CUDA is present (the models would
be built there); it is pointed at the CPU. `build_vae_var` is not called: it disables `reset_parameters` of every
`nn.Linear` / `nn.LayerNorm` of the process, which would change models built afterwards.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

# Top-level modules of a VAR checkout, dropped from `sys.modules` so that another checkout can be loaded.
_CHECKOUT_MODULES = ("models", "dist", "utils")


def is_var_checkout(original_repo: str | Path) -> bool:
    repo = Path(original_repo)
    return (repo / "models" / "var.py").is_file() and (repo / "models" / "vqvae.py").is_file()


def load_original_var(original_repo: str | Path) -> types.SimpleNamespace:
    """The official `VAR` and `VQVAE` classes of a FoundationVision/VAR checkout."""
    repo = Path(original_repo).resolve()
    if not is_var_checkout(repo):
        raise FileNotFoundError(
            f"`--original_repo` {str(repo)!r} is not a FoundationVision/VAR checkout (no models/var.py)."
        )
    for name in [n for n in sys.modules if n.split(".")[0] in _CHECKOUT_MODULES]:
        del sys.modules[name]
    sys.path.insert(0, str(repo))
    try:
        import dist  # the checkout's dist.py

        dist.get_device = lambda: torch.device("cpu")
        from models.var import VAR
        from models.vqvae import VQVAE
    finally:
        sys.path.remove(str(repo))
    return types.SimpleNamespace(VAR=VAR, VQVAE=VQVAE)


def build_original_var(
    original_repo: str | Path,
    vae_state_dict: dict[str, torch.Tensor],
    var_state_dict: dict[str, torch.Tensor],
    vqvae_config: dict,
    transformer_config: dict,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The official `VQVAE` and `VAR` with the original state dicts loaded strictly, in float32 eval mode.

    Only the official tokenizer layout can be built (its `ch_mult` is fixed at (1, 1, 2, 2, 4)); a `ValueError`
    says so for another one.
    """
    if tuple(vqvae_config["ch_mult"]) != (1, 1, 2, 2, 4):
        raise ValueError(
            f"The official VQVAE has ch_mult (1, 1, 2, 2, 4); this tokenizer has {tuple(vqvae_config['ch_mult'])}, "
            "so it cannot be rebuilt with the official code."
        )
    official = load_original_var(original_repo)
    patch_nums = tuple(transformer_config["patch_nums"])
    vqvae = official.VQVAE(
        vocab_size=vqvae_config["num_vq_embeddings"],
        z_channels=vqvae_config["latent_channels"],
        ch=vqvae_config["ch"],
        test_mode=True,
        share_quant_resi=vqvae_config["share_quant_resi"],
        v_patch_nums=patch_nums,
    )
    vqvae.load_state_dict(vae_state_dict, strict=True)
    width = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    var = official.VAR(
        vae_local=vqvae,
        num_classes=transformer_config["num_classes"],
        depth=transformer_config["num_layers"],
        embed_dim=width,
        num_heads=transformer_config["num_attention_heads"],
        mlp_ratio=transformer_config["mlp_ratio"],
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        norm_eps=1e-6,
        shared_aln=transformer_config["shared_adaln"],
        cond_drop_rate=0.0,
        attn_l2_norm=True,
        patch_nums=patch_nums,
        flash_if_available=False,
        fused_if_available=False,
    )
    var.load_state_dict(var_state_dict, strict=True)
    return vqvae.float().eval(), var.float().eval()
