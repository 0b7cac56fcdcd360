"""ARTransformer2DModel: a causal (GPT-style) transformer that gives MAR's diffusion head one condition per token.

The paper's Table 1 "AR" rows (LTH14/mar issues #34 and #72): one stack of causal blocks over
`[class token, x_tau1, ..., x_tau(L-1)]`, trained with teacher forcing on every position at once. Row `j` of the
sequence predicts the token at `orders[:, j]`; it sees the learned position embedding of its input token and the
*target-aware* embedding of the position it predicts (RAR, Yu et al. 2024), so random orders are well posed. At
sampling an `ARKVCache` keeps each block's keys and values, so a step costs O(L) instead of O(L^2).
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
from diffusers_mar.models.transformer_mar import MARFeedForward


class ARKVCache:
    """Keys and values of every causal block for one sampling run: `(batch, heads, num_tokens, head_dim)` per block.

    `length` sequence positions are filled; `ARTransformer2DModel.forward(..., kv_cache=cache)` computes position
    `length` only and appends its keys and values. Made by `ARTransformer2DModel.make_kv_cache`. A block's buffers
    are allocated at its first write, with the device and dtype of its keys (the compute dtype under layerwise
    casting or autocast, the onload device under offloading).
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, num_positions: int, head_dim: int):
        self.shape = (batch_size, num_heads, num_positions, head_dim)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.batch_size = batch_size
        self.num_positions = num_positions
        self.length = 0


class ARAttention(nn.Module):
    """Causal multi-head self-attention with a fused `to_qkv` projection (rows ordered q, k, v) and a KV cache."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attention_dropout = attention_dropout
        self.to_qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=True)
        self.to_out = nn.Linear(num_heads * head_dim, dim, bias=True)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, hidden_states: torch.Tensor, kv_cache: ARKVCache | None = None, layer_index: int = 0
    ) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        qkv = self.to_qkv(hidden_states).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, n, Dh)
        dropout_p = self.attention_dropout if self.training else 0.0
        if kv_cache is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # The new rows attend to every cached row and to each other causally.
            start, end = kv_cache.length, kv_cache.length + n
            if kv_cache.keys[layer_index] is None:
                kv_cache.keys[layer_index] = k.new_zeros(kv_cache.shape)
                kv_cache.values[layer_index] = v.new_zeros(kv_cache.shape)
            keys, values = kv_cache.keys[layer_index], kv_cache.values[layer_index]
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            causal = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(diagonal=start)  # (n, end)
            out = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=causal)
        out = out.transpose(1, 2).flatten(2)  # (B, n, H * Dh)
        return self.dropout(self.to_out(out))


class ARTransformerBlock(nn.Module):
    """Pre-norm GPT block: the ViT block of `MARTransformerBlock` with causal attention."""

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
        self.attn = ARAttention(dim, num_heads, head_dim, attention_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = MARFeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(
        self, hidden_states: torch.Tensor, kv_cache: ARKVCache | None = None, layer_index: int = 0
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), kv_cache, layer_index)
        return hidden_states + self.ff(self.norm2(hidden_states))


class ARTransformer2DModel(TokenGridMixin, StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""
    A causal transformer over the tokens in a generation order; one condition per token for the diffusion head.

    Sequence row `j` holds the class token (`j = 0`) or the token at `orders[:, j - 1]`, plus its position embedding,
    plus the target-aware embedding of `orders[:, j]`, the position it predicts. The conditions come back in raster
    positions, as `MARTransformer2DModel`'s: the condition of token `p` depends only on the class and on the tokens
    before `p` in the order.

    Parameters:
        sample_size (`int`, *optional*, defaults to 16):
            Side of the (square) latent or pixel grid the tokens are cut from (16 for 256px images and the KL-16 VAE).
        patch_size (`int`, *optional*, defaults to 1):
            Side of the square patch grouped into one token.
        in_channels (`int`, *optional*, defaults to 16):
            Channels of the latent (or pixel) grid. A token has `in_channels * patch_size**2` values.
        num_layers (`int`, *optional*, defaults to 24):
            Causal blocks (the paper's AR uses one stack of the MAR encoder's plus decoder's depth).
        num_attention_heads (`int`, *optional*, defaults to 12):
            Attention heads.
        attention_head_dim (`int`, *optional*, defaults to 64):
            Channels per head; the width is `num_attention_heads * attention_head_dim`.
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            Hidden width of the block MLPs relative to the block width.
        num_classes (`int`, *optional*, defaults to 1000):
            Number of classes. The embedding table has `num_classes + 1` rows; label `num_classes` is the
            unconditional (classifier-free guidance) class, as in MAR.
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout after the attention and MLP projections (training only).
        attention_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the attention probabilities (training only).
        norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every LayerNorm.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ARTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 16,
        num_layers: int = 24,
        num_attention_heads: int = 12,
        attention_head_dim: int = 64,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if sample_size % patch_size != 0:
            raise ValueError(f"`sample_size` ({sample_size}) must be a multiple of `patch_size` ({patch_size}).")
        self.grid_size = sample_size // patch_size
        self.num_tokens = self.grid_size**2
        self.token_dim = in_channels * patch_size**2
        self.inner_dim = num_attention_heads * attention_head_dim
        self.gradient_checkpointing = False
        dim = self.inner_dim

        self.class_embedding = nn.Embedding(num_classes + 1, dim)  # the start token; row num_classes: unconditional
        self.proj_in = nn.Linear(self.token_dim, dim, bias=True)
        self.start_pos_embed = nn.Parameter(torch.zeros(1, 1, dim))  # the class token's position
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))  # the input token's position
        self.target_pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))  # the predicted token's position
        self.proj_in_norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList(
            [
                ARTransformerBlock(
                    dim, num_attention_heads, attention_head_dim, mlp_ratio, attention_dropout, dropout, norm_eps
                )
                for _ in range(num_layers)
            ]
        )
        self.norm_out = nn.LayerNorm(dim, eps=norm_eps)
        self.diffusion_pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))  # as MAR's, at the output

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's initialisation: N(0, 0.02) embeddings, Xavier-uniform linears, unit LayerNorms."""
        for param in (self.class_embedding.weight, self.start_pos_embed, self.pos_embed, self.target_pos_embed):
            nn.init.normal_(param, std=0.02)
        nn.init.normal_(self.diffusion_pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def make_kv_cache(self, batch_size: int) -> ARKVCache:
        """An empty `ARKVCache` for `batch_size` sequences (the doubled batch under guidance)."""
        config = self.config
        return ARKVCache(
            len(self.blocks), batch_size, config.num_attention_heads, self.num_tokens, config.attention_head_dim
        )

    def _check_inputs(self, hidden_states, class_labels, orders, kv_cache) -> None:
        b, seq_len, token_dim = hidden_states.shape
        if (seq_len, token_dim) != (self.num_tokens, self.token_dim):
            raise ValueError(
                f"`hidden_states` must have shape (batch, {self.num_tokens}, {self.token_dim}), "
                f"got {tuple(hidden_states.shape)}."
            )
        if class_labels.shape != (b,):
            raise ValueError(f"`class_labels` must have shape ({b},), got {tuple(class_labels.shape)}.")
        if orders is not None and orders.shape != (b, seq_len):
            raise ValueError(f"`orders` must have shape ({b}, {seq_len}), got {tuple(orders.shape)}.")
        if kv_cache is not None and (kv_cache.batch_size != b or kv_cache.length >= kv_cache.num_positions):
            raise ValueError(
                f"`kv_cache` holds {kv_cache.batch_size} sequences with {kv_cache.length} of {kv_cache.num_positions} "
                f"positions filled; it needs {b} sequences and a free position (make one with `make_kv_cache`)."
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        class_labels: torch.Tensor,
        orders: torch.Tensor | None = None,
        kv_cache: ARKVCache | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        r"""
        Compute the per-token conditions for the diffusion head.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch, num_tokens, token_dim)`):
                The token canvas in raster positions (see `patchify`). The condition of a token never depends on the
                tokens at or after it in the order, so their values are ignored.
            class_labels (`torch.LongTensor` of shape `(batch,)`):
                Class indices in `[0, num_classes]`; `num_classes` is the unconditional class.
            orders (`torch.LongTensor` of shape `(batch, num_tokens)`, *optional*):
                Generation orders, one permutation of the positions per row. Defaults to raster order.
            kv_cache (`ARKVCache`, *optional*):
                With a cache (`make_kv_cache`), only sequence row `j = kv_cache.length` is computed, reading the
                token at `orders[:, j - 1]` of the canvas; its keys and values are appended and `j` advances. The
                output is then the condition of the token at `orders[:, j]`, shape `(batch, 1, dim)`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`~models.modeling_outputs.Transformer2DModelOutput`] or a tuple.

        Returns:
            [`~models.modeling_outputs.Transformer2DModelOutput`] or `tuple`: `sample` of shape
            `(batch, num_tokens, dim)`, the condition of each token in raster positions (with a cache:
            `(batch, 1, dim)`, the condition of the token at `orders[:, kv_cache.length]` before the call).
        """
        self._check_inputs(hidden_states, class_labels, orders, kv_cache)
        b, seq_len, token_dim = hidden_states.shape
        if orders is None:
            orders = torch.arange(seq_len, device=hidden_states.device).expand(b, -1)
        orders = orders.to(device=hidden_states.device, dtype=torch.long)
        start = 0 if kv_cache is None else kv_cache.length
        end = seq_len if kv_cache is None else start + 1
        dim = self.inner_dim

        # 1. Inputs of rows [start, end): the class token at row 0, else the token at orders[:, row - 1].
        class_token = self.class_embedding(class_labels).unsqueeze(1) + self.start_pos_embed  # (B, 1, D)
        rows = []
        if start == 0:
            rows.append(class_token)
        if end > max(start, 1):
            inputs = orders[:, max(start, 1) - 1 : end - 1]  # (B, n)
            tokens = torch.gather(hidden_states, 1, inputs.unsqueeze(-1).expand(-1, -1, token_dim))
            pos = torch.gather(self.pos_embed.expand(b, -1, -1), 1, inputs.unsqueeze(-1).expand(-1, -1, dim))
            rows.append(self.proj_in(tokens) + pos)
        x = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]  # (B, end - start, D)

        # 2. Target-aware embedding of the position each row predicts, LayerNorm, causal blocks.
        targets = orders[:, start:end]  # (B, n)
        target_index = targets.unsqueeze(-1).expand(-1, -1, dim)
        x = self.proj_in_norm(x + torch.gather(self.target_pos_embed.expand(b, -1, -1), 1, target_index))
        for index, block in enumerate(self.blocks):
            if kv_cache is None and torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x)
            else:
                x = block(x, kv_cache, index)
        x = self.norm_out(x) + torch.gather(self.diffusion_pos_embed.expand(b, -1, -1), 1, target_index)

        # 3. Conditions: in raster positions without a cache, the one new row with it.
        if kv_cache is not None:
            kv_cache.length = end
        else:
            x = torch.empty_like(x).scatter(1, target_index, x)  # row j -> position orders[:, j]
        if not return_dict:
            return (x,)
        return Transformer2DModelOutput(sample=x)
