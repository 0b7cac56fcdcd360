"""TokenGridMixin: the square grid of tokens that MAR's and AR's transformers share, as `patchify` / `unpatchify`.

A token is one `patch_size x patch_size` patch of the latent (or pixel) grid, its values channel-major; tokens are in
raster order. Numerics follow LTH14/mar `models/mar.py` (`patchify`, `unpatchify`).
"""

from __future__ import annotations

import torch


class TokenGridMixin:
    """`patchify` / `unpatchify` for a model with `config.patch_size`, `config.in_channels` and `grid_size`."""

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, C * p * p); tokens in raster order, channel-major inside a token."""
        b, c, h, w = latents.shape
        p = self.config.patch_size
        latents = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        return latents.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, C * p * p) -> (B, C, H, W); the exact inverse of `patchify`."""
        b = tokens.shape[0]
        p, c, g = self.config.patch_size, self.config.in_channels, self.grid_size
        tokens = tokens.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
        return tokens.reshape(b, c, g * p, g * p)
