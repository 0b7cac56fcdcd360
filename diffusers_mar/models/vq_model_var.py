"""VARVQModel: VAR's multi-scale residual VQ-VAE (the tokenizer of next-scale prediction).

An image is encoded to a latent map `f` of `patch_nums[-1]` x `patch_nums[-1]` positions, then quantized coarse to
fine: at scale `k` the residual `f - f_hat` is area-downsampled to `patch_nums[k]` x `patch_nums[k]`, each position
takes its nearest codebook entry, and the entries, bicubic-upsampled back to the full size and refined by a 3x3
convolution phi, are added to the partial sum `f_hat`. The decoder turns the last partial sum into the image. The
VAR transformer predicts the indices of one scale at a time from the partial sum of the scales before it
(`teacher_forcing_input` when training, `next_scale_input` when sampling).

Numerics follow FoundationVision/VAR (models/vqvae.py, models/quant.py, models/basic_vae.py); the encoder and
decoder are the LDM vq-f16 ones, built from diffusers' blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder, DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from diffusers_mar.models.loading import StrictLoadingMixin


def official_phi_indices(num_scales: int, share_quant_resi: int) -> list[int]:
    """The phi each scale uses in VAR: the tick nearest to `k / (num_scales - 1)`, in float64 NumPy.

    Two ticks can be equally near in exact arithmetic (scales 2 and 7 of a 10-scale schedule with 4 phi); the
    float64 rounding of `np.linspace` then decides, so the mapping is computed once like this and stored in the
    config. As in FoundationVision/VAR models/quant.py `PhiPartiallyShared` and `PhiNonShared`.
    """
    if share_quant_resi == 1:
        return [0] * num_scales
    count = num_scales if share_quant_resi == 0 else share_quant_resi
    if count == 4:
        ticks = np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count)
    else:
        ticks = np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)
    return [int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) for k in range(num_scales)]


@dataclass
class VARVQEncoderOutput(BaseOutput):
    """
    Output of `VARVQModel.encode`.

    Args:
        indices (`list[torch.LongTensor]`):
            One tensor per scale, of shape `(batch_size, patch_nums[k] ** 2)`: codebook indices in raster order.
        latents (`torch.Tensor` of shape `(batch_size, vq_embed_dim, patch_nums[-1], patch_nums[-1])`):
            The continuous latents that were quantized (`quant_conv` of the encoder output).
    """

    indices: list[torch.LongTensor]
    latents: torch.Tensor


class VARVQEncoder(nn.Module):
    """The LDM encoder: `conv_in` to `ch` channels, one down block per `ch_mult` entry (self-attention after each
    ResNet of the last one), a middle block with self-attention, GroupNorm, SiLU and `conv_out`."""

    def __init__(
        self, in_channels: int, out_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, groups: int
    ):
        super().__init__()
        # Unlike diffusers' `Encoder`, the stem has `ch` channels whatever `ch_mult[0]` is.
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList()
        channels = ch
        for level, mult in enumerate(ch_mult):
            last = level == len(ch_mult) - 1
            self.down_blocks.append(
                get_down_block(
                    "AttnDownEncoderBlock2D" if last else "DownEncoderBlock2D",
                    num_layers=num_res_blocks,
                    in_channels=channels,
                    out_channels=ch * mult,
                    add_downsample=not last,
                    resnet_eps=1e-6,
                    downsample_padding=0,
                    resnet_act_fn="silu",
                    resnet_groups=groups,
                    attention_head_dim=ch * mult,
                    temb_channels=None,
                )
            )
            channels = ch * mult
        self.mid_block = UNetMidBlock2D(
            in_channels=channels,
            resnet_eps=1e-6,
            resnet_act_fn="silu",
            output_scale_factor=1,
            resnet_time_scale_shift="default",
            attention_head_dim=channels,
            resnet_groups=groups,
            temb_channels=None,
        )
        self.conv_norm_out = nn.GroupNorm(num_channels=channels, num_groups=groups, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for down_block in self.down_blocks:
            sample = down_block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class VARVQModel(StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""
    VAR's multi-scale residual VQ-VAE: images in [-1, 1] <-> one map of codebook indices per scale.

    Images go in and come out in [-1, 1], as diffusers' `VQModel` (decoded images are clamped to that range, as in
    VAR). Scale `k` has `patch_nums[k] ** 2` indices in raster order; the partial sum `f_hat` after scale `k` is
    `sum_{j <= k} phi_j(upsample(embed(indices[j])))` at the full latent size `patch_nums[-1]`.

    Parameters:
        in_channels (`int`, *optional*, defaults to 3):
            Channels of the input images.
        out_channels (`int`, *optional*, defaults to 3):
            Channels of the decoded images.
        sample_size (`int`, *optional*, defaults to 256):
            Image side; it must equal `2 ** (len(ch_mult) - 1) * patch_nums[-1]`.
        ch (`int`, *optional*, defaults to 160):
            Base width of the encoder and decoder (VAR's `ch`); level `i` has `ch * ch_mult[i]` channels.
        ch_mult (`tuple[int, ...]`, *optional*, defaults to `(1, 1, 2, 2, 4)`):
            Width multipliers per level; every level but the last halves the resolution (vq-f16: 16x).
        num_res_blocks (`int`, *optional*, defaults to 2):
            ResNet blocks per encoder level (the decoder has one more per level).
        norm_num_groups (`int`, *optional*, defaults to 32):
            Groups of every GroupNorm.
        latent_channels (`int`, *optional*, defaults to 32):
            Channels of the encoder output and decoder input (VAR's `z_channels`).
        num_vq_embeddings (`int`, *optional*, defaults to 4096):
            Codebook size (VAR's `vocab_size`).
        vq_embed_dim (`int`, *optional*):
            Channels of a codebook entry (VAR's `Cvae`); defaults to `latent_channels`.
        beta (`float`, *optional*, defaults to 0.25):
            Commitment loss weight, for training the tokenizer.
        quant_resi (`float`, *optional*, defaults to 0.5):
            The phi mix: `phi(h) = (1 - quant_resi) * h + quant_resi * conv3x3(h)`.
        share_quant_resi (`int`, *optional*, defaults to 4):
            How many phi convolutions the scales share: 0 gives one per scale, 1 a single one, `K` gives `K` spread
            over the scales.
        patch_nums (`tuple[int, ...]`, *optional*, defaults to `(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)`):
            Side of each scale's index map, coarse to fine; `(1, 2, 3, 4, 6, 9, 13, 18, 24, 32)` for 512 px.
        phi_indices (`list[int]`, *optional*):
            The phi of each scale. Computed once as VAR does (`official_phi_indices`, float64) when not given and
            then saved in the config.
    """

    # Group offloading (diffusers' `enable_group_offload`) of the parts the pipelines call outside `forward`: each one
    # loads at its own call, as AutoencoderKL's; `phi` is grouped conv by conv as a ModuleList.
    _group_offload_block_modules = ["encoder", "quant_conv", "embedding", "post_quant_conv", "decoder"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        sample_size: int = 256,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        norm_num_groups: int = 32,
        latent_channels: int = 32,
        num_vq_embeddings: int = 4096,
        vq_embed_dim: int | None = None,
        beta: float = 0.25,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        phi_indices: list[int] | None = None,
    ):
        super().__init__()
        patch_nums = tuple(patch_nums)
        if len(patch_nums) < 2 or any(b <= a for a, b in zip(patch_nums, patch_nums[1:])) or patch_nums[0] < 1:
            raise ValueError(f"`patch_nums` must be at least two increasing positive sides, got {patch_nums}.")
        downsample = 2 ** (len(ch_mult) - 1)
        if sample_size != downsample * patch_nums[-1]:
            raise ValueError(
                f"`sample_size` ({sample_size}) must be 2 ** (len(ch_mult) - 1) * patch_nums[-1] "
                f"= {downsample * patch_nums[-1]}."
            )
        if share_quant_resi < 0:
            raise ValueError(f"`share_quant_resi` must be 0 (one phi per scale) or a count, got {share_quant_resi}.")
        if not 0 < quant_resi <= 1:
            raise ValueError(f"`quant_resi` must be in (0, 1], got {quant_resi}.")
        num_phi = len(patch_nums) if share_quant_resi == 0 else share_quant_resi
        if phi_indices is None:
            self.register_to_config(phi_indices=official_phi_indices(len(patch_nums), share_quant_resi))
        elif len(phi_indices) != len(patch_nums) or not all(0 <= i < num_phi for i in phi_indices):
            raise ValueError(
                f"`phi_indices` must give one phi in [0, {num_phi}) per scale ({len(patch_nums)}), got {phi_indices}."
            )
        vq_embed_dim = vq_embed_dim or latent_channels
        self.patch_nums = patch_nums
        self.phi_indices = list(self.config.phi_indices)
        self.vq_embed_dim = vq_embed_dim

        self.encoder = VARVQEncoder(in_channels, latent_channels, ch, tuple(ch_mult), num_res_blocks, norm_num_groups)
        self.quant_conv = nn.Conv2d(latent_channels, vq_embed_dim, kernel_size=3, stride=1, padding=1)
        self.embedding = nn.Embedding(num_vq_embeddings, vq_embed_dim)  # the codebook
        self.phi = nn.ModuleList([nn.Conv2d(vq_embed_dim, vq_embed_dim, 3, padding=1) for _ in range(num_phi)])
        self.post_quant_conv = nn.Conv2d(vq_embed_dim, latent_channels, kernel_size=3, stride=1, padding=1)
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (len(ch_mult) - 1),
            block_out_channels=tuple(ch * m for m in ch_mult),
            layers_per_block=num_res_blocks,
            norm_num_groups=norm_num_groups,
            act_fn="silu",
        )

    # Checks -----------------------------------------------------------------------------------------------------

    def _check_indices(self, indices: list[torch.Tensor], num_scales: int, name: str = "indices") -> None:
        if not isinstance(indices, (list, tuple)) or len(indices) != num_scales:
            count = len(indices) if isinstance(indices, (list, tuple)) else type(indices).__name__
            raise ValueError(f"`{name}` must be a list of {num_scales} tensors (one per scale), got {count}.")
        batch_size = indices[0].shape[0] if indices[0].ndim else None
        for k, idx in enumerate(indices):
            side = self.patch_nums[k]
            if idx.dtype not in (torch.int64, torch.int32) or tuple(idx.shape) != (batch_size, side * side):
                raise ValueError(
                    f"`{name}[{k}]` must be an integer tensor of shape ({batch_size}, {side * side}), got "
                    f"{idx.dtype} {tuple(idx.shape)}."
                )
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.num_vq_embeddings):
                raise ValueError(
                    f"`{name}[{k}]` holds indices outside [0, {self.config.num_vq_embeddings}): "
                    f"min {int(idx.min())}, max {int(idx.max())}."
                )

    def _check_map(self, tensor: torch.Tensor, side: int, name: str) -> None:
        if tensor.ndim != 4 or tensor.shape[1] != self.vq_embed_dim or tuple(tensor.shape[2:]) != (side, side):
            raise ValueError(
                f"`{name}` must be (batch_size, {self.vq_embed_dim}, {side}, {side}), got {tuple(tensor.shape)}."
            )

    # Codebook and phi -------------------------------------------------------------------------------------------

    @apply_forward_hook
    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        r"""
        Look up the codebook entries of one scale's indices, or mix them with weights (VAR's `more_smooth`).

        Args:
            indices (`torch.LongTensor` of shape `(batch_size, side * side)`, or `torch.Tensor` of shape
            `(batch_size, side * side, num_vq_embeddings)`):
                Codebook indices in raster order, or float weights over the codebook per position (`weights @
                codebook`, as VAR's Gumbel-softmax codes).

        Returns:
            `torch.Tensor` of shape `(batch_size, vq_embed_dim, side, side)`.
        """
        soft = indices.is_floating_point()
        if (
            indices.ndim != (3 if soft else 2)
            or round(indices.shape[1] ** 0.5) ** 2 != indices.shape[1]
            or (soft and indices.shape[2] != self.config.num_vq_embeddings)
        ):
            raise ValueError(
                "`indices` must be (batch_size, side * side) integers or (batch_size, side * side, "
                f"{self.config.num_vq_embeddings}) weights, got {indices.dtype} {tuple(indices.shape)}."
            )
        side = round(indices.shape[1] ** 0.5)
        if soft:
            # The codebook through the layer's own call (not `.weight`), so that offloading hooks load it.
            codebook = self.embedding(torch.arange(self.config.num_vq_embeddings, device=indices.device))  # (V, C)
            entries = indices @ codebook.to(indices.dtype).unsqueeze(0)  # (B, n, C), as VAR's `@ weight.unsqueeze(0)`
        else:
            entries = self.embedding(indices)  # (B, n, C)
        return entries.transpose(1, 2).reshape(indices.shape[0], self.vq_embed_dim, side, side)

    def apply_phi(self, hidden_states: torch.Tensor, scale_index: int) -> torch.Tensor:
        """`phi_k(h) = (1 - quant_resi) h + quant_resi conv3x3(h)` with the phi of scale `scale_index`."""
        ratio = self.config.quant_resi
        conv = self.phi[self.phi_indices[scale_index]]
        return hidden_states * (1 - ratio) + conv(hidden_states) * ratio

    def _upsampled_residual(self, embeddings: torch.Tensor, scale_index: int) -> torch.Tensor:
        """phi of the scale's embeddings bicubic-upsampled to the full latent size (the last scale is not resized)."""
        full = self.patch_nums[-1]
        if scale_index != len(self.patch_nums) - 1:
            embeddings = F.interpolate(embeddings, size=(full, full), mode="bicubic")
        return self.apply_phi(embeddings, scale_index)

    # Encoding ---------------------------------------------------------------------------------------------------

    def _latents(self, images: torch.Tensor, name: str) -> torch.Tensor:
        size, channels = self.config.sample_size, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != channels or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"`{name}` must be (batch_size, {channels}, {size}, {size}), got {tuple(images.shape)}.")
        return self.quant_conv(self.encoder(images))

    def quantize(self, latents: torch.Tensor) -> tuple[list[torch.LongTensor], list[torch.Tensor]]:
        r"""
        Multi-scale residual quantization of continuous latents (VAR's `f_to_idxBl_or_fhat`).

        Args:
            latents (`torch.Tensor` of shape `(batch_size, vq_embed_dim, patch_nums[-1], patch_nums[-1])`):
                The output of `quant_conv`.

        Returns:
            `tuple[list[torch.LongTensor], list[torch.Tensor]]`: the indices of each scale `(batch_size, side ** 2)`
            and the partial sum `f_hat` after each scale (full latent size).
        """
        self._check_map(latents, self.patch_nums[-1], "latents")
        batch_size, channels = latents.shape[:2]
        # The codebook through the layer's own call (not `.weight`), so that offloading hooks load it.
        codebook = self.embedding(torch.arange(self.config.num_vq_embeddings, device=latents.device)).float()
        codebook_sq = codebook.square().sum(dim=1)  # (V,)
        rest = latents.detach().clone()
        f_hat = torch.zeros_like(rest)
        indices, partial_sums = [], []
        for k, side in enumerate(self.patch_nums):
            last = k == len(self.patch_nums) - 1
            z = rest if last else F.interpolate(rest, size=(side, side), mode="area")
            z = z.permute(0, 2, 3, 1).reshape(-1, channels).float()  # (B * side * side, C)
            # As in VAR models/quant.py: |z|^2 + |e|^2 - 2 z.e, first index on ties.
            distances = z.square().sum(dim=1, keepdim=True) + codebook_sq
            distances.addmm_(z, codebook.T, alpha=-2, beta=1)
            idx = distances.argmin(dim=1).view(batch_size, side * side)
            h = self._upsampled_residual(self.embed(idx), k)
            f_hat = f_hat + h
            rest = rest - h
            indices.append(idx)
            partial_sums.append(f_hat)
        return indices, partial_sums

    @apply_forward_hook
    def encode(self, images: torch.Tensor, return_dict: bool = True) -> VARVQEncoderOutput | tuple:
        r"""
        Encode images to the codebook indices of every scale.

        Args:
            images (`torch.Tensor` of shape `(batch_size, in_channels, sample_size, sample_size)`):
                Images in [-1, 1].
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`VARVQEncoderOutput`] instead of a tuple `(indices, latents)`.

        Returns:
            [`VARVQEncoderOutput`] or `tuple`: the indices of every scale and the continuous latents.
        """
        latents = self._latents(images, "images")
        indices, _ = self.quantize(latents)
        if not return_dict:
            return (indices, latents)
        return VARVQEncoderOutput(indices=indices, latents=latents)

    # Partial sums, for the transformer ----------------------------------------------------------------------------

    def partial_sums(self, indices: list[torch.LongTensor]) -> list[torch.Tensor]:
        r"""
        The partial sum `f_hat` after each scale, at the full latent size (VAR's `embed_to_fhat`).

        Args:
            indices (`list[torch.LongTensor]`):
                One `(batch_size, patch_nums[k] ** 2)` tensor per scale.

        Returns:
            `list[torch.Tensor]`: one `(batch_size, vq_embed_dim, patch_nums[-1], patch_nums[-1])` tensor per scale.
        """
        self._check_indices(indices, len(self.patch_nums))
        f_hat, sums = 0, []
        for k, idx in enumerate(indices):
            f_hat = f_hat + self._upsampled_residual(self.embed(idx), k)
            sums.append(f_hat)
        return sums

    def teacher_forcing_input(self, indices: list[torch.LongTensor]) -> torch.Tensor:
        r"""
        The transformer's training input: for each scale after the first, the partial sum of the scales before it,
        area-downsampled to that scale's side (VAR's `idxBl_to_var_input`).

        Args:
            indices (`list[torch.LongTensor]`):
                One `(batch_size, patch_nums[k] ** 2)` tensor per scale; the last scale's may be left out (it is not
                used).

        Returns:
            `torch.Tensor` of shape `(batch_size, sum(patch_nums[1:] ** 2), vq_embed_dim)`, scales in order, each in
            raster order.
        """
        num_scales = len(self.patch_nums)
        if not isinstance(indices, (list, tuple)) or len(indices) not in (num_scales, num_scales - 1):
            count = len(indices) if isinstance(indices, (list, tuple)) else type(indices).__name__
            raise ValueError(f"`indices` must be a list of {num_scales} or {num_scales - 1} tensors, got {count}.")
        self._check_indices(indices, len(indices))
        batch_size = indices[0].shape[0]
        f_hat, inputs = 0, []
        for k in range(num_scales - 1):
            f_hat = f_hat + self._upsampled_residual(self.embed(indices[k]), k)
            side = self.patch_nums[k + 1]
            next_map = F.interpolate(f_hat, size=(side, side), mode="area")
            inputs.append(next_map.reshape(batch_size, self.vq_embed_dim, -1).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    @apply_forward_hook
    def next_scale_input(
        self, scale_index: int, f_hat: torch.Tensor, embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""
        One sampling step: add scale `scale_index` to the partial sum and give the next scale's input map (VAR's
        `get_next_autoregressive_input`, without its in-place update).

        Args:
            scale_index (`int`):
                The scale just sampled, 0 to `len(patch_nums) - 1`.
            f_hat (`torch.Tensor` of shape `(batch_size, vq_embed_dim, patch_nums[-1], patch_nums[-1])`):
                The partial sum of the scales before it (zeros before the first).
            embeddings (`torch.Tensor` of shape `(batch_size, vq_embed_dim, side, side)`):
                The scale's codebook entries (`embed(indices)`, or a soft mix of entries), `side =
                patch_nums[scale_index]`.

        Returns:
            `tuple[torch.Tensor, torch.Tensor | None]`: the new partial sum and its area-downsampling to
            `patch_nums[scale_index + 1]` (`None` after the last scale).
        """
        if not 0 <= scale_index < len(self.patch_nums):
            raise ValueError(f"`scale_index` must be in [0, {len(self.patch_nums)}), got {scale_index}.")
        self._check_map(f_hat, self.patch_nums[-1], "f_hat")
        self._check_map(embeddings, self.patch_nums[scale_index], "embeddings")
        f_hat = f_hat + self._upsampled_residual(embeddings, scale_index)
        if scale_index == len(self.patch_nums) - 1:
            return f_hat, None
        side = self.patch_nums[scale_index + 1]
        return f_hat, F.interpolate(f_hat, size=(side, side), mode="area")

    # Decoding ---------------------------------------------------------------------------------------------------

    @apply_forward_hook
    def decode_latents(self, f_hat: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        r"""
        Decode a partial sum to images (VAR's `fhat_to_img`).

        Args:
            f_hat (`torch.Tensor` of shape `(batch_size, vq_embed_dim, patch_nums[-1], patch_nums[-1])`):
                Quantized latents (the last partial sum).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`~models.autoencoders.vae.DecoderOutput`] instead of a tuple.

        Returns:
            [`~models.autoencoders.vae.DecoderOutput`] or `tuple`: images in [-1, 1] (clamped).
        """
        self._check_map(f_hat, self.patch_nums[-1], "f_hat")
        images = self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)
        if not return_dict:
            return (images,)
        return DecoderOutput(sample=images)

    @apply_forward_hook
    def decode(self, indices: list[torch.LongTensor], return_dict: bool = True) -> DecoderOutput | tuple:
        r"""
        Decode the indices of every scale to images (VAR's `idxBl_to_img(..., same_shape=True, last_one=True)`).

        Args:
            indices (`list[torch.LongTensor]`):
                One `(batch_size, patch_nums[k] ** 2)` tensor per scale.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`~models.autoencoders.vae.DecoderOutput`] instead of a tuple.

        Returns:
            [`~models.autoencoders.vae.DecoderOutput`] or `tuple`: images in [-1, 1] (clamped).
        """
        return self.decode_latents(self.partial_sums(indices)[-1], return_dict=return_dict)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        r"""
        Reconstruct images: encode, quantize over every scale and decode (VAR's `img_to_reconstructed_img`).

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, sample_size, sample_size)`):
                Images in [-1, 1].
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`~models.autoencoders.vae.DecoderOutput`] instead of a tuple.

        Returns:
            [`~models.autoencoders.vae.DecoderOutput`] or `tuple`: the reconstruction in [-1, 1].
        """
        _, partial_sums = self.quantize(self._latents(sample, "sample"))
        return self.decode_latents(partial_sums[-1], return_dict=return_dict)
