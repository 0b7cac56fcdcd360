"""Shared by the conversion tests: a stand-in LTH14/mar checkout for `--verify --original_repo`."""

from __future__ import annotations

import pathlib

import pytest

# `models/mar.py` of a stand-in checkout: the tiny original MAR written again from the fixture README's description of
# LTH14/mar (timm's pre-norm ViT block, the buffer of class tokens, `SimpleMLPAdaLN` with (shift, scale, gate)
# chunks), with plain torch and the ORIGINAL parameter names, so that it loads the checkpoint's `model_ema` as it is
# stored. It imports nothing of diffusers-mar or of the converter: `--verify --original_repo` against it checks the
# converter's key mapping against an independent one (issue 29), and
# `test_verify_and_errors.py::test_the_stand_in_original_reproduces_the_recorded_outputs` checks the stand-in itself
# against the outputs recorded from the real code. Its factory `mar_tiny_fixture` (the fixture checkpoint's
# `args.model`) fixes what the weights do not show, as LTH14/mar's factories do: 64 wide, 2 + 2 blocks, 4 heads.
STAND_IN_MAR = """
import math

import torch
from torch import nn
from torch.nn import functional as F


def layer_norm(width, affine=True):
    return nn.LayerNorm(width, eps=1e-6, elementwise_affine=affine)


class Attention(nn.Module):
    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, heads, L, head_dim) each
        weights = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(head_dim), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width, num_heads):
        super().__init__()
        self.norm1, self.attn = layer_norm(width), Attention(width, num_heads)
        self.norm2, self.mlp = layer_norm(width), Mlp(width, 4 * width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimestepEmbedder(nn.Module):
    def __init__(self, width, frequencies=256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.frequencies // 2
        rates = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = t.float()[:, None] * rates[None]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1))


class ResBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.in_ln = layer_norm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = layer_norm(width, affine=False)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, channels, condition_channels, width, depth):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(condition_channels, width)
        self.input_proj = nn.Linear(channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, 2 * channels)  # [eps; variance]

    def forward(self, x, t, c):
        x, y = self.input_proj(x), self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


class MAR(nn.Module):
    def __init__(self, width, depth, num_heads, img_size, vae_stride, patch_size, vae_embed_dim, class_num,
                 buffer_size, diffloss_d, diffloss_w):
        super().__init__()
        num_tokens, token_dim = (img_size // vae_stride // patch_size) ** 2, vae_embed_dim * patch_size**2
        self.buffer_size = buffer_size
        self.class_emb = nn.Embedding(class_num, width)
        self.fake_latent = nn.Parameter(torch.zeros(1, width))
        self.z_proj, self.z_proj_ln = nn.Linear(token_dim, width), layer_norm(width)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + num_tokens, width))
        self.encoder_blocks = nn.ModuleList([Block(width, num_heads) for _ in range(depth)])
        self.encoder_norm = layer_norm(width)
        self.decoder_embed = nn.Linear(width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + num_tokens, width))
        self.decoder_blocks = nn.ModuleList([Block(width, num_heads) for _ in range(depth)])
        self.decoder_norm = layer_norm(width)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.diffloss = nn.Module()
        self.diffloss.net = SimpleMLPAdaLN(token_dim, width, diffloss_w, diffloss_d)

    def _visible(self, mask):  # (B, buffer + L), True for the buffer and the known tokens
        return torch.cat([torch.zeros(mask.shape[0], self.buffer_size), mask], dim=1) == 0

    def forward_mae_encoder(self, x, mask, class_embedding):
        x = self.z_proj(x)
        buffer = class_embedding[:, None, :].expand(-1, self.buffer_size, -1)
        x = self.z_proj_ln(torch.cat([buffer, x], dim=1) + self.encoder_pos_embed_learned)
        x = x[self._visible(mask)].reshape(x.shape[0], -1, x.shape[2])
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x, mask):
        x = self.decoder_embed(x)
        visible = self._visible(mask)
        canvas = self.mask_token.expand(x.shape[0], visible.shape[1], -1).clone()
        canvas[visible] = x.reshape(-1, x.shape[2])
        x = canvas + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_norm(x)[:, self.buffer_size :] + self.diffusion_pos_embed_learned


def mar_tiny_fixture(**kwargs):
    return MAR(width=64, depth=2, num_heads=4, **kwargs)
"""


@pytest.fixture(scope="session")
def stand_in_checkout(tmp_path_factory) -> pathlib.Path:
    """A folder laid out like a LTH14/mar checkout whose `models/mar.py` defines `mar_tiny_fixture` (4 heads)."""
    repo = tmp_path_factory.mktemp("LTH14-mar")
    (repo / "models").mkdir()
    (repo / "models" / "mar.py").write_text(STAND_IN_MAR)
    return repo
