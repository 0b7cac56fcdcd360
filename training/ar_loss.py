"""The causal AR training objective: orders (raster, random, or RAR's annealing), teacher forcing, Diffusion Loss.

As the paper's Table 1 AR rows (LTH14/mar issues #34 and #72): the class token starts the sequence, every position
is predicted in one causal pass (teacher forcing), and MAR's per-token diffusion loss is taken on every token, each
repeated `diffusion_batch_mul` times. With `order="anneal"`, each image's order is a random permutation with
probability `r` and raster otherwise; `r` is 1 before `anneal_start` (a fraction of training), falls linearly to 0
at `anneal_end`, and stays 0 after (RAR, Yu et al. 2024). Every random draw is made here, from `generator` (or torch's
global generator), the same number of draws whatever `r` is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffusers_mar import ARTransformer2DModel, MARDDPMScheduler, MARDiffusionHead
from training.mar_loss import DiffusionLossOutput, DiffusionLossTables, diffusion_loss, drop_labels, sample_orders

AR_ORDERS = ("raster", "random", "anneal")


def random_order_probability(order: str, progress: float, anneal_start: float = 0.0, anneal_end: float = 1.0) -> float:
    """Probability that an image trains in a random order at `progress` (fraction of training done, in [0, 1])."""
    if order not in AR_ORDERS:
        raise ValueError(f"`order` must be one of {AR_ORDERS}; got {order!r}.")
    if not 0.0 <= anneal_start <= anneal_end <= 1.0:
        raise ValueError(f"Need 0 <= anneal_start <= anneal_end <= 1; got {anneal_start} and {anneal_end}.")
    if order != "anneal":
        return 1.0 if order == "random" else 0.0
    if progress < anneal_start:
        return 1.0
    if progress >= anneal_end:
        return 0.0
    return 1.0 - (progress - anneal_start) / (anneal_end - anneal_start)


def sample_ar_orders(
    batch_size: int,
    num_tokens: int,
    random_prob: float,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """`(batch_size, num_tokens)` orders: per image a random permutation with probability `random_prob`, else raster.
    Draws the permutations and the coin flips whatever `random_prob` is, so the random stream does not depend on it."""
    random_orders = sample_orders(batch_size, num_tokens, generator=generator, device=device)
    coins = torch.rand(batch_size, generator=generator, device=random_orders.device) < random_prob
    raster = torch.arange(num_tokens, device=random_orders.device).expand(batch_size, -1)
    return torch.where(coins[:, None], random_orders, raster)


@dataclass
class ARLossOutput:
    """The scalar loss of a batch and what it was computed from (for logging and tests)."""

    loss: torch.Tensor
    orders: torch.Tensor
    class_labels: torch.Tensor
    diffusion: DiffusionLossOutput


def ar_loss(
    transformer: ARTransformer2DModel,
    diffusion_head: MARDiffusionHead,
    scheduler: MARDDPMScheduler,
    tokens: torch.Tensor,
    class_labels: torch.Tensor,
    random_prob: float = 1.0,
    label_drop_prob: float = 0.1,
    diffusion_batch_mul: int = 4,
    orders: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    tables: DiffusionLossTables | None = None,
) -> ARLossOutput:
    r"""
    The causal AR training loss of one batch: teacher forcing over every position, Diffusion Loss on every token.

    Args:
        transformer (`ARTransformer2DModel`):
            The causal transformer; its train/eval mode controls dropout.
        diffusion_head (`MARDiffusionHead`):
            The per-token denoiser.
        scheduler (`MARDDPMScheduler`):
            The training diffusion process.
        tokens (`torch.Tensor` of shape `(batch, num_tokens, token_dim)`):
            Clean tokens (`transformer.patchify` of scaled latents or of pixels in `[-1, 1]`).
        class_labels (`torch.LongTensor` of shape `(batch,)`):
            Class labels in `[0, num_classes)`.
        random_prob (`float`, *optional*, defaults to 1.0):
            Probability of a random order per image (else raster); see `random_order_probability`.
        label_drop_prob (`float`, *optional*, defaults to 0.1):
            Probability of replacing a label by the unconditional class.
        diffusion_batch_mul (`int`, *optional*, defaults to 4):
            Each token enters the diffusion loss this many times, with independent timesteps and noise.
        orders (`torch.LongTensor` of shape `(batch, num_tokens)`, *optional*):
            Orders; drawn with `sample_ar_orders` if not given.
        timesteps (`torch.LongTensor` of shape `(batch * num_tokens * diffusion_batch_mul,)`, *optional*):
            Timesteps of the rows, laid out `[all tokens] x diffusion_batch_mul`; drawn if not given.
        noise (`torch.Tensor` of shape `(batch * num_tokens * diffusion_batch_mul, token_dim)`, *optional*):
            Noise of the rows, same layout; drawn if not given.
        generator (`torch.Generator`, *optional*):
            Source of every draw; torch's global generator if not given.
        tables (`DiffusionLossTables`, *optional*):
            Precomputed tables of `scheduler`.

    Returns:
        `ARLossOutput`.
    """
    batch_size, num_tokens, token_dim = tokens.shape
    if diffusion_batch_mul < 1:
        raise ValueError(f"`diffusion_batch_mul` must be >= 1; got {diffusion_batch_mul}.")
    if not 0.0 <= random_prob <= 1.0:
        raise ValueError(f"`random_prob` must be in [0, 1]; got {random_prob}.")
    num_classes = transformer.config.num_classes
    if class_labels.shape != (batch_size,) or bool(((class_labels < 0) | (class_labels >= num_classes)).any()):
        raise ValueError(f"`class_labels` must be ({batch_size},) labels in [0, {num_classes}); got {class_labels}.")

    # 1. Orders, label dropout
    if orders is None:
        orders = sample_ar_orders(batch_size, num_tokens, random_prob, generator=generator, device=tokens.device)
    class_labels = drop_labels(class_labels, num_classes, label_drop_prob, generator=generator)

    # 2. Every position's condition in one causal pass (teacher forcing), in raster positions
    condition = transformer(tokens, class_labels, orders.to(tokens.device), return_dict=False)[0]  # (B, L, D)

    # 3. Diffusion loss on every token, each repeated `diffusion_batch_mul` times (rows: [all B * L] x mul)
    target = tokens.reshape(batch_size * num_tokens, token_dim).detach().repeat(diffusion_batch_mul, 1)
    condition = condition.reshape(batch_size * num_tokens, -1).repeat(diffusion_batch_mul, 1)
    diffusion = diffusion_loss(
        diffusion_head,
        scheduler,
        target,
        condition,
        timesteps=timesteps,
        noise=noise,
        generator=generator,
        tables=tables,
    )
    return ARLossOutput(loss=diffusion.loss, orders=orders, class_labels=class_labels, diffusion=diffusion)


class ARTrainingModule(nn.Module):
    """The causal transformer and the head under one module whose `forward` returns the AR loss (as
    `MARTrainingModule`). The training loop sets `progress` (fraction of training done) before each step; the
    random-order probability follows from it, so a resumed run anneals exactly as an uninterrupted one."""

    def __init__(
        self,
        transformer: ARTransformer2DModel,
        diffusion_head: MARDiffusionHead,
        scheduler: MARDDPMScheduler,
        order: str = "random",
        anneal_start: float = 0.0,
        anneal_end: float = 1.0,
        label_drop_prob: float = 0.1,
        diffusion_batch_mul: int = 4,
    ):
        super().__init__()
        random_order_probability(order, 0.0, anneal_start, anneal_end)  # checks the arguments
        self.transformer = transformer
        self.diffusion_head = diffusion_head
        self.scheduler = scheduler
        self.order = order
        self.anneal_start = anneal_start
        self.anneal_end = anneal_end
        self.label_drop_prob = label_drop_prob
        self.diffusion_batch_mul = diffusion_batch_mul
        self.progress = 0.0
        self.tables = DiffusionLossTables.from_scheduler(scheduler)

    @property
    def random_prob(self) -> float:
        return random_order_probability(self.order, self.progress, self.anneal_start, self.anneal_end)

    def forward(self, latents: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """The scalar loss of a batch of latents (or pixels) `(B, C, H, W)`; labels drop in train mode only."""
        output = ar_loss(
            self.transformer,
            self.diffusion_head,
            self.scheduler,
            self.transformer.patchify(latents),
            class_labels,
            random_prob=self.random_prob,
            label_drop_prob=self.label_drop_prob if self.training else 0.0,
            diffusion_batch_mul=self.diffusion_batch_mul,
            tables=self.tables,
        )
        return output.loss
