"""Shared by the conversion tests: a stand-in LTH14/mar checkout for `--verify --original_repo`."""

from __future__ import annotations

import pathlib

import pytest

# `models/mar.py` of a stand-in checkout. Its factory `mar_tiny_fixture` (the fixture checkpoint's `args.model`)
# builds the tiny original MAR the way LTH14/mar's factories do, fixing what the weights do not show: 4 heads. It is
# made of diffusers-mar's modules (whose parity with the original is tested at 1e-5 on the same fixture) and follows
# the original's `forward_mae_encoder` / `forward_mae_decoder` statements.
STAND_IN_MAR = """
import torch
from torch import nn

from conversion.convert_mar_to_diffusers import convert_mar_state_dict
from diffusers_mar import MARDiffusionHead, MARTransformer2DModel


class _Net(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x, t, c):
        return self.head(x, t, c, return_dict=False)[0]


class MAR(nn.Module):
    def __init__(self, num_heads, buffer_size, class_num):
        super().__init__()
        self.buffer_size = buffer_size
        self.t = MARTransformer2DModel(
            sample_size=4, patch_size=1, in_channels=16, num_layers=2, num_attention_heads=num_heads,
            attention_head_dim=64 // num_heads, buffer_size=buffer_size, num_classes=class_num,
        )
        self.diffloss = nn.Module()
        self.diffloss.net = _Net(MARDiffusionHead(in_channels=16, model_channels=64, condition_channels=64, num_res_blocks=2))
        self.encoder_blocks, self.decoder_blocks = self.t.encoder_blocks, self.t.decoder_blocks

    def load_state_dict(self, state_dict, strict=True, assign=False):
        transformer, head = convert_mar_state_dict(state_dict)
        self.t.load_state_dict(transformer, strict=strict, assign=assign)
        self.diffloss.net.head.load_state_dict(head, strict=strict, assign=assign)
        rows = transformer["class_embedding.weight"]
        self.class_emb, self.fake_latent = nn.Embedding.from_pretrained(rows[:-1]), rows[-1:]

    def _keep(self, mask):
        return (1 - torch.cat([torch.zeros(mask.shape[0], self.buffer_size), mask], dim=1)).nonzero(as_tuple=True)

    def forward_mae_encoder(self, x, mask, class_embedding):
        x = self.t.proj_in(x)
        x = torch.cat([class_embedding.unsqueeze(1).expand(-1, self.buffer_size, -1), x], dim=1)
        x = self.t.proj_in_norm(x + self.t.encoder_pos_embed)
        x = x[self._keep(mask)].reshape(x.shape[0], -1, x.shape[-1])
        for block in self.encoder_blocks:
            x = block(x)
        return self.t.encoder_norm(x)

    def forward_mae_decoder(self, x, mask):
        x = self.t.decoder_embed(x)
        canvas = self.t.mask_token.repeat(x.shape[0], self.buffer_size + mask.shape[1], 1)
        canvas[self._keep(mask)] = x.reshape(-1, x.shape[-1])
        x = canvas + self.t.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.t.decoder_norm(x)[:, self.buffer_size:] + self.t.diffusion_pos_embed


def mar_tiny_fixture(**kwargs):
    return MAR(num_heads=4, buffer_size=kwargs["buffer_size"], class_num=kwargs["class_num"])
"""


@pytest.fixture(scope="session")
def stand_in_checkout(tmp_path_factory) -> pathlib.Path:
    """A folder laid out like a LTH14/mar checkout whose `models/mar.py` defines `mar_tiny_fixture` (4 heads)."""
    repo = tmp_path_factory.mktemp("LTH14-mar")
    (repo / "models").mkdir()
    (repo / "models" / "mar.py").write_text(STAND_IN_MAR)
    return repo
