"""The MAR training objective: random orders, a random mask ratio, label dropout and the per-token diffusion loss.

Numerics follow LTH14/mar `models/mar.py` (`sample_orders`, `random_masking`, `forward_loss`, the label drop in
`forward_mae_encoder`), `models/diffloss.py` (`DiffLoss.forward`) and `diffusion/gaussian_diffusion.py`
(`training_losses` with `LossType.MSE` and learned-range variance, `_vb_terms_bpd`). The networks stay pure functions
of tensors; every random draw of a training step is made here, from `generator` (or torch's global generator).

The loss of one token at timestep `t` with noise `eps`:

    x_t  = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                        (the scheduler's `add_noise`)
    mse  = mean_c (eps - eps_hat)^2
    vb   = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / ln 2           (t > 0; eps_hat frozen, only v learns)
         = -log p(x_0 | x_1) / ln 2 with 1/255 bins                        (t = 0)
    loss = mse + vb, averaged over the masked tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffusers_mar import MARDDPMScheduler, MARDiffusionHead, MARTransformer2DModel, mask_by_order

# As in LTH14/mar models/mar.py: a truncated normal centred at 1.0 (100% masked) with std 0.25.
MASK_RATIO_STD = 0.25


def sample_orders(
    batch_size: int, num_tokens: int, generator: torch.Generator | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """One uniformly random permutation of the token positions per image: `(batch_size, num_tokens)` int64."""
    device = device if device is not None else (generator.device if generator is not None else None)
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    return torch.argsort(noise, dim=1)


def sample_mask_ratio(
    mask_ratio_min: float = 0.7, generator: torch.Generator | None = None, quantile: float | None = None
) -> float:
    """One draw of the mask ratio from the normal N(1, 0.25^2) truncated to `[mask_ratio_min, 1]`.

    The original draws `scipy.stats.truncnorm((mask_ratio_min - 1) / 0.25, 0, loc=1, scale=0.25).rvs(1)`; this is
    the same distribution by inverse-CDF sampling, in float64 (`quantile` fixes the uniform draw, for tests).
    """
    if not 0.0 <= mask_ratio_min <= 1.0:
        raise ValueError(f"`mask_ratio_min` must be in [0, 1]; got {mask_ratio_min}.")
    if quantile is None:
        quantile = torch.rand((), generator=generator, dtype=torch.float64, device=generator and generator.device)
    quantile = torch.as_tensor(quantile, dtype=torch.float64).cpu()
    lower = torch.special.ndtr(torch.tensor((mask_ratio_min - 1.0) / MASK_RATIO_STD, dtype=torch.float64))
    upper = torch.special.ndtr(torch.tensor(0.0, dtype=torch.float64))
    ratio = 1.0 + MASK_RATIO_STD * torch.special.ndtri(lower + quantile * (upper - lower))
    return float(ratio.clamp(mask_ratio_min, 1.0))


def mask_from_orders(orders: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Mask (1 = unknown) of the last `ceil(num_tokens * mask_ratio)` positions of each order: `(B, L)` float.

    The mask itself is sampling's `mask_by_order`; training only chooses how many positions are unknown.
    """
    num_tokens = orders.shape[1]
    # As in LTH14/mar random_masking: the count is computed in float64 (numpy) from the float64 ratio.
    num_masked = int(np.ceil(num_tokens * mask_ratio))
    return mask_by_order(num_masked, orders)


def drop_labels(
    class_labels: torch.Tensor, num_classes: int, drop_prob: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by the unconditional class `num_classes` with probability `drop_prob`.

    The original blends `fake_latent` into the class embedding with a 0/1 mask; selecting the last embedding row,
    which holds `fake_latent`, gives the same forward values and the same gradients.
    """
    if drop_prob <= 0.0:
        return class_labels
    drop = torch.rand(class_labels.shape, generator=generator, device=generator and generator.device)
    drop = drop.to(class_labels.device) < drop_prob
    return torch.where(drop, torch.full_like(class_labels, num_classes), class_labels)


@dataclass
class DiffusionLossTables:
    """float32 copies of the float64 process tables the loss needs (the original casts each gathered value)."""

    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    log_betas: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor

    @classmethod
    def from_scheduler(cls, scheduler: MARDDPMScheduler, device: torch.device | str | None = None):
        # The scheduler's float64 tables of the full 1000-step process (LTH14/mar GaussianDiffusion.__init__).
        tables = scheduler.process_tables()
        return cls(**{name: torch.from_numpy(tables[name]).float().to(device) for name in cls.__dataclass_fields__})

    def gather(self, name: str, timesteps: torch.Tensor) -> torch.Tensor:
        table = getattr(self, name)
        if table.device != timesteps.device:
            table = table.to(timesteps.device)
            setattr(self, name, table)
        return table[timesteps].unsqueeze(-1)  # (N, 1)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    # As in LTH14/mar diffusion/diffusion_utils.py: 8-bit bins of width 2/255 on [-1, 1], open-ended at the edges.
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@dataclass
class DiffusionLossOutput:
    """The scalar loss and its per-row terms `(N,)`: `rows = mse + vb`."""

    loss: torch.Tensor
    rows: torch.Tensor
    mse: torch.Tensor
    vb: torch.Tensor


def diffusion_loss(
    diffusion_head: nn.Module,
    scheduler: MARDDPMScheduler,
    target: torch.Tensor,
    condition: torch.Tensor,
    mask: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    tables: DiffusionLossTables | None = None,
) -> DiffusionLossOutput:
    r"""
    The per-token diffusion loss (MSE on the noise plus the variational bound of the learned variance).

    Args:
        diffusion_head (`MARDiffusionHead`):
            The denoiser; called as `diffusion_head(x_t, timesteps, condition, return_dict=False)`.
        scheduler (`MARDDPMScheduler`):
            The training process: `add_noise` and the float64 tables.
        target (`torch.Tensor` of shape `(N, C)`):
            Clean tokens `x_0`.
        condition (`torch.Tensor` of shape `(N, condition_channels)`):
            The transformer's condition for each row.
        mask (`torch.Tensor` of shape `(N,)`, *optional*):
            Rows with 1 enter the mean (`sum(rows * mask) / sum(mask)`); all rows if not given.
        timesteps (`torch.LongTensor` of shape `(N,)`, *optional*):
            Timesteps in `[0, num_train_timesteps)`; drawn uniformly with `generator` if not given.
        noise (`torch.Tensor` of shape `(N, C)`, *optional*):
            Standard normal noise; drawn with `generator` if not given.
        generator (`torch.Generator`, *optional*):
            Source of the draws; torch's global generator if not given.
        tables (`DiffusionLossTables`, *optional*):
            Precomputed tables of `scheduler`; built if not given.

    Returns:
        `DiffusionLossOutput`: `loss` (scalar), `rows`, `mse` and `vb` (`(N,)`, float32).
    """
    num_rows, channels = target.shape
    device = target.device
    if timesteps is None:
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (num_rows,), generator=generator, device=device
        )
    if noise is None:
        noise = torch.randn(target.shape, generator=generator, device=device, dtype=target.dtype)
    tables = tables if tables is not None else DiffusionLossTables.from_scheduler(scheduler, device)
    timesteps = timesteps.to(device)

    # 1. Noise the targets and predict [eps, v]
    x_t = scheduler.add_noise(target, noise, timesteps)
    model_output = diffusion_head(x_t, timesteps, condition, return_dict=False)[0].float()  # (N, 2C)
    eps, v = model_output[:, :channels], model_output[:, channels:]
    target, x_t, noise = target.float(), x_t.float(), noise.float()

    # 2. MSE on the noise
    mse = ((noise - eps) ** 2).mean(dim=1)

    # 3. Variational bound of the learned variance; eps is frozen so that only v learns from it
    # As in LTH14/mar gaussian_diffusion.py training_losses (frozen_out) and _vb_terms_bpd.
    coef1 = tables.gather("posterior_mean_coef1", timesteps)
    coef2 = tables.gather("posterior_mean_coef2", timesteps)
    min_log = tables.gather("posterior_log_variance_clipped", timesteps)
    true_mean = coef1 * target + coef2 * x_t
    pred_x0 = (
        tables.gather("sqrt_recip_alphas_cumprod", timesteps) * x_t
        - tables.gather("sqrt_recipm1_alphas_cumprod", timesteps) * eps.detach()
    )
    model_mean = coef1 * pred_x0 + coef2 * x_t
    frac = (v + 1) / 2
    model_log_variance = frac * tables.gather("log_betas", timesteps) + (1 - frac) * min_log
    kl = _normal_kl(true_mean, min_log, model_mean, model_log_variance).mean(dim=1) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(target, model_mean, 0.5 * model_log_variance)
    vb = torch.where(timesteps == 0, nll.mean(dim=1) / math.log(2.0), kl)

    # 4. Mean over the rows that count
    rows = mse + vb
    loss = rows.mean() if mask is None else (rows * mask).sum() / mask.sum()
    return DiffusionLossOutput(loss=loss, rows=rows, mse=mse, vb=vb)


@dataclass
class MARLossOutput:
    """The scalar loss of a batch and what it was computed from (for logging and tests)."""

    loss: torch.Tensor
    mask: torch.Tensor
    class_labels: torch.Tensor
    mask_ratio: float
    diffusion: DiffusionLossOutput


def mar_loss(
    transformer: MARTransformer2DModel,
    diffusion_head: MARDiffusionHead,
    scheduler: MARDDPMScheduler,
    tokens: torch.Tensor,
    class_labels: torch.Tensor,
    mask_ratio_min: float = 0.7,
    label_drop_prob: float = 0.1,
    diffusion_batch_mul: int = 4,
    orders: torch.Tensor | None = None,
    mask_ratio: float | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    tables: DiffusionLossTables | None = None,
) -> MARLossOutput:
    r"""
    The MAR training loss of one batch, as LTH14/mar `MAR.forward`.

    Args:
        transformer (`MARTransformer2DModel`):
            The encoder-decoder; its train/eval mode controls dropout.
        diffusion_head (`MARDiffusionHead`):
            The per-token denoiser.
        scheduler (`MARDDPMScheduler`):
            The training diffusion process.
        tokens (`torch.Tensor` of shape `(batch, num_tokens, token_dim)`):
            Clean tokens (`transformer.patchify` of scaled latents or of pixels in `[-1, 1]`).
        class_labels (`torch.LongTensor` of shape `(batch,)`):
            Class labels in `[0, num_classes)`.
        mask_ratio_min (`float`, *optional*, defaults to 0.7):
            Lower end of the truncated-normal mask ratio.
        label_drop_prob (`float`, *optional*, defaults to 0.1):
            Probability of replacing a label by the unconditional class (the original applies it in train mode only;
            pass 0 to disable).
        diffusion_batch_mul (`int`, *optional*, defaults to 4):
            Each token enters the diffusion loss this many times, with independent timesteps and noise.
        orders (`torch.LongTensor` of shape `(batch, num_tokens)`, *optional*):
            Random orders; drawn if not given. The last `ceil(num_tokens * mask_ratio)` entries are masked (the
            generation order of `orders.py`; `orders_from_original` converts an order of LTH14/mar).
        mask_ratio (`float`, *optional*):
            The batch's mask ratio; drawn once per batch if not given.
        timesteps (`torch.LongTensor` of shape `(batch * num_tokens * diffusion_batch_mul,)`, *optional*):
            Timesteps of the rows, laid out `[all tokens] x diffusion_batch_mul`; drawn if not given.
        noise (`torch.Tensor` of shape `(batch * num_tokens * diffusion_batch_mul, token_dim)`, *optional*):
            Noise of the rows, same layout; drawn if not given.
        generator (`torch.Generator`, *optional*):
            Source of every draw; torch's global generator if not given.
        tables (`DiffusionLossTables`, *optional*):
            Precomputed tables of `scheduler`.

    Returns:
        `MARLossOutput`.
    """
    batch_size, num_tokens, token_dim = tokens.shape
    if diffusion_batch_mul < 1:
        raise ValueError(f"`diffusion_batch_mul` must be >= 1; got {diffusion_batch_mul}.")
    num_classes = transformer.config.num_classes
    if class_labels.shape != (batch_size,) or bool(((class_labels < 0) | (class_labels >= num_classes)).any()):
        raise ValueError(f"`class_labels` must be ({batch_size},) labels in [0, {num_classes}); got {class_labels}.")

    # 1. Random orders and one mask ratio for the batch; the last entries of each order are masked
    if orders is None:
        orders = sample_orders(batch_size, num_tokens, generator=generator, device=tokens.device)
    if mask_ratio is None:
        mask_ratio = sample_mask_ratio(mask_ratio_min, generator=generator)
    mask = mask_from_orders(orders.to(tokens.device), mask_ratio)  # (B, L)

    # 2. Label dropout to the unconditional class
    class_labels = drop_labels(class_labels, num_classes, label_drop_prob, generator=generator)

    # 3. Per-token conditions
    condition = transformer(tokens, mask, class_labels, return_dict=False)[0]  # (B, L, D)

    # 4. Diffusion loss on the masked tokens, every token repeated `diffusion_batch_mul` times
    # As in LTH14/mar forward_loss: rows are [all B * L tokens] x mul.
    target = tokens.reshape(batch_size * num_tokens, token_dim).detach().repeat(diffusion_batch_mul, 1)
    condition = condition.reshape(batch_size * num_tokens, -1).repeat(diffusion_batch_mul, 1)
    row_mask = mask.reshape(batch_size * num_tokens).repeat(diffusion_batch_mul)
    diffusion = diffusion_loss(
        diffusion_head,
        scheduler,
        target,
        condition,
        mask=row_mask,
        timesteps=timesteps,
        noise=noise,
        generator=generator,
        tables=tables,
    )
    return MARLossOutput(
        loss=diffusion.loss, mask=mask, class_labels=class_labels, mask_ratio=mask_ratio, diffusion=diffusion
    )


class MARTrainingModule(nn.Module):
    """The transformer and the diffusion head under one module whose `forward` returns the MAR loss.

    A training construct only (the pipeline's models stay pure functions): `accelerator.prepare` wraps it once, so
    distributed data parallel synchronises both networks, as the original's single `MAR` module.
    """

    def __init__(
        self,
        transformer: MARTransformer2DModel,
        diffusion_head: MARDiffusionHead,
        scheduler: MARDDPMScheduler,
        mask_ratio_min: float = 0.7,
        label_drop_prob: float = 0.1,
        diffusion_batch_mul: int = 4,
    ):
        super().__init__()
        self.transformer = transformer
        self.diffusion_head = diffusion_head
        self.scheduler = scheduler
        self.mask_ratio_min = mask_ratio_min
        self.label_drop_prob = label_drop_prob
        self.diffusion_batch_mul = diffusion_batch_mul
        self.tables = DiffusionLossTables.from_scheduler(scheduler)

    def forward(self, latents: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """The scalar loss of a batch of latents (or pixels) `(B, C, H, W)`; labels drop in train mode only."""
        output = mar_loss(
            self.transformer,
            self.diffusion_head,
            self.scheduler,
            self.transformer.patchify(latents),
            class_labels,
            mask_ratio_min=self.mask_ratio_min,
            label_drop_prob=self.label_drop_prob if self.training else 0.0,
            diffusion_batch_mul=self.diffusion_batch_mul,
            tables=self.tables,
        )
        return output.loss


def weight_decay_param_groups(
    transformer: nn.Module, diffusion_head: nn.Module, weight_decay: float
) -> list[dict[str, object]]:
    """AdamW groups as LTH14/mar `util/misc.py` `add_weight_decay`: no decay on 1-D tensors, biases and the head.

    Everything else decays, including the position embeddings, the class embedding (with the unconditional row, the
    original's `fake_latent`) and the mask token.
    """
    decay, no_decay = [], []
    for name, param in transformer.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    no_decay.extend(param for param in diffusion_head.parameters() if param.requires_grad)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
