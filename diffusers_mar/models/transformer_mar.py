"""MARTransformer2DModel: the bidirectional MAE-style encoder-decoder of MAR.

Numerics follow LTH14/mar `models/mar.py` (`forward_mae_encoder`, `forward_mae_decoder`); the blocks are the
pre-norm ViT blocks of timm 0.9.12 written with `scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from diffusers_mar.models.loading import StrictLoadingMixin
from diffusers_mar.models.token_grid import TokenGridMixin


class MARAttention(nn.Module):
    """Multi-head self-attention with a fused `to_qkv` projection (rows ordered q, k, v)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.inner_dim = num_heads * head_dim
        self.attention_dropout = attention_dropout
        self.to_qkv = nn.Linear(dim, 3 * self.inner_dim, bias=True)
        self.to_out = nn.Linear(self.inner_dim, dim, bias=True)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

    def forward(self, hidden_states: torch.Tensor, query_indices: torch.Tensor | None = None) -> torch.Tensor:
        # `query_indices` (B, K) restricts the output to K query rows; keys and values still see every row.
        q, k, v = self.to_qkv(hidden_states).chunk(3, dim=-1)  # each (B, N, H * Dh)
        if query_indices is not None:
            q = torch.gather(q, 1, query_indices.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # (B, K, H * Dh)
        dropout_p = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), dropout_p=dropout_p)
        out = out.transpose(1, 2).flatten(2)  # (B, K, H * Dh)
        return self.dropout(self.to_out(out))


class MARFeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(F.gelu(self.fc1(hidden_states)))
        return self.dropout(self.fc2(hidden_states))


class MARTransformerBlock(nn.Module):
    """Pre-norm ViT block, as timm 0.9.12 `Block` with `qkv_bias=True` and no LayerScale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        mlp_ratio: float,
        attention_dropout: float,
        dropout: float,
        norm_eps: float,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MARAttention(dim, num_heads, head_dim, attention_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = MARFeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, hidden_states: torch.Tensor, query_indices: torch.Tensor | None = None) -> torch.Tensor:
        # With `query_indices` (B, K) only those rows are updated and returned: (B, K, D).
        attn_out = self.attn(self.norm1(hidden_states), query_indices)
        if query_indices is not None:
            index = query_indices.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
            hidden_states = torch.gather(hidden_states, 1, index)
        hidden_states = hidden_states + attn_out
        return hidden_states + self.ff(self.norm2(hidden_states))


class MARTransformer2DModel(TokenGridMixin, StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""
    The MAR encoder-decoder: sees the known tokens and emits one condition vector per token for the diffusion head.

    The encoder runs on `buffer_size` class-embedding slots plus the known (unmasked) tokens only; the decoder runs on
    all positions, with a learned mask token at the unknown ones, and adds a learned diffusion position embedding.

    Parameters:
        sample_size (`int`, *optional*, defaults to 16):
            Side of the (square) latent or pixel grid the tokens are cut from (16 for 256px images and the KL-16 VAE).
        patch_size (`int`, *optional*, defaults to 1):
            Side of the square patch grouped into one token.
        in_channels (`int`, *optional*, defaults to 16):
            Channels of the latent (or pixel) grid. A token has `in_channels * patch_size**2` values.
        num_layers (`int`, *optional*, defaults to 12):
            Encoder blocks.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Encoder attention heads.
        attention_head_dim (`int`, *optional*, defaults to 64):
            Channels per encoder head; the encoder width is `num_attention_heads * attention_head_dim`.
        decoder_num_layers (`int`, *optional*):
            Decoder blocks; defaults to `num_layers`.
        decoder_num_attention_heads (`int`, *optional*):
            Decoder heads; defaults to `num_attention_heads`.
        decoder_attention_head_dim (`int`, *optional*):
            Channels per decoder head; defaults to `attention_head_dim`.
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            Hidden width of the block MLPs relative to the block width.
        buffer_size (`int`, *optional*, defaults to 64):
            Number of class-embedding slots prepended to the sequence.
        num_classes (`int`, *optional*, defaults to 1000):
            Number of classes. The embedding table has `num_classes + 1` rows; label `num_classes` is the
            unconditional (classifier-free guidance) class, the original's `fake_latent`.
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout after the attention and MLP projections (training only).
        attention_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the attention probabilities (training only).
        norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every LayerNorm.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["MARTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 16,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        attention_head_dim: int = 64,
        decoder_num_layers: int | None = None,
        decoder_num_attention_heads: int | None = None,
        decoder_attention_head_dim: int | None = None,
        mlp_ratio: float = 4.0,
        buffer_size: int = 64,
        num_classes: int = 1000,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if sample_size % patch_size != 0:
            raise ValueError(f"`sample_size` ({sample_size}) must be a multiple of `patch_size` ({patch_size}).")
        decoder_num_layers = num_layers if decoder_num_layers is None else decoder_num_layers
        decoder_heads = num_attention_heads if decoder_num_attention_heads is None else decoder_num_attention_heads
        decoder_head_dim = attention_head_dim if decoder_attention_head_dim is None else decoder_attention_head_dim
        self.grid_size = sample_size // patch_size
        self.num_tokens = self.grid_size**2
        self.token_dim = in_channels * patch_size**2
        self.gradient_checkpointing = False

        encoder_dim = num_attention_heads * attention_head_dim
        decoder_dim = decoder_heads * decoder_head_dim
        self.encoder_dim = encoder_dim
        self.decoder_dim = decoder_dim

        # Encoder: token projection, class slots, learned positions.
        self.class_embedding = nn.Embedding(num_classes + 1, encoder_dim)
        self.proj_in = nn.Linear(self.token_dim, encoder_dim, bias=True)
        self.proj_in_norm = nn.LayerNorm(encoder_dim, eps=1e-6)
        self.encoder_pos_embed = nn.Parameter(torch.zeros(1, buffer_size + self.num_tokens, encoder_dim))
        self.encoder_blocks = nn.ModuleList(
            [
                MARTransformerBlock(
                    encoder_dim,
                    num_attention_heads,
                    attention_head_dim,
                    mlp_ratio,
                    attention_dropout,
                    dropout,
                    norm_eps,
                )
                for _ in range(num_layers)
            ]
        )
        self.encoder_norm = nn.LayerNorm(encoder_dim, eps=norm_eps)

        # Decoder: mask token at unknown positions, learned positions, diffusion position embedding.
        self.decoder_embed = nn.Linear(encoder_dim, decoder_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, buffer_size + self.num_tokens, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            [
                MARTransformerBlock(
                    decoder_dim, decoder_heads, decoder_head_dim, mlp_ratio, attention_dropout, dropout, norm_eps
                )
                for _ in range(decoder_num_layers)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=norm_eps)
        self.diffusion_pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, decoder_dim))

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The original's initialisation: N(0, 0.02) embeddings, Xavier-uniform linears, unit LayerNorms."""
        # As in LTH14/mar models/mar.py initialize_weights (fake_latent is the last class-embedding row).
        for param in (self.class_embedding.weight, self.mask_token, self.encoder_pos_embed):
            nn.init.normal_(param, std=0.02)
        for param in (self.decoder_pos_embed, self.diffusion_pos_embed):
            nn.init.normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _run_blocks(self, blocks: nn.ModuleList, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states)
            else:
                hidden_states = block(hidden_states)
        return hidden_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor,
        class_labels: torch.Tensor,
        predict_indices: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        r"""
        Compute the per-token conditions for the diffusion head.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch, num_tokens, token_dim)`):
                The token canvas (see `patchify`). Values at unknown positions are ignored.
            mask (`torch.Tensor` of shape `(batch, num_tokens)`):
                1 = unknown (to be predicted), 0 = known, as in MAR. Every row must have the same number of known
                tokens, because the encoder runs on a dense batch of the known tokens.
            class_labels (`torch.LongTensor` of shape `(batch,)`):
                Class indices in `[0, num_classes]`; `num_classes` is the unconditional class.
            predict_indices (`torch.LongTensor` of shape `(batch, K)`, *optional*):
                Token positions whose conditions are wanted. The last decoder block then computes only these rows
                (an exact saving at sampling time). Defaults to all positions.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`~models.modeling_outputs.Transformer2DModelOutput`] or a tuple.

        Returns:
            [`~models.modeling_outputs.Transformer2DModelOutput`] or `tuple`: `sample` of shape
            `(batch, num_tokens, decoder_dim)` (or `(batch, K, decoder_dim)`), the conditions `z` of the original.
        """
        b, seq_len, token_dim = hidden_states.shape
        if (seq_len, token_dim) != (self.num_tokens, self.token_dim):
            raise ValueError(
                f"`hidden_states` must have shape (batch, {self.num_tokens}, {self.token_dim}), "
                f"got {tuple(hidden_states.shape)}."
            )
        if mask.shape != (b, seq_len):
            raise ValueError(f"`mask` must have shape ({b}, {seq_len}), got {tuple(mask.shape)}.")
        if class_labels.shape != (b,):
            raise ValueError(f"`class_labels` must have shape ({b},), got {tuple(class_labels.shape)}.")
        unknown = (mask != 0).to(torch.uint8)
        num_known = (seq_len - unknown.sum(dim=1)).tolist()  # one host sync per forward
        if len(set(num_known)) > 1:
            raise ValueError(
                f"Every row of `mask` must have the same number of known (0) tokens; got {num_known}. "
                "The encoder runs on a dense (batch, known, dim) tensor, as in the original."
            )
        buffer_size = self.config.buffer_size

        # 1. Keep the known tokens, in raster order (a stable sort puts the 0s first in their original order).
        known_indices = torch.argsort(unknown, dim=1, stable=True)[:, : num_known[0]]  # (B, n)
        index = known_indices.unsqueeze(-1)
        tokens = torch.gather(hidden_states, 1, index.expand(-1, -1, token_dim))  # (B, n, C)

        # 2. Encoder: class slots + known tokens, positions, LayerNorm, blocks.
        encoder_pos = self.encoder_pos_embed.expand(b, -1, -1)
        token_pos = torch.gather(encoder_pos[:, buffer_size:], 1, index.expand(-1, -1, self.encoder_dim))
        class_slots = self.class_embedding(class_labels).unsqueeze(1).expand(-1, buffer_size, -1)
        x = torch.cat([class_slots, self.proj_in(tokens)], dim=1)  # (B, buffer + n, D_enc)
        x = x + torch.cat([encoder_pos[:, :buffer_size], token_pos], dim=1)
        x = self.proj_in_norm(x)
        x = self._run_blocks(self.encoder_blocks, x)
        x = self.encoder_norm(x)

        # 3. Decoder: scatter the known rows into a mask-token canvas of all positions.
        x = self.decoder_embed(x)
        buffer_positions = torch.arange(buffer_size, device=x.device).expand(b, -1)
        positions = torch.cat([buffer_positions, known_indices + buffer_size], dim=1)  # (B, buffer + n)
        canvas = self.mask_token.to(x.dtype).expand(b, buffer_size + seq_len, -1)
        canvas = canvas.scatter(1, positions.unsqueeze(-1).expand(-1, -1, self.decoder_dim), x)
        x = canvas + self.decoder_pos_embed

        if predict_indices is None:
            x = self._run_blocks(self.decoder_blocks, x)
            x = self.decoder_norm(x)[:, buffer_size:] + self.diffusion_pos_embed  # (B, L, D_dec)
        else:
            # Only the rows in `predict_indices` are needed: the last block computes just those queries.
            x = self._run_blocks(self.decoder_blocks[:-1], x)
            query_indices = predict_indices + buffer_size
            if len(self.decoder_blocks) > 0:
                x = self.decoder_blocks[-1](x, query_indices)
            else:
                x = torch.gather(x, 1, query_indices.unsqueeze(-1).expand(-1, -1, self.decoder_dim))
            index = predict_indices.unsqueeze(-1).expand(-1, -1, self.decoder_dim)
            x = self.decoder_norm(x) + torch.gather(self.diffusion_pos_embed.expand(b, -1, -1), 1, index)  # (B, K, D)
        if not return_dict:
            return (x,)
        return Transformer2DModelOutput(sample=x)
