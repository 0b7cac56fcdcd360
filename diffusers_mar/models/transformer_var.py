"""VARTransformer2DModel: VAR's next-scale prediction transformer (Tian et al. 2024), logits over the VQ codebook.

The sequence is the token pyramid of a multi-scale VQ-VAE, coarse to fine: scale `s` has `patch_nums[s]**2` tokens.
The first scale's tokens are the class embedding plus a learned start position; every later scale's tokens are the
VQ-VAE's teacher-forcing input for that scale (`vq_embed_dim` channels) through `proj_in`. A token sees every token
of its own and of the earlier scales (a block-causal mask), so all tokens of a scale are predicted at once. The class
embedding is also the AdaLN condition of every block and of the head. At sampling a `VARKVCache` keeps each block's
keys and values, and each call computes one scale.

Numerics follow FoundationVision/VAR (commit 78b9539) `models/var.py` (`VAR.forward`, `autoregressive_infer_cfg`,
`init_weights`) and `models/basic_var.py` (`AdaLNSelfAttn`, `SelfAttention` with `attn_l2_norm=True`, `FFN`,
`AdaLNBeforeHead`), written with `scaled_dot_product_attention`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from diffusers_mar.models.loading import StrictLoadingMixin

# The learned per-head multiplier of the normalised queries is exp(min(log_scale, log 100)): at most 100.
MAX_LOG_ATTENTION_SCALE = math.log(100.0)


class VARKVCache:
    """Keys and values of every block for one sampling run: `(batch, heads, num_tokens, head_dim)` per block.

    `VARTransformer2DModel.forward(..., kv_cache=cache)` computes scale `scale_index` only, appends its keys and values
    after the `length` tokens of the earlier scales and advances both. Made by `VARTransformer2DModel.make_kv_cache`.
    A block's buffers are allocated at its first write, with the device and dtype of its keys (the compute dtype under
    layerwise casting or autocast, the onload device under offloading).
    """

    def __init__(
        self, num_layers: int, batch_size: int, num_heads: int, num_tokens: int, head_dim: int, num_scales: int
    ):
        self.shape = (batch_size, num_heads, num_tokens, head_dim)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.batch_size = batch_size
        self.num_tokens = num_tokens
        self.num_scales = num_scales
        self.length = 0  # tokens filled: those of scales 0 .. scale_index - 1
        self.scale_index = 0  # the scale the next call computes


class VARDropPath(nn.Module):
    """Stochastic depth (timm's `DropPath`): in training, zero a sample's branch with probability `p`, scale others."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return hidden_states
        keep = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1))
        return hidden_states * keep.bernoulli_(1.0 - self.p).div_(1.0 - self.p)


class VARAttention(nn.Module):
    """Self-attention on L2-normalised queries and keys with a learned per-head scale; q and v biases, no k bias."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attention_dropout = attention_dropout
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)  # rows ordered q, k, v
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())  # the original's scale_mul_1H11
        self.to_out = nn.Linear(dim, dim, bias=True)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: VARKVCache | None = None,
        layer_index: int = 0,
    ) -> torch.Tensor:
        b, n, dim = hidden_states.shape
        # The bias is added after the layer's own call (not fused into F.linear) so that hooks on `to_qkv` apply.
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = self.to_qkv(hidden_states)
        qkv = (qkv + bias.to(qkv.dtype)).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, n, Dh)
        q = F.normalize(q, dim=-1) * self.log_scale.clamp_max(MAX_LOG_ATTENTION_SCALE).exp()
        k = F.normalize(k, dim=-1)
        if kv_cache is not None:
            # The new scale attends to every cached token and to all of its own: no mask.
            start, end = kv_cache.length, kv_cache.length + n
            if kv_cache.keys[layer_index] is None:
                kv_cache.keys[layer_index] = k.new_zeros(kv_cache.shape)
                kv_cache.values[layer_index] = v.new_zeros(kv_cache.shape)
            kv_cache.keys[layer_index][:, :, start:end] = k
            kv_cache.values[layer_index][:, :, start:end] = v
            k, v = kv_cache.keys[layer_index][:, :, :end], kv_cache.values[layer_index][:, :, :end]
        dropout_p = self.attention_dropout if self.training else 0.0
        # The queries carry the whole scale: the softmax scale is 1.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout_p, scale=1.0)
        out = out.transpose(1, 2).reshape(b, n, dim)  # (B, n, D)
        return self.dropout(self.to_out(out))


class VARFeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(hidden_states), approximate="tanh")))


class VARTransformerBlock(nn.Module):
    """AdaLN block: six class-conditioned vectors (gates, scales, shifts) around attention and MLP, as `AdaLNSelfAttn`.

    Without `shared_adaln` the block projects the condition `(B, D)` itself (`adaln_proj`); with it the model projects
    the condition once for every block, `(B, 1, 6, D)`, and each block adds its own learned table `adaln_table`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        attention_dropout: float,
        dropout: float,
        drop_path: float,
        norm_eps: float,
        shared_adaln: bool,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        if shared_adaln:
            self.adaln_table = nn.Parameter(torch.zeros(1, 1, 6, dim))
            self.adaln_proj = None
        else:
            self.adaln_table = None
            self.adaln_proj = nn.Linear(dim, 6 * dim, bias=True)
        self.attn = VARAttention(dim, num_heads, attention_dropout, dropout)
        self.ff = VARFeedForward(dim, round(dim * mlp_ratio), dropout)
        self.drop_path = VARDropPath(drop_path)

    def forward(
        self,
        hidden_states: torch.Tensor,
        condition: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: VARKVCache | None = None,
        layer_index: int = 0,
    ) -> torch.Tensor:
        dim = hidden_states.shape[-1]
        if self.adaln_table is not None:
            modulation = self.adaln_table + condition  # (B, 1, 6, D)
        else:
            modulation = self.adaln_proj(F.silu(condition)).view(-1, 1, 6, dim)  # (B, 1, 6, D)
        # As in FoundationVision/VAR models/basic_var.py AdaLNSelfAttn.forward: gates, then scales, then shifts.
        gate_msa, gate_mlp, scale_msa, scale_mlp, shift_msa, shift_mlp = modulation.unbind(2)  # each (B, 1, D)
        attn_in = self.norm(hidden_states) * (scale_msa + 1) + shift_msa
        attn_out = self.attn(attn_in, attention_mask, kv_cache, layer_index)
        hidden_states = hidden_states + self.drop_path(attn_out * gate_msa)
        ff_in = self.norm(hidden_states) * (scale_mlp + 1) + shift_mlp
        return hidden_states + self.drop_path(self.ff(ff_in) * gate_mlp)


class VARNormOut(nn.Module):
    """The head's AdaLN (`AdaLNBeforeHead`): LayerNorm without affine, then a class-conditioned scale and shift."""

    def __init__(self, dim: int, norm_eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.linear = nn.Linear(dim, 2 * dim, bias=True)

    def forward(self, hidden_states: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(condition)).view(-1, 1, 2, hidden_states.shape[-1]).unbind(2)
        return self.norm(hidden_states) * (scale + 1) + shift


class VARTransformer2DModel(StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""
    VAR's class-conditional next-scale transformer: logits over the VQ codebook for every token of the token pyramid.

    Scale `s` has `patch_nums[s]**2` tokens in raster order; the sequence is the scales from coarse to fine,
    `num_tokens = sum(p**2 for p in patch_nums)` tokens. The logits of scale `s` depend only on the class and on the
    teacher-forcing inputs of scales `1 .. s` (the VQ-VAE's interpolated sum of the codes of scales `0 .. s-1`).

    Parameters:
        patch_nums (`list[int]` or `tuple[int, ...]`, *optional*, defaults to `(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)`):
            Side of each scale's square token grid, coarse to fine (the VQ-VAE's `v_patch_nums`).
        vocab_size (`int`, *optional*, defaults to 4096):
            Codebook size of the VQ-VAE: the logits have `vocab_size` entries.
        vq_embed_dim (`int`, *optional*, defaults to 32):
            Channels of the VQ-VAE's codes (the original's `Cvae`), the channels of `hidden_states`.
        num_layers (`int`, *optional*, defaults to 16):
            Transformer blocks (the original's `depth`; its released models are d16, d20, d24, d30 and d36).
        num_attention_heads (`int`, *optional*, defaults to 16):
            Attention heads (the original uses `depth` heads).
        attention_head_dim (`int`, *optional*, defaults to 64):
            Channels per head; the width is `num_attention_heads * attention_head_dim` (the original's `depth * 64`).
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            Hidden width of the block MLPs relative to the block width.
        num_classes (`int`, *optional*, defaults to 1000):
            Number of classes. The embedding table has `num_classes + 1` rows; label `num_classes` is the
            unconditional (classifier-free guidance) class, as in the original.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout after the attention and MLP projections (training only; the original's `drop_rate`).
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities (training only).
        drop_path_rate (`float`, *optional*, defaults to 0.06666666666666667):
            Stochastic depth of the last block, rising linearly from 0 at the first (training only). The original
            uses `0.1 * depth / 24` (the default: d16's).
        norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every LayerNorm.
        shared_adaln (`bool`, *optional*, defaults to `False`):
            One AdaLN projection of the condition for all blocks plus a learned table per block (the original's
            `shared_aln`, used by its d36 model), instead of a projection per block.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["VARTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_nums: list[int] | tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        vocab_size: int = 4096,
        vq_embed_dim: int = 32,
        num_layers: int = 16,
        num_attention_heads: int = 16,
        attention_head_dim: int = 64,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path_rate: float = 0.1 * 16 / 24,
        norm_eps: float = 1e-6,
        shared_adaln: bool = False,
    ):
        super().__init__()
        if len(patch_nums) == 0 or any(not isinstance(p, int) or p < 1 for p in patch_nums):
            raise ValueError(f"`patch_nums` must be a non-empty list of positive integers, got {patch_nums}.")
        self.register_to_config(patch_nums=list(patch_nums))  # a list, as config.json gives it back
        self.scale_lengths = [p * p for p in patch_nums]
        self.scale_starts = [sum(self.scale_lengths[:s]) for s in range(len(patch_nums))]
        self.num_tokens = sum(self.scale_lengths)
        self.inner_dim = num_attention_heads * attention_head_dim
        self.gradient_checkpointing = False
        dim, first_length = self.inner_dim, self.scale_lengths[0]

        self.class_embedding = nn.Embedding(num_classes + 1, dim)  # start token and condition; last row: unconditional
        self.start_pos_embed = nn.Parameter(torch.zeros(1, first_length, dim))  # the first scale's tokens
        self.proj_in = nn.Linear(vq_embed_dim, dim, bias=True)  # the teacher-forcing input of the later scales
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))  # absolute positions, scale by scale
        self.level_embedding = nn.Embedding(len(patch_nums), dim)  # which scale a token belongs to

        self.shared_adaln_proj = nn.Linear(dim, 6 * dim, bias=True) if shared_adaln else None
        # Linear from 0 to drop_path_rate, in float32 as the original; on the CPU, so that a meta-device build works.
        drop_path_rates = torch.linspace(0, drop_path_rate, num_layers, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            [
                VARTransformerBlock(
                    dim,
                    num_attention_heads,
                    mlp_ratio,
                    attention_dropout,
                    dropout,
                    drop_path_rates[index],
                    norm_eps,
                    shared_adaln,
                )
                for index in range(num_layers)
            ]
        )
        self.norm_out = VARNormOut(dim, norm_eps)
        self.proj_out = nn.Linear(dim, vocab_size, bias=True)

        self.initialize_weights()

    def initialize_weights(
        self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1.0
    ) -> None:
        """The original's initialisation for training from scratch, with `build_vae_var`'s defaults.

        Truncated-normal linears and embeddings (`init_std`; negative: `sqrt(1 / (3 * width))`), zero biases, the
        output layer times `init_head`, the residual projections divided by `sqrt(2 * num_layers)`, AdaLN scales and
        shifts times `init_adaln` and gates times `init_adaln_gamma`.
        """
        # As in FoundationVision/VAR models/var.py VAR.__init__ (positions) and VAR.init_weights (the rest).
        dim, depth = self.inner_dim, len(self.blocks)
        position_std = math.sqrt(1 / dim / 3)
        init_std = position_std if init_std < 0 else init_std
        nn.init.trunc_normal_(self.start_pos_embed, std=position_std)
        nn.init.trunc_normal_(self.pos_embed, std=position_std)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        self.proj_out.weight.data.mul_(init_head)
        self.norm_out.linear.weight.data.mul_(init_adaln)
        for block in self.blocks:
            nn.init.zeros_(block.attn.q_bias)
            nn.init.zeros_(block.attn.v_bias)
            block.attn.log_scale.data.fill_(math.log(4.0))
            block.attn.to_out.weight.data.div_(math.sqrt(2 * depth))
            block.ff.fc2.weight.data.div_(math.sqrt(2 * depth))
            if block.adaln_table is not None:
                block.adaln_table.data.copy_(torch.randn_like(block.adaln_table) / dim**0.5)
                block.adaln_table.data[:, :, 2:].mul_(init_adaln)
                block.adaln_table.data[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.adaln_proj.weight.data[2 * dim :].mul_(init_adaln)
                block.adaln_proj.weight.data[: 2 * dim].mul_(init_adaln_gamma)

    def make_kv_cache(self, batch_size: int) -> VARKVCache:
        """An empty `VARKVCache` for `batch_size` sequences (the doubled batch under guidance)."""
        config = self.config
        return VARKVCache(
            len(self.blocks),
            batch_size,
            config.num_attention_heads,
            self.num_tokens,
            config.attention_head_dim,
            len(config.patch_nums),
        )

    def block_causal_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """`(num_tokens, num_tokens)` booleans: query `i` may attend to key `j` iff `j`'s scale is not after `i`'s."""
        levels = self._levels(device)
        return levels[:, None] >= levels[None, :]

    def _levels(self, device: torch.device | str | None) -> torch.Tensor:
        lengths = torch.tensor(self.scale_lengths, device=device)
        scales = torch.arange(len(self.scale_lengths), device=device)
        return torch.repeat_interleave(scales, lengths, output_size=self.num_tokens)  # (L,); no device sync

    def _check_inputs(self, class_labels, hidden_states, kv_cache) -> None:
        if class_labels.ndim != 1 or class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
            raise ValueError(
                f"`class_labels` must be a 1-D tensor of integer class indices, got {class_labels.dtype} of shape "
                f"{tuple(class_labels.shape)}."
            )
        b, channels = class_labels.shape[0], self.config.vq_embed_dim
        if kv_cache is None:
            expected = self.num_tokens - self.scale_lengths[0]
            what = f"the teacher-forcing input of every scale after the first ({expected} tokens)"
        else:
            if kv_cache.batch_size != b or kv_cache.scale_index >= kv_cache.num_scales:
                raise ValueError(
                    f"`kv_cache` holds {kv_cache.batch_size} sequences with {kv_cache.scale_index} of "
                    f"{kv_cache.num_scales} scales filled; it needs {b} sequences (the batch of `class_labels`) and "
                    "a scale left to compute (make one with `make_kv_cache`)."
                )
            if kv_cache.num_scales != len(self.scale_lengths) or kv_cache.num_tokens != self.num_tokens:
                raise ValueError("`kv_cache` was made for another model's scales (make one with `make_kv_cache`).")
            if kv_cache.scale_index == 0:
                if hidden_states is not None:
                    raise ValueError(
                        "`hidden_states` must be None at the first scale of a `kv_cache`: its tokens come from the "
                        "class embedding."
                    )
                return
            expected = self.scale_lengths[kv_cache.scale_index]
            what = f"the teacher-forcing input of scale {kv_cache.scale_index} ({expected} tokens)"
        if hidden_states is None or hidden_states.shape != (b, expected, channels):
            got = None if hidden_states is None else tuple(hidden_states.shape)
            raise ValueError(f"`hidden_states` must have shape ({b}, {expected}, {channels}), {what}; got {got}.")

    def forward(
        self,
        class_labels: torch.Tensor,
        hidden_states: torch.Tensor | None = None,
        kv_cache: VARKVCache | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        r"""
        Compute the logits of every token (teacher forcing), or of the next scale with a `kv_cache`.

        Args:
            class_labels (`torch.LongTensor` of shape `(batch,)`):
                Class indices in `[0, num_classes]`; `num_classes` is the unconditional class.
            hidden_states (`torch.Tensor` of shape `(batch, num_tokens - patch_nums[0]**2, vq_embed_dim)`, *optional*):
                The teacher-forcing input of every scale after the first, scales concatenated in order (the
                original's `x_BLCv_wo_first_l`, from the VQ-VAE). With a `kv_cache`: the input of scale
                `kv_cache.scale_index` only, `(batch, patch_nums[s]**2, vq_embed_dim)`, and `None` at scale 0.
            kv_cache (`VARKVCache`, *optional*):
                With a cache (`make_kv_cache`), only scale `s = kv_cache.scale_index` is computed; it attends to the
                cached keys and values of the earlier scales, appends its own and `s` advances. One call per scale,
                in order, gives the logits of the full forward.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`~models.modeling_outputs.Transformer2DModelOutput`] or a tuple.

        Returns:
            [`~models.modeling_outputs.Transformer2DModelOutput`] or `tuple`: `sample` of shape
            `(batch, num_tokens, vocab_size)`, the logits of every token (with a cache: `(batch, patch_nums[s]**2,
            vocab_size)`, those of scale `s`).
        """
        self._check_inputs(class_labels, hidden_states, kv_cache)
        scale = None if kv_cache is None else kv_cache.scale_index
        start = 0 if scale is None else self.scale_starts[scale]
        end = self.num_tokens if scale is None else start + self.scale_lengths[scale]

        # 1. Tokens: the class embedding at the first scale, the projected teacher-forcing input at the later ones.
        # As the original under autocast: the tokens in the model's dtype, the blocks' inputs in the autocast dtype.
        device_type = class_labels.device.type
        autocast = torch.amp.is_autocast_available(device_type)  # torch.autocast refuses other device types
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            condition = self.class_embedding(class_labels)  # (B, D)
            rows = []
            if start == 0:
                rows.append(condition.unsqueeze(1) + self.start_pos_embed)  # (B, first_l, D)
            if hidden_states is not None and hidden_states.shape[1] > 0:
                rows.append(self.proj_in(hidden_states.to(self.pos_embed.dtype)))  # (B, n, D)
            x = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]  # (B, end - start, D)
            levels = self._levels(class_labels.device)[start:end]
            x = x + (self.level_embedding(levels) + self.pos_embed[:, start:end])

        # 2. Block-causal attention over the scales (with a cache: the new scale sees every earlier token, no mask).
        attention_mask = self.block_causal_mask(x.device) if kv_cache is None else None
        if self.shared_adaln_proj is not None:
            block_condition = self.shared_adaln_proj(F.silu(condition)).view(-1, 1, 6, self.inner_dim)  # (B, 1, 6, D)
        else:
            block_condition = condition  # (B, D); each block projects it
        if autocast and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, block_condition = x.to(dtype), block_condition.to(dtype)
        for index, block in enumerate(self.blocks):
            if kv_cache is None and torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, block_condition, attention_mask)
            else:
                x = block(x, block_condition, attention_mask, kv_cache, index)

        # 3. Logits over the codebook.
        logits = self.proj_out(self.norm_out(x, condition))  # (B, end - start, V)
        if kv_cache is not None:
            kv_cache.length, kv_cache.scale_index = end, scale + 1
        if not return_dict:
            return (logits,)
        return Transformer2DModelOutput(sample=logits)
