"""MARDiffusionHead: the per-token denoiser of MAR's Diffusion Loss.

Numerics follow LTH14/mar `models/diffloss.py` (`SimpleMLPAdaLN`). The AdaLN modulations of all residual blocks
and of the final layer are the rows of one `Linear` (`MARAdaLNModulation`): `forward` computes each block's rows just
before the block runs, as the original does, and a sampler can compute the modulations of several diffusion steps at
once (`compute_modulation`, then `forward_with_modulation` per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from diffusers_mar.models.loading import StrictLoadingMixin


@dataclass
class MARDiffusionHeadOutput(BaseOutput):
    """
    The output of [`MARDiffusionHead`].

    Args:
        sample (`torch.Tensor` of shape `(N, out_channels)`):
            `[eps, v]`: the predicted noise and the learned-range variance value of each token.
    """

    sample: torch.Tensor


class MARResBlock(nn.Module):
    """LayerNorm -> AdaLN modulate -> MLP -> gated residual (shift, scale, gate come from outside)."""

    def __init__(self, channels: int, norm_eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=norm_eps)
        self.linear_1 = nn.Linear(channels, channels, bias=True)
        self.linear_2 = nn.Linear(channels, channels, bias=True)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * (1 + scale) + shift
        h = self.linear_2(F.silu(self.linear_1(h)))
        return x + gate * h


class MARAdaLNModulation(nn.Linear):
    r"""
    The AdaLN modulations of `num_res_blocks` residual blocks and of the final layer, as the rows of one `Linear`:
    `(shift, scale, gate)` of each block, then `(shift, scale)` of the final layer, `channels` rows each.

    `forward(y)` gives them all, `(..., (3 * num_res_blocks + 2) * channels)`; `forward(y, block=i)` only those of
    block `i` (`i = num_res_blocks`: the final layer), from its rows of the weight. Both go through the module call,
    so hooks (layerwise casting, offloading) apply. The products are made one block at a time either way: on the CPU
    that is faster than one product with a 20x wider output (about 1.1-1.3x for MAR-B at 32-256 rows).
    """

    def __init__(self, channels: int, num_res_blocks: int):
        super().__init__(channels, (3 * num_res_blocks + 2) * channels, bias=True)
        sizes = [3 * channels] * num_res_blocks + [2 * channels]  # the final layer has no gate
        self.block_rows = [slice(3 * channels * i, 3 * channels * i + size) for i, size in enumerate(sizes)]

    def forward(self, y: torch.Tensor, block: int | None = None) -> torch.Tensor:
        if block is not None:
            rows = self.block_rows[block]
            return F.linear(y, self.weight[rows], self.bias[rows])
        out = y.new_empty(*y.shape[:-1], self.out_features)
        for rows in self.block_rows:
            out[..., rows] = F.linear(y, self.weight[rows], self.bias[rows])
        return out


class MARDiffusionHead(StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""
    A denoiser for ONE token given its condition: `(sample, timestep, condition) -> (N, 2 * in_channels)`.

    The output is `[eps, v]`: the predicted noise and the learned-range variance interpolation value in `[-1, 1]`
    (diffusers' `variance_type="learned_range"`).

    Parameters:
        in_channels (`int`, *optional*, defaults to 16):
            Values per token (`in_channels * patch_size**2` of the transformer).
        model_channels (`int`, *optional*, defaults to 1024):
            Width of the MLP (the original's `diffloss_w`).
        condition_channels (`int`, *optional*, defaults to 768):
            Width of the condition, i.e. the transformer's decoder width.
        num_res_blocks (`int`, *optional*, defaults to 6):
            Residual AdaLN blocks (the original's `diffloss_d`).
        out_channels (`int`, *optional*):
            Output channels; defaults to `2 * in_channels` (noise and learned variance).
        frequency_embedding_size (`int`, *optional*, defaults to 256):
            Size of the sinusoidal timestep features (`[cos, sin]`).
        norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the LayerNorms.
    """

    _supports_gradient_checkpointing = True
    # Samplers call `embed_condition`, `compute_modulation`, `forward_with_modulation` and
    # `forward_with_condition_embedding`, not `forward`: block-level group offloading must onload these layers when
    # they run, not when `forward` is entered (as AutoencoderKL).
    _group_offload_block_modules = ["time_embedding", "cond_proj", "proj_in", "adaln_modulation", "proj_out"]
    # What `compile` compiles besides the module call (`forward`): the entry points samplers call.
    _sampler_methods = (
        "embed_condition",
        "compute_modulation",
        "forward_with_modulation",
        "forward_with_condition_embedding",
    )

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        model_channels: int = 1024,
        condition_channels: int = 768,
        num_res_blocks: int = 6,
        out_channels: int | None = None,
        frequency_embedding_size: int = 256,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        out_channels = 2 * in_channels if out_channels is None else out_channels
        self.gradient_checkpointing = False

        self.time_proj = Timesteps(frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(frequency_embedding_size, model_channels, act_fn="silu")
        self.cond_proj = nn.Linear(condition_channels, model_channels, bias=True)
        self.proj_in = nn.Linear(in_channels, model_channels, bias=True)
        self.res_blocks = nn.ModuleList([MARResBlock(model_channels, norm_eps) for _ in range(num_res_blocks)])
        # (shift, scale, gate) for every block, then (shift, scale) for the final layer.
        self.adaln_modulation = MARAdaLNModulation(model_channels, num_res_blocks)
        self.norm_out = nn.LayerNorm(model_channels, elementwise_affine=False, eps=norm_eps)
        self.proj_out = nn.Linear(model_channels, out_channels, bias=True)

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The original's initialisation: Xavier linears, N(0, 0.02) timestep MLP, zeroed AdaLN and output."""
        # As in LTH14/mar models/diffloss.py SimpleMLPAdaLN.initialize_weights.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embedding.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embedding.linear_2.weight, std=0.02)
        for layer in (self.adaln_modulation, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def compile(self, *args, **kwargs) -> None:
        r"""
        Compile the head with `torch.compile`: its module call (`forward`, as `nn.Module.compile`) and the entry points
        samplers call instead of `forward` (`embed_condition`, `compute_modulation`, `forward_with_modulation`,
        `forward_with_condition_embedding`), each with the same arguments. Without the latter, `MARPipeline` and
        `ARPipeline` would run the head eagerly. The compiled methods are attributes of this instance; calling
        `compile` again compiles the class's methods anew.
        """
        super().compile(*args, **kwargs)
        for name in self._sampler_methods:
            setattr(self, name, torch.compile(getattr(type(self), name).__get__(self), *args, **kwargs))

    def embed_condition(self, condition: torch.Tensor) -> torch.Tensor:
        """Project the transformer condition (N, D) to (N, model_channels); fixed across the diffusion steps."""
        return self.cond_proj(condition)

    def embed_timestep(self, timestep: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
        """Timestep embedding: (N, model_channels), or (1, model_channels) for one shared timestep."""
        timestep = torch.as_tensor(timestep, device=self.proj_in.weight.device)
        return self.time_embedding(self.time_proj(timestep.reshape(-1)).to(dtype))

    def compute_modulation(self, timestep: torch.Tensor | int, condition_embedding: torch.Tensor) -> torch.Tensor:
        r"""
        The AdaLN modulation of every block for each (timestep, token) pair: `(T, N, (3 * num_res_blocks + 2) * W)`.

        It depends on the timestep and the condition only, not on the noisy sample, so a sampler that knows its
        timesteps can compute it for several steps in one matrix product and call `forward_with_modulation` with one
        step's row. The values are those `forward` computes from the same timestep and condition.

        Args:
            timestep (`torch.Tensor` of shape `(T,)` or `()`, or `int`):
                Integer timesteps (0..999), one modulation per timestep.
            condition_embedding (`torch.Tensor` of shape `(N, model_channels)`):
                `embed_condition(condition)`.
        """
        time_embedding = self.embed_timestep(timestep, condition_embedding.dtype)  # (T, W)
        y = F.silu(time_embedding.unsqueeze(1) + condition_embedding.unsqueeze(0))  # (T, N, W)
        return self.adaln_modulation(y)

    def forward_with_modulation(self, sample: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        r"""
        The denoiser given a precomputed AdaLN modulation (one step's row of `compute_modulation`), which already
        holds the timestep and the condition: `(N, in_channels), (N, M) -> (N, out_channels)`.
        """
        if modulation.shape != (sample.shape[0], self.adaln_modulation.out_features):
            raise ValueError(
                f"`modulation` must have shape ({sample.shape[0]}, {self.adaln_modulation.out_features}) for "
                f"{sample.shape[0]} samples, got {tuple(modulation.shape)}."
            )
        return self._denoise(sample, lambda block: modulation[:, self.adaln_modulation.block_rows[block]])

    def forward_with_condition_embedding(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, condition_embedding: torch.Tensor
    ) -> torch.Tensor:
        r"""
        `forward` given `embed_condition(condition)`, which a sampler computes once for all its diffusion steps:
        `(N, in_channels), (N,) or (), (N, model_channels) -> (N, out_channels)`. Each block's modulation is computed
        just before the block runs, so only one block's is held at a time (the original's memory).
        """
        y = F.silu(self.embed_timestep(timestep, condition_embedding.dtype) + condition_embedding)  # (N, W)
        return self._denoise(sample, lambda block: self.adaln_modulation(y, block=block))

    def _denoise(self, sample: torch.Tensor, block_modulation) -> torch.Tensor:
        """The MLP: `block_modulation(i)` is block `i`'s `(N, 3W)` modulation (`(N, 2W)` for the final layer)."""
        x = self.proj_in(sample)  # (N, W)
        for i, block in enumerate(self.res_blocks):
            shift, scale, gate = block_modulation(i).chunk(3, dim=-1)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, shift, scale, gate)
            else:
                x = block(x, shift, scale, gate)
        shift, scale = block_modulation(len(self.res_blocks)).chunk(2, dim=-1)
        x = self.norm_out(x) * (1 + scale) + shift
        return self.proj_out(x)  # (N, 2C)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        condition: torch.Tensor,
        return_dict: bool = True,
    ) -> MARDiffusionHeadOutput | tuple[torch.Tensor]:
        r"""
        Predict the noise and the variance value of noisy tokens.

        Args:
            sample (`torch.Tensor` of shape `(N, in_channels)`):
                Noisy tokens `x_t`.
            timestep (`torch.Tensor` of shape `(N,)` or `()`, or `int`):
                Integer timesteps of the 1000-step training process (0..999). One shared timestep is embedded once.
            condition (`torch.Tensor` of shape `(N, condition_channels)`):
                The transformer's per-token conditions.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`MARDiffusionHeadOutput`] or a tuple.

        Returns:
            [`MARDiffusionHeadOutput`] or `tuple`: `sample` of shape `(N, out_channels)`, `[eps, v]`.
        """
        output = self.forward_with_condition_embedding(sample, timestep, self.embed_condition(condition))
        if not return_dict:
            return (output,)
        return MARDiffusionHeadOutput(sample=output)
